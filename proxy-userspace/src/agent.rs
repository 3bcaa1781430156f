//! The composition root of `switchyard run`: install the dataplane, spawn the background work
//! (interface follower, conntrack garbage collection, metrics and health endpoints), run the
//! sync loop.
use anyhow::{Context, Result, bail};
use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use tracing::{debug, error, info, warn};

use crate::{
    admin::{health, healthcheck, http, metrics, stats::StatsHandle},
    bpf::{
        bpf_log, link_events, loader,
        lock::PinRootLock,
        mount_scope, mounts,
        north_south::{self, Dsr, InterfaceFollower, NorthSouth, XdpMode},
        pins::PinLayout,
        versions,
    },
    cli::{BpfLogLevel, RunArgs},
    datapath::{
        affinity::{AffinityMatches, PinnedMatches},
        conntrack::{Conntrack, monotonic_now_ns},
        counters::DatapathCounters,
        fill::{self, DatapathMaps, FillAlarms, FillTracker},
        udp_reaper::{NetlinkReaper, SocketsAndFlows},
    },
    maps::KernelMaps,
    model::ModelConfig,
    node::NodeConfig,
    reconcile::Reconciler,
    runner::{self, SyncConfig},
    source,
};

/// The eBPF object built by `cargo xtask build` (empty when built without it).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SWITCHYARD_EBPF_OBJECT_PATH"));

/// The oldest kernel with everything the socket hooks use (`bpf_set_retval` in sock_addr
/// programs arrived in 5.19; TCX for the TC path needs 6.6).
const MIN_KERNEL: (u32, u32) = (5, 19);

fn kernel_version() -> Option<(u32, u32)> {
    let release = nix::sys::utsname::uname()
        .ok()?
        .release()
        .to_string_lossy()
        .into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Clear errors for an unsuitable environment, before anything is touched.
pub(crate) fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "switchyard must run as root (it loads BPF programs, pins maps and attaches to cgroups: CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        );
    }
    match kernel_version() {
        Some(version) if version < MIN_KERNEL => bail!(
            "kernel {}.{} is too old: switchyard needs Linux {}.{} or newer",
            version.0,
            version.1,
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
        _ => Ok(()),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail in a tokio runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down; the dataplane stays in place (use `switchyard cleanup` to remove it)");
}

/// The installed dataplane: mounts resolved, the object loaded with its maps pinned (a
/// previous agent's adopted), every program attached, the previous agent's links retired, and
/// the handles the agent drives from then on.
struct Dataplane {
    /// Held for the agent's life: one agent per pin root.
    lock: PinRootLock,
    pins: PinLayout,
    /// Other layout versions' pins found at start, taken over after the first sync.
    other_versions: Vec<u32>,
    cgroup: std::path::PathBuf,
    writer: KernelMaps,
    sockets: NetlinkReaper,
    /// One handle on the conntrack maps, shared by the UDP cleanup and the garbage collector.
    conntrack: Arc<Mutex<Conntrack>>,
    counters: Arc<DatapathCounters>,
    /// The maps the datapath fills (counted by the upkeep, never at scrape time).
    datapath_maps: DatapathMaps,
    fill: Arc<FillTracker>,
    /// Attaches the TC program to interfaces that appear later.
    follower: InterfaceFollower,
    /// Wakes the follower on link, address and route changes (`None`: it polls).
    link_events: Option<link_events::LinkEvents>,
    /// Needed TC attachments missing after the first pass (keeps `/readyz` at 503).
    tc_missing: north_south::MissingAttachments,
    /// The eBPF programs' log records (with `--bpf-log-level`).
    bpf_logger: Option<bpf_log::BpfLogger>,
}

impl Dataplane {
    fn install(args: &RunArgs) -> Result<Self> {
        let cgroup = mounts::resolve_cgroup(args.cgroup_path.as_deref())?;
        // Refused before anything is loaded: hooks that see only the agent's own cgroup, or
        // pins that die with its mount namespace, would run and look healthy.
        let cgroup_scope = mount_scope::check_cgroup(&cgroup, args.cgroup_path.is_some())?;
        let pins = PinLayout::new(mounts::resolve_bpffs(&args.pins.bpffs)?);
        let pin_scope = mount_scope::check_pins(&pins.root)?;
        info!(cgroup = %cgroup.display(), scope = ?cgroup_scope, "socket hooks' cgroup");
        info!(pins = %pins.root.display(), scope = ?pin_scope, "pins outlive the agent");
        // Before anything is loaded or attached: a second agent must leave the first untouched.
        let lock = PinRootLock::acquire(&pins.root)?;
        let other_versions = versions::announce(&pins);
        // Pinned maps of another capacity or flags are migrated (see `bpf::migrate`): copied
        // before the new programs attach, copied again before the old links go.
        let (mut ebpf, mut migration) = loader::load_object(
            EBPF_OBJECT,
            &pins,
            &args.capacities(),
            args.bpf_log_level.aya_level(),
        )?;
        let bpf_logger = if args.bpf_log_level == BpfLogLevel::Off {
            None
        } else {
            Some(bpf_log::BpfLogger::take_from(&mut ebpf)?)
        };
        let north_south = north_south_settings(args);
        north_south::check_node_settings();
        // Before the programs can masquerade with them.
        crate::node_ports::reserve(
            &crate::node_ports::PortSettings::default(),
            north_south.snat_ports,
        )?;
        // Subscribed before the first pass, so no change after it goes unnoticed.
        let link_events = link_events::subscribe()
            .inspect_err(|error| warn!("cannot follow rtnetlink events ({error}): interfaces are re-read every {INTERFACE_FALLBACK_PERIOD:?} instead"))
            .ok();
        let generation = loader::attach_all(&mut ebpf, &pins, &cgroup, &north_south)?;
        let writer = KernelMaps::take_from(&mut ebpf)?;
        let sockets = NetlinkReaper::take_from(&mut ebpf)?;
        let counters = Arc::new(DatapathCounters::take_from(&mut ebpf)?);
        // The loaded programs now only serve to attach the TC program to interfaces; the
        // attached ones live on through their pinned links. The first pass attaches before
        // the previous agent's links go (make before break).
        let mut follower =
            InterfaceFollower::new(ebpf, pins.clone(), generation.clone(), north_south);
        let tc_missing = follower.follow();
        info!(interfaces = ?follower.attached().keys().collect::<Vec<_>>(), "TC ingress attached");
        let xdp_failures = follower.xdp_failures();
        if !xdp_failures.is_empty() {
            // Nothing half-applied: this generation's links go, the previous agent's stay.
            loader::retire_generation(&pins, &generation);
            let failures: Vec<String> = xdp_failures
                .iter()
                .map(|(interface, reason)| format!("{interface}: {reason}"))
                .collect();
            anyhow::bail!(
                "--xdp-mode native: the XDP fast path cannot be attached in driver mode on {}",
                failures.join("; ")
            );
        }
        migration.after_attach();
        let retired = loader::retire_links(&pins, Some(&generation));
        if retired > 0 {
            info!(retired, "took over from a previous agent's links");
        }
        migration.finish();
        let conntrack = Conntrack::open_pinned(&pins).context("opening the conntrack maps")?;
        let datapath_maps =
            DatapathMaps::open_pinned(&pins).context("opening the socket and affinity maps")?;
        let fill = Arc::new(FillTracker::from_pins(&pins));
        Ok(Self {
            lock,
            pins,
            other_versions,
            cgroup,
            writer,
            sockets,
            conntrack: Arc::new(Mutex::new(conntrack)),
            counters,
            datapath_maps,
            fill,
            follower,
            link_events,
            tc_missing,
            bpf_logger,
        })
    }
}

/// The agent: start the source, install the dataplane, spawn the background work, run the
/// sync loop until a signal, then close what goes with the agent.
pub async fn run(args: RunArgs) -> Result<()> {
    preflight()?;
    let stats = StatsHandle::default();
    // Start the source before touching the kernel or the mounts: an unreadable file or an
    // unusable kubeconfig changes nothing.
    let (deltas, api_server_addresses) = if let Some(manifests) = &args.manifests {
        (
            source::file::start(manifests.clone(), stats.clone())?,
            Vec::new(),
        )
    } else {
        let started =
            source::kube::start(args.kubeconfig.as_deref(), args.node_name.as_deref()).await?;
        (started.deltas, started.api_server_addresses)
    };
    let dataplane = Dataplane::install(&args)?;
    if let Some(logger) = dataplane.bpf_logger {
        spawn_bpf_logger(logger);
    }
    if !args.allow_service_external_ips {
        info!("--allow-service-external-ips=false: spec.externalIPs of every Service is ignored");
    }
    if !dataplane.other_versions.is_empty() {
        spawn_version_takeover(dataplane.pins.clone(), stats.clone());
    }

    if !dataplane.tc_missing.is_empty() {
        warn!(missing = ?dataplane.tc_missing, "TC ingress is missing on needed interfaces: /readyz answers 503 until it is attached");
    }
    let tc_missing = dataplane.tc_missing;
    stats.update(|stats| stats.tc_missing = tc_missing);
    spawn_interface_follower(dataplane.follower, dataplane.link_events, stats.clone());
    spawn_upkeep(
        dataplane.conntrack.clone(),
        dataplane.datapath_maps,
        dataplane.fill.clone(),
        stats.clone(),
    );
    // kube-proxy's health-check node ports listen where NodePorts open: on the wildcard
    // address by default, else on each selected node address.
    let bind = if args.nodeport_addresses.is_all() {
        healthcheck::BindTo::AllAddresses
    } else {
        healthcheck::BindTo::NodePortAddresses
    };
    let health_checks = healthcheck::HealthCheckServer::new(
        bind,
        proxy_health(&stats, health::stale_after(args.sync_period)),
    );
    start_endpoints(
        &args,
        &stats,
        dataplane.counters,
        dataplane.fill,
        &health_checks,
    )
    .await;

    info!(pins = %dataplane.pins.root.display(), cgroup = %dataplane.cgroup.display(), "switchyard running");
    let node = NodeConfig::new(
        ModelConfig {
            node_name: args.node_name.clone(),
            service_proxy_name: args.service_proxy_name.clone(),
            ignore_external_ips: !args.allow_service_external_ips,
            api_server_addresses,
            lb_algorithm: args.maglev.lb_algorithm,
            ..ModelConfig::default()
        },
        args.nodeport_addresses.clone(),
    );
    let reaper = SocketsAndFlows {
        sockets: dataplane.sockets,
        flows: dataplane.conntrack,
    };
    let synced = runner::run(
        deltas,
        Box::new(node),
        Reconciler::new(Box::new(dataplane.writer))?.with_maglev(args.maglev.settings()),
        runner::FollowUp {
            reaper: Box::new(reaper),
            matches: AffinityMatches::new(Box::new(PinnedMatches::open(&dataplane.pins)?)),
        },
        health_checks.clone(),
        SyncConfig {
            min_period: args.min_sync_period,
            max_period: args.sync_period,
        },
        stats,
        shutdown_signal(),
    )
    .await;
    // Unlike the pinned dataplane, the health-check node ports go with the agent (as
    // kube-proxy's do): close them before exiting, whatever ended the runner.
    health_checks.close_all().await;
    synced?;
    drop(dataplane.lock);
    Ok(())
}

/// Forwards the eBPF programs' log records into the agent's log as they arrive.
fn spawn_bpf_logger(logger: bpf_log::BpfLogger) {
    let spawned = std::thread::Builder::new()
        .name("bpf-log".into())
        .spawn(move || {
            if let Err(failure) = logger.forward() {
                error!("forwarding the eBPF programs' log stopped: {failure}");
            }
        });
    if let Err(failure) = spawned {
        error!("cannot start forwarding the eBPF programs' log: {failure}");
    }
}

/// Once the first complete sync has filled this version's maps, the other layout versions'
/// programs are retired and their maps removed (see `bpf::versions`): until then they keep
/// translating, so an upgrade or a rollback has no moment without a dataplane.
fn spawn_version_takeover(pins: PinLayout, stats: StatsHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while stats.snapshot().syncs_total == 0 {
            tick.tick().await;
        }
        let done = tokio::task::spawn_blocking(move || versions::take_over(&pins)).await;
        match done {
            Ok(report) => info!(
                versions = ?report.versions,
                links = report.links,
                maps = report.maps,
                carried_over = report.entries,
                "other map layout versions taken over"
            ),
            Err(failure) => error!("taking over from other map layout versions failed: {failure}"),
        }
    });
}

/// How often interfaces are re-read when rtnetlink events cannot be received.
const INTERFACE_FALLBACK_PERIOD: Duration = Duration::from_secs(2);

/// Runs the follower on every rtnetlink change (a burst coalesced into one pass) and
/// publishes what is missing for `/readyz`.
fn spawn_interface_follower(
    mut follower: InterfaceFollower,
    events: Option<link_events::LinkEvents>,
    stats: StatsHandle,
) {
    let wake = events.map(link_events::LinkEvents::spawn_reader);
    tokio::spawn(async move {
        loop {
            match &wake {
                Some(wake) => {
                    wake.notified().await;
                    // A pod's veth, address and route arrive as a burst of messages.
                    tokio::time::sleep(link_events::COALESCE).await;
                }
                None => tokio::time::sleep(INTERFACE_FALLBACK_PERIOD).await,
            }
            let pass = tokio::task::spawn_blocking(move || {
                let missing = follower.follow();
                (follower, missing)
            })
            .await;
            match pass {
                Ok((back, missing)) => {
                    follower = back;
                    stats.update(|stats| stats.tc_missing = missing);
                }
                Err(failure) => {
                    error!("following the node's interfaces stopped: {failure}");
                    return;
                }
            }
        }
    });
}

/// How often the fill of every map is checked against its capacity (the agent-written maps'
/// counts are the mirror's, so this costs nothing).
const FILL_CHECK_PERIOD: Duration = Duration::from_secs(2);
/// Every this many fill checks, expired north-south flows are removed and the maps the
/// datapath writes are counted (a walk of each): every 10 s.
const WALKS_EVERY: u32 = 5;

/// The datapath's periodic upkeep: the datapath only refreshes conntrack lifetimes, and the
/// maps it fills are walked here, never at scrape time.
fn spawn_upkeep(
    conntrack: Arc<Mutex<Conntrack>>,
    mut counted: DatapathMaps,
    fill: Arc<FillTracker>,
    stats: StatsHandle,
) {
    tokio::spawn(async move {
        let mut alarms = FillAlarms::default();
        let mut tick = tokio::time::interval(FILL_CHECK_PERIOD);
        let mut round: u32 = 0;
        loop {
            tick.tick().await;
            let walk = round.is_multiple_of(WALKS_EVERY);
            round = round.wrapping_add(1);
            if walk {
                let conntrack = conntrack.clone();
                let pass = tokio::task::spawn_blocking(move || {
                    let report = conntrack
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .collect_garbage(monotonic_now_ns());
                    let counts = counted.count();
                    (counted, report, counts)
                })
                .await;
                let Ok((back, report, counts)) = pass else {
                    error!("the datapath upkeep stopped: a walk of the maps failed");
                    return;
                };
                counted = back;
                fill.record(counts);
                fill.record(report.entries.map(|(map, entries)| (map, entries as u64)));
                if report.removed > 0 {
                    debug!(
                        removed = report.removed,
                        live = report.live_flows,
                        "conntrack garbage collected"
                    );
                }
            }
            for event in alarms.check(&fill.fill(&stats.snapshot().map_entries)) {
                fill::log(&event);
            }
        }
    });
}

fn north_south_settings(args: &RunArgs) -> NorthSouth {
    let flags = &args.north_south;
    NorthSouth {
        interfaces: flags.interfaces.clone(),
        cluster_cidrs: flags.cluster_cidr.clone(),
        masquerade_all: flags.masquerade_all,
        dsr: match flags.lb_mode {
            crate::cli::LbMode::Snat => Dsr::Off,
            crate::cli::LbMode::Dsr => Dsr::TcpAndUdp,
            crate::cli::LbMode::Hybrid => Dsr::TcpOnly,
        },
        snat_ports: flags.snat_port_range,
        xdp: match flags.xdp_mode {
            crate::cli::XdpModeArg::Off => XdpMode::Off,
            crate::cli::XdpModeArg::Native => XdpMode::Native,
            crate::cli::XdpModeArg::BestEffort => XdpMode::BestEffort,
        },
    }
}

/// kube-proxy's `serviceProxyHealthy` for the health-check node ports: the proxy's freshness
/// (`/livez`; the Node's own eligibility is `/healthz`'s business, as in kube-proxy), so a node
/// whose syncs stopped is taken out of its load balancers.
fn proxy_health(stats: &StatsHandle, stale: Duration) -> healthcheck::ProxyHealth {
    let stats = stats.clone();
    Arc::new(move || health::fresh(&stats.snapshot(), SystemTime::now(), stale))
}

/// Starts the metrics and health endpoints. A port that cannot be bound is reported, never
/// fatal: the dataplane matters more than its observability.
async fn start_endpoints(
    args: &RunArgs,
    stats: &StatsHandle,
    counters: Arc<DatapathCounters>,
    fill: Arc<FillTracker>,
    health_checks: &healthcheck::HealthCheckServer,
) {
    if let Some(address) = args.metrics_bind_address.0 {
        let stats = stats.clone();
        let health_checks = health_checks.counters();
        let handler: http::Handler = Arc::new(move |path| match path {
            "/metrics" => {
                let stats = stats.snapshot();
                let maps = fill.fill(&stats.map_entries);
                let text = metrics::render(
                    stats,
                    metrics::DatapathView {
                        reasons: counters.read(),
                        maps,
                    },
                    Some(health_checks.as_ref().into()),
                );
                http::Response::new(200, metrics::CONTENT_TYPE, text)
            }
            _ => http::Response::not_found(),
        });
        if let Err(failure) = http::serve(address, "metrics", handler).await {
            error!(%address, "cannot serve metrics: {failure}");
        }
    }
    if let Some(address) = args.healthz_bind_address.0 {
        let stats = stats.clone();
        let stale = health::stale_after(args.sync_period);
        let handler: http::Handler = Arc::new(move |path| match path {
            "/healthz" => {
                let answer = health::healthz(&stats.snapshot(), SystemTime::now(), stale);
                stats.update(|stats| *stats.healthz_total.entry(answer.status).or_default() += 1);
                answer
            }
            "/livez" => {
                let answer = health::livez(&stats.snapshot(), SystemTime::now(), stale);
                stats.update(|stats| *stats.livez_total.entry(answer.status).or_default() += 1);
                answer
            }
            "/readyz" => health::readyz(&stats.snapshot()),
            _ => http::Response::not_found(),
        });
        if let Err(failure) = http::serve(address, "health", handler).await {
            error!(%address, "cannot serve health checks: {failure}");
        }
    }
}
