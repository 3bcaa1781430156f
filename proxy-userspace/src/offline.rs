//! The commands that work on the pins, with or without a running agent: `cleanup`, `dump`
//! and `inspect`. They never mount anything.
use anyhow::{Context, Result, bail};
use proxy_common::map_names;

use crate::{
    agent::preflight,
    bpf::{lock, mounts, pins::PinLayout, versions},
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

/// The error for `dump` and `inspect` without pins of this build's layout (naming the
/// versions that are there, which another build of switchyard reads).
fn no_pins(args: &PinArgs) -> anyhow::Error {
    let versions = mounts::find_bpffs(&args.bpffs)
        .map(|root| PinLayout::versions_present(&root))
        .unwrap_or_default();
    if versions.is_empty() {
        anyhow::anyhow!("no pinned Switchyard maps under {}", args.bpffs.display())
    } else {
        let found: Vec<String> = versions.iter().map(|v| format!("v{v}")).collect();
        anyhow::anyhow!(
            "no pinned Switchyard maps of map layout v{} under {}: found {} (an agent of another version; its own switchyard binary reads them)",
            proxy_common::MAP_LAYOUT_VERSION,
            args.bpffs.display(),
            found.join(", ")
        )
    }
}

/// Removes every layout version's links and maps; refuses while an agent runs on them.
pub fn cleanup(args: &PinArgs) -> Result<()> {
    preflight()?;
    let Some(root) = mounts::find_bpffs(&args.bpffs).filter(|root| root.exists()) else {
        println!("nothing to clean up under {}", args.bpffs.display());
        return Ok(());
    };
    if let Some(holder) = lock::held_by(&root) {
        let holder = holder.map_or_else(|| "PID unknown".to_owned(), |pid| format!("PID {pid}"));
        bail!(
            "an agent ({holder}) is running on the pins under {}: stop it first (it would attach again and keep writing)",
            args.bpffs.display()
        );
    }
    let report =
        versions::cleanup(&root).with_context(|| format!("cleaning up {}", root.display()))?;
    if report.versions.is_empty() {
        println!("nothing to clean up under {}", args.bpffs.display());
        return Ok(());
    }
    let found: Vec<String> = report.versions.iter().map(|v| format!("v{v}")).collect();
    println!(
        "removed {} links and {} maps under {} (map layouts {})",
        report.links,
        report.maps,
        args.bpffs.display(),
        found.join(", ")
    );
    Ok(())
}

pub fn dump(args: &PinArgs) -> Result<()> {
    preflight()?;
    let Some(pins) = existing_pins(args) else {
        return Err(no_pins(args));
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
        return Err(no_pins(&args.pins));
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
