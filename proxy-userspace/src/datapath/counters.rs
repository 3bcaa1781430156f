//! The datapath's reason counters (per-CPU array), summed over CPUs.
use std::path::Path;

use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
};
use proxy_common::{map_names, reason};

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
