//! Pins of other map layout versions: an older agent's after an upgrade, a newer one's after
//! a rollback. They are taken over with no gap, whichever way the version moved:
//! 1. at start, this agent loads and attaches its own programs next to them (the other
//!    version's programs keep translating from their own maps meanwhile);
//! 2. once this agent's first complete sync has filled its maps, the entries the datapath
//!    wrote in the other version's maps (socket reverse NAT, conntrack, affinity) are copied
//!    into this version's where the layout of that map is the same;
//! 3. the other version's links are retired (every program of that version detaches), the
//!    datapath's entries are copied once more, and its maps are unpinned: the kernel frees
//!    them with their last reference, so no program is left reading a frozen map.
//!
//! An agent killed anywhere in between leaves a state the next agent (of either version)
//! finishes the same way.
use proxy_common::map_table::{self, Writer};
use tracing::{info, warn};

use super::{
    loader, migrate,
    pins::{self, PinLayout},
    sizing::MapShape,
};

/// What taking over from other versions did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Takeover {
    /// The versions whose pins were removed.
    pub versions: Vec<u32>,
    pub links: usize,
    pub maps: usize,
    /// Entries carried over from maps the datapath writes.
    pub entries: usize,
}

/// Says which other versions' pins are present (they keep serving until [`take_over`]).
pub fn announce(pins: &PinLayout) -> Vec<u32> {
    let others: Vec<u32> = pins.others().iter().map(|other| other.version).collect();
    for version in &others {
        let direction = if *version < pins.version {
            "older"
        } else {
            "newer"
        };
        info!(
            found = version,
            this = pins.version,
            "found pins of map layout v{version} ({direction}): its programs keep serving until this agent's first sync, then they are retired and its maps removed"
        );
    }
    others
}

/// Copies every entry the datapath wrote in `other`'s maps into this version's maps of the
/// same layout; returns how many were copied.
fn carry_over(pins: &PinLayout, other: &PinLayout) -> usize {
    let Ok(entries) = std::fs::read_dir(other.maps_dir()) else {
        return 0;
    };
    let mut copied = 0;
    for path in entries.filter_map(Result::ok).map(|entry| entry.path()) {
        let file = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned());
        let Some(spec) = file.as_deref().and_then(|name| {
            map_table::pinned().find(|spec| pins::base_name(spec.name) == pins::base_name(name))
        }) else {
            continue;
        };
        if spec.writer != Writer::Datapath || !spec.kind.has_entries() {
            // The agent rewrote its own maps from the cluster state; counters start afresh.
            continue;
        }
        let (Ok(old_shape), Ok(new_shape)) = (
            MapShape::of_pin(&path),
            MapShape::of_pin(&pins.map(spec.name)),
        ) else {
            continue;
        };
        if (old_shape.map_type, old_shape.key_size, old_shape.value_size)
            != (new_shape.map_type, new_shape.key_size, new_shape.value_size)
        {
            info!(
                map = spec.name,
                version = other.version,
                "not carrying over {}: its layout changed between versions",
                spec.name
            );
            continue;
        }
        let (Ok(old), Ok(mut new)) = (migrate::open(&path), migrate::open(&pins.map(spec.name)))
        else {
            continue;
        };
        match migrate::copy(spec, &old, &mut new) {
            Ok(count) => copied += count,
            Err(reason) => warn!(
                map = spec.name,
                "carrying over entries from layout v{}: {reason}", other.version
            ),
        }
    }
    copied
}

/// Removes every map pin of `other` (and what an interrupted migration left), then its
/// directories; returns how many map pins were removed.
pub fn remove_maps(other: &PinLayout) -> std::io::Result<usize> {
    let mut removed = 0;
    for dir in [other.maps_dir(), migrate::staging_dir(other)] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.filter_map(Result::ok) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    for dir in [
        other.links_dir(),
        other.maps_dir(),
        migrate::staging_dir(other),
        other.version_dir(),
    ] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(removed)
}

/// Takes over from every other version's pins (after this agent's first sync).
pub fn take_over(pins: &PinLayout) -> Takeover {
    let mut report = Takeover::default();
    for other in pins.others() {
        report.entries += carry_over(pins, &other);
        report.links += loader::retire_links(&other, None);
        // Entries the other programs made until they detached.
        report.entries += carry_over(pins, &other);
        match remove_maps(&other) {
            Ok(maps) => report.maps += maps,
            Err(error) => warn!(
                version = other.version,
                "cannot remove the pins of layout v{}: {error}", other.version
            ),
        }
        report.versions.push(other.version);
        info!(
            from = other.version,
            to = pins.version,
            "took over from map layout v{}: its links are retired and its maps removed",
            other.version
        );
    }
    report
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links: usize,
    pub maps: usize,
    /// The layout versions whose pins were found.
    pub versions: Vec<u32>,
}

/// Detaches every pinned link and removes every pinned map of every layout version under
/// `root`, then the pin directories.
pub fn cleanup(root: &std::path::Path) -> std::io::Result<CleanupReport> {
    let mut report = CleanupReport::default();
    for version in PinLayout::versions_present(root) {
        let pins = PinLayout::of_version(root, version);
        report.links += loader::retire_links(&pins, None);
        report.maps += remove_maps(&pins)?;
        report.versions.push(version);
    }
    match std::fs::remove_dir(root) {
        Ok(()) => Ok(report),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(report),
        // Something else lives under the root: leave it alone.
        Err(error) if error.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(report),
        Err(error) => Err(error),
    }
}
