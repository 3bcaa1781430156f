//! The sync runner: source snapshots in, map writes out.
//!
//! Modelled on kube-proxy's bounded-frequency runner: changes only mark the state dirty; a sync
//! runs at most every `min_period` (bursts coalesce into one sync) and at least every
//! `max_period` (then the maps are re-read, repairing any drift); a failed sync is retried with
//! exponential backoff. Nothing is synced before the source's first complete snapshot.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::{map_names, service_flags};
use tracing::{debug, error, info, warn};

use crate::{
    admin::{
        healthcheck::HealthCheckServer,
        stats::{MapEntries, StatsHandle},
    },
    datapath::udp_reaper::SocketReaper,
    maps::{self as writer, MapWriter, WriteError},
    model::{self, ClusterSnapshot, HealthCheck, ModelConfig, Problem},
    node::ModelConfigSource,
    plan::{
        mirror::{Programmed, UdpPair},
        plan,
    },
    source::SnapshotReceiver,
};

/// Timing of the runner.
#[derive(Clone, Copy, Debug)]
pub struct SyncConfig {
    pub min_period: Duration,
    pub max_period: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Rebuilds the mirror from the maps (restore on start, drift repair later).
pub fn restore(writer: &dyn MapWriter) -> Result<Programmed, WriteError> {
    let image = writer.read_image()?;
    let (programmed, unreadable) = crate::maps::encode::programmed_from_image(&image);
    for entry in &unreadable.0 {
        warn!("leaving an entry this agent cannot interpret: {entry}");
    }
    Ok(programmed)
}

/// What one successful sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Map operations applied.
    pub operations: usize,
    /// Problems reported that the previous sync had not reported.
    pub new_problems: usize,
    /// Services whose internal traffic policy leaves no endpoint on this node.
    pub no_local_endpoints: usize,
    /// The desired healthCheckNodePort listeners, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// One sync: model, plan and apply.
pub fn sync_once(
    snapshot: &ClusterSnapshot,
    config: &ModelConfig,
    writer: &mut dyn MapWriter,
    mirror: &mut Programmed,
    last_problems: &mut Vec<Problem>,
) -> Result<SyncOutcome, writer::ApplyError> {
    let output = model::build(snapshot, config);
    let mut new_problems = 0;
    if output.problems != *last_problems {
        for problem in output
            .problems
            .iter()
            .filter(|problem| !last_problems.contains(problem))
        {
            warn!("skipping part of {problem}");
            new_problems += 1;
        }
        *last_problems = output.problems;
    }
    let ops = plan(mirror, &output.desired);
    writer::apply(writer, mirror, &ops)?;
    if !ops.is_empty() {
        forget_stale_affinity(writer, mirror);
    }
    let no_local_endpoints = output
        .desired
        .frontends
        .values()
        // ClusterIPs only: the metric is kube-proxy's traffic_policy="internal" one, and the
        // node-local entries of externalTrafficPolicy Local frontends carry the flag too.
        .filter(|frontend| {
            frontend.flags & service_flags::NO_LOCAL_ENDPOINTS != 0
                && frontend.flags & service_flags::CLUSTER_IP != 0
        })
        .map(|frontend| (&frontend.service.namespace, &frontend.service.name))
        .collect::<BTreeSet<_>>()
        .len();
    Ok(SyncOutcome {
        operations: ops.len(),
        new_problems,
        no_local_endpoints,
        health_checks: output.desired.health_checks,
    })
}

/// How many entries each agent-owned map holds, from the mirror.
fn map_entries(mirror: &Programmed) -> MapEntries {
    let mut entries = MapEntries::new();
    for (key, frontend) in &mirror.frontends {
        let map = if key.ip.is_ipv4() {
            map_names::SERVICES4
        } else {
            map_names::SERVICES6
        };
        *entries.entry(map).or_default() +=
            u64::from(frontend.master.is_some()) + frontend.slots.len() as u64;
    }
    for backend in mirror.backends.values() {
        let map = if backend.ip.is_ipv4() {
            map_names::BACKENDS4
        } else {
            map_names::BACKENDS6
        };
        *entries.entry(map).or_default() += 1;
    }
    for target in mirror.rev_nats.values() {
        let map = if target.ip.is_ipv4() {
            map_names::REV_NAT4
        } else {
            map_names::REV_NAT6
        };
        *entries.entry(map).or_default() += 1;
    }
    entries
}

/// How many objects were added, changed or removed between two snapshots (by namespace/name).
fn changed<
    K: PartialEq
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    before: &[Arc<K>],
    after: &[Arc<K>],
) -> u64 {
    let key = |object: &Arc<K>| {
        (
            object.metadata().namespace.clone(),
            object.metadata().name.clone(),
        )
    };
    let old: std::collections::HashMap<_, _> =
        before.iter().map(|object| (key(object), object)).collect();
    let new: std::collections::HashMap<_, _> =
        after.iter().map(|object| (key(object), object)).collect();
    let added_or_changed = new
        .iter()
        .filter(|(name, object)| old.get(*name) != Some(*object))
        .count();
    let removed = old.keys().filter(|name| !new.contains_key(*name)).count();
    (added_or_changed + removed) as u64
}

/// Records a successful sync and the maps' fill after it.
fn record_success(
    stats: &StatsHandle,
    mirror: &Programmed,
    outcome: &SyncOutcome,
    elapsed: Duration,
    latency: Option<Duration>,
) {
    let entries = map_entries(mirror);
    stats.update(|stats| {
        stats.record_sync(outcome.new_problems, elapsed, latency);
        stats.no_local_endpoints = outcome.no_local_endpoints as u64;
        stats.map_entries = entries;
    });
}

/// Counts the Services and EndpointSlices that changed between two snapshots.
fn record_changes(stats: &StatsHandle, before: &ClusterSnapshot, after: &ClusterSnapshot) {
    let services = changed(&before.services, &after.services);
    let slices = changed(&before.endpoint_slices, &after.endpoint_slices);
    stats.update(|stats| {
        stats.service_changes_total += services;
        stats.endpoint_changes_total += slices;
    });
}

/// Deletes session-affinity entries whose backend left its service. Best effort: a failure
/// only delays the cleanup to the next sync (the datapath also checks the backend exists).
fn forget_stale_affinity(writer: &mut dyn MapWriter, mirror: &Programmed) {
    let affinity = match writer.read_image() {
        Ok(image) => image.affinity,
        Err(failure) => {
            warn!("cannot read the affinity map: {failure}");
            return;
        }
    };
    for key in crate::datapath::affinity::stale_affinity(mirror, &affinity) {
        if let Err(failure) = writer.write(&crate::maps::encode::MapWrite::AffinityDelete(key)) {
            warn!("cannot forget a stale affinity entry: {failure}");
            return;
        }
    }
}

/// Runs until `shutdown` completes or the source goes away.
#[expect(
    clippy::too_many_arguments,
    reason = "each collaborator is injected on its own so tests can fake it"
)]
pub async fn run(
    mut source: SnapshotReceiver,
    mut config: impl ModelConfigSource,
    mut writer: Box<dyn MapWriter>,
    mut reaper: Box<dyn SocketReaper>,
    health_checks: HealthCheckServer,
    timing: SyncConfig,
    stats: StatsHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WriteError> {
    tokio::pin!(shutdown);
    let mut mirror = restore(writer.as_ref())?;
    info!(
        frontends = mirror.frontends.len(),
        backends = mirror.backends.len(),
        "adopted the pinned maps"
    );
    let mut snapshot: Arc<ClusterSnapshot> = tokio::select! {
        () = &mut shutdown => return Ok(()),
        first = source.wait_for(Option::is_some) => match first {
            Ok(snapshot) => snapshot.clone().expect("waited for Some"),
            Err(_) => return Ok(()),
        },
    };
    // When the earliest change not yet in the maps arrived (network programming latency).
    let mut pending_since = Some(Instant::now());
    let mut last_problems = Vec::new();
    let mut retry: Option<Duration> = None;
    let mut first_sync = true;
    loop {
        let started = Instant::now();
        let udp_before = mirror.udp_pairs(mirror.frontends.keys());
        // Node addresses are read afresh for every sync: an address change reprograms NodePorts.
        match sync_once(
            &snapshot,
            &config.model_config(&snapshot),
            writer.as_mut(),
            &mut mirror,
            &mut last_problems,
        ) {
            Ok(outcome) => {
                retry = None;
                let removed: BTreeSet<UdpPair> = udp_before
                    .difference(&mirror.udp_pairs(mirror.frontends.keys()))
                    .copied()
                    .collect();
                if !removed.is_empty() {
                    reaper.reap(&removed);
                }
                health_checks.reconcile(&outcome.health_checks).await;
                let elapsed = started.elapsed();
                let latency = pending_since
                    .take()
                    .filter(|_| outcome.operations > 0)
                    .map(|since| since.elapsed());
                record_success(&stats, &mirror, &outcome, elapsed, latency);
                if outcome.operations > 0 || first_sync {
                    info!(
                        operations = outcome.operations,
                        elapsed_ms = elapsed.as_millis(),
                        "dataplane synced"
                    );
                } else {
                    debug!("dataplane already in sync");
                }
                first_sync = false;
            }
            Err(failure) => {
                let delay = retry.map_or(FIRST_RETRY, |previous| (previous * 2).min(MAX_RETRY));
                error!(retry_in_ms = delay.as_millis(), "sync failed: {failure}");
                stats.update(|stats| {
                    *stats
                        .sync_errors_total
                        .entry(failure.source.reason())
                        .or_default() += 1;
                });
                retry = Some(delay);
            }
        }
        let wait = retry.unwrap_or(timing.max_period);
        let mut periodic = false;
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            changed = source.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                pending_since.get_or_insert_with(Instant::now);
            }
            () = tokio::time::sleep(wait) => periodic = retry.is_none(),
        }
        if periodic {
            // Drift repair: trust the kernel, not the mirror.
            match restore(writer.as_ref()) {
                Ok(restored) => mirror = restored,
                Err(failure) => warn!("cannot re-read the maps for drift repair: {failure}"),
            }
        }
        // Coalesce bursts: at most one sync per min_period.
        if let Some(remaining) = timing.min_period.checked_sub(started.elapsed()) {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(remaining) => {}
            }
        }
        if let Some(latest) = source.borrow_and_update().clone() {
            record_changes(&stats, &snapshot, &latest);
            snapshot = latest;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        maps::{
            FakeMaps, FaultyWriter,
            encode::{MapImage, MapWrite},
        },
        source::manifest,
    };

    fn snapshot(yaml: &str) -> ClusterSnapshot {
        let parsed = manifest::parse(yaml);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        parsed.snapshot
    }

    fn service(backends: &[&str]) -> ClusterSnapshot {
        let endpoints: Vec<String> = backends
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        snapshot(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ))
    }

    /// What the datapath relies on at every instant: a master's count never exceeds the slots
    /// present, and every slot points at an existing backend.
    fn assert_datapath_consistent(image: &MapImage, context: &str) {
        for (key, master) in image
            .services4
            .iter()
            .filter(|(key, _)| key.backend_slot == 0)
        {
            for slot in 1..=master.count {
                let slot_key = proxy_common::Service4Key {
                    backend_slot: slot,
                    ..*key
                };
                let entry = image
                    .services4
                    .get(&slot_key)
                    .unwrap_or_else(|| panic!("{context}: slot {slot} missing"));
                assert!(
                    image.backends4.contains_key(&entry.backend_id),
                    "{context}: backend {} missing",
                    entry.backend_id
                );
            }
        }
    }

    /// Replays a journal write by write, checking consistency after each one.
    fn replay_checking(start: &MapImage, journal: &[MapWrite], context: &str) {
        let mut image = start.clone();
        for (index, write) in journal.iter().enumerate() {
            image.apply(*write);
            assert_datapath_consistent(&image, &format!("{context}, after write {index}"));
        }
    }

    fn sync_to(fake: &mut FakeMaps, mirror: &mut Programmed, target: &ClusterSnapshot) {
        sync_once(
            target,
            &ModelConfig::default(),
            fake,
            mirror,
            &mut Vec::new(),
        )
        .expect("fake writes succeed");
    }

    #[test]
    fn every_intermediate_state_of_a_transition_is_consistent() {
        let steps = [
            service(&["10.0.0.1"]),
            service(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            service(&["10.0.0.3"]),
            service(&[]),
            ClusterSnapshot::default(),
        ];
        let mut fake = FakeMaps::default();
        let mut mirror = Programmed::default();
        for (index, step) in steps.iter().enumerate() {
            let before = fake.image.clone();
            fake.journal.clear();
            sync_to(&mut fake, &mut mirror, step);
            replay_checking(&before, &fake.journal, &format!("step {index}"));
            assert_eq!(
                crate::maps::encode::programmed_from_image(&fake.image).0,
                mirror,
                "mirror matches the maps after step {index}"
            );
        }
        assert_eq!(
            fake.image,
            MapImage::default(),
            "deleting everything leaves empty maps"
        );
    }

    #[test]
    fn a_failed_write_at_any_point_leaves_a_consistent_datapath_and_a_true_mirror() {
        let from = service(&["10.0.0.1", "10.0.0.2"]);
        let to = service(&["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let mut clean = FakeMaps::default();
        let mut clean_mirror = Programmed::default();
        sync_to(&mut clean, &mut clean_mirror, &from);
        let start = clean.clone();
        sync_to(&mut clean, &mut clean_mirror, &to);
        let total_writes = clean.journal.len() - start.journal.len();
        for fail_at in 0..total_writes {
            let mut faulty = FaultyWriter::new(start.clone(), [fail_at]);
            let mut mirror = crate::maps::encode::programmed_from_image(&start.image).0;
            let error = sync_once(
                &to,
                &ModelConfig::default(),
                &mut faulty,
                &mut mirror,
                &mut Vec::new(),
            )
            .expect_err("the injected fault surfaces");
            assert_eq!(error.applied, fail_at);
            assert_datapath_consistent(&faulty.inner.image, &format!("failure at write {fail_at}"));
            assert_eq!(
                crate::maps::encode::programmed_from_image(&faulty.inner.image).0,
                mirror,
                "mirror is exactly what was written"
            );
            // The retry converges to the same maps as an uninterrupted sync.
            sync_once(
                &to,
                &ModelConfig::default(),
                &mut faulty,
                &mut mirror,
                &mut Vec::new(),
            )
            .expect("retry succeeds");
            assert_eq!(
                faulty.inner.image, clean.image,
                "retry after failure at write {fail_at}"
            );
        }
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_without_writing_anything() {
        let state = service(&["10.0.0.1", "10.0.0.2"]);
        let mut fake = FakeMaps::default();
        sync_to(&mut fake, &mut Programmed::default(), &state);
        let mut adopted = restore(&fake).expect("fake maps read");
        fake.journal.clear();
        sync_to(&mut fake, &mut adopted, &state);
        assert!(
            fake.journal.is_empty(),
            "no write on adoption: {:?}",
            fake.journal
        );
    }

    #[test]
    fn affinity_entries_are_forgotten_when_their_backend_leaves_the_service() {
        let mut fake = FakeMaps::default();
        let mut mirror = Programmed::default();
        sync_to(&mut fake, &mut mirror, &service(&["10.0.0.1", "10.0.0.2"]));
        let rev_nat_id = mirror
            .frontends
            .values()
            .find_map(|f| f.master)
            .unwrap()
            .rev_nat_id;
        let id_of = |mirror: &Programmed, ip: &str| {
            let backend = crate::model::BackendAddr {
                ip: ip.parse().unwrap(),
                port: 8080,
                protocol: crate::model::Protocol::Tcp,
            };
            mirror.backend_id(&backend).unwrap()
        };
        for (client, ip) in [(1u64, "10.0.0.1"), (2, "10.0.0.2")] {
            let key = proxy_common::AffinityKey {
                client_cookie: client,
                rev_nat_id,
                pad: 0,
            };
            let value = proxy_common::AffinityValue {
                last_used_ns: 1,
                backend_id: id_of(&mirror, ip),
                pad: 0,
            };
            fake.image.affinity.insert(key, value);
        }
        sync_to(&mut fake, &mut mirror, &service(&["10.0.0.1"]));
        let clients: Vec<u64> = fake
            .image
            .affinity
            .keys()
            .map(|key| key.client_cookie)
            .collect();
        assert_eq!(
            clients,
            [1],
            "the client stuck to the removed backend is forgotten"
        );
        sync_to(&mut fake, &mut mirror, &ClusterSnapshot::default());
        assert!(
            fake.image.affinity.is_empty(),
            "a deleted service takes its affinity entries along"
        );
    }

    /// A fake shared with the test while the runner owns its writer.
    #[derive(Clone, Default)]
    struct SharedFake(Arc<Mutex<FakeMaps>>);

    impl MapWriter for SharedFake {
        fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
            self.0.lock().expect("not poisoned").write(write)
        }

        fn read_image(&self) -> Result<MapImage, WriteError> {
            self.0.lock().expect("not poisoned").read_image()
        }
    }

    #[tokio::test]
    async fn the_runner_waits_for_the_first_snapshot_then_follows_changes() {
        let (sender, receiver) = tokio::sync::watch::channel(None);
        let fake = SharedFake::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = SyncConfig {
            min_period: Duration::from_millis(10),
            max_period: Duration::from_mins(1),
        };
        let stats = StatsHandle::default();
        let runner = tokio::spawn(run(
            receiver,
            ModelConfig::default(),
            Box::new(fake.clone()),
            Box::new(crate::datapath::udp_reaper::NoReaper),
            HealthCheckServer::new(
                crate::admin::healthcheck::BindTo::Address(std::net::Ipv4Addr::LOCALHOST.into()),
                Arc::new(|| true),
            ),
            config,
            stats.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            fake.0.lock().unwrap().journal.is_empty(),
            "nothing is written before the first snapshot"
        );
        sender.send_replace(Some(Arc::new(service(&["10.0.0.1"]))));
        let backends = |fake: &SharedFake| fake.0.lock().unwrap().image.backends4.len();
        for _ in 0..100 {
            if backends(&fake) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(backends(&fake), 1);
        // A burst of changes coalesces; the last one wins.
        for count in 1..=20 {
            let ips: Vec<String> = (1..=count).map(|i| format!("10.0.1.{i}")).collect();
            let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
            sender.send_replace(Some(Arc::new(service(&refs))));
        }
        for _ in 0..100 {
            if backends(&fake) == 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(backends(&fake), 20);
        stop.send(()).unwrap();
        runner.await.unwrap().unwrap();
        let recorded = stats.snapshot();
        assert!(recorded.syncs_total >= 2, "{recorded:?}");
        assert!(
            recorded.last_programming_latency.is_some() && recorded.last_sync_duration.is_some(),
            "{recorded:?}"
        );
        assert!(recorded.sync_errors_total.is_empty(), "{recorded:?}");
    }
}
