//! How big each map is: the capacities the operator configured (one per group of maps, see
//! `map_table::CapacitySetting`), the shape a pinned map must have to be adopted as it is, and
//! the verdict on one that differs: a different capacity or creation flags is migrated, a
//! different type or key/value size (another layout) is refused.
use std::{collections::BTreeMap, fmt, path::Path};

use aya::maps::MapInfo;
use proxy_common::{
    BPF_F_NO_PREALLOC,
    map_table::{CapacitySetting, MapKind, MapSpec, Sizing},
};

/// The largest capacity a setting accepts (a conntrack map this big takes gigabytes).
pub const MAX_CAPACITY: u32 = 1 << 25;

/// The configured capacity of every group of maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacities(BTreeMap<CapacitySetting, u32>);

impl Default for Capacities {
    /// The table's defaults (what the eBPF object declares).
    fn default() -> Self {
        Self(
            CapacitySetting::ALL
                .into_iter()
                .map(|setting| (setting, setting.default_capacity()))
                .collect(),
        )
    }
}

impl Capacities {
    /// Sets one group's capacity.
    #[must_use]
    pub fn with(mut self, setting: CapacitySetting, entries: u32) -> Self {
        self.0.insert(setting, entries);
        self
    }

    pub fn setting(&self, setting: CapacitySetting) -> u32 {
        self.0
            .get(&setting)
            .copied()
            .unwrap_or_else(|| setting.default_capacity())
    }

    /// The capacity `spec` gets.
    pub fn of(&self, spec: &MapSpec) -> u32 {
        match spec.sizing {
            Sizing::Fixed(entries) => entries,
            Sizing::Setting(setting) => self.setting(setting),
        }
    }
}

/// The `switchyard run` flag behind each setting (for messages; the CLI's tests check that
/// these are its flags).
pub fn flag(setting: CapacitySetting) -> &'static str {
    match setting {
        CapacitySetting::LoadBalancer => "--bpf-lb-map-max",
        CapacitySetting::Conntrack => "--bpf-ct-global-max",
        CapacitySetting::ConntrackUnreplied => "--bpf-ct-unreplied-max",
        CapacitySetting::SockRevNat => "--bpf-sock-rev-map-max",
        CapacitySetting::Affinity => "--bpf-affinity-map-max",
        CapacitySetting::SourceRanges => "--bpf-lb-source-range-map-max",
        CapacitySetting::Maglev => "--bpf-maglev-tables-max",
        CapacitySetting::DsrReverse => "--bpf-dsr-rev-map-max",
    }
}

/// What a map is, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// The shape this agent creates `spec` with.
    pub fn wanted(spec: &MapSpec, capacities: &Capacities) -> Self {
        Self {
            map_type: spec.kind.bpf_type(),
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries: capacities.of(spec),
            flags: spec.flags,
        }
    }

    pub fn of_info(info: &MapInfo) -> Self {
        Self {
            // aya's enum carries the kernel's numbers; an unknown one reads as 0 (unspecified).
            map_type: info.map_type().map_or(0, |kind| kind as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }

    /// The shape of the map pinned at `path`.
    pub fn of_pin(path: &Path) -> Result<Self, aya::maps::MapError> {
        MapInfo::from_pin(path).map(|info| Self::of_info(&info))
    }
}

/// One way a pinned map differs from what this agent creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Difference {
    Type { found: u32, wanted: u32 },
    KeySize { found: u32, wanted: u32 },
    ValueSize { found: u32, wanted: u32 },
    Capacity { found: u32, wanted: u32 },
    Flags { found: u32, wanted: u32 },
}

impl Difference {
    /// Whether the map can be migrated despite this difference: entries keep their meaning
    /// in a map of another size or allocation; another type or entry size is another layout.
    pub fn migratable(self) -> bool {
        matches!(self, Self::Capacity { .. } | Self::Flags { .. })
    }
}

fn type_name(number: u32) -> String {
    MapKind::from_bpf_type(number).map_or_else(
        || format!("bpf_map_type {number}"),
        |kind| kind.name().to_owned(),
    )
}

fn flags_text(flags: u32) -> String {
    match flags {
        0 => "preallocated (flags 0)".to_owned(),
        BPF_F_NO_PREALLOC => "not preallocated (BPF_F_NO_PREALLOC)".to_owned(),
        other => format!("flags {other:#x}"),
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Type { found, wanted } => write!(
                f,
                "its type is {}, this agent's is {}",
                type_name(found),
                type_name(wanted)
            ),
            Self::KeySize { found, wanted } => write!(
                f,
                "its keys are {found} bytes, this agent's are {wanted} bytes"
            ),
            Self::ValueSize { found, wanted } => write!(
                f,
                "its values are {found} bytes, this agent's are {wanted} bytes"
            ),
            Self::Capacity { found, wanted } => {
                write!(f, "it holds up to {found} entries, {wanted} are configured")
            }
            Self::Flags { found, wanted } => write!(
                f,
                "it is {}, this agent creates it {}",
                flags_text(found),
                flags_text(wanted)
            ),
        }
    }
}

/// What to do with a pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Exactly what this agent would create: use it as it is.
    Adopt,
    /// Same layout, another capacity or allocation: copy it into a new map.
    Migrate(Vec<Difference>),
    /// Another layout: never adopted, never migrated.
    Refuse(Vec<Difference>),
}

/// Compares a pinned map with what this agent would create.
pub fn compare(found: &MapShape, wanted: &MapShape) -> Verdict {
    let candidates = [
        Difference::Type {
            found: found.map_type,
            wanted: wanted.map_type,
        },
        Difference::KeySize {
            found: found.key_size,
            wanted: wanted.key_size,
        },
        Difference::ValueSize {
            found: found.value_size,
            wanted: wanted.value_size,
        },
        Difference::Capacity {
            found: found.max_entries,
            wanted: wanted.max_entries,
        },
        Difference::Flags {
            found: found.flags,
            wanted: wanted.flags,
        },
    ];
    let differences: Vec<Difference> = candidates
        .into_iter()
        .filter(|difference| match *difference {
            Difference::Type { found, wanted }
            | Difference::KeySize { found, wanted }
            | Difference::ValueSize { found, wanted }
            | Difference::Capacity { found, wanted }
            | Difference::Flags { found, wanted } => found != wanted,
        })
        .collect();
    if differences.is_empty() {
        Verdict::Adopt
    } else if differences.iter().all(|difference| difference.migratable()) {
        Verdict::Migrate(differences)
    } else {
        Verdict::Refuse(
            differences
                .into_iter()
                .filter(|difference| !difference.migratable())
                .collect(),
        )
    }
}

/// Joins differences for a message.
pub fn describe(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use proxy_common::map_table;

    use super::*;

    fn services(capacity: u32) -> MapShape {
        MapShape::wanted(
            &map_table::SERVICES4.spec,
            &Capacities::default().with(CapacitySetting::LoadBalancer, capacity),
        )
    }

    #[test]
    fn capacities_default_to_the_table_and_fixed_maps_ignore_them() {
        let capacities = Capacities::default();
        for spec in map_table::ALL {
            assert_eq!(
                capacities.of(spec),
                spec.default_capacity(),
                "{}",
                spec.name
            );
        }
        let small = Capacities::default()
            .with(CapacitySetting::LoadBalancer, 8)
            .with(CapacitySetting::Conntrack, 16);
        assert_eq!(small.of(&map_table::BACKENDS6.spec), 8);
        assert_eq!(small.of(&map_table::SERVICE_NAMES.spec), 8);
        assert_eq!(small.of(&map_table::CT6.spec), 16);
        assert_eq!(
            small.of(&map_table::METRICS.spec),
            proxy_common::reason::COUNT
        );
        assert_eq!(
            small.of(&map_table::AFFINITY.spec),
            CapacitySetting::Affinity.default_capacity()
        );
    }

    #[test]
    fn an_identical_map_is_adopted() {
        assert_eq!(compare(&services(1024), &services(1024)), Verdict::Adopt);
    }

    #[test]
    fn another_capacity_or_allocation_is_migrated() {
        assert_eq!(
            compare(&services(262_144), &services(1024)),
            Verdict::Migrate(vec![Difference::Capacity {
                found: 262_144,
                wanted: 1024
            }])
        );
        // The maps of agents before this layout were preallocated.
        let preallocated = MapShape {
            flags: 0,
            ..services(1024)
        };
        let verdict = compare(&preallocated, &services(2048));
        assert_eq!(
            verdict,
            Verdict::Migrate(vec![
                Difference::Capacity {
                    found: 1024,
                    wanted: 2048
                },
                Difference::Flags {
                    found: 0,
                    wanted: BPF_F_NO_PREALLOC
                },
            ])
        );
    }

    #[test]
    fn another_type_or_entry_size_is_refused_and_named() {
        let lru = MapShape {
            map_type: MapKind::LruHash.bpf_type(),
            max_entries: 7,
            ..services(1024)
        };
        let Verdict::Refuse(differences) = compare(&lru, &services(1024)) else {
            panic!("an LRU map where a hash map belongs must be refused");
        };
        // Only what makes it incompatible is reported (the capacity alone would migrate).
        assert_eq!(
            describe(&differences),
            "its type is lru_hash, this agent's is hash"
        );
        let wider = MapShape {
            key_size: 24,
            value_size: 20,
            ..services(1024)
        };
        let Verdict::Refuse(differences) = compare(&wider, &services(1024)) else {
            panic!("other key and value sizes must be refused");
        };
        assert_eq!(
            describe(&differences),
            "its keys are 24 bytes, this agent's are 12 bytes; its values are 20 bytes, this agent's are 16 bytes"
        );
        let unknown = MapShape {
            map_type: 30,
            ..services(1024)
        };
        assert!(matches!(
            compare(&unknown, &services(1024)),
            Verdict::Refuse(_)
        ));
        assert_eq!(
            Difference::Type {
                found: 30,
                wanted: 1
            }
            .to_string(),
            "its type is bpf_map_type 30, this agent's is hash"
        );
    }

    #[test]
    fn flag_differences_read_as_allocation() {
        assert_eq!(
            Difference::Flags {
                found: 0,
                wanted: BPF_F_NO_PREALLOC
            }
            .to_string(),
            "it is preallocated (flags 0), this agent creates it not preallocated (BPF_F_NO_PREALLOC)"
        );
    }
}
