//! The sync runner: source deltas in, map writes out.
//!
//! Modelled on kube-proxy's bounded-frequency runner: deltas only mark Services dirty; a sync
//! runs at once when the last one is older than `min_period` and otherwise waits for it
//! (bursts coalesce into one sync); a full recomputation runs at least every `max_period`
//! (re-reading the maps, repairing drift); Services that could not be written are retried with
//! exponential backoff. Nothing is synced before the source's first complete list. The syncs
//! run on a blocking thread, so the runtime keeps serving health probes meanwhile.
use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::mpsc::error::TryRecvError;
use tracing::{debug, error, info, warn};

use crate::{
    admin::{healthcheck::HealthCheckServer, stats::StatsHandle},
    datapath::{affinity::AffinityMatches, conntrack::ReconcileReport, udp_reaper::SocketReaper},
    maps::WriteError,
    model::{HealthCheck, ModelConfig},
    node::ModelConfigSource,
    plan::mirror::Fill,
    reconcile::{Reconciler, SyncReport},
    source::{Delta, DeltaReceiver},
};

/// Timing of the runner.
#[derive(Clone, Copy, Debug)]
pub struct SyncConfig {
    pub min_period: Duration,
    pub max_period: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Everything a sync works on, moved to a blocking thread for each sync.
struct Engine {
    reconciler: Reconciler,
    node: Box<dyn ModelConfigSource>,
    follow_up: FollowUp,
}

/// The follow-up work on the datapath's own state after each sync.
pub struct FollowUp {
    /// Stale UDP sockets and flows.
    pub reaper: Box<dyn SocketReaper>,
    /// The affinity match map.
    pub matches: AffinityMatches,
}

/// What one step (absorbing deltas, then syncing) produced.
struct Step {
    report: Result<SyncReport, WriteError>,
    summary: Summary,
}

/// The state after a step, for the statistics.
struct Summary {
    /// Services and EndpointSlices that changed (kube-proxy's change counters).
    service_changes: u64,
    slice_changes: u64,
    elapsed: Duration,
    fill: Fill,
    no_local_endpoints: usize,
    not_programmed: BTreeMap<&'static str, u64>,
    /// This node's Node object allows load-balanced traffic (KEP-3836).
    node_eligible: bool,
    /// Where NodePorts (and so health-check node ports) open.
    nodeport_addresses: Vec<std::net::IpAddr>,
    /// The TC path's UDP flows reconciled after this step.
    conntrack: Option<ReconcileReport>,
}

impl Engine {
    /// Whether this node's Node object (if the source has one) allows load-balanced traffic.
    fn node_eligible(&self) -> bool {
        self.node
            .node_name()
            .and_then(|name| self.reconciler.cluster().node(name))
            .is_none_or(crate::model::input::NodeInput::eligible)
    }

    fn config(&mut self) -> ModelConfig {
        let node = self
            .node
            .node_name()
            .and_then(|name| self.reconciler.cluster().node(name));
        // Borrow dance: the Node object lives in the reconciler, the reader in `node`.
        let node = node.cloned();
        self.node.model_config(node.as_ref())
    }

    fn step(&mut self, deltas: Vec<Delta>, full: bool) -> Step {
        let started = Instant::now();
        // Only the counts outlive the absorption: the touched Services are the reconciler's
        // dirty set now, and a second copy through a many-Service sync costs memory.
        let (mut service_changes, mut slice_changes) = (0, 0);
        for delta in deltas {
            let touched = self.reconciler.absorb(delta);
            service_changes += touched.service_changes;
            slice_changes += touched.slice_changes;
        }
        let config = self.config();
        let nodeport_addresses = config.nodeport_addresses.clone();
        let report = if full {
            self.reconciler.resync(&config)
        } else {
            Ok(self.reconciler.sync(&config))
        };
        // Level-triggered: the reaper compares the datapath's sockets and flows with what is
        // served now, so whatever a killed agent or a failed sync left behind is found at the
        // next full sync (the first one after a start included), not only what this sync
        // removed.
        if let Ok(report) = &report
            && (full || !report.removed_udp.is_empty())
        {
            self.follow_up
                .reaper
                .reap(&self.reconciler.mirror().served_udp());
        }
        // The affinity match map follows the programmed backends of the affine Services: the
        // frontends this sync touched, or all of them (read back and compared) at a full sync.
        let frontends_touched = self.reconciler.take_touched_frontends();
        if report.is_ok() {
            let outcome = if full {
                self.follow_up
                    .matches
                    .reconcile_all(self.reconciler.mirror())
            } else {
                self.follow_up
                    .matches
                    .update(self.reconciler.mirror(), frontends_touched)
            };
            if let Err(failure) = outcome {
                warn!(
                    "cannot update the affinity match map {}: {failure}; repaired at the next full sync",
                    proxy_common::map_names::AFFINITY_MATCH
                );
            }
        }
        let conntrack = match &report {
            Ok(report) if report.udp_touched => self
                .follow_up
                .reaper
                .reconcile_flows(&self.reconciler.udp_serving()),
            _ => None,
        };
        let mut not_programmed: BTreeMap<&'static str, u64> = BTreeMap::new();
        for status in self.reconciler.not_programmed().values() {
            *not_programmed.entry(status.reason).or_default() += 1;
        }
        Step {
            report,
            summary: Summary {
                service_changes,
                slice_changes,
                elapsed: started.elapsed(),
                fill: Fill {
                    affinity_matches: self.follow_up.matches.len() as u64,
                    ..self.reconciler.mirror().fill()
                },
                no_local_endpoints: self.reconciler.desired().no_local_endpoints(),
                not_programmed,
                node_eligible: self.node_eligible(),
                nodeport_addresses,
                conntrack,
            },
        }
    }
}

/// Drains every delta available now; `None` when the source is gone.
fn drain(deltas: &mut DeltaReceiver, into: &mut Vec<Delta>) -> Option<()> {
    loop {
        match deltas.try_recv() {
            Ok(delta) => into.push(delta),
            Err(TryRecvError::Empty) => return Some(()),
            Err(TryRecvError::Disconnected) => return None,
        }
    }
}

/// Runs until `shutdown` completes or the source goes away.
#[expect(
    clippy::too_many_arguments,
    reason = "each collaborator is injected on its own so tests can fake it"
)]
pub async fn run(
    mut deltas: DeltaReceiver,
    node: Box<dyn ModelConfigSource>,
    reconciler: Reconciler,
    follow_up: FollowUp,
    health_checks: HealthCheckServer,
    timing: SyncConfig,
    stats: StatsHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WriteError> {
    tokio::pin!(shutdown);
    info!(
        frontends = reconciler.mirror().frontends.len(),
        backends = reconciler.mirror().backends.len(),
        "adopted the pinned maps"
    );
    let mut engine = Some(Engine {
        reconciler,
        node,
        follow_up,
    });
    // Nothing is synced before the source listed everything once.
    let mut pending = Vec::new();
    loop {
        let delta = tokio::select! {
            () = &mut shutdown => return Ok(()),
            delta = deltas.recv() => delta,
        };
        match delta {
            None => return Ok(()),
            Some(Delta::Listed) => break,
            Some(delta) => pending.push(delta),
        }
    }
    // When the earliest change not yet in the maps arrived (network programming latency).
    let mut pending_since = Some(Instant::now());
    let mut retry: Option<Duration> = None;
    let mut full = true;
    let mut first_sync = true;
    let mut last_full = Instant::now();
    let mut health = HealthChecks::default();
    loop {
        let started = Instant::now();
        let batch = std::mem::take(&mut pending);
        let taken = engine.take().expect("the engine is back after every step");
        let (back, step, queued_during_sync, source_gone) =
            step_receiving(taken, batch, full, &mut deltas, &mut pending).await;
        let has_failures = back.reconciler.has_failures();
        engine = Some(back);
        if full {
            last_full = Instant::now();
        }
        stats.update(|stats| {
            stats.service_changes_total += step.summary.service_changes;
            stats.endpoint_changes_total += step.summary.slice_changes;
            stats.node_eligible = step.summary.node_eligible;
        });
        match step.report {
            Ok(report) => {
                // What was queued before this sync is in the maps now; only what arrived
                // during it still waits.
                stats.update(|stats| stats.queued_since = queued_during_sync);
                let latency = pending_since
                    .take()
                    .filter(|_| report.operations > 0)
                    .map(|since| since.elapsed());
                health
                    .follow(&report, &step.summary.nodeport_addresses, &health_checks)
                    .await;
                record(&stats, &report, &step.summary, latency);
                log_sync(&report, step.summary.elapsed, full, first_sync);
                first_sync = false;
                full = false;
                retry = has_failures
                    .then(|| retry.map_or(FIRST_RETRY, |previous| (previous * 2).min(MAX_RETRY)));
            }
            Err(failure) => retry = Some(sync_failed(&stats, &failure, retry, queued_during_sync)),
        }
        if source_gone {
            return Ok(());
        }
        let until_full = timing.max_period.saturating_sub(last_full.elapsed());
        let wait = retry.map_or(until_full, |delay| delay.min(until_full));
        if pending.is_empty() {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                delta = deltas.recv() => match delta {
                    None => return Ok(()),
                    Some(delta) => {
                        pending.push(delta);
                        queued(&stats);
                    }
                },
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Coalesce bursts: at most one sync per min_period.
        if let Some(remaining) = timing.min_period.checked_sub(started.elapsed()) {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(remaining) => {}
            }
        }
        if drain(&mut deltas, &mut pending).is_none() {
            return Ok(());
        }
        if !pending.is_empty() {
            pending_since.get_or_insert_with(Instant::now);
            queued(&stats);
        }
        full = full || last_full.elapsed() >= timing.max_period;
    }
}

/// Runs one step on a blocking thread; changes that arrive meanwhile are queued (and their
/// age watched by the health endpoints) at once, not when the sync is over. Returns the
/// engine, the step, when the first change arrived meanwhile, and whether the source is gone.
async fn step_receiving(
    mut engine: Engine,
    batch: Vec<Delta>,
    full: bool,
    deltas: &mut DeltaReceiver,
    pending: &mut Vec<Delta>,
) -> (Engine, Step, Option<SystemTime>, bool) {
    let mut sync = tokio::task::spawn_blocking(move || {
        let step = engine.step(batch, full);
        (engine, step)
    });
    let mut queued_during_sync = None;
    let mut source_gone = false;
    loop {
        tokio::select! {
            joined = &mut sync => {
                let (engine, step) = joined.expect("a sync never panics");
                return (engine, step, queued_during_sync, source_gone);
            }
            delta = deltas.recv(), if !source_gone => match delta {
                Some(delta) => {
                    pending.push(delta);
                    queued_during_sync.get_or_insert_with(SystemTime::now);
                }
                None => source_gone = true,
            },
        }
    }
}

/// Records a sync that failed as a whole (only a full one can: the maps could not be read);
/// returns the delay before the retry.
fn sync_failed(
    stats: &StatsHandle,
    failure: &WriteError,
    retry: Option<Duration>,
    queued_during_sync: Option<SystemTime>,
) -> Duration {
    let delay = retry.map_or(FIRST_RETRY, |previous| (previous * 2).min(MAX_RETRY));
    error!(retry_in_ms = delay.as_millis(), "sync failed: {failure}");
    stats.update(|stats| {
        // What was queued still waits, and so does what arrived meanwhile.
        if stats.queued_since.is_none() {
            stats.queued_since = queued_during_sync;
        }
        *stats.sync_errors_total.entry(failure.reason()).or_default() += 1;
    });
    delay
}

/// Notes that a change waits for a sync (the oldest one counts).
fn queued(stats: &StatsHandle) {
    stats.update(|stats| {
        stats.queued_since.get_or_insert_with(SystemTime::now);
    });
}

/// The health-check listeners last asked for, and whether some could not be opened (then
/// they are tried again after every sync).
#[derive(Default)]
struct HealthChecks {
    desired: BTreeMap<u16, HealthCheck>,
    failed: bool,
}

impl HealthChecks {
    /// Opens and closes listeners when the wanted set or the NodePort addresses changed, or
    /// some failed to open.
    async fn follow(
        &mut self,
        report: &SyncReport,
        addresses: &[std::net::IpAddr],
        server: &HealthCheckServer,
    ) {
        if let Some(desired) = &report.health_checks {
            self.desired.clone_from(desired);
        }
        let moved = server.set_addresses(addresses);
        if report.health_checks.is_some() || self.failed || moved {
            let done = server.reconcile(&self.desired).await;
            self.failed = !done.failed.is_empty();
        }
    }
}

/// Records a successful sync and the state after it.
fn record(stats: &StatsHandle, report: &SyncReport, summary: &Summary, latency: Option<Duration>) {
    stats.update(|stats| {
        stats.record_sync(report.new_problems, summary.elapsed, latency);
        stats.no_local_endpoints = summary.no_local_endpoints as u64;
        stats.record_fill(&summary.fill);
        stats.not_programmed.clone_from(&summary.not_programmed);
        if let Some(conntrack) = &summary.conntrack {
            stats.record_conntrack_reconcile(conntrack);
        }
        if report.diverged {
            stats.model_divergences_total += 1;
        }
    });
}

fn log_sync(report: &SyncReport, elapsed: Duration, full: bool, first: bool) {
    if report.operations > 0 || first {
        info!(
            "dataplane synced operations={} elapsed_ms={} elapsed_us={} services={} full={full}",
            report.operations,
            elapsed.as_millis(),
            elapsed.as_micros(),
            report.recomputed,
        );
    } else {
        debug!(
            elapsed_us = elapsed.as_micros(),
            services = report.recomputed,
            full,
            "dataplane already in sync"
        );
    }
    if report.affinity_forgotten > 0 {
        info!(
            forgotten = report.affinity_forgotten,
            "forgot session-affinity entries whose backend left its Service"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admin::healthcheck::BindTo,
        datapath::udp_reaper::NoReaper,
        maps::{FakeMaps, Shared},
        source::{lists_of, manifest},
    };

    fn service(backends: &[&str]) -> crate::model::ClusterSnapshot {
        let endpoints: Vec<String> = backends
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        manifest::parse(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ))
        .snapshot
    }

    async fn wait_for(maps: &Shared<FakeMaps>, backends: usize) {
        for _ in 0..200 {
            if maps.lock().image.backends4.len() == backends {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the maps never held {backends} backends");
    }

    #[tokio::test]
    async fn the_runner_waits_for_the_first_lists_then_follows_changes() {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let maps = Shared::new(FakeMaps::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stats = StatsHandle::default();
        let runner = tokio::spawn(run(
            receiver,
            Box::new(ModelConfig::default()),
            Reconciler::new(Box::new(maps.clone())).unwrap(),
            FollowUp {
                reaper: Box::new(NoReaper),
                matches: AffinityMatches::new(Box::new(
                    crate::datapath::affinity::MemoryMatches::default(),
                )),
            },
            HealthCheckServer::new(
                BindTo::Address(std::net::Ipv4Addr::LOCALHOST.into()),
                std::sync::Arc::new(|| true),
            ),
            SyncConfig {
                min_period: Duration::from_millis(10),
                max_period: Duration::from_mins(1),
            },
            stats.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        // Lists without the final "listed": nothing may be written yet.
        let mut lists = lists_of(&service(&["10.0.0.1"]));
        let listed = lists.pop().unwrap();
        for delta in lists {
            sender.send(delta).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            maps.lock().journal.is_empty(),
            "nothing is written before the first complete lists"
        );
        sender.send(listed).unwrap();
        wait_for(&maps, 1).await;
        // A burst of changes coalesces; the last one wins.
        for count in 1..=20 {
            let ips: Vec<String> = (1..=count).map(|i| format!("10.0.1.{i}")).collect();
            let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
            let mut deltas = lists_of(&service(&refs));
            deltas.pop();
            for delta in deltas {
                sender.send(delta).unwrap();
            }
        }
        wait_for(&maps, 20).await;
        stop.send(()).unwrap();
        runner.await.unwrap().unwrap();
        let recorded = stats.snapshot();
        assert!(recorded.syncs_total >= 2, "{recorded:?}");
        assert!(
            recorded.syncs_total < 22,
            "bursts coalesce: {} syncs",
            recorded.syncs_total
        );
        assert!(
            recorded.last_programming_latency.is_some() && recorded.last_sync_duration.is_some(),
            "{recorded:?}"
        );
        assert!(recorded.sync_errors_total.is_empty(), "{recorded:?}");
        assert_eq!(recorded.map_entries[proxy_common::map_names::BACKENDS4], 20);
    }
}
