//! Loading the eBPF object, attaching its programs to the cgroup, pinning maps and links, and
//! taking over from a previous agent without a gap.
//!
//! Maps are pinned by name, so a new agent opens the very maps the old one filled and traffic
//! keeps its backends (or, when their capacity or allocation changed, migrates them: see
//! `migrate`). Links are pinned per generation: a new agent attaches its programs
//! first (cgroup links run side by side; the second program sees an already translated
//! destination and leaves it alone) and only then retires the links of older generations.
use std::{
    fs::File,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::PinnedLink},
};
use proxy_common::{map_table, program};
use tracing::{info, warn};

use super::{
    error::LoadError,
    migrate::{self, Migration},
    north_south::{self, NorthSouth},
    pins::{PinLayout, pin_link},
    sizing::Capacities,
};

fn create_dir(path: &Path) -> Result<(), LoadError> {
    std::fs::create_dir_all(path).map_err(|source| LoadError::PinDir {
        path: path.to_owned(),
        source,
    })
}

/// aya-log's level global in the eBPF object (`aya_log::LEVEL`): 0 turns logging off.
const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// Loads the object with every map pinned and sized as `capacities` says. Pinned maps that
/// match are adopted; those with another capacity or allocation are migrated (see
/// [`migrate`]: the returned [`Migration`] is finished around the switch of links); those
/// with another layout are refused before anything is loaded. `log_level` is the highest
/// aya-log level the programs log at (0: none; see `BpfLogLevel`).
pub fn load_object(
    object: &[u8],
    pins: &PinLayout,
    capacities: &Capacities,
    log_level: u8,
) -> Result<(Ebpf, Migration), LoadError> {
    if object.is_empty() {
        return Err(LoadError::NoObject);
    }
    create_dir(&pins.maps_dir())?;
    create_dir(&pins.links_dir())?;
    let check = migrate::check(pins, capacities)?;
    migrate::clear_staging(pins)?;
    if !check.is_empty() {
        create_dir(&migrate::staging_dir(pins))?;
    }
    let mut loader = EbpfLoader::new();
    for spec in map_table::pinned() {
        loader.map_max_entries(spec.name, capacities.of(spec));
        loader.map_pin_path(spec.name, check.pin_path(pins, spec));
    }
    // Read-only once loaded: the verifier prunes the logging of levels that are off.
    loader.override_global(LOG_LEVEL_GLOBAL, &log_level, true);
    let ebpf = match loader.load(object) {
        Ok(ebpf) => ebpf,
        Err(error) => {
            // New maps staged for a migration go; the old pins were not touched.
            let _ = migrate::clear_staging(pins);
            return Err(LoadError::Object(error));
        }
    };
    let migration = check.migrate(pins).inspect_err(|_| {
        // Maps not yet in place go; pins already replaced hold complete copies.
        let _ = migrate::clear_staging(pins);
    })?;
    Ok((ebpf, migration))
}

/// A new, unique generation name for this agent's links.
fn new_generation() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{nanos}-{}", std::process::id())
}

/// Attaches the socket hooks to the cgroup and pins their links, and loads the TC ingress
/// program (the [`north_south::InterfaceFollower`] attaches it); returns the generation.
pub fn attach_all(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    cgroup: &Path,
    north_south: &NorthSouth,
) -> Result<String, LoadError> {
    let cgroup_dir = File::open(cgroup).map_err(|source| LoadError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let generation = new_generation();
    let mut pinned = Vec::new();
    let result = (|| {
        // Before the hooks run: they must know the host from their first call.
        super::sock_config::write(ebpf)?;
        // The two hook types have no common attach trait in aya: one body for both.
        macro_rules! attach_to_cgroup {
            ($kind:ty, $name:expr) => {{
                let name = $name;
                let program: &mut $kind = ebpf
                    .program_mut(name)
                    .ok_or(LoadError::MissingProgram { name })?
                    .try_into()
                    .map_err(LoadError::program(name, "type check"))?;
                program
                    .load()
                    .map_err(LoadError::program(name, "loading"))?;
                let id = program
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(LoadError::program(name, "attaching"))?;
                let link = program
                    .take_link(id)
                    .map_err(LoadError::program(name, "taking its link"))?;
                pinned.push(pin_link(name, link, pins.link(name, &generation))?);
            }};
        }
        for name in program::SOCK_ADDR {
            attach_to_cgroup!(CgroupSockAddr, name);
        }
        attach_to_cgroup!(CgroupSock, program::SOCK_RELEASE);
        north_south::write_config(ebpf, north_south)?;
        north_south::load(ebpf, north_south.xdp)
    })();
    match result {
        Ok(()) => {}
        Err(error) => {
            // Nothing half-applied: detach what this attempt attached; older links stay.
            for link in pinned {
                if let Err(unpin) = link.unpin() {
                    warn!("cannot unpin a link of the failed attach: {unpin}");
                }
            }
            return Err(error);
        }
    }
    info!(cgroup = %cgroup.display(), %generation, "socket hooks attached");
    Ok(generation)
}

/// Detaches the links of every generation but `keep` (all of them with `None`).
pub fn retire_links(pins: &PinLayout, keep: Option<&str>) -> usize {
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return 0;
    };
    let mut retired = 0;
    for path in entries.filter_map(Result::ok).map(|entry| entry.path()) {
        if keep.is_some_and(|generation| PinLayout::is_generation(&path, generation)) {
            continue;
        }
        // Removing the last pin (and dropping our fd) detaches the link.
        let outcome = match PinnedLink::from_pin(&path) {
            Ok(link) => link.unpin().map(drop).map_err(|error| error.to_string()),
            Err(error) => {
                std::fs::remove_file(&path).map_err(|remove| format!("{error}; {remove}"))
            }
        };
        match outcome {
            Ok(()) => retired += 1,
            Err(error) => warn!(path = %path.display(), "cannot retire link: {error}"),
        }
    }
    retired
}

/// Detaches the links of one generation (a start that failed after attaching).
pub fn retire_generation(pins: &PinLayout, generation: &str) {
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return;
    };
    for path in entries.filter_map(Result::ok).map(|entry| entry.path()) {
        if !PinLayout::is_generation(&path, generation) {
            continue;
        }
        let outcome = PinnedLink::from_pin(&path)
            .map_err(|error| error.to_string())
            .and_then(|link| link.unpin().map(drop).map_err(|error| error.to_string()));
        if let Err(error) = outcome {
            warn!(path = %path.display(), "cannot retire link: {error}");
        }
    }
}
