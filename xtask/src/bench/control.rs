//! The control plane at scale, fed the way production feeds it: the agent follows the test
//! API server (`switchyard run --kubeconfig`), programs N Services from empty, then applies
//! endpoint changes one at a time, each to a different Service (round robin below as many
//! Services as changes). Per N it measures programming from empty (agent-side and start →
//! synced), per change the agent-side sync, the agent's CPU time and API event → maps
//! written, and the agent's memory. Then, endpoints churning at ten changes a second through
//! the API server, the latency of `GET /healthz` (the probe must not stall behind syncs).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use switchyard_tests::agent::Agent;
use switchyard_tests::env::bpffs::PrivateBpffs;
use switchyard_tests::env::cgroup::TestCgroup;
use switchyard_tests::env::netns::Topology;

use super::agent_usage::{self, CpuSample};
use super::api_feed::ApiFeed;
use super::modes::{AgentMemory, IDLE_MAX, IDLE_STEP, Mode, UPDATE_TIMEOUT, wait_for_syncs};
use super::pinned_maps::PinnedServices;
use super::profile::{Plan, predict};
use super::progress::{Progress, check_stop, stopping};
use super::record::{Metric, Record};
use super::services::{SERVICE_PORT, ServiceSet};
use super::stats;
use super::sync_log::LogTail;

/// The agent's `--min-sync-period` here (its default); changes are spaced further apart so
/// none waits for the runner's coalescing.
const MIN_SYNC_PERIOD: Duration = Duration::from_millis(100);
const SPACING: Duration = MIN_SYNC_PERIOD.saturating_add(Duration::from_millis(30));
/// Far beyond a measurement, so no periodic drift repair lands inside a change.
const SYNC_PERIOD: &str = "1h";
/// Between two reads of the pinned map while a change is awaited.
const POLL_INTERVAL: Duration = Duration::from_micros(100);
const NODE_NAME: &str = "bench-node";
/// Endpoint changes a second while /healthz is probed.
const CHURN_PER_SECOND: u32 = 10;
/// Between two /healthz probes.
const HEALTHZ_EVERY: Duration = Duration::from_millis(20);
/// The agent's default health endpoint, inside its node namespace.
const HEALTHZ_ADDRESS: &str = "127.0.0.1:10256";

/// Runs every control-plane point of the plan; returns their records.
pub fn run(plan: &Plan, progress: &Progress) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut history = History::default();
    let mut stopped: Option<String> = None;
    for &n in &plan.control_scale {
        check_stop()?;
        let set = ServiceSet::new(n, pod_ips(plan.endpoints_at(n)));
        let mut point = Point::default();
        let skip = stopped.clone().or_else(|| history.skip_reason(n, plan));
        if let Some(reason) = skip {
            progress.say(&format!("N={n}: {}: {reason}", Mode::SwitchyardApi));
            point.note = Some(reason);
        } else {
            let started = Instant::now();
            if let Err(error) = measure(plan, progress, &set, &mut point) {
                if stopping() {
                    return Err(error);
                }
                let reason = format!("{error:#}");
                progress.say(&format!("N={n}: {}: {reason}", Mode::SwitchyardApi));
                if point.start_to_synced.is_none() {
                    stopped = Some(format!("skipped: programming failed at N = {n}"));
                }
                point.note = Some(reason);
            }
            history.learn(n, &point, started.elapsed());
            say_point(progress, n, &point);
        }
        records.extend(point.records(n, set.endpoints.len()));
    }
    Ok(records)
}

/// Endpoint addresses: pod IPs like the lanes' backends (10.240.<i + 1>.2). The control plane
/// needs no process behind them.
fn pod_ips(count: usize) -> Vec<Ipv4Addr> {
    (1..=count)
        .map(|i| Ipv4Addr::new(10, 240, u8::try_from(i).expect("at most 250 endpoints"), 2))
        .collect()
}

/// The pod that replaces a Service's first endpoint in change `i`: a new IP every change, so
/// every change is a real one (10.240.252.1 onwards, outside the lanes' addresses).
fn replacement(i: usize) -> Ipv4Addr {
    let offset = u32::try_from(i).expect("a bounded number of changes") + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 252, 0)) + offset)
}

/// The Service change `i` of `changes` goes to: spread over all N, distinct while N allows.
fn changed_service(i: usize, changes: usize, n: usize) -> usize {
    if n >= changes {
        i * (n / changes)
    } else {
        i % n
    }
}

/// What one point measured; whatever was measured before a failure is kept.
#[derive(Debug, Default)]
struct Point {
    populate: Option<Duration>,
    start_to_synced: Option<Duration>,
    program_sync: Option<Duration>,
    change_sync: Vec<Duration>,
    change_cpu: Vec<Duration>,
    event_to_maps: Vec<Duration>,
    /// Per change, how long before the moment it was seen in the map the last read without it
    /// began: the uncertainty of its event → maps value.
    read_gap: Vec<Duration>,
    /// Changes whose watch event the server never sent (the agent relisted instead).
    unsent: usize,
    /// GET /healthz latencies while endpoints churned, and the probes that failed (no answer
    /// or not 200).
    healthz: Vec<Duration>,
    healthz_failed: usize,
    memory: Option<AgentMemory>,
    note: Option<String>,
}

impl Point {
    fn records(&self, n: usize, m: usize) -> Vec<Record> {
        let mut records = Vec::new();
        for metric in Metric::ALL {
            if !metric.applies_to(Mode::SwitchyardApi) || !metric.per_scale_point() {
                continue;
            }
            let mut record = Record::new(Mode::SwitchyardApi, n, m, metric);
            let single = |value: Option<f64>| (value, usize::from(value.is_some()));
            match metric {
                Metric::ProgramAll => {
                    (record.value, record.reps) =
                        single(self.start_to_synced.map(|d| d.as_secs_f64()));
                }
                Metric::ProgramSync => {
                    (record.value, record.reps) =
                        single(self.program_sync.map(|d| d.as_secs_f64()));
                }
                Metric::ChangeSync => distribution(&mut record, &self.change_sync),
                Metric::ChangeCpu => distribution(&mut record, &self.change_cpu),
                Metric::EventToMaps => {
                    distribution(&mut record, &self.event_to_maps);
                    if self.unsent > 0 {
                        record.note = Some(format!(
                            "{} changes reached the agent without a watch event (relist) and \
                             are not counted",
                            self.unsent
                        ));
                    }
                }
                Metric::HealthzChurn => {
                    distribution(&mut record, &self.healthz);
                    if self.healthz_failed > 0 {
                        record.note = Some(format!(
                            "{} probes failed (no answer or not 200) and are not counted",
                            self.healthz_failed
                        ));
                    }
                }
                Metric::AgentRss => {
                    (record.value, record.reps) = single(self.memory.map(|m| m.peak_rss_mib));
                }
                Metric::MapMemory => {
                    (record.value, record.reps) = single(self.memory.and_then(|m| m.maps_mib));
                }
                _ => unreachable!("not a metric of {}", Mode::SwitchyardApi),
            }
            // A failure's note goes on every record: on those with a value, it says the value
            // rests on the changes made before the failure.
            record.note = record.note.take().or_else(|| self.note.clone());
            records.push(record);
        }
        records
    }
}

/// Mean, p50 and p99 of per-change samples, in ms.
fn distribution(record: &mut Record, samples: &[Duration]) {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    record.value = stats::mean(&ms);
    record.p50 = stats::percentile(&ms, 50.0);
    record.p99 = stats::percentile(&ms, 99.0);
    record.reps = ms.len();
}

/// The costs of the points measured so far, to predict the next one.
#[derive(Debug, Default)]
struct History {
    /// (N, seconds) of filling the API server, of start → synced, and of one change from
    /// event to idle.
    populate: Vec<(usize, f64)>,
    program: Vec<(usize, f64)>,
    change: Vec<(usize, f64)>,
    /// Whatever else a point took (namespaces, verification, spacing), seconds.
    overhead: f64,
}

impl History {
    fn learn(&mut self, n: usize, point: &Point, total: Duration) {
        let (Some(populate), Some(program)) = (point.populate, point.start_to_synced) else {
            return;
        };
        self.populate.push((n, populate.as_secs_f64()));
        self.program.push((n, program.as_secs_f64()));
        let changes: Vec<f64> = point
            .event_to_maps
            .iter()
            .map(Duration::as_secs_f64)
            .collect();
        if let Some(change) = stats::mean(&changes) {
            self.change.push((n, change));
        }
        #[allow(clippy::cast_precision_loss)] // a bounded number of changes
        let changes_time = stats::mean(&changes).unwrap_or(0.0) * changes.len() as f64;
        self.overhead =
            (total.as_secs_f64() - populate.as_secs_f64() - program.as_secs_f64() - changes_time)
                .max(0.0);
    }

    fn predicted(&self, n: usize, changes: usize) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)] // a bounded number of changes
        let changes = changes as f64;
        Some(
            predict(&self.populate, n)?
                + predict(&self.program, n)?
                + changes * predict(&self.change, n).unwrap_or(0.0)
                + self.overhead,
        )
    }

    fn skip_reason(&self, n: usize, plan: &Plan) -> Option<String> {
        let predicted = self.predicted(n, plan.control_changes)?;
        (predicted > plan.control_budget.as_secs_f64()).then(|| {
            format!(
                "skipped: this point predicted to take ~{predicted:.0} s (extrapolated), over \
                 the {} s budget",
                plan.control_budget.as_secs()
            )
        })
    }
}

/// The agent of one point. Stops it and removes its pins however the point ends.
struct AgentGuard(Agent);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.0.stop();
        let _ = self.0.cleanup();
    }
}

fn measure(plan: &Plan, progress: &Progress, set: &ServiceSet, point: &mut Point) -> Result<()> {
    let (n, m) = (set.count, set.endpoints.len());
    // The agent's node namespace; its one link gives the TC program an interface, as on a
    // node. Declared first, dropped last: the agent and the API server go before it.
    let topology = Topology::new(1)?;
    let cgroup = TestCgroup::new()?;
    let bpffs = PrivateBpffs::new()?;
    let feed = ApiFeed::start(topology.node_namespace())?;
    let filling = Instant::now();
    feed.populate(set);
    point.populate = Some(filling.elapsed());
    progress.say(&format!(
        "N={n} M={m}: {}: {} Services and EndpointSlices in the test API server ({:.1} s); \
         starting the agent",
        Mode::SwitchyardApi,
        n,
        filling.elapsed().as_secs_f64()
    ));

    let started = Instant::now();
    let min_sync = format!("{}ms", MIN_SYNC_PERIOD.as_millis());
    let mut agent = AgentGuard(Agent::start_with_source(
        &topology,
        &cgroup,
        &bpffs,
        "--kubeconfig",
        feed.kubeconfig(),
        &[
            "--node-name",
            NODE_NAME,
            "--min-sync-period",
            &min_sync,
            "--sync-period",
            SYNC_PERIOD,
        ],
    )?);
    let mut log = LogTail::open(agent.0.log_path())?;
    let (start_to_synced, program_sync) =
        program_from_empty(&mut agent.0, &mut log, set, plan, &bpffs, started)?;
    point.start_to_synced = Some(start_to_synced);
    point.program_sync = Some(program_sync);
    progress.say(&format!(
        "N={n}: {}: programmed in {:.3} s (agent-side sync {:.3} s); {} endpoint changes",
        Mode::SwitchyardApi,
        start_to_synced.as_secs_f64(),
        program_sync.as_secs_f64(),
        plan.control_changes
    ));
    let synced_at = Instant::now();
    let pinned = PinnedServices::open(&bpffs.agent_dir())?;
    verify_all(&pinned, set)?;
    // The first change must not wait for the runner's coalescing after the initial sync.
    if let Some(wait) = (synced_at + SPACING).checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }

    let pid = agent.0.pid().context("the agent is not running")?;
    let mut current: HashMap<usize, Vec<Ipv4Addr>> = HashMap::new();
    for i in 0..plan.control_changes {
        check_stop()?;
        let index = changed_service(i, plan.control_changes, n);
        let mut endpoints = current
            .get(&index)
            .cloned()
            .unwrap_or_else(|| set.endpoints.clone());
        endpoints[0] = replacement(i);
        let mut expected = endpoints.clone();
        expected.sort_unstable();

        log.new_syncs()?;
        let before = CpuSample::read(pid).context("reading the agent's CPU time")?;
        let rv = feed.set_endpoints(index, &endpoints);
        let (visible, gap) = wait_visible(&mut agent.0, &pinned, ServiceSet::vip(index), &expected)
            .with_context(|| {
                format!("change {} of {} (svc-{index})", i + 1, plan.control_changes)
            })?;
        let sync = wait_for_syncs(&mut agent.0, &mut log, UPDATE_TIMEOUT)?;
        let idle = agent_usage::wait_until_idle(pid, IDLE_STEP, IDLE_MAX)
            .context("reading the agent's CPU time")?;
        // A sync that went on after the first line (a second pass) belongs to this change.
        let later: Duration = log.new_syncs()?.iter().map(|s| s.elapsed).sum();
        point.change_sync.push(sync + later);
        point.change_cpu.push(idle.since(&before));
        point.read_gap.push(gap);
        match feed.event_sent_at(rv) {
            Some(emitted) => point
                .event_to_maps
                .push(visible.saturating_duration_since(emitted)),
            None => point.unsent += 1,
        }
        current.insert(index, endpoints);
        // Past the runner's coalescing window before the next change.
        let next = visible + SPACING;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let (latencies, failed) = healthz_under_churn(
        &feed,
        set,
        topology.node_namespace(),
        plan.healthz_churn,
        plan.control_changes,
    )?;
    point.healthz = latencies;
    point.healthz_failed = failed;
    agent.0.ensure_running()?;
    point.memory = AgentMemory::of(pid);
    Ok(())
}

/// For `duration`: an endpoint change through the API server every 1/CHURN_PER_SECOND s,
/// round robin over the Services (new pod IPs after the `first_change` already made), and a
/// `GET /healthz` every HEALTHZ_EVERY from a thread in the node namespace. Returns the
/// latencies of the answered probes and the number of failed ones.
fn healthz_under_churn(
    feed: &ApiFeed,
    set: &ServiceSet,
    netns: &str,
    duration: Duration,
    first_change: usize,
) -> Result<(Vec<Duration>, usize)> {
    let done = AtomicBool::new(false);
    let netns_path = format!("/run/netns/{netns}");
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| -> Result<(Vec<Duration>, usize)> {
            let namespace = std::fs::File::open(&netns_path)
                .with_context(|| format!("opening {netns_path}"))?;
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the node namespace")?;
            let address: SocketAddr = HEALTHZ_ADDRESS.parse().expect("a socket address");
            let mut latencies = Vec::new();
            let mut failed = 0;
            let mut next = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                match get_healthz(address) {
                    Ok(200) => latencies.push(started.elapsed()),
                    Ok(_) | Err(_) => failed += 1,
                }
                next += HEALTHZ_EVERY;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            Ok((latencies, failed))
        });
        let started = Instant::now();
        let spacing = Duration::from_secs(1) / CHURN_PER_SECOND;
        let mut change = 0;
        while started.elapsed() < duration && !stopping() {
            let index = change % set.count;
            let mut endpoints = set.endpoints.clone();
            endpoints[0] = replacement(first_change + change);
            feed.set_endpoints(index, &endpoints);
            change += 1;
            let next = started + spacing * u32::try_from(change).unwrap_or(u32::MAX);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        done.store(true, Ordering::Relaxed);
        prober
            .join()
            .map_err(|_| anyhow::anyhow!("the /healthz prober panicked"))?
    })
}

/// The status of one `GET /healthz` on a new connection (as a kubelet probe makes it).
fn get_healthz(address: SocketAddr) -> Result<u16> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status line")
}

/// Waits for the agent's first sync(s) until the first and last Services resolve to their
/// endpoints; returns (from `started`, the agent's spawning, to then; the syncs' own
/// `elapsed`).
fn program_from_empty(
    agent: &mut Agent,
    log: &mut LogTail,
    set: &ServiceSet,
    plan: &Plan,
    bpffs: &PrivateBpffs,
    started: Instant,
) -> Result<(Duration, Duration)> {
    let deadline = started + plan.program_timeout;
    let mut expected = set.endpoints.clone();
    expected.sort_unstable();
    let mut syncs = Duration::ZERO;
    let mut pinned: Option<PinnedServices> = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!(
                "the Services were not all programmed within {:?}",
                plan.program_timeout
            );
        }
        syncs += wait_for_syncs(agent, log, remaining)?;
        let synced = started.elapsed();
        if pinned.is_none() {
            pinned = Some(PinnedServices::open(&bpffs.agent_dir())?);
        }
        let maps = pinned.as_ref().expect("opened above");
        let mut complete = true;
        for index in [0, set.count - 1] {
            complete &= maps
                .backends(ServiceSet::vip(index), SERVICE_PORT)?
                .as_ref()
                == Some(&expected);
        }
        if complete {
            return Ok((synced, syncs));
        }
    }
}

/// Every Service resolves to exactly its endpoints (not timed): nothing was half-programmed.
fn verify_all(pinned: &PinnedServices, set: &ServiceSet) -> Result<()> {
    let mut expected = set.endpoints.clone();
    expected.sort_unstable();
    for index in 0..set.count {
        let found = pinned.backends(ServiceSet::vip(index), SERVICE_PORT)?;
        if found.as_ref() != Some(&expected) {
            bail!(
                "after programming, {} ({}) resolves to {found:?} instead of {expected:?}",
                ServiceSet::name(index),
                ServiceSet::vip(index)
            );
        }
    }
    Ok(())
}

/// Polls the pinned services map until `vip` resolves to `expected`. Returns the moment it was
/// first seen so, and how long before that the last read that did not see it began (the
/// change happened in between).
fn wait_visible(
    agent: &mut Agent,
    pinned: &PinnedServices,
    vip: Ipv4Addr,
    expected: &[Ipv4Addr],
) -> Result<(Instant, Duration)> {
    let deadline = Instant::now() + UPDATE_TIMEOUT;
    let mut previous_read: Option<Instant> = None;
    for poll in 0_u64.. {
        let read = Instant::now();
        if pinned.backends(vip, SERVICE_PORT)?.as_deref() == Some(expected) {
            let seen = Instant::now();
            return Ok((seen, seen - previous_read.unwrap_or(read)));
        }
        previous_read = Some(read);
        if read >= deadline {
            bail!("{vip} did not resolve to {expected:?} within {UPDATE_TIMEOUT:?}");
        }
        if poll % 1_000 == 0 {
            agent
                .ensure_running()
                .with_context(|| format!("the agent's log:\n{}", agent.log()))?;
            check_stop()?;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    unreachable!("the loop returns or fails by its deadline")
}

/// How the control-plane numbers were obtained, for report.md.
pub fn method(plan: &Plan) -> Vec<String> {
    vec![
        format!(
            "Control plane fed from an API server ({api}): at N = {scale:?}, N ClusterIP \
             Services and their EndpointSlices (the data-plane points' M ready endpoints each) \
             are stored in the test API server, which speaks kube-apiserver's list/watch \
             protocol on 127.0.0.1 inside the agent's node namespace. The agent runs \
             `switchyard run --kubeconfig` (`--min-sync-period {min}ms --sync-period \
             {SYNC_PERIOD}`, so no drift repair lands inside a measurement) and lists them \
             with kube-rs. Nothing else runs meanwhile: the data-plane lanes are gone. A point \
             predicted (from the smaller ones) to take over {budget} s is skipped with a note.",
            api = Mode::SwitchyardApi,
            scale = plan.control_scale,
            min = MIN_SYNC_PERIOD.as_millis(),
            budget = plan.control_budget.as_secs(),
        ),
        "Programming from empty: start → synced is from spawning the agent to the `dataplane \
         synced` line after which the first and the last Service resolve to their endpoints in \
         the pinned services map; agent-side is the `elapsed` of that sync line (or lines). \
         Every Service is then checked in the pinned map (not timed)."
            .to_owned(),
        format!(
            "One endpoint change: {changes} changes one at a time, each replacing the first \
             endpoint of a different Service (spread over the N; round robin where N < \
             {changes}) with a new pod IP, each applied at least {spacing} ms after the \
             previous one became visible, so none waits for the runner's coalescing. \
             Agent-side sync: the `elapsed_us` (else `elapsed_ms`) of the sync line(s) the \
             change caused; p50/p99 over the changes. CPU per change: the agent's CPU time \
             from just before the change until it is idle again (no CPU time for {idle} ms), \
             summed over its threads from /proc/PID/task/*/schedstat in ns (from utime + \
             stime of /proc/PID/stat, in 10 ms ticks, when a thread ended meanwhile); value = \
             mean, with p50/p99.",
            changes = plan.control_changes,
            spacing = SPACING.as_millis(),
            idle = IDLE_STEP.as_millis(),
        ),
        format!(
            "API event → maps written: from the moment the test API server hands the change's \
             watch event to the agent's connection to the moment the bench process reads the \
             Service's new backend set in the pinned services map, resolved as the socket hook \
             does (master entry, slots, backends); the map is read every {} µs, so a value is \
             late by at most the gap between two reads (that interval, one read and the \
             scheduler's wake-up delay; printed per point as the map read gap). It includes the \
             agent's own event handling (kube-rs, the source's coalescing) and the sync. \
             p50/p99 over the changes.",
            POLL_INTERVAL.as_micros()
        ),
        format!(
            "/healthz under churn: after the changes, for {secs} s, {CHURN_PER_SECOND} \
             endpoint changes a second go through the API server (round robin over the N \
             Services, a new pod IP each) while a thread in the node namespace sends `GET \
             /healthz` on a new connection every {every} ms (as the kubelet probes it) and \
             times it until the response is read; p50/p99 over the probes answered 200 (the \
             others are counted in a note).",
            secs = plan.healthz_churn.as_secs(),
            every = HEALTHZ_EVERY.as_millis(),
        ),
        "Control-plane comparison: kube-proxy's per-change figure is its partial sync \
         (update_one at the data-plane points: the restore's wall time, without kube-proxy's \
         own computation); Switchyard's file path is the manifests-file agent of \
         switchyard-socket / switchyard-tc at the same points."
            .to_owned(),
    ]
}

fn say_point(progress: &Progress, n: usize, point: &Point) {
    let ms = |samples: &[Duration], p: f64| {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        stats::percentile(&ms, p).map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"))
    };
    let cpu: Vec<f64> = point
        .change_cpu
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    progress.say(&format!(
        "N={n}: {}: {} changes: sync p50 {} / p99 {} ms, CPU {} ms per change, event → maps \
         p50 {} / p99 {} ms (map read gap p50 {} / p99 {} ms), /healthz at {} changes/s p50 \
         {} / p99 {} ms ({} probes, {} failed), peak RSS {}",
        Mode::SwitchyardApi,
        point.change_sync.len(),
        ms(&point.change_sync, 50.0),
        ms(&point.change_sync, 99.0),
        stats::mean(&cpu).map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
        ms(&point.event_to_maps, 50.0),
        ms(&point.event_to_maps, 99.0),
        ms(&point.read_gap, 50.0),
        ms(&point.read_gap, 99.0),
        CHURN_PER_SECOND,
        ms(&point.healthz, 50.0),
        ms(&point.healthz, 99.0),
        point.healthz.len(),
        point.healthz_failed,
        point.memory.map_or_else(
            || "n/a".to_owned(),
            |m| format!("{:.0} MiB", m.peak_rss_mib)
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_go_to_distinct_services_while_n_allows() {
        let spread: Vec<usize> = (0..50).map(|i| changed_service(i, 50, 100_000)).collect();
        let mut distinct = spread.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 50);
        assert!(spread.iter().all(|&i| i < 100_000));
        assert_eq!(changed_service(49, 50, 100), 98);
        assert_eq!(
            (0..5).map(|i| changed_service(i, 5, 3)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1]
        );
    }

    #[test]
    fn replacements_are_new_pod_ips() {
        assert_eq!(replacement(0), Ipv4Addr::new(10, 240, 252, 1));
        assert_eq!(replacement(299), Ipv4Addr::new(10, 240, 253, 44));
        let backends = pod_ips(10);
        assert!((0..1_000).all(|i| !backends.contains(&replacement(i))));
    }

    #[test]
    fn records_keep_what_was_measured_and_say_why_the_rest_is_missing() {
        let point = Point {
            start_to_synced: Some(Duration::from_millis(1_500)),
            program_sync: Some(Duration::from_millis(400)),
            change_sync: vec![Duration::from_millis(2), Duration::from_millis(4)],
            note: Some("change 3 of 50 (svc-4): timed out".into()),
            ..Point::default()
        };
        let records = point.records(10_000, 10);
        let get = |metric: Metric| records.iter().find(|r| r.metric == metric.name()).unwrap();
        assert_eq!(records.len(), 8);
        assert_eq!(get(Metric::ProgramAll).value, Some(1.5));
        assert_eq!(get(Metric::ProgramSync).value, Some(0.4));
        let sync = get(Metric::ChangeSync);
        assert_eq!(
            (sync.value, sync.p50, sync.p99, sync.reps),
            (Some(3.0), Some(2.0), Some(4.0), 2)
        );
        assert!(sync.note.is_some());
        assert!(get(Metric::EventToMaps).value.is_none());
        assert!(
            get(Metric::EventToMaps)
                .note
                .as_deref()
                .unwrap()
                .contains("timed out")
        );
        assert!(
            records
                .iter()
                .all(|r| r.mode == "switchyard-api" && r.services == 10_000)
        );
    }
}
