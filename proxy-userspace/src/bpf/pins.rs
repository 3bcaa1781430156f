//! The pin layout under bpffs. Versioned, so an agent with another map layout never adopts
//! maps it cannot read: `<root>/v<N>/maps/<MAP>` and `<root>/v<N>/links/<program>@<generation>`.
use std::path::{Path, PathBuf};

use proxy_common::MAP_LAYOUT_VERSION;

#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn version_dir(&self) -> PathBuf {
        self.root.join(format!("v{MAP_LAYOUT_VERSION}"))
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
}
