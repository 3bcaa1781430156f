//! The datapath's reason counters (per-CPU array), summed over CPUs.
use std::path::Path;

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, PerCpuArray},
};
use proxy_common::{map_names, reason};

/// Reads the `METRICS` map.
pub struct DatapathCounters(PerCpuArray<MapData, u64>);

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("the datapath counters map {map} is not in the eBPF object")]
    NotInObject { map: &'static str },
    #[error("cannot open the datapath counters map {map}: {source}")]
    Open {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn error(source: MapError) -> CountersError {
    CountersError::Open {
        map: map_names::METRICS,
        source,
    }
}

impl DatapathCounters {
    /// Takes the map out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, CountersError> {
        let map = ebpf
            .take_map(map_names::METRICS)
            .ok_or(CountersError::NotInObject {
                map: map_names::METRICS,
            })?;
        PerCpuArray::try_from(map).map(Self).map_err(error)
    }

    /// Opens the pinned map (works with the agent stopped).
    pub fn open_pinned(path: &Path) -> Result<Self, CountersError> {
        let data = MapData::from_pin(path).map_err(error)?;
        PerCpuArray::try_from(Map::PerCpuArray(data))
            .map(Self)
            .map_err(error)
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
