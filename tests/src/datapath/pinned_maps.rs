//! Pinned maps as the kernel describes them, and maps a test pins in their place to stand for
//! what another agent (another version, other settings) left behind.

use std::path::Path;

use anyhow::{Context, Result};
use aya::Pod;
use aya::maps::{Array, HashMap, Map, MapData, MapInfo};

/// What the kernel says about a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub id: u32,
    /// `enum bpf_map_type` (1 hash, 2 array, 9 LRU hash, 11 LPM trie).
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The shape of the map pinned at `path`.
pub fn shape(path: &Path) -> Result<Shape> {
    let info =
        MapInfo::from_pin(path).with_context(|| format!("reading map {}", path.display()))?;
    Ok(Shape {
        id: info.id(),
        map_type: info.map_type().map_or(0, |kind| kind as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Whether the kernel still holds the map with this id (released maps vanish).
pub fn map_alive(id: u32) -> bool {
    MapInfo::from_id(id).is_ok()
}

/// Replaces the hash map pinned at `path` with a copy of it created with `max_entries` and
/// `flags` (as an agent with other settings, or an older one, would have left it). The old
/// map lives on as long as the programs attached to it. Returns how many entries were copied.
pub fn replace_hash<K: Pod, V: Pod>(path: &Path, max_entries: u32, flags: u32) -> Result<usize> {
    let old: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?,
    ))?;
    let mut new = HashMap::<MapData, K, V>::create(max_entries, flags)
        .context("creating the replacement map")?;
    let mut copied = 0;
    for entry in &old {
        let (key, value) = entry?;
        new.insert(key, value, 0)?;
        copied += 1;
    }
    std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
    new.pin(path)
        .with_context(|| format!("pinning the replacement at {}", path.display()))?;
    Ok(copied)
}

/// Pins a new, empty hash map of `K` → `V` at `path` (whatever should be there).
pub fn pin_hash<K: Pod, V: Pod>(path: &Path, max_entries: u32, flags: u32) -> Result<()> {
    HashMap::<MapData, K, V>::create(max_entries, flags)
        .context("creating a hash map")?
        .pin(path)
        .with_context(|| format!("pinning a hash map at {}", path.display()))
}

/// Pins a new array of `len` `V`s at `path`.
pub fn pin_array<V: Pod>(path: &Path, len: u32) -> Result<()> {
    Array::<MapData, V>::create(len, 0)
        .context("creating an array map")?
        .pin(path)
        .with_context(|| format!("pinning an array at {}", path.display()))
}
