//! The real writer: the pinned BPF maps, through aya.
use std::{fmt::Debug, io};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError,
        lpm_trie::{self, Key},
    },
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend4, Backend6, RevNat4, RevNat6, Service4Key, Service6Key,
    ServiceGuard4, ServiceGuard6, ServiceName, ServiceStatus, ServiceValue, SourceRange4,
    SourceRange6, maglev::MaglevConfig, map_names, service_flags,
};

use super::{
    MapWriter, WriteError,
    encode::{LpmKey, MapImage, MapWrite},
};
use crate::bpf::pins::PinLayout;

type SourceRanges<D> = LpmTrie<MapData, D, u32>;

/// The agent-owned maps of a loaded (or adopted) dataplane.
pub struct KernelMaps {
    services4: HashMap<MapData, Service4Key, ServiceValue>,
    services6: HashMap<MapData, Service6Key, ServiceValue>,
    backends4: HashMap<MapData, u32, Backend4>,
    backends6: HashMap<MapData, u32, Backend6>,
    rev_nat4: HashMap<MapData, u32, RevNat4>,
    rev_nat6: HashMap<MapData, u32, RevNat6>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    names: HashMap<MapData, u32, ServiceName>,
    /// `None` for pins older than the map (read by `inspect` only).
    status: Option<HashMap<MapData, ServiceName, ServiceStatus>>,
    /// `None` when the object or the pins predate the TC path: nothing can enforce source
    /// ranges then, and `dump`/`inspect` of such pins still work.
    source_ranges4: Option<SourceRanges<SourceRange4>>,
    source_ranges6: Option<SourceRanges<SourceRange6>>,
    /// Each map's capacity, read once from the kernel (the plan asks before every Service).
    capacities: std::collections::BTreeMap<&'static str, u32>,
    /// `None` when the object or the pins predate the service-CIDR guard.
    guard4: Option<SourceRanges<ServiceGuard4>>,
    guard6: Option<SourceRanges<ServiceGuard6>>,
    /// `None` when the object or the pins predate Maglev.
    maglev: Option<MaglevMaps>,
}

/// The Maglev tables and their settings.
struct MaglevMaps {
    tables: Array<MapData, u32>,
    config: Array<MapData, MaglevConfig>,
}

impl MaglevMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Option<Self>, WriteError> {
        let (Some(tables), Some(config)) = (
            ebpf.take_map(map_names::MAGLEV),
            ebpf.take_map(map_names::MAGLEV_CONFIG),
        ) else {
            return Ok(None);
        };
        Self::of(tables, config).map(Some)
    }

    fn open(pins: &PinLayout) -> Result<Option<Self>, WriteError> {
        let (tables, config) = (
            pins.map(map_names::MAGLEV),
            pins.map(map_names::MAGLEV_CONFIG),
        );
        if !tables.exists() || !config.exists() {
            return Ok(None);
        }
        let open = |path: &std::path::Path, name: &'static str| {
            MapData::from_pin(path)
                .map(Map::Array)
                .map_err(read_error(name))
        };
        Self::of(
            open(&tables, map_names::MAGLEV)?,
            open(&config, map_names::MAGLEV_CONFIG)?,
        )
        .map(Some)
    }

    fn of(tables: Map, config: Map) -> Result<Self, WriteError> {
        Ok(Self {
            tables: Array::try_from(tables).map_err(read_error(map_names::MAGLEV))?,
            config: Array::try_from(config).map_err(read_error(map_names::MAGLEV_CONFIG))?,
        })
    }

    fn config(&self) -> Result<MaglevConfig, WriteError> {
        self.config
            .get(&0, 0)
            .map_err(read_error(map_names::MAGLEV_CONFIG))
    }

    /// Writes table `table` (1-based) slot by slot; the datapath reads it only once a master
    /// points at it.
    fn write_table(&mut self, table: u32, content: &[u32]) -> Result<(), WriteError> {
        let size = u32::try_from(content.len()).unwrap_or(u32::MAX);
        let capacity = self.tables.len();
        let full = || WriteError::MapFull {
            map: map_names::MAGLEV,
            capacity,
            entry: format!(
                "Maglev table {table} ({} tables of {size} slots fit)",
                capacity / size.max(1)
            ),
        };
        let base = table
            .checked_sub(1)
            .and_then(|index| index.checked_mul(size))
            .ok_or_else(full)?;
        if base.checked_add(size).is_none_or(|end| end > capacity) {
            return Err(full());
        }
        for (offset, backend_id) in (0..size).zip(content) {
            self.tables
                .set(base + offset, *backend_id, 0)
                .map_err(|error| WriteError::Kernel {
                    map: map_names::MAGLEV,
                    action: "writing",
                    entry: format!("slot {offset} of Maglev table {table}"),
                    source: io_error(error),
                })?;
        }
        Ok(())
    }

    /// Table `table` as `size` slots, if the map holds it.
    fn read_table(&self, table: u32, size: u32) -> Result<Option<Vec<u32>>, WriteError> {
        let Some(base) = table
            .checked_sub(1)
            .and_then(|index| index.checked_mul(size))
        else {
            return Ok(None);
        };
        if size == 0
            || base
                .checked_add(size)
                .is_none_or(|end| end > self.tables.len())
        {
            return Ok(None);
        }
        (base..base + size)
            .map(|index| {
                self.tables
                    .get(&index, 0)
                    .map_err(read_error(map_names::MAGLEV))
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
    }
}

/// Takes a hash (or LRU hash) map out of a loaded object.
pub(crate) fn take<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, WriteError> {
    let map = ebpf
        .take_map(name)
        .ok_or(WriteError::NotInObject { map: name })?;
    HashMap::try_from(map).map_err(read_error(name))
}

fn open<K: aya::Pod, V: aya::Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, WriteError> {
    let data = MapData::from_pin(pins.map(name)).map_err(read_error(name))?;
    HashMap::try_from(Map::HashMap(data)).map_err(read_error(name))
}

fn read_error(name: &'static str) -> impl Fn(MapError) -> WriteError {
    move |source| WriteError::Read {
        map: name,
        source: Box::new(source),
    }
}

/// Takes a source-ranges trie out of a loaded object, if it declares one.
fn take_trie<D: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<Option<SourceRanges<D>>, WriteError> {
    ebpf.take_map(name)
        .map(|map| LpmTrie::try_from(map).map_err(read_error(name)))
        .transpose()
}

/// Opens a pinned source-ranges trie, if it was pinned.
fn open_trie<D: aya::Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<Option<SourceRanges<D>>, WriteError> {
    let path = pins.map(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(path).map_err(read_error(name))?;
    LpmTrie::try_from(Map::LpmTrie(data))
        .map(Some)
        .map_err(read_error(name))
}

fn io_error(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(syscall) => syscall.io_error,
        other => io::Error::other(other.to_string()),
    }
}

/// The capacity of a map as the kernel created it (the configured one; 0 if unreadable).
fn capacity<K: aya::Pod, V>(map: &impl IterableMap<K, V>) -> u32 {
    map.map().info().map_or(0, |info| info.max_entries())
}

fn upsert<K: aya::Pod + Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
    value: &V,
) -> Result<(), WriteError> {
    map.insert(key, value, 0).map_err(|error| {
        let source = io_error(error);
        // A full hash map answers E2BIG to a new key (kernel/bpf/hashtab.c).
        if source.raw_os_error() == Some(libc::E2BIG) {
            WriteError::MapFull {
                map: name,
                capacity: capacity(map),
                entry: format!("{key:?}"),
            }
        } else {
            WriteError::Kernel {
                map: name,
                action: "update",
                entry: format!("{key:?}"),
                source,
            }
        }
    })
}

fn delete<K: aya::Pod + Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), WriteError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(error) => {
            let source = io_error(error);
            if source.raw_os_error() == Some(libc::ENOENT) {
                Ok(())
            } else {
                Err(WriteError::Kernel {
                    map: name,
                    action: "delete",
                    entry: format!("{key:?}"),
                    source,
                })
            }
        }
    }
}

fn write_entry<K: aya::Pod + Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
    value: Option<&V>,
) -> Result<(), WriteError> {
    match value {
        Some(value) => upsert(map, name, key, value),
        None => delete(map, name, key),
    }
}

/// Writes or deletes one source range. A full trie answers ENOSPC (kernel/bpf/lpm_trie.c).
fn write_range<D: aya::Pod + Debug>(
    trie: Option<&mut SourceRanges<D>>,
    name: &'static str,
    key: &LpmKey<D>,
    value: Option<u32>,
) -> Result<(), WriteError> {
    let entry = || format!("prefix length {} {:?}", key.prefix_len, key.data);
    let Some(trie) = trie else {
        // Deleting from a map that does not exist is deleting a missing key.
        return match value {
            Some(_) => Err(WriteError::MissingMap {
                map: name,
                entry: entry(),
            }),
            None => Ok(()),
        };
    };
    let aya_key = Key::new(key.prefix_len, key.data);
    let result = match value {
        Some(value) => trie.insert(&aya_key, value, 0),
        None => trie.remove(&aya_key),
    };
    let Err(error) = result else {
        return Ok(());
    };
    let source = io_error(error);
    match (source.raw_os_error(), value) {
        (Some(libc::ENOENT), None) => Ok(()),
        (Some(libc::ENOSPC | libc::E2BIG), Some(_)) => Err(WriteError::MapFull {
            map: name,
            capacity: capacity(trie),
            entry: entry(),
        }),
        _ => Err(WriteError::Kernel {
            map: name,
            action: if value.is_some() { "update" } else { "delete" },
            entry: entry(),
            source,
        }),
    }
}

fn read_trie<D: aya::Pod + Ord>(
    trie: Option<&SourceRanges<D>>,
    name: &'static str,
) -> Result<std::collections::BTreeMap<LpmKey<D>, u32>, WriteError> {
    let Some(trie) = trie else {
        return Ok(std::collections::BTreeMap::new());
    };
    trie.iter()
        .map(|entry| {
            let (key, value): (lpm_trie::Key<D>, u32) = entry.map_err(read_error(name))?;
            let key = LpmKey {
                prefix_len: key.prefix_len(),
                data: key.data(),
            };
            Ok((key, value))
        })
        .collect()
}

fn read_all<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<std::collections::BTreeMap<K, V>, WriteError> {
    map.iter()
        .map(|entry| entry.map_err(read_error(name)))
        .collect()
}

impl KernelMaps {
    /// Takes the agent-owned maps out of a loaded object (they are pinned, so this adopts any
    /// content a previous agent left).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, WriteError> {
        Ok(Self::with_capacities(Self {
            services4: take(ebpf, map_names::SERVICES4)?,
            services6: take(ebpf, map_names::SERVICES6)?,
            backends4: take(ebpf, map_names::BACKENDS4)?,
            backends6: take(ebpf, map_names::BACKENDS6)?,
            rev_nat4: take(ebpf, map_names::REV_NAT4)?,
            rev_nat6: take(ebpf, map_names::REV_NAT6)?,
            affinity: take(ebpf, map_names::AFFINITY)?,
            names: take(ebpf, map_names::SERVICE_NAMES)?,
            status: Some(take(ebpf, map_names::SERVICE_STATUS)?),
            source_ranges4: take_trie(ebpf, map_names::SOURCE_RANGES4)?,
            source_ranges6: take_trie(ebpf, map_names::SOURCE_RANGES6)?,
            guard4: take_trie(ebpf, map_names::SERVICE_GUARD4)?,
            guard6: take_trie(ebpf, map_names::SERVICE_GUARD6)?,
            maglev: MaglevMaps::take(ebpf)?,
            capacities: std::collections::BTreeMap::new(),
        }))
    }

    /// Opens the pinned maps without loading any program (for `dump`).
    pub fn open_pinned(pins: &PinLayout) -> Result<Self, WriteError> {
        Ok(Self::with_capacities(Self {
            services4: open(pins, map_names::SERVICES4)?,
            services6: open(pins, map_names::SERVICES6)?,
            backends4: open(pins, map_names::BACKENDS4)?,
            backends6: open(pins, map_names::BACKENDS6)?,
            rev_nat4: open(pins, map_names::REV_NAT4)?,
            rev_nat6: open(pins, map_names::REV_NAT6)?,
            affinity: open(pins, map_names::AFFINITY)?,
            names: open(pins, map_names::SERVICE_NAMES)?,
            status: if pins.map(map_names::SERVICE_STATUS).exists() {
                Some(open(pins, map_names::SERVICE_STATUS)?)
            } else {
                None
            },
            source_ranges4: open_trie(pins, map_names::SOURCE_RANGES4)?,
            source_ranges6: open_trie(pins, map_names::SOURCE_RANGES6)?,
            guard4: open_trie(pins, map_names::SERVICE_GUARD4)?,
            guard6: open_trie(pins, map_names::SERVICE_GUARD6)?,
            maglev: MaglevMaps::open(pins)?,
            capacities: std::collections::BTreeMap::new(),
        }))
    }

    /// Records every map's capacity.
    fn with_capacities(mut self) -> Self {
        let mut capacities = std::collections::BTreeMap::new();
        capacities.insert(map_names::SERVICES4, capacity(&self.services4));
        capacities.insert(map_names::SERVICES6, capacity(&self.services6));
        capacities.insert(map_names::BACKENDS4, capacity(&self.backends4));
        capacities.insert(map_names::BACKENDS6, capacity(&self.backends6));
        capacities.insert(map_names::REV_NAT4, capacity(&self.rev_nat4));
        capacities.insert(map_names::REV_NAT6, capacity(&self.rev_nat6));
        capacities.insert(map_names::SERVICE_NAMES, capacity(&self.names));
        if let Some(trie) = &self.source_ranges4 {
            capacities.insert(map_names::SOURCE_RANGES4, capacity(trie));
        }
        if let Some(trie) = &self.source_ranges6 {
            capacities.insert(map_names::SOURCE_RANGES6, capacity(trie));
        }
        if let Some(trie) = &self.guard4 {
            capacities.insert(map_names::SERVICE_GUARD4, capacity(trie));
        }
        if let Some(trie) = &self.guard6 {
            capacities.insert(map_names::SERVICE_GUARD6, capacity(trie));
        }
        self.capacities = capacities;
        self
    }
}

impl MapWriter for KernelMaps {
    fn capacity(&self, map: &'static str) -> Option<u32> {
        self.capacities
            .get(map)
            .copied()
            .filter(|capacity| *capacity > 0)
    }

    fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
        match write {
            MapWrite::Service4(key, value) => write_entry(
                &mut self.services4,
                map_names::SERVICES4,
                key,
                value.as_ref(),
            ),
            MapWrite::Service6(key, value) => write_entry(
                &mut self.services6,
                map_names::SERVICES6,
                key,
                value.as_ref(),
            ),
            MapWrite::Backend4(id, value) => write_entry(
                &mut self.backends4,
                map_names::BACKENDS4,
                id,
                value.as_ref(),
            ),
            MapWrite::Backend6(id, value) => write_entry(
                &mut self.backends6,
                map_names::BACKENDS6,
                id,
                value.as_ref(),
            ),
            MapWrite::RevNat4(id, value) => {
                write_entry(&mut self.rev_nat4, map_names::REV_NAT4, id, value.as_ref())
            }
            MapWrite::RevNat6(id, value) => {
                write_entry(&mut self.rev_nat6, map_names::REV_NAT6, id, value.as_ref())
            }
            MapWrite::AffinityDelete(key) => delete(&mut self.affinity, map_names::AFFINITY, key),
            MapWrite::ServiceName(id, name) => {
                write_entry(&mut self.names, map_names::SERVICE_NAMES, id, name.as_ref())
            }
            MapWrite::Status(key, value) => match self.status.as_mut() {
                Some(map) => write_entry(map, map_names::SERVICE_STATUS, key, value.as_ref()),
                None if value.is_none() => Ok(()),
                None => Err(WriteError::MissingMap {
                    map: map_names::SERVICE_STATUS,
                    entry: "a Service status".into(),
                }),
            },
            MapWrite::SourceRange4(key, value) => write_range(
                self.source_ranges4.as_mut(),
                map_names::SOURCE_RANGES4,
                key,
                *value,
            ),
            MapWrite::SourceRange6(key, value) => write_range(
                self.source_ranges6.as_mut(),
                map_names::SOURCE_RANGES6,
                key,
                *value,
            ),
            MapWrite::Guard4(key, value) => {
                write_range(self.guard4.as_mut(), map_names::SERVICE_GUARD4, key, *value)
            }
            MapWrite::Guard6(key, value) => {
                write_range(self.guard6.as_mut(), map_names::SERVICE_GUARD6, key, *value)
            }
            // A freed table keeps its slots: no master points at it, and its number is
            // refilled completely before one does again.
            MapWrite::Maglev(_, None) => Ok(()),
            MapWrite::Maglev(table, Some(content)) => match self.maglev.as_mut() {
                Some(maps) => maps.write_table(*table, content),
                None => Err(WriteError::MissingMap {
                    map: map_names::MAGLEV,
                    entry: format!("Maglev table {table}"),
                }),
            },
            MapWrite::MaglevConfig(config) => match self.maglev.as_mut() {
                Some(maps) => maps
                    .config
                    .set(0, *config, 0)
                    .map_err(|error| WriteError::Kernel {
                        map: map_names::MAGLEV_CONFIG,
                        action: "writing",
                        entry: format!("{config:?}"),
                        source: io_error(error),
                    }),
                None => Err(WriteError::MissingMap {
                    map: map_names::MAGLEV_CONFIG,
                    entry: "the Maglev settings".into(),
                }),
            },
        }
    }

    fn read_image(&self) -> Result<MapImage, WriteError> {
        let services4 = read_all(&self.services4, map_names::SERVICES4)?;
        let services6 = read_all(&self.services6, map_names::SERVICES6)?;
        let (maglev, maglev_config) = match &self.maglev {
            Some(maps) => {
                let config = maps.config()?;
                // Only the tables masters point at, read at the size the datapath indexes them
                // with (a table of another size is not what the datapath reads: left out, so
                // the first plan writes a new one).
                let in_use: std::collections::BTreeSet<u32> = services4
                    .iter()
                    .filter(|(key, _)| key.backend_slot == 0)
                    .map(|(_, value)| value)
                    .chain(
                        services6
                            .iter()
                            .filter(|(key, _)| key.backend_slot == 0)
                            .map(|(_, value)| value),
                    )
                    .filter(|value| {
                        value.flags & service_flags::MAGLEV != 0 && value.backend_id != 0
                    })
                    .map(|value| value.backend_id)
                    .collect();
                let mut tables = std::collections::BTreeMap::new();
                for table in in_use {
                    if let Some(content) = maps.read_table(table, config.table_size)? {
                        tables.insert(table, content.into());
                    }
                }
                (tables, Some(config))
            }
            None => (std::collections::BTreeMap::new(), None),
        };
        Ok(MapImage {
            services4,
            services6,
            maglev,
            maglev_config,
            backends4: read_all(&self.backends4, map_names::BACKENDS4)?,
            backends6: read_all(&self.backends6, map_names::BACKENDS6)?,
            rev_nat4: read_all(&self.rev_nat4, map_names::REV_NAT4)?,
            rev_nat6: read_all(&self.rev_nat6, map_names::REV_NAT6)?,
            affinity: read_all(&self.affinity, map_names::AFFINITY)?,
            service_names: read_all(&self.names, map_names::SERVICE_NAMES)?,
            service_status: match &self.status {
                Some(map) => read_all(map, map_names::SERVICE_STATUS)?,
                None => std::collections::BTreeMap::new(),
            },
            source_ranges4: read_trie(self.source_ranges4.as_ref(), map_names::SOURCE_RANGES4)?,
            source_ranges6: read_trie(self.source_ranges6.as_ref(), map_names::SOURCE_RANGES6)?,
            guard4: read_trie(self.guard4.as_ref(), map_names::SERVICE_GUARD4)?,
            guard6: read_trie(self.guard6.as_ref(), map_names::SERVICE_GUARD6)?,
        })
    }
}
