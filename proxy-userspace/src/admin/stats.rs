//! What the agent records about its own work, for the metrics and health endpoints: sync
//! durations, network programming latency (kube-proxy's: from the earliest change not yet
//! applied to the moment its map writes completed), changes seen, failures by reason, bad
//! input skipped and how full the maps are.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use proxy_common::map_names;

use crate::{datapath::conntrack::ReconcileReport, plan::mirror::Fill};

/// A Prometheus histogram: cumulative counts per upper bound, sum and count.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len()];
        Self {
            bounds,
            counts,
            sum: 0.0,
            count: 0,
        }
    }

    /// kube-proxy's sync duration buckets: 1 ms doubling, 15 buckets.
    pub fn sync_duration() -> Self {
        Self::new((0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect())
    }

    /// kube-proxy's network programming buckets (0.25 s steps to 1 s, then coarser).
    pub fn programming_latency() -> Self {
        Self::new(vec![
            0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ])
    }

    pub fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// Entry counts of the maps the agent owns, per map name.
pub type MapEntries = BTreeMap<&'static str, u64>;

/// Counters and last values; shared between the runner, the sources and the endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncStats {
    pub syncs_total: u64,
    /// Failed syncs by reason (`map_full`, `kernel`, `read`, `injected`).
    pub sync_errors_total: BTreeMap<&'static str, u64>,
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    pub last_sync_duration: Option<Duration>,
    pub last_sync_at: Option<SystemTime>,
    /// Earliest unapplied change → its map writes completed, for the last sync that wrote.
    pub last_programming_latency: Option<Duration>,
    /// EndpointSlices and Services added, changed or removed, as the runner saw them.
    pub endpoint_changes_total: u64,
    pub service_changes_total: u64,
    /// Services whose traffic policy leaves no endpoint on this node (kube-proxy's gauge).
    pub no_local_endpoints: u64,
    /// Parts of objects the model skipped (each newly reported problem once).
    pub invalid_object_parts_total: u64,
    /// Documents of a manifests file that could not be used.
    pub skipped_documents_total: u64,
    pub map_entries: MapEntries,
    /// Services not (completely) programmed, by reason.
    pub not_programmed: BTreeMap<&'static str, u64>,
    /// Full recomputations that disagreed with the incremental model (should stay 0).
    pub model_divergences_total: u64,
    /// When the oldest change not yet taken by a sync arrived (kube-proxy's queued update);
    /// `None` when every change has been synced.
    pub queued_since: Option<SystemTime>,
    /// This node's Node object allows load-balanced traffic (not being deleted, no
    /// to-be-deleted taint); true while there is no Node object.
    pub node_eligible: bool,
    /// Answers of `/healthz` and `/livez`, by HTTP status code.
    pub healthz_total: BTreeMap<u16, u64>,
    pub livez_total: BTreeMap<u16, u64>,
    /// The TC path's UDP conntrack reconciler per family (IPv4, IPv6): how long each run
    /// took, and the flows it removed (kube-proxy's `kubeproxy_conntrack_reconciler_*`).
    pub conntrack_reconcile_duration: [Histogram; 2],
    pub conntrack_reconcile_deleted: [u64; 2],
    /// Interfaces that need the TC program and do not have it, with the reason (an
    /// `--interfaces` name that does not exist yet, a failed attach).
    pub tc_missing: BTreeMap<String, String>,
}

impl Default for SyncStats {
    fn default() -> Self {
        Self {
            syncs_total: 0,
            sync_errors_total: BTreeMap::new(),
            sync_duration: Histogram::sync_duration(),
            programming_latency: Histogram::programming_latency(),
            last_sync_duration: None,
            last_sync_at: None,
            last_programming_latency: None,
            endpoint_changes_total: 0,
            service_changes_total: 0,
            no_local_endpoints: 0,
            invalid_object_parts_total: 0,
            skipped_documents_total: 0,
            map_entries: MapEntries::new(),
            not_programmed: BTreeMap::new(),
            model_divergences_total: 0,
            queued_since: None,
            node_eligible: true,
            healthz_total: BTreeMap::new(),
            livez_total: BTreeMap::new(),
            conntrack_reconcile_duration: [Histogram::sync_duration(), Histogram::sync_duration()],
            conntrack_reconcile_deleted: [0, 0],
            tc_missing: BTreeMap::new(),
        }
    }
}

impl SyncStats {
    /// Records the agent-owned maps' entry counts (from the mirror: no map is read).
    pub fn record_fill(&mut self, fill: &Fill) {
        let per_map = [
            (map_names::SERVICES4, fill.services[0]),
            (map_names::SERVICES6, fill.services[1]),
            (map_names::BACKENDS4, fill.backends[0]),
            (map_names::BACKENDS6, fill.backends[1]),
            (map_names::REV_NAT4, fill.rev_nats[0]),
            (map_names::REV_NAT6, fill.rev_nats[1]),
            (map_names::SERVICE_NAMES, fill.names),
            (map_names::SOURCE_RANGES4, fill.source_ranges[0]),
            (map_names::SOURCE_RANGES6, fill.source_ranges[1]),
            (map_names::AFFINITY_MATCH, fill.affinity_matches),
        ];
        for (map, entries) in per_map {
            self.map_entries.insert(map, entries);
        }
    }

    /// Records a run of the UDP conntrack reconciler.
    pub fn record_conntrack_reconcile(&mut self, report: &ReconcileReport) {
        for (family, run) in report.families.iter().enumerate() {
            self.conntrack_reconcile_duration[family].observe(run.elapsed);
            self.conntrack_reconcile_deleted[family] += run.deleted;
        }
    }

    /// Records a successful sync; `latency` is set when it wrote something.
    pub fn record_sync(
        &mut self,
        new_problems: usize,
        duration: Duration,
        latency: Option<Duration>,
    ) {
        self.syncs_total += 1;
        self.sync_duration.observe(duration);
        self.last_sync_duration = Some(duration);
        self.last_sync_at = Some(SystemTime::now());
        self.invalid_object_parts_total += new_problems as u64;
        if let Some(latency) = latency {
            self.programming_latency.observe(latency);
            self.last_programming_latency = Some(latency);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let mut histogram = Histogram::new(vec![0.1, 1.0]);
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_millis(500));
        histogram.observe(Duration::from_secs(5));
        assert_eq!(histogram.counts, [1, 2]);
        assert_eq!(histogram.count, 3);
        assert!((histogram.sum - 5.55).abs() < 1e-9);
    }
}
