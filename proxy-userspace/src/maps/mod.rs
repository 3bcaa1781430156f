//! Map writers: where planned operations meet the maps. The real one writes the kernel's
//! pinned maps; the fake one keeps an in-memory image for tests; the faulty one wraps either
//! and fails on demand. `apply` keeps the mirror true: it changes only after a write succeeded.
//! `encode` is the one place that knows the wire layout.
pub mod encode;
mod fake;
mod faulty;
mod kernel;

pub use fake::{FakeMaps, Shared};
pub use faulty::FaultyWriter;
pub use kernel::KernelMaps;
pub(crate) use kernel::take;

use crate::plan::{mirror::Programmed, op::Op};
use encode::{MapImage, MapWrite};

/// Why a map write or read failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("map {map} is full ({capacity} entries): cannot add {entry}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        entry: String,
    },
    #[error("{action} {entry} in map {map} failed: {source}")]
    Kernel {
        map: &'static str,
        action: &'static str,
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading map {map} failed: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map} is not in the loaded eBPF object")]
    NotInObject { map: &'static str },
    #[error(
        "cannot add {entry}: map {map} is not in the loaded eBPF object (built before the TC path?)"
    )]
    MissingMap { map: &'static str, entry: String },
    #[error("injected fault on write #{index}")]
    Injected { index: usize },
}

impl WriteError {
    /// A short, stable name of the failure's kind (a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MapFull { .. } => "map_full",
            Self::Kernel { .. } => "kernel",
            Self::Read { .. } => "read",
            Self::MissingMap { .. } | Self::NotInObject { .. } => "missing_map",
            Self::Injected { .. } => "injected",
        }
    }
}

/// Something that can write map entries and read the maps back.
pub trait MapWriter: Send {
    /// Writes (or deletes) one entry. Deleting a missing key is success.
    fn write(&mut self, write: &MapWrite) -> Result<(), WriteError>;
    /// Reads the content of the maps the agent owns.
    fn read_image(&self) -> Result<MapImage, WriteError>;
    /// How many entries a map can hold, if known.
    fn capacity(&self, _map: &'static str) -> Option<u32> {
        None
    }
}

/// A plan that stopped part-way: how many operations were applied, why it stopped, and
/// whether what it had applied was undone.
#[derive(Debug, thiserror::Error)]
#[error("applied {applied} of {total} map operations{}; operation {op:?} failed: {source}", if *.rolled_back { " (undone)" } else { "" })]
pub struct ApplyError {
    pub applied: usize,
    pub total: usize,
    pub op: Box<Op>,
    /// The operations applied before the failure were undone.
    pub rolled_back: bool,
    #[source]
    pub source: WriteError,
}

/// Applies operations in order, recording each one in `mirror` once the writer accepted it.
/// Stops at the first failure; the plan's order keeps the datapath consistent at that point
/// and the next sync resumes from the mirror.
pub fn apply(
    writer: &mut dyn MapWriter,
    mirror: &mut Programmed,
    ops: &[Op],
) -> Result<(), ApplyError> {
    for (index, op) in ops.iter().enumerate() {
        if let Err(source) = writer.write(&encode::encode(op)) {
            return Err(ApplyError {
                applied: index,
                total: ops.len(),
                op: Box::new(op.clone()),
                rolled_back: false,
                source,
            });
        }
        mirror.apply(op);
    }
    Ok(())
}

/// Applies one Service's plan as a unit: when a write fails, what the plan already applied
/// is undone (the inverse operations, newest first, which is make-before-break backwards), so
/// the maps hold the whole change or none of it. Undoing only deletes entries or restores
/// ones that existed, so it needs no room in a full map.
pub fn apply_all_or_nothing(
    writer: &mut dyn MapWriter,
    mirror: &mut Programmed,
    ops: &[Op],
) -> Result<(), ApplyError> {
    let mut undo = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let inverse = mirror.inverse(op);
        if let Err(source) = writer.write(&encode::encode(op)) {
            let rolled_back = undo.into_iter().rev().all(|inverse: Op| {
                let undone = writer.write(&encode::encode(&inverse)).is_ok();
                if undone {
                    mirror.apply(&inverse);
                }
                undone
            });
            return Err(ApplyError {
                applied: index,
                total: ops.len(),
                op: Box::new(op.clone()),
                rolled_back,
                source,
            });
        }
        mirror.apply(op);
        undo.extend(inverse);
    }
    Ok(())
}
