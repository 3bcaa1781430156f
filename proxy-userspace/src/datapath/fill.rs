//! How full each map is against its capacity, and warnings well before one is full.
//!
//! Capacities are read from the maps themselves (what the kernel created, so a migrated or
//! adopted map reports its real size). Entries of the maps the agent fills come from its
//! mirror (`SyncStats::map_entries`); the maps the datapath fills (conntrack, socket
//! reverse NAT, affinity) are counted by the periodic upkeep task, never at scrape time, and
//! the counts are kept here.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::{Mutex, PoisonError},
};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use proxy_common::{
    AffinityKey, AffinityValue, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key,
    map_names,
    map_table::{self, MapKind, MapSpec, Sizing, Writer},
};
use tracing::{info, warn};

use crate::{
    admin::stats::MapEntries,
    bpf::{
        pins::{OpenPinError, PinLayout},
        sizing,
    },
};

/// One map's fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub spec: &'static MapSpec,
    /// Entries in use; `None` before anyone counted them.
    pub entries: Option<u64>,
    /// Capacity of the map as the kernel created it.
    pub capacity: u32,
}

impl MapFill {
    /// Fill in percent (0 when unknown).
    pub fn percent(&self) -> f64 {
        self.entries
            .map_or(0.0, |entries| percent(entries, self.capacity))
    }
}

/// `entries` in percent of `capacity` (0 for a capacity of 0).
#[expect(
    clippy::cast_precision_loss,
    reason = "entry counts stay far below 2^52"
)]
pub fn percent(entries: u64, capacity: u32) -> f64 {
    if capacity == 0 {
        return 0.0;
    }
    entries as f64 * 100.0 / f64::from(capacity)
}

/// The maps whose fill is tracked: those with entries that come and go (not the arrays).
pub fn tracked() -> impl Iterator<Item = &'static MapSpec> {
    map_table::pinned().filter(|spec| spec.kind.has_entries())
}

/// Capacities and the datapath-written maps' last counts, shared by the upkeep task (which
/// writes) and the metrics endpoint (which reads).
#[derive(Debug, Default)]
pub struct FillTracker {
    capacities: BTreeMap<&'static str, u32>,
    counted: Mutex<BTreeMap<&'static str, u64>>,
}

impl FillTracker {
    /// Reads every tracked map's capacity from its pin (a map that cannot be read is left out).
    pub fn from_pins(pins: &PinLayout) -> Self {
        let capacities = tracked()
            .filter_map(|spec| {
                let info = MapInfo::from_pin(pins.map(spec.name));
                match info {
                    Ok(info) => Some((spec.name, info.max_entries())),
                    Err(error) => {
                        warn!(map = spec.name, "cannot read the map's capacity: {error}");
                        None
                    }
                }
            })
            .collect();
        Self {
            capacities,
            counted: Mutex::default(),
        }
    }

    /// Remembers the counts of datapath-written maps.
    pub fn record(&self, counts: impl IntoIterator<Item = (&'static str, u64)>) {
        self.counted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(counts);
    }

    /// Every tracked map's fill: agent-written maps from `agent` (the mirror's counts, absent
    /// meaning empty), datapath-written ones from the last count.
    pub fn fill(&self, agent: &MapEntries) -> Vec<MapFill> {
        let counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        tracked()
            .filter_map(|spec| {
                let capacity = *self.capacities.get(spec.name)?;
                let entries = match spec.writer {
                    Writer::Agent => Some(agent.get(spec.name).copied().unwrap_or(0)),
                    Writer::Datapath => counted.get(spec.name).copied(),
                };
                Some(MapFill {
                    spec,
                    entries,
                    capacity,
                })
            })
            .collect()
    }
}

/// The datapath-written LRU maps the upkeep task counts besides conntrack (whose garbage
/// collection counts it): the socket reverse-NAT maps and the affinity map.
pub struct DatapathMaps {
    sock4: HashMap<MapData, SockRevNat4Key, SockRevNat4>,
    sock6: HashMap<MapData, SockRevNat6Key, SockRevNat6>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

fn open_lru<K: aya::Pod, V: aya::Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, OpenPinError> {
    HashMap::try_from(Map::LruHashMap(pins.open_map(name)?))
        .map_err(|source| OpenPinError { map: name, source })
}

impl DatapathMaps {
    /// Opens the pinned maps (handles of their own, beside the agent's).
    pub fn open_pinned(pins: &PinLayout) -> Result<Self, OpenPinError> {
        Ok(Self {
            sock4: open_lru(pins, map_names::SOCK_REV_NAT4)?,
            sock6: open_lru(pins, map_names::SOCK_REV_NAT6)?,
            affinity: open_lru(pins, map_names::AFFINITY)?,
        })
    }

    /// Walks the keys (no value lookups) of each map.
    pub fn count(&self) -> [(&'static str, u64); 3] {
        [
            (
                map_names::SOCK_REV_NAT4,
                self.sock4.keys().flatten().count() as u64,
            ),
            (
                map_names::SOCK_REV_NAT6,
                self.sock6.keys().flatten().count() as u64,
            ),
            (
                map_names::AFFINITY,
                self.affinity.keys().flatten().count() as u64,
            ),
        ]
    }
}

/// Fill levels that warn, in percent of the capacity.
pub const WARN_AT_PERCENT: [u64; 2] = [80, 95];
/// A warning is re-armed once the fill drops this many points below its level.
const REARM_POINTS: u64 = 5;

/// Something worth a log line about a map's fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FillEvent {
    /// The fill rose past `threshold` percent.
    Rising {
        map: &'static str,
        threshold: u64,
        entries: u64,
        capacity: u32,
    },
    /// The fill dropped back below `threshold` percent (its warning is re-armed).
    Falling {
        map: &'static str,
        threshold: u64,
        entries: u64,
        capacity: u32,
    },
}

/// Per map, how many warning levels are crossed; warns once per level and map until the fill
/// drops back.
#[derive(Debug, Default)]
pub struct FillAlarms {
    levels: BTreeMap<&'static str, usize>,
}

/// Whether `entries` reach `percent` of `capacity`.
fn at_least(entries: u64, capacity: u32, percent: u64) -> bool {
    entries.saturating_mul(100) >= percent.saturating_mul(u64::from(capacity))
}

fn level(current: usize, entries: u64, capacity: u32) -> usize {
    let mut level = current;
    while level < WARN_AT_PERCENT.len() && at_least(entries, capacity, WARN_AT_PERCENT[level]) {
        level += 1;
    }
    while level > 0
        && !at_least(
            entries,
            capacity,
            WARN_AT_PERCENT[level - 1].saturating_sub(REARM_POINTS),
        )
    {
        level -= 1;
    }
    level
}

impl FillAlarms {
    /// Compares the fill with the last one; returns what changed.
    pub fn check(&mut self, fill: &[MapFill]) -> Vec<FillEvent> {
        let mut events = Vec::new();
        for map in fill {
            let Some(entries) = map.entries else {
                continue;
            };
            if map.capacity == 0 {
                continue;
            }
            let name = map.spec.name;
            let before = self.levels.get(name).copied().unwrap_or(0);
            let after = level(before, entries, map.capacity);
            if after > before {
                events.push(FillEvent::Rising {
                    map: name,
                    threshold: WARN_AT_PERCENT[after - 1],
                    entries,
                    capacity: map.capacity,
                });
            } else if after < before {
                events.push(FillEvent::Falling {
                    map: name,
                    threshold: WARN_AT_PERCENT[after],
                    entries,
                    capacity: map.capacity,
                });
            }
            self.levels.insert(name, after);
        }
        events
    }
}

/// What happens when the map is full, for the warning.
fn when_full(spec: &MapSpec) -> &'static str {
    match (spec.kind, spec.writer) {
        (MapKind::LruHash, _) => {
            "when full, the least recently used entries give way (their connections lose their translation)"
        }
        _ => "when full, Services that do not fit are not programmed",
    }
}

/// Logs a fill event.
pub fn log(event: &FillEvent) {
    match *event {
        FillEvent::Rising {
            map,
            threshold,
            entries,
            capacity,
        } => {
            let spec = map_table::spec(map);
            let remedy = spec
                .and_then(|spec| match spec.sizing {
                    Sizing::Setting(setting) => Some(sizing::flag(setting)),
                    Sizing::Fixed(_) => None,
                })
                .map_or_else(String::new, |flag| format!("; raise {flag}"));
            warn!(
                map,
                entries,
                capacity,
                "map {map} is over {threshold}% full ({entries} of {capacity} entries): {}{remedy}",
                spec.map_or("", when_full)
            );
        }
        FillEvent::Falling {
            map,
            threshold,
            entries,
            capacity,
        } => info!(
            map,
            entries,
            capacity,
            "map {map} is back below {threshold}% full ({entries} of {capacity} entries)"
        ),
    }
}

/// The memory the kernel charges for the map behind `map` (`memlock` in its fdinfo), bytes.
pub fn memory_of(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    memlock(&info)
}

fn memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
}

/// The memory of the map pinned at `path`, bytes.
pub fn memory_of_pin(path: &Path) -> Option<u64> {
    memory_of(&MapData::from_pin(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(name: &str, entries: u64, capacity: u32) -> MapFill {
        MapFill {
            spec: map_table::spec(name).expect("a table map"),
            entries: Some(entries),
            capacity,
        }
    }

    #[test]
    fn warns_at_80_and_95_percent_once_each_and_rearms_when_the_fill_drops() {
        let mut alarms = FillAlarms::default();
        let services = map_names::SERVICES4;
        assert_eq!(alarms.check(&[fill(services, 79, 100)]), []);
        assert_eq!(
            alarms.check(&[fill(services, 80, 100)]),
            [FillEvent::Rising {
                map: services,
                threshold: 80,
                entries: 80,
                capacity: 100
            }]
        );
        assert_eq!(alarms.check(&[fill(services, 90, 100)]), [], "warned once");
        assert_eq!(
            alarms.check(&[fill(services, 96, 100)]),
            [FillEvent::Rising {
                map: services,
                threshold: 95,
                entries: 96,
                capacity: 100
            }]
        );
        // Hovering just under a level does not re-arm it (no warning storm at the edge).
        assert_eq!(alarms.check(&[fill(services, 94, 100)]), []);
        assert_eq!(alarms.check(&[fill(services, 96, 100)]), []);
        assert_eq!(
            alarms.check(&[fill(services, 70, 100)]),
            [FillEvent::Falling {
                map: services,
                threshold: 80,
                entries: 70,
                capacity: 100
            }]
        );
        assert_eq!(
            alarms.check(&[fill(services, 81, 100)]),
            [FillEvent::Rising {
                map: services,
                threshold: 80,
                entries: 81,
                capacity: 100
            }],
            "re-armed"
        );
    }

    #[test]
    fn a_jump_past_both_levels_warns_at_the_higher_and_maps_are_independent() {
        let mut alarms = FillAlarms::default();
        let events = alarms.check(&[
            fill(map_names::CT4, 99, 100),
            fill(map_names::CT6, 1, 100),
            MapFill {
                entries: None,
                ..fill(map_names::AFFINITY, 0, 100)
            },
        ]);
        assert_eq!(
            events,
            [FillEvent::Rising {
                map: map_names::CT4,
                threshold: 95,
                entries: 99,
                capacity: 100
            }]
        );
        // Full to empty re-arms both levels at once.
        assert_eq!(
            alarms.check(&[fill(map_names::CT4, 0, 100)]),
            [FillEvent::Falling {
                map: map_names::CT4,
                threshold: 80,
                entries: 0,
                capacity: 100
            }]
        );
    }

    #[test]
    fn capacities_of_millions_do_not_overflow() {
        assert!(at_least(26_843_546, 33_554_432, 80));
        assert!(!at_least(26_843_545, 33_554_432, 80));
    }

    #[test]
    fn the_tracker_takes_agent_counts_from_the_mirror_and_datapath_counts_from_upkeep() {
        let tracker = FillTracker {
            capacities: [
                (map_names::SERVICES4, 1000),
                (map_names::SERVICES6, 1000),
                (map_names::CT4, 500),
                (map_names::CT6, 500),
            ]
            .into_iter()
            .collect(),
            counted: Mutex::default(),
        };
        tracker.record([(map_names::CT4, 42)]);
        let agent: MapEntries = [(map_names::SERVICES4, 7)].into_iter().collect();
        let fill = tracker.fill(&agent);
        let entries = |name: &str| {
            fill.iter()
                .find(|map| map.spec.name == name)
                .map(|map| map.entries)
        };
        assert_eq!(entries(map_names::SERVICES4), Some(Some(7)));
        assert_eq!(
            entries(map_names::SERVICES6),
            Some(Some(0)),
            "absent is empty"
        );
        assert_eq!(entries(map_names::CT4), Some(Some(42)));
        assert_eq!(entries(map_names::CT6), Some(None), "not counted yet");
        assert_eq!(entries(map_names::AFFINITY), None, "capacity unknown");
        let services = fill
            .iter()
            .find(|map| map.spec.name == map_names::SERVICES4)
            .expect("tracked");
        assert!((services.percent() - 0.7).abs() < 1e-9, "{services:?}");
    }

    #[test]
    fn memlock_is_read_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nmemlock:\t4243456\nmap_id:\t7\n";
        assert_eq!(memlock(fdinfo), Some(4_243_456));
        assert_eq!(memlock("pos:\t0\n"), None);
    }
}
