//! `cargo xtask bench`: Switchyard side by side with kube-proxy's iptables (nft and legacy
//! backends) and nftables modes, on this machine, in one run, written to
//! `target/bench/report.{json,md}` with SVG plots. This module runs the data-plane scale points
//! (one lane per mode; at the first point also the two-node cluster of `switchyard-dsr` and
//! its masqueraded twin, `two_node`) and then the control-plane phase (the agent fed by the
//! test API server, `control`), and turns the measurements into records; the other modules
//! build the lanes, rules, load and report.

mod agent_usage;
mod api_feed;
mod control;
mod kube_iptables;
mod kube_nftables;
mod lanes;
mod loadgen;
mod machine;
mod maglev;
mod modes;
mod pinned_maps;
mod plot;
mod profile;
mod progress;
mod record;
mod report;
mod services;
mod stats;
mod sync_log;
mod tools;
mod two_node;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use lanes::Lane;
use loadgen::{Load, Summary};
use modes::{Dataplane, Mode};
use profile::{Plan, predict};
pub use profile::{Profile, Scope};
use progress::{Progress, check_stop};
use record::{Metric, Record};
use report::Report;
use services::ServiceSet;
use two_node::TwoNode;

pub fn run(profile: Profile, scope: Scope) -> Result<()> {
    if !switchyard_tests::is_root() {
        bail!("the benchmark creates network namespaces and loads BPF programs: run it as root");
    }
    if scope == Scope::All {
        tools::ensure()?;
    }
    // Ctrl-C also reaches the children (same process group); this process then unwinds
    // through its guards, which remove namespaces, cgroup, pins and mounts.
    progress::stop_on_ctrl_c();
    let plan = Plan::new(profile);
    let progress = Progress::start();
    progress.say(&format!(
        "bench {}: data plane N = {}, up to {} endpoints per service; control plane N = {:?}; \
         expected duration: {}",
        format!("{profile:?}").to_lowercase(),
        if scope == Scope::All {
            format!("{:?}", plan.scale)
        } else {
            "skipped".to_owned()
        },
        plan.max_endpoints,
        plan.control_scale,
        plan.expected
    ));
    let mut records = Vec::new();
    if scope == Scope::All {
        let mut bench = Bench::new(&plan, &progress)?;
        for &n in &plan.scale {
            check_stop()?;
            records.extend(bench.scale_point(n)?);
        }
        // The lanes go before the control plane is measured: nothing else runs meanwhile.
        drop(bench);
    }
    records.extend(control::run(&plan, &progress)?);
    check_stop()?;
    records.push(maglev::run(&plan, &progress)?);
    let report = Report {
        machine: machine::facts(profile, scope, progress.started().elapsed()),
        records,
    };
    report.write(&plan.out_dir, &method(&plan))?;
    print_headline(&report);
    progress.say(&format!(
        "wrote {} and report.md",
        plan.out_dir.join("report.json").display()
    ));
    if profile == Profile::Smoke {
        check_complete(&report)?;
    }
    Ok(())
}

/// The smoke's only verdict: every mode produced every measurement it should.
/// Timings are never judged.
fn check_complete(report: &Report) -> Result<()> {
    let missing: Vec<String> = report
        .records
        .iter()
        .filter(|r| r.value.is_none() && expected(r))
        .map(|r| {
            format!(
                "{} {} at N = {}: {}",
                r.mode,
                r.metric,
                r.services,
                r.note.as_deref().unwrap_or("no value")
            )
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "the bench smoke produced no measurement for:\n  {}",
            missing.join("\n  ")
        );
    }
    println!("bench smoke: every mode produced every measurement");
    Ok(())
}

/// Whether `record` must have a value.
fn expected(record: &Record) -> bool {
    Mode::ALL.into_iter().any(|mode| {
        Metric::ALL
            .into_iter()
            .any(|metric| record.is(mode, metric) && metric.expected_for(mode))
    })
}

/// Where a mode is measured.
enum Site {
    /// A lane of its own, programmed by the mode's data plane.
    Lane {
        // Declared before the lane: the data plane (agent, rules) goes before its namespaces.
        plane: Box<dyn Dataplane>,
        lane: Lane,
    },
    /// A Service of the two-node cluster ([`Bench::two_node`]), programmed once by its agents.
    TwoNode,
}

/// A mode's site, and what the run learnt about it so far.
struct Entry {
    mode: Mode,
    site: Site,
    /// Set once the mode cannot go on to larger scale points.
    stopped: Option<String>,
    /// (N, seconds) of each successful program-everything.
    program_history: Vec<(usize, f64)>,
}

impl Entry {
    /// Why this mode is not measured at `n`, if it is not.
    fn skip_reason(&self, n: usize, plan: &Plan) -> Option<String> {
        if let Some(reason) = &self.stopped {
            return Some(reason.clone());
        }
        let predicted = predict(&self.program_history, n)?;
        (predicted > plan.program_budget.as_secs_f64()).then(|| {
            format!(
                "skipped: programming predicted to take ~{predicted:.0} s (extrapolated), over \
                 the {} s budget",
                plan.program_budget.as_secs()
            )
        })
    }
}

struct Bench<'a> {
    plan: &'a Plan,
    progress: &'a Progress,
    entries: Vec<Entry>,
    backend_ips: Vec<std::net::Ipv4Addr>,
    /// The two-node modes' cluster: it lives for the first scale point only (three agents,
    /// an API server and a router are not worth keeping idle through the others).
    two_node: Option<TwoNode>,
    /// The scale point the two-node modes are measured at.
    two_node_at: usize,
}

/// Per-mode results of one repeated measurement, repetition by repetition.
type Reps = BTreeMap<Mode, Vec<Option<Summary>>>;

/// Upper bound of the sustained connections run (iptables at 0.2× direct still fits).
const SUSTAINED_BOUND: Duration = Duration::from_mins(2);

impl<'a> Bench<'a> {
    fn new(plan: &'a Plan, progress: &'a Progress) -> Result<Self> {
        let mut entries = Vec::new();
        let mut backend_ips = Vec::new();
        for mode in Mode::LANES {
            check_stop()?;
            progress.say(&format!(
                "creating the {mode} lane (client, node, {} backends)",
                plan.max_endpoints
            ));
            let lane = Lane::new(plan.max_endpoints)
                .with_context(|| format!("creating the {mode} lane"))?;
            backend_ips = lane.backend_ips();
            entries.push(Entry {
                mode,
                site: Site::Lane {
                    plane: mode.dataplane(&lane)?,
                    lane,
                },
                stopped: None,
                program_history: Vec::new(),
            });
        }
        check_stop()?;
        let two_node_at = *plan
            .scale
            .first()
            .context("the profile has no scale point")?;
        let endpoints = plan.endpoints_at(two_node_at);
        progress.say(&format!(
            "creating the two-node cluster of {} (3 nodes with their agents, router, client; \
             {endpoints} pods per node)",
            Mode::TWO_NODE.map(Mode::name).join(" and ")
        ));
        // A cluster that cannot be built costs these two modes their measurements (with the
        // reason in the report), not the whole run.
        let (two_node, failure) = match TwoNode::new(endpoints) {
            Ok(world) => (Some(world), None),
            Err(error) => {
                let reason = format!("the two-node cluster failed: {error:#}");
                progress.say(&reason);
                (None, Some(reason))
            }
        };
        for mode in Mode::TWO_NODE {
            entries.push(Entry {
                mode,
                site: Site::TwoNode,
                stopped: failure.clone(),
                program_history: Vec::new(),
            });
        }
        Ok(Self {
            plan,
            progress,
            entries,
            backend_ips,
            two_node,
            two_node_at,
        })
    }

    fn scale_point(&mut self, n: usize) -> Result<Vec<Record>> {
        let m = self.plan.endpoints_at(n);
        let set = ServiceSet::new(n, self.backend_ips[..m].to_vec());
        let mut notes: BTreeMap<Mode, String> = BTreeMap::new();
        let mut control: BTreeMap<(Mode, Metric), f64> = BTreeMap::new();
        let two_node_here = n == self.two_node_at;
        let mut active = self.program_all(&set, &mut control, &mut notes)?;
        self.warm_up(&set, &mut active, &mut notes)?;
        let latency = self.repeat(
            &set,
            &active,
            "latency",
            self.plan.latency_reps,
            Load::Latency {
                connections: self.plan.latency_connections,
                max: Duration::from_mins(1),
            },
        )?;
        let (cps, sustained) = self.connection_rates(&set, &active)?;
        let throughput = self.repeat(
            &set,
            &active,
            "throughput",
            self.plan.throughput_reps,
            Load::Throughput {
                bytes: self.plan.throughput_bytes,
                duration: self.plan.throughput_duration,
            },
        )?;
        let mut memory = BTreeMap::new();
        for &index in &active {
            check_stop()?;
            let entry = &mut self.entries[index];
            let Site::Lane { plane, lane } = &mut entry.site else {
                continue;
            };
            match plane.update_one(lane.topology(), &set) {
                Ok(Some(elapsed)) => {
                    control.insert((entry.mode, Metric::UpdateOne), elapsed.as_secs_f64());
                }
                Ok(None) => {}
                Err(error) => {
                    notes.insert(entry.mode, format!("endpoint update failed: {error:#}"));
                }
            }
            let costs = plane.sync_costs();
            for (metric, value) in [
                (
                    Metric::ProgramSync,
                    costs.program_sync.map(|d| d.as_secs_f64()),
                ),
                (
                    Metric::ChangeSync,
                    costs.change_sync.map(|d| d.as_secs_f64() * 1e3),
                ),
                (
                    Metric::ChangeCpu,
                    costs.change_cpu.map(|d| d.as_secs_f64() * 1e3),
                ),
            ] {
                if let Some(value) = value {
                    control.insert((entry.mode, metric), value);
                }
            }
            if let Some(usage) = plane.agent_memory() {
                memory.insert((entry.mode, Metric::AgentRss), usage.peak_rss_mib);
                if let Some(maps) = usage.maps_mib {
                    memory.insert((entry.mode, Metric::MapMemory), maps);
                }
            }
        }
        if two_node_here {
            self.two_node = None;
        }
        let mut modes = Mode::LANES.to_vec();
        if two_node_here {
            modes.extend(Mode::TWO_NODE);
        }
        let results = Results {
            modes,
            n,
            m,
            latency,
            cps,
            sustained,
            throughput,
            control,
            memory,
            notes,
        };
        let records = results.records();
        self.say_point(&records);
        Ok(records)
    }

    /// The connections-per-second repetitions, then one sustained run per mode.
    fn connection_rates(&self, set: &ServiceSet, active: &[usize]) -> Result<(Reps, Reps)> {
        let cps = self.repeat(
            set,
            active,
            "connections/s",
            self.plan.cps_reps,
            Load::Cps {
                concurrency: self.plan.cps_concurrency,
                duration: self.plan.cps_duration,
                count: None,
            },
        )?;
        let sustained = self.repeat(
            set,
            active,
            "sustained connections",
            1,
            Load::Cps {
                concurrency: self.plan.cps_concurrency,
                duration: SUSTAINED_BOUND,
                count: Some(self.plan.sustained_connections),
            },
        )?;
        Ok((cps, sustained))
    }

    /// Programs every mode that is still in the run from empty; returns the indices of the
    /// entries that are ready to measure.
    fn program_all(
        &mut self,
        set: &ServiceSet,
        control: &mut BTreeMap<(Mode, Metric), f64>,
        notes: &mut BTreeMap<Mode, String>,
    ) -> Result<Vec<usize>> {
        let (n, m) = (set.count, set.endpoints.len());
        let mut active = Vec::new();
        for (index, entry) in self.entries.iter_mut().enumerate() {
            check_stop()?;
            if matches!(entry.site, Site::TwoNode) && n != self.two_node_at {
                continue;
            }
            if let Some(reason) = entry.skip_reason(n, self.plan) {
                self.progress
                    .say(&format!("N={n}: {}: {reason}", entry.mode));
                notes.insert(entry.mode, reason);
                continue;
            }
            // Programmed once, when the cluster started.
            let Site::Lane { plane, lane } = &mut entry.site else {
                active.push(index);
                continue;
            };
            self.progress
                .say(&format!("N={n} M={m}: programming {}", entry.mode));
            let topology = lane.topology();
            let programmed = plane
                .clear(topology)
                .and_then(|()| plane.program_all(topology, set, self.plan.program_timeout));
            match programmed {
                Ok(elapsed) => {
                    if let Some(elapsed) = elapsed {
                        let secs = elapsed.as_secs_f64();
                        self.progress
                            .say(&format!("N={n}: {} programmed in {secs:.3} s", entry.mode));
                        control.insert((entry.mode, Metric::ProgramAll), secs);
                        entry.program_history.push((n, secs));
                    }
                    active.push(index);
                }
                Err(error) => {
                    let reason = format!("programming failed at N = {n}: {error:#}");
                    self.progress
                        .say(&format!("N={n}: {}: {reason}", entry.mode));
                    entry.stopped = Some(format!("skipped: {reason}"));
                    notes.insert(entry.mode, reason);
                }
            }
        }
        Ok(active)
    }

    /// A few untimed connections per mode (neighbour entries, caches); a mode that cannot
    /// complete one is dropped from this scale point with a note.
    fn warm_up(
        &self,
        set: &ServiceSet,
        active: &mut Vec<usize>,
        notes: &mut BTreeMap<Mode, String>,
    ) -> Result<()> {
        let load = Load::Latency {
            connections: self.plan.warmup_connections,
            max: Duration::from_secs(30),
        };
        let mut working = Vec::new();
        for &index in active.iter() {
            check_stop()?;
            let entry = &self.entries[index];
            match self.measure(entry, set, &load) {
                Ok(summary) if summary.ok > 0 => working.push(index),
                Ok(summary) => {
                    notes.insert(
                        entry.mode,
                        format!(
                            "no connection succeeded ({} failed; first error: {})",
                            summary.errors,
                            summary.first_error.unwrap_or_default()
                        ),
                    );
                }
                Err(error) => {
                    notes.insert(entry.mode, format!("load generator failed: {error:#}"));
                }
            }
        }
        // The backends' UDP echo answers too (checked once, on the floor's lane).
        if let Some(entry) = self.entries.iter().find(|e| e.mode == Mode::Direct) {
            let udp = Load::Udp {
                datagrams: 2 * set.endpoints.len() as u64,
                max: Duration::from_secs(10),
            };
            let summary = self.measure(entry, set, &udp)?;
            if summary.ok == 0 {
                bail!(
                    "no backend answered the UDP echo: {}",
                    summary.first_error.unwrap_or_default()
                );
            }
        }
        *active = working;
        Ok(())
    }

    fn measure(&self, entry: &Entry, set: &ServiceSet, load: &Load) -> Result<Summary> {
        match &entry.site {
            Site::Lane { plane, lane } => {
                plane.reset_connection_state(lane.topology())?;
                loadgen::run(
                    lane.client_namespace(),
                    plane.cgroup(),
                    &plane.targets(set),
                    load,
                )
            }
            Site::TwoNode => {
                let world = self
                    .two_node
                    .as_ref()
                    .context("the two-node cluster is gone")?;
                loadgen::run(
                    world.client_namespace(),
                    None,
                    &[world.target(entry.mode)?],
                    load,
                )
            }
        }
    }

    /// `reps` repetitions of `load` on every active mode, interleaved (A B C, B C A, ...) so
    /// that the machine's drift hits every mode alike.
    fn repeat(
        &self,
        set: &ServiceSet,
        active: &[usize],
        what: &str,
        reps: usize,
        load: Load,
    ) -> Result<Reps> {
        let mut results: Reps = BTreeMap::new();
        for rep in 0..reps {
            let mut order = active.to_vec();
            let len = order.len();
            if len > 0 {
                order.rotate_left(rep % len);
            }
            for index in order {
                check_stop()?;
                let entry = &self.entries[index];
                let summary = match self.measure(entry, set, &load) {
                    Ok(summary) => Some(summary),
                    Err(error) => {
                        self.progress.say(&format!(
                            "N={}: {} {what}: {error:#}",
                            set.count, entry.mode
                        ));
                        None
                    }
                };
                results.entry(entry.mode).or_default().push(summary);
            }
            self.progress.say(&format!(
                "N={}: {what} repetition {}/{reps} done",
                set.count,
                rep + 1
            ));
        }
        Ok(results)
    }

    fn say_point(&self, records: &[Record]) {
        for record in records
            .iter()
            .filter(|r| r.metric == Metric::ConnectLatency.name() && r.value.is_some())
        {
            self.progress.say(&format!(
                "N={}: {:<19} latency mean {:>7.1} µs  p99 {:>7.1} µs  ×direct {}",
                record.services,
                record.mode,
                record.value.unwrap_or_default(),
                record.p99.unwrap_or_default(),
                record
                    .ratio_to_direct
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
            ));
        }
    }
}

/// Everything measured at one scale point.
struct Results {
    /// The modes with records at this point.
    modes: Vec<Mode>,
    n: usize,
    m: usize,
    latency: Reps,
    cps: Reps,
    sustained: Reps,
    throughput: Reps,
    control: BTreeMap<(Mode, Metric), f64>,
    memory: BTreeMap<(Mode, Metric), f64>,
    notes: BTreeMap<Mode, String>,
}

impl Results {
    fn records(&self) -> Vec<Record> {
        let mut records = Vec::new();
        for &mode in &self.modes {
            for metric in Metric::ALL
                .into_iter()
                .filter(|m| m.applies_to(mode) && m.per_scale_point())
            {
                let mut record = Record::new(mode, self.n, self.m, metric);
                match metric {
                    Metric::ConnectLatency => self.latency_record(mode, &mut record),
                    Metric::ConnPerS => {
                        Self::rate_record(mode, &self.cps, |s| s.conn_per_s, &mut record);
                    }
                    Metric::SustainedConnPerS => {
                        Self::rate_record(mode, &self.sustained, |s| s.conn_per_s, &mut record);
                    }
                    Metric::ConnFailed => self.failed_record(mode, &mut record),
                    Metric::Throughput => {
                        Self::rate_record(mode, &self.throughput, |s| s.gbps, &mut record);
                    }
                    Metric::ProgramAll
                    | Metric::UpdateOne
                    | Metric::ProgramSync
                    | Metric::ChangeSync
                    | Metric::ChangeCpu
                    | Metric::EventToMaps
                    | Metric::HealthzChurn => {
                        record.value = self.control.get(&(mode, metric)).copied();
                        record.reps = usize::from(record.value.is_some());
                    }
                    Metric::AgentRss | Metric::MapMemory => {
                        record.value = self.memory.get(&(mode, metric)).copied();
                        record.reps = usize::from(record.value.is_some());
                    }
                    Metric::MaglevRebuild => unreachable!("not measured per scale point"),
                }
                if record.value.is_none() && record.note.is_none() {
                    record.note = self.notes.get(&mode).cloned();
                }
                records.push(record);
            }
        }
        records
    }

    fn latency_record(&self, mode: Mode, record: &mut Record) {
        let Some(reps) = self.latency.get(&mode) else {
            return;
        };
        let per_rep = |reps: &[Option<Summary>]| -> Vec<Option<f64>> {
            reps.iter()
                .map(|s| {
                    let samples: Vec<f64> = s
                        .as_ref()?
                        .samples_us
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect();
                    stats::mean(&samples)
                })
                .collect()
        };
        let pooled: Vec<f64> = reps
            .iter()
            .flatten()
            .flat_map(|s| s.samples_us.iter().map(|&v| f64::from(v)))
            .collect();
        record.value = stats::mean(&pooled);
        record.p50 = stats::percentile(&pooled, 50.0);
        record.p99 = stats::percentile(&pooled, 99.0);
        let means = per_rep(reps);
        record.reps = means.iter().flatten().count();
        if let Some(direct) = self.latency.get(&Mode::Direct)
            && mode != Mode::Direct
        {
            set_ratio(record, &stats::paired_ratios(&means, &per_rep(direct)));
        }
        if let Some(twin) = mode.masqueraded_twin()
            && let Some(base) = self.latency.get(&twin)
        {
            set_twin_ratio(record, &stats::paired_ratios(&means, &per_rep(base)));
        }
        let errors: u64 = reps.iter().flatten().map(|s| s.errors).sum();
        if errors > 0 {
            let first = reps
                .iter()
                .flatten()
                .find_map(|s| s.first_error.clone())
                .unwrap_or_default();
            record.note = Some(format!(
                "{errors} of {} connections failed (first error: {first})",
                errors + u64::try_from(pooled.len()).unwrap_or(u64::MAX)
            ));
        }
    }

    /// Failed connections summed over the mode's connections-per-second runs; no value when
    /// none of them ran.
    fn failed_record(&self, mode: Mode, record: &mut Record) {
        let runs: Vec<&Summary> = [&self.cps, &self.sustained]
            .into_iter()
            .filter_map(|reps| reps.get(&mode))
            .flat_map(|reps| reps.iter().flatten())
            .collect();
        if runs.is_empty() {
            return;
        }
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let failed = runs.iter().map(|s| s.errors).sum::<u64>() as f64;
        record.value = Some(failed);
        record.reps = runs.len();
        if let Some(first) = runs.iter().find_map(|s| s.first_error.clone()) {
            record.note = Some(format!("first error: {first}"));
        }
    }

    fn rate_record(
        mode: Mode,
        measured: &Reps,
        value: impl Fn(&Summary) -> Option<f64>,
        record: &mut Record,
    ) {
        let Some(reps) = measured.get(&mode) else {
            return;
        };
        let values_of = |reps: &[Option<Summary>]| -> Vec<Option<f64>> {
            reps.iter()
                .map(|s| s.as_ref().filter(|s| s.ok > 0).and_then(&value))
                .collect()
        };
        let values = values_of(reps);
        let present: Vec<f64> = values.iter().flatten().copied().collect();
        record.value = stats::median(&present);
        record.reps = present.len();
        if let Some(direct) = measured.get(&Mode::Direct)
            && mode != Mode::Direct
        {
            set_ratio(record, &stats::paired_ratios(&values, &values_of(direct)));
        }
        if let Some(twin) = mode.masqueraded_twin()
            && let Some(base) = measured.get(&twin)
        {
            set_twin_ratio(record, &stats::paired_ratios(&values, &values_of(base)));
        }
        let errors: u64 = reps.iter().flatten().map(|s| s.errors).sum();
        if errors > 0 {
            record.note = Some(format!(
                "{errors} connections failed during the measurement"
            ));
        }
    }
}

fn set_ratio(record: &mut Record, ratios: &[f64]) {
    if let Some(summary) = stats::summarize_ratios(ratios) {
        record.ratio_to_direct = Some(summary.median);
        record.ratio_min = Some(summary.min);
        record.ratio_max = Some(summary.max);
    }
}

fn set_twin_ratio(record: &mut Record, ratios: &[f64]) {
    if let Some(summary) = stats::summarize_ratios(ratios) {
        record.ratio_to_masquerade = Some(summary.median);
        record.ratio_to_masquerade_min = Some(summary.min);
        record.ratio_to_masquerade_max = Some(summary.max);
    }
}

/// The switchyard-xdp mode, for the method section.
const XDP_MODE_NOTE: &str = "switchyard-xdp = switchyard-tc with `--xdp-mode native`: TC sets \
     each flow up (SYN, SYN-ACK, the handshake's ACK), the XDP fast path forwards its later \
     packets both ways. In its lane the veth ends around the node have GRO on (so XDP_REDIRECT \
     into them works) and transmit checksum offload off (full checksums, as from a wire).";

/// How the numbers were obtained, for report.md.
fn method(plan: &Plan) -> Vec<String> {
    let mut lines = vec![
        "Topology: per mode a lane of network namespaces on this machine: client → node → M \
         backends, joined by veth pairs, no link or route out of the machine. All lanes have \
         the same addresses; the node forwards (ip_forward=1 inside the node namespace only)."
            .to_owned(),
        "Backends answer a tiny HTTP/1.1 response (and a UDP echo); the client always closes \
         first, so backends never hold TIME_WAIT for a reused 4-tuple."
            .to_owned(),
        "Modes: direct = client to a backend's own IP (no service: the physical floor); \
         iptables-nft / iptables-legacy / nftables = kube-proxy's rule layout for N ClusterIP \
         services × M endpoints loaded in the node namespace (PREROUTING DNAT); \
         switchyard-socket = the agent's socket hooks on a cgroup the client process runs in; \
         switchyard-tc = the client, outside that cgroup, connects to the measured service's \
         NodePort on the node's address and the agent's TC program on the node's interfaces \
         does conntrack, DNAT and masquerade (externalTrafficPolicy Cluster)."
            .to_owned(),
        XDP_MODE_NOTE.to_owned(),
        "The measured service is always the last one: the worst-placed in KUBE-SERVICES for the \
         iptables modes (nftables and Switchyard look services up in hash maps, where the \
         position does not matter)."
            .to_owned(),
        "The client lives inside the cluster CIDR (like a pod), so service traffic is not \
         masqueraded, but every masquerade rule is still evaluated."
            .to_owned(),
        format!(
            "Latency: {} sequential new connections per repetition (connect, request, full \
             response, close), {} repetitions per mode, modes interleaved with the order rotated \
             each repetition. Value = mean over all connections, p50/p99 over all connections; \
             ×direct = median over repetitions of (mode's mean / direct's mean in the same \
             repetition), [min–max] over repetitions.",
            plan.latency_connections, plan.latency_reps
        ),
        format!(
            "Connections per second: {} concurrent connection loops for {:.1} s, {} repetitions, \
             interleaved, then one sustained run of {} connections on as many loops per mode \
             (every failed connection of these runs is counted); throughput: one download for \
             {:.1} s, {} repetitions, interleaved. Ratios are paired the same way.",
            plan.cps_concurrency,
            plan.cps_duration.as_secs_f64(),
            plan.cps_reps,
            plan.sustained_connections,
            plan.throughput_duration.as_secs_f64(),
            plan.throughput_reps
        ),
        "Before each repetition of a netfilter mode its conntrack table is flushed, so every \
         repetition starts alike."
            .to_owned(),
        "Endpoints per service: the profile's M where the BPF maps allow N × (M + 1) ≤ 262 144 \
         service slots, fewer above (the same M for every mode at a scale point)."
            .to_owned(),
        "Agent memory: peak RSS (VmHWM) of the agent process after programming and the update; \
         BPF map memory: sum of `memlock` over the maps the agent holds (fdinfo). kube-proxy \
         itself is not run (its rules are generated by the bench), so neither applies to the \
         netfilter modes."
            .to_owned(),
        "switchyard-tc: the last services, as many as kube-apiserver's default NodePort range \
         (30000-32767) holds, are type NodePort; the measured one has nodePort 30000, opened on \
         the client-facing node address only (`--nodeport-addresses`). The agent runs without \
         `--cluster-cidr`, so the client counts as external and every connection is \
         masqueraded to the node address with a port from the default `--snat-port-range`. \
         Its conntrack is not flushed between repetitions (ended flows leave through the \
         agent's garbage collection, as on a live node). Its ×direct ratio is the issue's \
         target: new-connection latency within noise of plain routing."
            .to_owned(),
        format!(
            "switchyard-tc-2node and switchyard-dsr: measured at the first scale point only \
             (N = {first}: their layout takes seconds to build and runs three agents, and \
             Switchyard's lookups do not depend on N, as switchyard-tc shows); their records \
             sit at that N, but their cluster holds just their two Services. The layout is the \
             tests crate's multi-node cluster: three node namespaces (node 2 idle: the \
             harness's minimum), each running its own agent following the test API server \
             (`--cluster-cidr` set, default `--lb-mode snat`), joined by a router, and an \
             external client outside the cluster CIDR. The client connects to a NodePort on \
             node 0 whose M endpoints are all pods on node 1: client → router → node 0 → \
             router → node 1 → pod. The two Services differ only in their \
             `switchyard.dev/forwarding-mode` annotation: `snat` (switchyard-tc-2node: node 0 \
             masquerades, replies return through node 0) and `dsr` (node 0 keeps the client's \
             address and encodes the frontend in an IP option; node 1 replies straight to the \
             client through the router). Before measuring, {check} connections per Service \
             check that node 0 encodes DSR packets for the `dsr` one only. Their ×direct \
             compares with the one-hop direct lane (more hops here); the DSR table pairs \
             switchyard-dsr with switchyard-tc-2node repetition by repetition.",
            first = plan.scale.first().copied().unwrap_or_default(),
            check = two_node::CHECK_CONNECTIONS,
        ),
    ];
    for mode in [
        Mode::IptablesNft,
        Mode::Nftables,
        Mode::SwitchyardSocket,
        Mode::SwitchyardTc,
    ] {
        if let Some(note) = mode.control_plane_note() {
            lines.push(format!("Control plane, {mode}: {note}."));
        }
    }
    lines.extend(control::method(plan));
    lines.push(maglev::method(plan));
    lines
}

fn print_headline(report: &Report) {
    let lanes = report
        .records
        .iter()
        .filter(|r| r.metric == Metric::ConnectLatency.name());
    if let Some(largest) = lanes.map(|r| r.services).max() {
        println!("\nheadline at N = {largest} (the two-node modes where they were measured):");
        for mode in Mode::LANES.into_iter().chain(Mode::TWO_NODE) {
            // The two-node modes have records at one point only.
            let get = |metric: Metric| {
                report
                    .records
                    .iter()
                    .find(|r| r.is(mode, metric) && (mode.is_two_node() || r.services == largest))
            };
            let latency = get(Metric::ConnectLatency);
            let program = get(Metric::ProgramAll).and_then(|r| r.value);
            println!(
                "  {:<19} latency {:>9}  ×direct {:>5}  program {:>9}",
                mode.name(),
                latency
                    .and_then(|r| r.value)
                    .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1} µs")),
                latency
                    .and_then(|r| r.ratio_to_direct)
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                program.map_or_else(|| "n/a".to_owned(), |s| format!("{s:.3} s")),
            );
        }
    }
    println!("\ncontrol plane (legend in report.md):");
    print!("{}", report.control_plane_text());
    if let Some(line) = report.maglev_rebuild_text() {
        println!("\nMaglev table rebuild (agent side): {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_applicable_records_are_required_in_the_smoke() {
        let record = |mode, metric| Record::new(mode, 10, 2, metric);
        assert!(expected(&record(Mode::Direct, Metric::ConnectLatency)));
        assert!(!expected(&record(Mode::Direct, Metric::ProgramAll)));
        assert!(expected(&record(Mode::Nftables, Metric::UpdateOne)));
        assert!(!expected(&record(Mode::Nftables, Metric::AgentRss)));
        assert!(expected(&record(Mode::SwitchyardSocket, Metric::MapMemory)));
        assert!(expected(&record(
            Mode::SwitchyardTc,
            Metric::ConnectLatency
        )));
        assert!(expected(&record(Mode::SwitchyardTc, Metric::AgentRss)));
        assert!(expected(&record(Mode::SwitchyardApi, Metric::EventToMaps)));
        assert!(expected(&record(Mode::SwitchyardSocket, Metric::ChangeCpu)));
        assert!(!expected(&record(Mode::Nftables, Metric::ChangeSync)));
        assert!(expected(&record(
            Mode::SwitchyardDsr,
            Metric::ConnectLatency
        )));
        assert!(expected(&record(
            Mode::SwitchyardTc2Node,
            Metric::ConnFailed
        )));
        assert!(!expected(&record(Mode::SwitchyardDsr, Metric::UpdateOne)));
        assert!(!expected(&record(
            Mode::SwitchyardTc2Node,
            Metric::AgentRss
        )));
    }
}
