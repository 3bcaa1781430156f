//! A writer that fails on chosen writes, to prove that failures leave nothing half-applied.
use std::collections::BTreeSet;

use super::encode::{MapImage, MapWrite};
use super::{MapWriter, WriteError};

/// Wraps a writer and fails the writes whose (0-based, counted over its lifetime) index is in
/// `fail_at`.
pub struct FaultyWriter<W> {
    pub inner: W,
    pub fail_at: BTreeSet<usize>,
    writes: usize,
}

impl<W> FaultyWriter<W> {
    pub fn new(inner: W, fail_at: impl IntoIterator<Item = usize>) -> Self {
        Self {
            inner,
            fail_at: fail_at.into_iter().collect(),
            writes: 0,
        }
    }
}

impl<W: MapWriter> MapWriter for FaultyWriter<W> {
    fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
        let index = self.writes;
        self.writes += 1;
        if self.fail_at.contains(&index) {
            return Err(WriteError::Injected { index });
        }
        self.inner.write(write)
    }

    fn read_image(&self) -> Result<MapImage, WriteError> {
        self.inner.read_image()
    }

    fn capacity(&self, map: &'static str) -> Option<u32> {
        self.inner.capacity(map)
    }
}
