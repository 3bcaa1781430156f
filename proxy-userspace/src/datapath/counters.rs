//! The datapath's reason counters (per-CPU array), summed over CPUs.
use std::path::Path;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray},
};
use proxy_common::{SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, map_names, reason};

/// Reads the `METRICS` map.
pub struct DatapathCounters(PerCpuArray<MapData, u64>);

#[derive(Debug, thiserror::Error)]
#[error("cannot open the datapath counters map {map}: {reason}")]
pub struct CountersError {
    map: &'static str,
    reason: String,
}

fn error(reason: &impl ToString) -> CountersError {
    CountersError {
        map: map_names::METRICS,
        reason: reason.to_string(),
    }
}

impl DatapathCounters {
    /// Takes the map out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, CountersError> {
        let map = ebpf
            .take_map(map_names::METRICS)
            .ok_or_else(|| error(&"not in the eBPF object"))?;
        PerCpuArray::try_from(map).map(Self).map_err(|e| error(&e))
    }

    /// Opens the pinned map (works with the agent stopped).
    pub fn open_pinned(path: &Path) -> Result<Self, CountersError> {
        let data = MapData::from_pin(path).map_err(|e| error(&e))?;
        PerCpuArray::try_from(Map::PerCpuArray(data))
            .map(Self)
            .map_err(|e| error(&e))
    }

    /// Every named reason with its total; unreadable slots count as 0.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        reason::NAMES
            .iter()
            .zip(0u32..)
            .map(|(name, index)| {
                (
                    *name,
                    self.0
                        .get(&index, 0)
                        .map_or(0, |per_cpu| per_cpu.iter().sum()),
                )
            })
            .collect()
    }
}

/// Counts the socket translations (the socket load balancer's per-connection state).
pub struct SocketTranslations {
    v4: HashMap<MapData, SockRevNat4Key, SockRevNat4>,
    v6: HashMap<MapData, SockRevNat6Key, SockRevNat6>,
}

impl SocketTranslations {
    /// Opens the pinned socket reverse-NAT maps (extra handles beside the agent's own).
    pub fn open_pinned(v4: &Path, v6: &Path) -> Result<Self, CountersError> {
        let open = |path: &Path| {
            MapData::from_pin(path)
                .map(Map::LruHashMap)
                .map_err(|e| error(&e))
        };
        Ok(Self {
            v4: HashMap::try_from(open(v4)?).map_err(|e| error(&e))?,
            v6: HashMap::try_from(open(v6)?).map_err(|e| error(&e))?,
        })
    }

    /// Entries per family, walking keys only (no value lookups).
    pub fn count(&self) -> (u64, u64) {
        (
            self.v4.keys().flatten().count() as u64,
            self.v6.keys().flatten().count() as u64,
        )
    }
}
