//! In-memory maps for tests: the same image the kernel maps would hold, with capacities a test
//! can set small to see what a full map does.
use std::collections::BTreeMap;

use super::encode::{MapImage, MapWrite};
use super::{MapWriter, WriteError};

/// In-memory stand-in for the kernel maps.
#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub image: MapImage,
    /// Every write in order, for tests that check ordering.
    pub journal: Vec<MapWrite>,
    /// Entries each map may hold, by map name (unlimited when absent).
    pub capacities: BTreeMap<&'static str, usize>,
}

impl FakeMaps {
    /// Empty maps where `map` holds at most `entries`.
    #[must_use]
    pub fn with_capacity(mut self, map: &'static str, entries: usize) -> Self {
        self.capacities.insert(map, entries);
        self
    }
}

impl MapWriter for FakeMaps {
    fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
        let map = write.map_name();
        if let Some(capacity) = self.capacities.get(map)
            && !write.is_delete()
            && !self.image.holds(write)
            && self.image.len_of(write) >= *capacity
        {
            return Err(WriteError::MapFull {
                map,
                capacity: u32::try_from(*capacity).unwrap_or(u32::MAX),
                entry: format!("{write:?}"),
            });
        }
        self.image.apply(write.clone());
        self.journal.push(write.clone());
        Ok(())
    }

    fn read_image(&self) -> Result<MapImage, WriteError> {
        Ok(self.image.clone())
    }

    fn capacity(&self, map: &'static str) -> Option<u32> {
        self.capacities
            .get(map)
            .map(|entries| u32::try_from(*entries).unwrap_or(u32::MAX))
    }
}

/// A writer shared between the code under test, which owns a box of it, and the test, which
/// looks at (or changes) the maps in between.
#[derive(Debug, Default)]
pub struct Shared<W>(pub std::sync::Arc<std::sync::Mutex<W>>);

impl<W> Clone for Shared<W> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<W> Shared<W> {
    pub fn new(writer: W) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(writer)))
    }

    /// The writer, for the test to look at.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, W> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<W: MapWriter> MapWriter for Shared<W> {
    fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
        self.lock().write(write)
    }

    fn read_image(&self) -> Result<MapImage, WriteError> {
        self.lock().read_image()
    }

    fn capacity(&self, map: &'static str) -> Option<u32> {
        self.lock().capacity(map)
    }
}
