//! What the datapath would do for a ClusterIP frontend, read straight from the agent's pinned
//! maps (the documented pin layout `<bpffs>/v<layout>/maps/<MAP>` and proxy-common's wire
//! types): the bench's witness that a change reached the kernel, independent of the agent's
//! own account.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError};
use proxy_common::{Backend4, MAP_LAYOUT_VERSION, Service4Key, ServiceValue, map_names, scope};

pub struct PinnedServices {
    services: HashMap<MapData, Service4Key, ServiceValue>,
    backends: HashMap<MapData, u32, Backend4>,
}

impl PinnedServices {
    /// Opens the IPv4 services and backends maps the agent pinned under `bpffs_dir` (its
    /// `--bpffs`).
    pub fn open(bpffs_dir: &Path) -> Result<Self> {
        let maps = bpffs_dir.join(format!("v{MAP_LAYOUT_VERSION}/maps"));
        Ok(Self {
            services: open(&maps, map_names::SERVICES4)?,
            backends: open(&maps, map_names::BACKENDS4)?,
        })
    }

    /// The backend addresses a TCP ClusterIP frontend `vip:port` resolves to now, sorted, as
    /// the socket hooks read them: the master entry's count, then slots `1..=count` and each
    /// slot's backend. `None` while it does not resolve completely (no master entry yet, or a
    /// slot or backend missing in the middle of an update).
    pub fn backends(&self, vip: Ipv4Addr, port: u16) -> Result<Option<Vec<Ipv4Addr>>> {
        let key = |slot| Service4Key {
            address: u32::from_ne_bytes(vip.octets()),
            port_be: port.to_be(),
            backend_slot: slot,
            protocol: proxy_common::protocol::TCP,
            scope: scope::EXTERNAL,
            pad: [0; 2],
        };
        let Some(master) = found(self.services.get(&key(0), 0))? else {
            return Ok(None);
        };
        let mut addresses = Vec::with_capacity(usize::from(master.count));
        for slot in 1..=master.count {
            let Some(entry) = found(self.services.get(&key(slot), 0))? else {
                return Ok(None);
            };
            let Some(backend) = found(self.backends.get(&entry.backend_id, 0))? else {
                return Ok(None);
            };
            addresses.push(Ipv4Addr::from(backend.address.to_ne_bytes()));
        }
        addresses.sort_unstable();
        Ok(Some(addresses))
    }
}

fn open<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> Result<HashMap<MapData, K, V>> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("reading {} as a hash map", path.display()))
}

/// A lookup's value, `None` for a missing key, an error for anything else.
fn found<V>(lookup: Result<V, MapError>) -> Result<Option<V>> {
    match lookup {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(error) => Err(error).context("looking up a pinned map"),
    }
}
