//! In-memory maps for tests: the same image the kernel maps would hold.
use super::encode::{MapImage, MapWrite};
use super::{MapWriter, WriteError};

/// In-memory stand-in for the kernel maps.
#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub image: MapImage,
    /// Every write in order, for tests that check ordering.
    pub journal: Vec<MapWrite>,
}

impl MapWriter for FakeMaps {
    fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
        self.image.apply(*write);
        self.journal.push(*write);
        Ok(())
    }

    fn read_image(&self) -> Result<MapImage, WriteError> {
        Ok(self.image.clone())
    }
}
