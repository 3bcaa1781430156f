//! What the agent records about its own work, for the metrics endpoint: sync durations,
//! network programming latency (kube-proxy's: from the earliest change not yet applied to the
//! moment its map writes completed), failures by reason and bad input skipped.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

/// Counters and last values; shared between the runner, the sources and readers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub syncs_total: u64,
    /// Failed syncs by reason (`map_full`, `kernel`, `read`, `injected`).
    pub sync_errors_total: BTreeMap<&'static str, u64>,
    pub last_sync_duration: Option<Duration>,
    pub last_sync_at: Option<SystemTime>,
    /// Earliest unapplied change → its map writes completed, for the last sync that wrote.
    pub last_programming_latency: Option<Duration>,
    /// Parts of objects the model skipped (each newly reported problem once).
    pub invalid_object_parts_total: u64,
    /// Documents of a manifests file that could not be used.
    pub skipped_documents_total: u64,
}

impl SyncStats {
    /// Records a successful sync; `latency` is set when it wrote something.
    pub fn record_sync(
        &mut self,
        new_problems: usize,
        duration: Duration,
        latency: Option<Duration>,
    ) {
        self.syncs_total += 1;
        self.last_sync_duration = Some(duration);
        self.last_sync_at = Some(SystemTime::now());
        self.invalid_object_parts_total += new_problems as u64;
        if latency.is_some() {
            self.last_programming_latency = latency;
        }
    }
}

/// A shared handle on the stats.
#[derive(Clone, Debug, Default)]
pub struct StatsHandle(Arc<Mutex<SyncStats>>);

impl StatsHandle {
    pub fn update(&self, change: impl FnOnce(&mut SyncStats)) {
        change(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn snapshot(&self) -> SyncStats {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
