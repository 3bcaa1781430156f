//! The pin layout under bpffs. Versioned, so an agent with another map layout never adopts
//! maps it cannot read: `<root>/v<N>/maps/<MAP>` and `<root>/v<N>/links/<program>@<generation>`.
//! Pins of other layout versions (an older or newer agent's) are found by [`PinLayout::others`]
//! and taken over (see `versions`).
use std::path::{Path, PathBuf};

use aya::{
    maps::{MapData, MapError},
    programs::links::{FdLink, LinkError, PinnedLink},
};
use proxy_common::MAP_LAYOUT_VERSION;

use super::error::LoadError;

/// A pinned map that could not be opened, by name.
#[derive(Debug, thiserror::Error)]
#[error("cannot open pinned map {map}: {source}")]
pub struct OpenPinError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}

#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
    /// The map layout version whose pins this describes.
    pub version: u32,
}

impl PinLayout {
    /// This build's layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::of_version(root, MAP_LAYOUT_VERSION)
    }

    /// Another layout version's pins under `root`.
    pub fn of_version(root: impl Into<PathBuf>, version: u32) -> Self {
        Self {
            root: root.into(),
            version,
        }
    }

    pub fn version_dir(&self) -> PathBuf {
        self.root.join(format!("v{}", self.version))
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.version_dir().join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.version_dir().join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Opens the pinned map `name` of this layout.
    pub fn open_map(&self, name: &'static str) -> Result<MapData, OpenPinError> {
        MapData::from_pin(self.map(name)).map_err(|source| OpenPinError { map: name, source })
    }

    pub fn link(&self, program: &str, generation: &str) -> PathBuf {
        self.links_dir().join(format!("{program}@{generation}"))
    }

    /// Whether a link pin file belongs to the given generation.
    pub fn is_generation(path: &Path, generation: &str) -> bool {
        path.file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.rsplit_once('@'))
            .is_some_and(|(_, pinned)| pinned == generation)
    }

    /// Every layout version with a directory under the root, this one included, ascending.
    pub fn versions_present(root: &Path) -> Vec<u32> {
        let mut versions: Vec<u32> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|entry| version_of(&entry.file_name().to_string_lossy()))
            .collect();
        versions.sort_unstable();
        versions
    }

    /// The pins of every other layout version under the same root (older and newer).
    pub fn others(&self) -> Vec<Self> {
        Self::versions_present(&self.root)
            .into_iter()
            .filter(|version| *version != self.version)
            .map(|version| Self::of_version(&self.root, version))
            .collect()
    }
}

/// The version a directory name `v<N>` stands for.
fn version_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('v')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|version| *version > 0)
}

/// A map's name without its `_V<N>` suffix: the same map across layout versions.
pub fn base_name(name: &str) -> &str {
    match name.rsplit_once("_V") {
        Some((base, digits))
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            base
        }
        _ => name,
    }
}

/// Makes program `name`'s link an fd link and pins it at `path`, so that the attachment
/// outlives the agent.
pub fn pin_link(
    name: &'static str,
    link: impl TryInto<FdLink, Error = LinkError>,
    path: PathBuf,
) -> Result<PinnedLink, LoadError> {
    let link = link
        .try_into()
        .map_err(|source| LoadError::Link { name, source })?;
    link.pin(&path)
        .map_err(|source| LoadError::LinkPin { name, path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_directories_are_recognised_and_nothing_else() {
        assert_eq!(version_of("v1"), Some(1));
        assert_eq!(version_of("v12"), Some(12));
        for other in ["v", "v0", "vx", "lock", "v1.old", "1"] {
            assert_eq!(version_of(other), None, "{other}");
        }
        let dir = std::env::temp_dir().join(format!("sy-pins-{}", std::process::id()));
        for name in ["v3", "v1", "migrating", "v2x"] {
            std::fs::create_dir_all(dir.join(name)).expect("creating a test directory");
        }
        assert_eq!(PinLayout::versions_present(&dir), [1, 3]);
        let others: Vec<u32> = PinLayout::of_version(&dir, 1)
            .others()
            .iter()
            .map(|pins| pins.version)
            .collect();
        assert_eq!(others, [3]);
        std::fs::remove_dir_all(&dir).expect("removing the test directory");
    }

    #[test]
    fn base_names_drop_the_version_suffix() {
        assert_eq!(base_name("SVC4_V1"), "SVC4");
        assert_eq!(base_name("SOCK_NAT6_V12"), "SOCK_NAT6");
        assert_eq!(base_name("FIB_SCRATCH"), "FIB_SCRATCH");
        assert_eq!(base_name("A_V"), "A_V");
    }
}
