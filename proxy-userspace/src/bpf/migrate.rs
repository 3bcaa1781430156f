//! Pinned maps that differ from what this agent is configured to create. Every pinned map is
//! checked before anything is loaded: one with another layout (type, key or value size) is
//! refused with the difference named; one with another capacity or allocation is migrated,
//! never silently adopted.
//!
//! A migration never leaves a moment without translation:
//! 1. before loading, the old map is opened (and kept open to the end); a map the agent
//!    fills must fit its new capacity, or it is refused;
//! 2. the object is loaded with the new map pinned under `v<N>/migrating/`, and every entry
//!    is copied into it;
//! 3. its pin replaces the old one (a rename on bpffs: the pin never disappears); the old map
//!    lives on, unpinned, as long as the old programs use it;
//! 4. the new programs are attached next to the old ones ([`Migration::after_attach`] then
//!    copies the maps the datapath writes again, for the entries the old programs made);
//! 5. the old links are retired, and [`Migration::finish`] copies those maps a last time and
//!    closes the old maps, which the kernel frees with their last reference.
//!
//! An agent killed part-way leaves a state the next one handles: pins not yet replaced are
//! migrated again, replaced ones are adopted, and leftovers under `migrating/` are removed.
use std::path::{Path, PathBuf};

use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
};
use proxy_common::map_table::{self, MapDef, MapKind, MapSpec, Sizing, TypedVisitor, Writer};
use tracing::{info, warn};

use super::{
    error::{LoadError, MigrationError, Refusal},
    pins::PinLayout,
    sizing::{self, Capacities, MapShape, Verdict},
};

/// Where new maps are pinned while they are filled.
pub fn staging_dir(pins: &PinLayout) -> PathBuf {
    pins.version_dir().join("migrating")
}

fn staging_pin(pins: &PinLayout, spec: &MapSpec) -> PathBuf {
    staging_dir(pins).join(spec.name)
}

/// Removes what an interrupted migration left under `migrating/` (maps no program uses
/// vanish with their pin; maps a still attached program uses live on with it).
pub fn clear_staging(pins: &PinLayout) -> Result<(), LoadError> {
    let dir = staging_dir(pins);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for path in entries.filter_map(Result::ok).map(|entry| entry.path()) {
        std::fs::remove_file(&path).map_err(|source| LoadError::PinDir {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// A pinned map to migrate, opened before the object is loaded.
struct Pending {
    spec: &'static MapSpec,
    old: Map,
    differences: Vec<sizing::Difference>,
}

/// The verdict on every pinned map.
pub struct MapCheck {
    pending: Vec<Pending>,
}

pub(super) fn open(path: &Path) -> Result<Map, MapError> {
    Map::from_map_data(MapData::from_pin(path)?)
}

/// Checks every pinned map against what `capacities` asks for. Refuses (naming every map and
/// difference) if any has another layout, or holds more agent-written entries than its new
/// capacity; opens the maps to migrate.
pub fn check(pins: &PinLayout, capacities: &Capacities) -> Result<MapCheck, LoadError> {
    let mut refusals = Vec::new();
    let mut pending = Vec::new();
    for spec in map_table::pinned() {
        let path = pins.map(spec.name);
        if !path.exists() {
            continue;
        }
        let refuse = |reason: String| Refusal {
            map: spec.name,
            path: path.clone(),
            reason,
        };
        let found = match MapShape::of_pin(&path) {
            Ok(found) => found,
            Err(error) => {
                refusals.push(refuse(format!("cannot read it: {error}")));
                continue;
            }
        };
        let wanted = MapShape::wanted(spec, capacities);
        let differences = match sizing::compare(&found, &wanted) {
            Verdict::Adopt => continue,
            Verdict::Refuse(differences) => {
                refusals.push(refuse(format!(
                    "{} (another map layout, left by an incompatible version)",
                    sizing::describe(&differences)
                )));
                continue;
            }
            Verdict::Migrate(differences) => differences,
        };
        let old = match open(&path) {
            Ok(old) => old,
            Err(error) => {
                refusals.push(refuse(format!("cannot open it to migrate it: {error}")));
                continue;
            }
        };
        if let Some(reason) = does_not_fit(spec, &old, wanted.max_entries) {
            refusals.push(refuse(reason));
            continue;
        }
        warn_if_shrunk_below_content(spec, &old, wanted.max_entries);
        pending.push(Pending {
            spec,
            old,
            differences,
        });
    }
    if refusals.is_empty() {
        Ok(MapCheck { pending })
    } else {
        Err(LoadError::IncompatibleMaps(refusals))
    }
}

/// Why the entries of `old` cannot move into a map of `capacity` entries, if they cannot.
/// Entries the agent wrote must all fit (dropping some would drop Services); an LRU map
/// keeps what fits; arrays keep their first slots.
fn does_not_fit(spec: &MapSpec, old: &Map, capacity: u32) -> Option<String> {
    if spec.writer != Writer::Agent || !matches!(spec.kind, MapKind::Hash | MapKind::LpmTrie) {
        return None;
    }
    let entries = match map_table::with_types(spec.name, Count(old))? {
        Ok(entries) => entries,
        Err(error) => return Some(format!("cannot count its entries: {error}")),
    };
    let setting = match spec.sizing {
        Sizing::Setting(setting) => sizing::flag(setting),
        Sizing::Fixed(_) => "a fixed size",
    };
    (entries > capacity as usize).then(|| {
        format!(
            "it holds {entries} entries, more than the {capacity} configured ({setting}): raise the capacity, or remove Services first"
        )
    })
}

/// An LRU map shrunk below its content keeps what fits (the datapath would evict the rest
/// anyway): said once, with the numbers.
fn warn_if_shrunk_below_content(spec: &MapSpec, old: &Map, capacity: u32) {
    if spec.kind != MapKind::LruHash {
        return;
    }
    if let Some(Ok(entries)) = map_table::with_types(spec.name, Count(old))
        && entries > capacity as usize
    {
        warn!(
            map = spec.name,
            entries,
            capacity,
            "map {} holds {entries} entries, more than its new capacity of {capacity}: only that many are kept",
            spec.name
        );
    }
}

impl MapCheck {
    /// Whether nothing is to be migrated.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Where the loader pins `spec`: its usual pin, or a staging pin when it is migrated.
    pub fn pin_path(&self, pins: &PinLayout, spec: &MapSpec) -> PathBuf {
        if self
            .pending
            .iter()
            .any(|pending| pending.spec.name == spec.name)
        {
            staging_pin(pins, spec)
        } else {
            pins.map(spec.name)
        }
    }

    /// After loading: fills every new map and puts its pin in place of the old one.
    pub fn migrate(self, pins: &PinLayout) -> Result<Migration, LoadError> {
        let mut maps = Vec::new();
        for pending in self.pending {
            let name = pending.spec.name;
            let failed = |source: MigrationError| LoadError::Migration { map: name, source };
            let staged = staging_pin(pins, pending.spec);
            let mut new = open(&staged).map_err(|error| failed(error.into()))?;
            let copied = copy(pending.spec, &pending.old, &mut new).map_err(failed)?;
            info!(
                map = name,
                copied,
                "migrating map {name} ({} entries copied): {}",
                copied,
                sizing::describe(&pending.differences)
            );
            maps.push(Migrating {
                spec: pending.spec,
                old: pending.old,
                new,
                staged,
            });
        }
        // Every map is filled before any pin moves: a failure above leaves the old pins.
        for map in &maps {
            let pin = pins.map(map.spec.name);
            std::fs::rename(&map.staged, &pin).map_err(|source| LoadError::Migration {
                map: map.spec.name,
                source: MigrationError::MovePin {
                    from: map.staged.clone(),
                    to: pin.clone(),
                    source,
                },
            })?;
        }
        Ok(Migration {
            maps,
            staging: staging_dir(pins),
        })
    }
}

/// A map being migrated: the old one (still used by the old programs) and the new one.
struct Migrating {
    spec: &'static MapSpec,
    old: Map,
    new: Map,
    staged: PathBuf,
}

/// Migrations under way, between loading and retiring the old links.
#[must_use = "finish the migration after retiring the old links"]
pub struct Migration {
    maps: Vec<Migrating>,
    staging: PathBuf,
}

impl Migration {
    /// The names of the maps migrated.
    pub fn maps(&self) -> Vec<&'static str> {
        self.maps.iter().map(|map| map.spec.name).collect()
    }

    /// Once the new programs are attached: copies again the maps the old programs still write.
    pub fn after_attach(&mut self) {
        self.copy_datapath_written("after attaching the new programs");
    }

    /// Once the old links are retired: copies the datapath-written maps a last time and
    /// closes the old maps.
    pub fn finish(mut self) {
        self.copy_datapath_written("after retiring the old programs");
        if !self.maps.is_empty() {
            info!(maps = ?self.maps(), "map migration complete: the old maps are released");
        }
        // Empty by now (every staged pin was moved); left alone if anything else is in it.
        let _ = std::fs::remove_dir(&self.staging);
    }

    fn copy_datapath_written(&mut self, when: &str) {
        // Arrays (the reason counters) are copied once, before the switch: copying them again
        // would overwrite what the new programs counted meanwhile, and counters never go back.
        for map in self
            .maps
            .iter_mut()
            .filter(|map| map.spec.writer == Writer::Datapath && map.spec.kind.has_entries())
        {
            // Best effort: the entry at stake is one connection's, and copying is idempotent.
            if let Err(reason) = copy(map.spec, &map.old, &mut map.new) {
                warn!(map = map.spec.name, "copying entries {when}: {reason}");
            }
        }
    }
}

/// Copies every entry of `from` into `to` (both of `spec`'s layout); returns how many.
pub(super) fn copy(spec: &MapSpec, from: &Map, to: &mut Map) -> Result<usize, MigrationError> {
    Ok(map_table::with_types(spec.name, CopyEntries { from, to })
        .ok_or(MigrationError::Untyped)??)
}

/// No key is visited more than this many times the capacity while copying: an LRU map the
/// datapath churns could otherwise restart the key walk indefinitely.
const WALK_BOUND: usize = 2;

fn walk_bound(map: &MapData) -> usize {
    map.info()
        .map_or(usize::MAX, |info| info.max_entries() as usize)
        .saturating_mul(WALK_BOUND)
}

struct CopyEntries<'a> {
    from: &'a Map,
    to: &'a mut Map,
}

impl TypedVisitor for CopyEntries<'_> {
    type Output = Result<usize, MapError>;

    fn visit<K: Pod, V: Pod>(self, def: &MapDef<K, V>) -> Self::Output {
        match def.spec.kind {
            MapKind::Hash | MapKind::LruHash => {
                let from = HashMap::<&MapData, K, V>::try_from(self.from)?;
                let mut to = HashMap::<&mut MapData, K, V>::try_from(self.to)?;
                let bound = walk_bound(from.map());
                let mut copied = 0;
                for entry in from.iter().take(bound) {
                    let (key, value) = entry?;
                    to.insert(key, value, 0)?;
                    copied += 1;
                }
                Ok(copied)
            }
            MapKind::LpmTrie => {
                let from = LpmTrie::<&MapData, K, V>::try_from(self.from)?;
                let mut to = LpmTrie::<&mut MapData, K, V>::try_from(self.to)?;
                let bound = walk_bound(from.map());
                let mut copied = 0;
                for entry in from.iter().take(bound) {
                    let (key, value) = entry?;
                    to.insert(&key, value, 0)?;
                    copied += 1;
                }
                Ok(copied)
            }
            MapKind::Array => {
                let from = Array::<&MapData, V>::try_from(self.from)?;
                let mut to = Array::<&mut MapData, V>::try_from(self.to)?;
                let slots = from.len().min(to.len());
                for index in 0..slots {
                    to.set(index, from.get(&index, 0)?, 0)?;
                }
                Ok(slots as usize)
            }
            MapKind::PerCpuArray => {
                let from = PerCpuArray::<&MapData, V>::try_from(self.from)?;
                let mut to = PerCpuArray::<&mut MapData, V>::try_from(self.to)?;
                let slots = from.len().min(to.len());
                for index in 0..slots {
                    to.set(index, from.get(&index, 0)?, 0)?;
                }
                Ok(slots as usize)
            }
            // Records in flight are not state: a new ring starts empty.
            MapKind::RingBuf => Ok(0),
        }
    }
}

/// Counts the entries of a hash map or LPM trie.
struct Count<'a>(&'a Map);

impl TypedVisitor for Count<'_> {
    type Output = Result<usize, MapError>;

    fn visit<K: Pod, V: Pod>(self, def: &MapDef<K, V>) -> Self::Output {
        match def.spec.kind {
            MapKind::Hash | MapKind::LruHash => {
                let map = HashMap::<&MapData, K, V>::try_from(self.0)?;
                let bound = walk_bound(map.map());
                map.keys()
                    .take(bound)
                    .try_fold(0, |count, key| key.map(|_| count + 1))
            }
            MapKind::LpmTrie => {
                let map = LpmTrie::<&MapData, K, V>::try_from(self.0)?;
                let bound = walk_bound(map.map());
                map.keys()
                    .take(bound)
                    .try_fold(0, |count, key| key.map(|_| count + 1))
            }
            MapKind::Array | MapKind::PerCpuArray => Ok(def.spec.default_capacity() as usize),
            MapKind::RingBuf => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use aya::maps::{PerCpuValues, lpm_trie::Key};
    use proxy_common::{
        BPF_F_NO_PREALLOC, DatapathConfig, Service4Key, ServiceValue, SourceRange4, map_table,
    };

    use super::*;

    /// These tests create real (unpinned) maps: they need CAP_BPF, as `cargo xtask test` has.
    fn may_create_maps() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipping: creating BPF maps needs root");
        }
        root
    }

    fn service_key(slot: u16) -> Service4Key {
        Service4Key {
            address: 0x0a60_000a,
            port_be: 80u16.to_be(),
            backend_slot: slot,
            protocol: proxy_common::protocol::TCP,
            ..Service4Key::default()
        }
    }

    fn services(capacity: u32, entries: u16) -> Map {
        let mut map =
            HashMap::<MapData, Service4Key, ServiceValue>::create(capacity, BPF_F_NO_PREALLOC)
                .expect("creating a hash map");
        for slot in 0..entries {
            let value = ServiceValue {
                backend_id: u32::from(slot),
                ..ServiceValue::default()
            };
            map.insert(service_key(slot), value, 0).expect("inserting");
        }
        Map::HashMap(map_data(&map))
    }

    fn map_data<T: IterableMap<K, V>, K: Pod, V>(map: &T) -> MapData {
        // Reopen by id: the typed wrappers keep their MapData to themselves.
        let id = map.map().info().expect("map info").id();
        MapData::from_id(id).expect("reopening the map")
    }

    #[test]
    fn every_entry_of_a_hash_map_is_copied_and_a_second_copy_changes_nothing() {
        if !may_create_maps() {
            return;
        }
        let old = services(64, 5);
        let mut new = services(128, 0);
        let spec = &map_table::SERVICES4.spec;
        assert_eq!(copy(spec, &old, &mut new).expect("copied"), 5);
        assert_eq!(copy(spec, &old, &mut new).expect("copied"), 5, "idempotent");
        let copied =
            HashMap::<&MapData, Service4Key, ServiceValue>::try_from(&new).expect("typed view");
        assert_eq!(copied.keys().count(), 5);
        assert_eq!(
            copied.get(&service_key(3), 0).expect("copied").backend_id,
            3
        );
    }

    #[test]
    fn agent_written_entries_must_fit_the_new_capacity() {
        if !may_create_maps() {
            return;
        }
        let old = services(64, 5);
        let spec = &map_table::SERVICES4.spec;
        assert_eq!(does_not_fit(spec, &old, 5), None);
        assert_eq!(
            does_not_fit(spec, &old, 4).as_deref(),
            Some(
                "it holds 5 entries, more than the 4 configured (--bpf-lb-map-max): raise the capacity, or remove Services first"
            )
        );
        // Datapath-written maps are never refused for their content (an LRU keeps what fits).
        assert_eq!(does_not_fit(&map_table::CT4.spec, &old, 1), None);
    }

    #[test]
    fn tries_arrays_and_per_cpu_counters_are_copied_by_their_own_rules() {
        if !may_create_maps() {
            return;
        }
        let trie = |entries: u32| {
            let mut trie = LpmTrie::<MapData, SourceRange4, u32>::create(16, BPF_F_NO_PREALLOC)
                .expect("creating a trie");
            for id in 0..entries {
                let range = SourceRange4 {
                    rev_nat_id_be: id.to_be(),
                    address: 0x0000_71cb,
                };
                trie.insert(&Key::new(32 + 24, range), id, 0)
                    .expect("inserting a prefix");
            }
            Map::LpmTrie(map_data(&trie))
        };
        let mut new = trie(0);
        assert_eq!(
            copy(&map_table::SOURCE_RANGES4.spec, &trie(3), &mut new).expect("copied"),
            3
        );

        let config = |value: u16| {
            let mut array = Array::<MapData, DatapathConfig>::create(1, 0).expect("array");
            array
                .set(
                    0,
                    DatapathConfig {
                        snat_port_min: value,
                        ..DatapathConfig::default()
                    },
                    0,
                )
                .expect("setting");
            Map::Array(map_data(&array))
        };
        let mut new_config = config(0);
        assert_eq!(
            copy(
                &map_table::DATAPATH_CONFIG.spec,
                &config(61_000),
                &mut new_config
            )
            .expect("copied"),
            1
        );
        let copied = Array::<&MapData, DatapathConfig>::try_from(&new_config).expect("view");
        assert_eq!(copied.get(&0, 0).expect("slot 0").snat_port_min, 61_000);

        // A counters array of another length: the common slots move, per CPU.
        let counters = |len: u32, value: u64| {
            let mut array = PerCpuArray::<MapData, u64>::create(len, 0).expect("per-CPU array");
            let cpus = aya::util::nr_cpus().expect("CPU count");
            for index in 0..len {
                array
                    .set(
                        index,
                        PerCpuValues::try_from(vec![value; cpus]).expect("values"),
                        0,
                    )
                    .expect("setting");
            }
            Map::PerCpuArray(map_data(&array))
        };
        let mut longer = counters(8, 0);
        assert_eq!(
            copy(&map_table::METRICS.spec, &counters(4, 7), &mut longer).expect("copied"),
            4
        );
        let copied = PerCpuArray::<&MapData, u64>::try_from(&longer).expect("view");
        assert!(copied.get(&3, 0).expect("slot 3").iter().all(|v| *v == 7));
        assert!(copied.get(&4, 0).expect("slot 4").iter().all(|v| *v == 0));
    }
}
