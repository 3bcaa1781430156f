//! The commands that work on the pins, with or without a running agent: `cleanup`, `dump`
//! and `inspect`. They never mount anything.
use anyhow::{Context, Result, bail};
use proxy_common::map_names;

use crate::{
    agent::preflight,
    bpf::{loader, mounts, pins::PinLayout},
    cli::{InspectArgs, InspectTarget, OutputFormat, PinArgs},
    datapath::counters::DatapathCounters,
    maps::{KernelMaps, MapWriter},
    reconcile,
    render::{dump, inspect},
};

/// The pins under `--bpffs`, if any; never mounts anything.
pub(crate) fn existing_pins(args: &PinArgs) -> Option<PinLayout> {
    let pins = mounts::find_bpffs(&args.bpffs).map(PinLayout::new);
    pins.filter(|pins| pins.version_dir().exists())
}

pub fn cleanup(args: &PinArgs) -> Result<()> {
    preflight()?;
    let Some(pins) = existing_pins(args) else {
        println!("nothing to clean up under {}", args.bpffs.display());
        return Ok(());
    };
    let report =
        loader::cleanup(&pins).with_context(|| format!("cleaning up {}", pins.root.display()))?;
    println!(
        "removed {} links and {} maps under {}",
        report.links,
        report.maps,
        args.bpffs.display()
    );
    Ok(())
}

pub fn dump(args: &PinArgs) -> Result<()> {
    preflight()?;
    let Some(pins) = existing_pins(args) else {
        bail!("no pinned Switchyard maps under {}", args.bpffs.display());
    };
    let maps = KernelMaps::open_pinned(&pins)?;
    let programmed = reconcile::restore(&maps)?;
    print!("{}", dump::render(&programmed));
    let image = maps.read_image()?;
    print!(
        "{}",
        dump::render_guard(&crate::maps::encode::guard_from_image(&image))
    );
    let counters = DatapathCounters::open_pinned(&pins.map(map_names::METRICS))?;
    print!("{}", dump::render_counters(&counters.read()));
    Ok(())
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    preflight()?;
    let Some(pins) = existing_pins(&args.pins) else {
        bail!(
            "no pinned Switchyard maps under {}",
            args.pins.bpffs.display()
        );
    };
    let maps = KernelMaps::open_pinned(&pins)?;
    let image = maps.read_image()?;
    let (programmed, _) = crate::maps::encode::programmed_from_image(&image);
    let inspection = inspect::read(&pins, image, programmed)?;
    let target = match args.target {
        InspectTarget::Services => "services",
        InspectTarget::Backends => "backends",
        InspectTarget::Conntrack => "conntrack",
        InspectTarget::Stats => "stats",
    };
    match args.output {
        OutputFormat::Table => print!("{}", inspect::render_table(target, &inspection)),
        OutputFormat::Json => println!("{}", inspect::render_json(target, &inspection)),
    }
    Ok(())
}
