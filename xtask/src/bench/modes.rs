//! The modes compared and their data planes: what each programs, how a client reaches the
//! measured service through it, and its control-plane costs. A new mode is a [`Mode`] variant
//! plus a [`Dataplane`] implementation.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use switchyard_tests::agent::Agent;
use switchyard_tests::env::bpffs::PrivateBpffs;
use switchyard_tests::env::cgroup::TestCgroup;
use switchyard_tests::env::netns::Topology;
use switchyard_tests::env::process::{run_bounded, run_checked, wait_until};
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::manifests::{
    AddressType, EndpointPort, EndpointSlice, Manifests, Protocol, Service, ServicePort,
};

use super::agent_usage::{self, CpuSample};
use super::lanes::Lane;
use super::services::{BACKEND_PORT, PORT_NAME, SERVICE_PORT, ServiceSet};
use super::sync_log::LogTail;
use super::{kube_iptables, kube_nftables};

const COMMAND_TIMEOUT: Duration = Duration::from_mins(1);
pub const UPDATE_TIMEOUT: Duration = Duration::from_mins(2);
/// How the agent's return to idle after a change is detected: its CPU time no longer grows
/// over one step (bounded by the maximum).
pub const IDLE_STEP: Duration = Duration::from_millis(10);
pub const IDLE_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Client to a backend's own IP, no service at all: the physical floor.
    Direct,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    /// ClusterIP from a process in the hooked cgroup.
    SwitchyardSocket,
    /// NodePort (externalTrafficPolicy Cluster) from a client outside the node, through
    /// Switchyard's TC program on the node's interfaces: conntrack, DNAT and masquerade.
    SwitchyardTc,
    /// switchyard-tc with the XDP fast path (`--xdp-mode native`) on the node's interfaces:
    /// TC sets each flow up, XDP forwards its later packets both ways.
    SwitchyardXdp,
    /// switchyard-tc's masquerading over two nodes: an external client through node 0's
    /// NodePort to endpoints on node 1 (`two_node`), replies back through node 0.
    SwitchyardTc2Node,
    /// The same two nodes with Direct Server Return: node 1's replies go straight to the
    /// client.
    SwitchyardDsr,
    /// The agent fed by the test API server (`--kubeconfig`, the production path): control
    /// plane only. Its maps and hooks are switchyard-socket's, so it has no lane of its own.
    SwitchyardApi,
}

impl Mode {
    pub const ALL: [Self; 10] = [
        Self::Direct,
        Self::IptablesNft,
        Self::IptablesLegacy,
        Self::Nftables,
        Self::SwitchyardSocket,
        Self::SwitchyardTc,
        Self::SwitchyardXdp,
        Self::SwitchyardTc2Node,
        Self::SwitchyardDsr,
        Self::SwitchyardApi,
    ];

    /// The modes measured in lanes at the data-plane scale points.
    pub const LANES: [Self; 7] = [
        Self::Direct,
        Self::IptablesNft,
        Self::IptablesLegacy,
        Self::Nftables,
        Self::SwitchyardSocket,
        Self::SwitchyardTc,
        Self::SwitchyardXdp,
    ];

    /// The modes measured in the two-node cluster, at the first data-plane scale point only.
    pub const TWO_NODE: [Self; 2] = [Self::SwitchyardTc2Node, Self::SwitchyardDsr];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
            Self::SwitchyardSocket => "switchyard-socket",
            Self::SwitchyardTc => "switchyard-tc",
            Self::SwitchyardXdp => "switchyard-xdp",
            Self::SwitchyardTc2Node => "switchyard-tc-2node",
            Self::SwitchyardDsr => "switchyard-dsr",
            Self::SwitchyardApi => "switchyard-api",
        }
    }

    /// What the mode's control-plane numbers include, for the report.
    pub fn control_plane_note(self) -> Option<&'static str> {
        match self {
            Self::IptablesNft | Self::IptablesLegacy => Some(
                "wall time of `iptables-nft-restore` / `iptables-legacy-restore` in the node \
                 namespace on a file generated beforehand (kube-proxy's own computation is not \
                 included). Programming from empty is a full restore: kube-proxy passes \
                 `--noflush`, which gives the same tables but made iptables-nft 1.8.9 take over \
                 two minutes instead of 14 s at 10 000 services × 10 endpoints on this machine, \
                 so these figures favour iptables-nft. The update is kube-proxy's partial sync \
                 with `--noflush`, which rewrites KUBE-SERVICES in full",
            ),
            Self::Nftables => Some(
                "wall time of `nft -f` in the node namespace on a file generated beforehand; the \
                 update is one transaction (new endpoint chain, service chain rewritten, stale \
                 endpoint chain deleted)",
            ),
            Self::SwitchyardSocket | Self::SwitchyardTc => Some(
                "program: from starting the agent on the manifests file (load and attach the \
                 programs, parse, plan, write the maps) to its `dataplane synced` log line; \
                 update: from rewriting the file to the next `dataplane synced` line (includes \
                 the file source's poll every 100 ms, the one extra poll that proves the file complete \
                 and re-parsing the documents that changed); the \
                 agent-side durations are the `elapsed` of those lines, the CPU time is the \
                 agent's from rewriting the file until it is idle again after the sync",
            ),
            Self::SwitchyardApi => Some(
                "the agent follows the test API server (`--kubeconfig`, kube-rs list/watch over \
                 the node namespace's loopback), see the control-plane method",
            ),
            Self::Direct | Self::SwitchyardXdp | Self::SwitchyardTc2Node | Self::SwitchyardDsr => {
                None
            }
        }
    }

    pub fn is_switchyard(self) -> bool {
        matches!(
            self,
            Self::SwitchyardSocket
                | Self::SwitchyardTc
                | Self::SwitchyardXdp
                | Self::SwitchyardTc2Node
                | Self::SwitchyardDsr
                | Self::SwitchyardApi
        )
    }

    /// The mode that takes the same path but masquerades, which this one is paired with.
    pub fn masqueraded_twin(self) -> Option<Self> {
        (self == Self::SwitchyardDsr).then_some(Self::SwitchyardTc2Node)
    }

    /// Whether the mode is measured in the two-node cluster rather than in a lane.
    pub fn is_two_node(self) -> bool {
        Self::TWO_NODE.contains(&self)
    }

    /// Builds the mode's data plane for `lane`.
    pub fn dataplane(self, lane: &Lane) -> Result<Box<dyn Dataplane>> {
        Ok(match self {
            Self::SwitchyardApi => {
                bail!("{self} is measured in the control-plane phase and has no lane")
            }
            Self::SwitchyardTc2Node | Self::SwitchyardDsr => {
                bail!("{self} is measured in the two-node cluster and has no lane")
            }
            Self::Direct => Box::new(Direct),
            Self::IptablesNft | Self::IptablesLegacy | Self::Nftables => {
                Box::new(Netfilter::new(self)?)
            }
            Self::SwitchyardSocket => Box::new(Switchyard::new(Frontend::HookedClusterIp)?),
            Self::SwitchyardTc => Box::new(Switchyard::new(Frontend::NodePort(
                lane.node_address_for_client(),
            ))?),
            Self::SwitchyardXdp => {
                lane.prepare_for_xdp()?;
                Box::new(Switchyard::new(Frontend::NodePortXdp(
                    lane.node_address_for_client(),
                ))?)
            }
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Memory the agent uses at a scale point.
#[derive(Debug, Clone, Copy)]
pub struct AgentMemory {
    /// Peak resident set size (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Sum of the `memlock` of every BPF map the agent holds, MiB (None if none was found).
    pub maps_mib: Option<f64>,
}

impl AgentMemory {
    pub fn of(pid: u32) -> Option<Self> {
        Some(Self {
            peak_rss_mib: agent_usage::peak_rss_mib(pid)?,
            maps_mib: agent_usage::bpf_map_mib(pid),
        })
    }
}

/// The agent's own account of its last program-everything and endpoint change.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCosts {
    /// `elapsed` of the sync that programmed everything from empty.
    pub program_sync: Option<Duration>,
    /// `elapsed` of the sync(s) that applied the endpoint change.
    pub change_sync: Option<Duration>,
    /// Agent CPU time from the change until it was idle again.
    pub change_cpu: Option<Duration>,
}

pub trait Dataplane {
    /// Removes everything programmed, leaving the mode as on a fresh node (not timed).
    fn clear(&mut self, topology: &Topology) -> Result<()>;
    /// Programs every service of `set` from empty; the time it took, `None` if the mode
    /// programs nothing.
    fn program_all(
        &mut self,
        topology: &Topology,
        set: &ServiceSet,
        timeout: Duration,
    ) -> Result<Option<Duration>>;
    /// Applies [`ServiceSet::updated_endpoints`] on top of `program_all(set)`.
    fn update_one(&mut self, topology: &Topology, set: &ServiceSet) -> Result<Option<Duration>>;
    /// Where a client connects to reach the measured service.
    fn targets(&self, set: &ServiceSet) -> Vec<SocketAddr> {
        vec![set.measured_target()]
    }
    /// The cgroup the client must run in, if the mode acts on sockets.
    fn cgroup(&self) -> Option<&Path> {
        None
    }
    /// Resets per-connection state between repetitions (conntrack), so every repetition
    /// starts alike.
    fn reset_connection_state(&self, _topology: &Topology) -> Result<()> {
        Ok(())
    }
    fn agent_memory(&self) -> Option<AgentMemory> {
        None
    }
    fn sync_costs(&self) -> SyncCosts {
        SyncCosts::default()
    }
}

/// No service: the client spreads its connections over the backends' own addresses.
struct Direct;

impl Dataplane for Direct {
    fn clear(&mut self, _: &Topology) -> Result<()> {
        Ok(())
    }

    fn program_all(
        &mut self,
        _: &Topology,
        _: &ServiceSet,
        _: Duration,
    ) -> Result<Option<Duration>> {
        Ok(None)
    }

    fn update_one(&mut self, _: &Topology, _: &ServiceSet) -> Result<Option<Duration>> {
        Ok(None)
    }

    fn targets(&self, set: &ServiceSet) -> Vec<SocketAddr> {
        set.endpoints
            .iter()
            .map(|&ip| SocketAddr::from((ip, BACKEND_PORT)))
            .collect()
    }
}

/// kube-proxy's rules, generated and loaded into the node namespace with the mode's tool.
struct Netfilter {
    mode: Mode,
    files: TempDir,
}

impl Netfilter {
    fn new(mode: Mode) -> Result<Self> {
        Ok(Self {
            mode,
            files: TempDir::new()?,
        })
    }

    /// The loader command for a rules file: (program, arguments before the file).
    fn loader(&self, incremental: bool) -> (&'static str, &'static [&'static str]) {
        match (self.mode, incremental) {
            (Mode::IptablesNft, true) => ("iptables-nft-restore", &["--noflush"]),
            (Mode::IptablesNft, false) => ("iptables-nft-restore", &[]),
            (Mode::IptablesLegacy, true) => ("iptables-legacy-restore", &["--noflush"]),
            (Mode::IptablesLegacy, false) => ("iptables-legacy-restore", &[]),
            _ => ("nft", &["-f"]),
        }
    }

    /// Writes `rules` to a file (not timed) and loads it in the node namespace (timed).
    fn load(
        &self,
        topology: &Topology,
        rules: &str,
        incremental: bool,
        timeout: Duration,
    ) -> Result<Duration> {
        let path = self.files.path().join("rules");
        std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        let (program, args) = self.loader(incremental);
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", topology.node_namespace(), program])
            .args(args)
            .arg(&path);
        let started = Instant::now();
        let output = run_bounded(&mut command, timeout)?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "{program} failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(elapsed)
    }
}

impl Dataplane for Netfilter {
    fn clear(&mut self, topology: &Topology) -> Result<()> {
        let rules = if self.mode == Mode::Nftables {
            kube_nftables::empty()
        } else {
            kube_iptables::empty()
        };
        self.load(topology, &rules, false, COMMAND_TIMEOUT * 10)
            .map(drop)
    }

    fn program_all(
        &mut self,
        topology: &Topology,
        set: &ServiceSet,
        timeout: Duration,
    ) -> Result<Option<Duration>> {
        // A full restore, not kube-proxy's `--noflush`: the tables are empty, so the result is
        // the same, and iptables-nft 1.8.9 is far slower with `--noflush` at this size (over
        // two minutes instead of 14 s at 10 000 × 10), which would measure a tool quirk.
        let (rules, incremental) = if self.mode == Mode::Nftables {
            (kube_nftables::program_all(set), true)
        } else {
            (kube_iptables::program_all(set), false)
        };
        self.load(topology, &rules, incremental, timeout).map(Some)
    }

    fn update_one(&mut self, topology: &Topology, set: &ServiceSet) -> Result<Option<Duration>> {
        let rules = if self.mode == Mode::Nftables {
            kube_nftables::update_one(set)
        } else {
            kube_iptables::update_one(set)
        };
        self.load(topology, &rules, true, UPDATE_TIMEOUT).map(Some)
    }

    fn reset_connection_state(&self, topology: &Topology) -> Result<()> {
        run_checked(
            Command::new("ip").args([
                "netns",
                "exec",
                topology.node_namespace(),
                "conntrack",
                "-F",
            ]),
            COMMAND_TIMEOUT,
        )
        .map(drop)
    }
}

/// How the client reaches the measured service through Switchyard.
#[derive(Debug, Clone, Copy)]
enum Frontend {
    /// Its ClusterIP, from a process in the cgroup the socket hooks are attached to.
    HookedClusterIp,
    /// Its NodePort on this node address, from outside the node: the client is not in the
    /// hooked cgroup, so its packets meet the TC program on the node's interface. The agent
    /// runs without `--cluster-cidr`, so the client counts as external and the flow is
    /// masqueraded to the node address (externalTrafficPolicy Cluster).
    NodePort(Ipv4Addr),
    /// [`Frontend::NodePort`] with the XDP fast path (`--xdp-mode native`).
    NodePortXdp(Ipv4Addr),
}

/// The Switchyard agent in the node namespace, its socket hooks on a bench-owned cgroup and
/// its TC program on the node's interfaces (its defaults). Fields drop in order: the agent
/// stops before its cgroup and bpffs go.
struct Switchyard {
    frontend: Frontend,
    agent: Option<Agent>,
    manifests: TempDir,
    cgroup: TestCgroup,
    bpffs: PrivateBpffs,
    log: Option<LogTail>,
    costs: SyncCosts,
}

impl Switchyard {
    fn new(frontend: Frontend) -> Result<Self> {
        Ok(Self {
            frontend,
            agent: None,
            manifests: TempDir::new()?,
            cgroup: TestCgroup::new()?,
            bpffs: PrivateBpffs::new()?,
            log: None,
            costs: SyncCosts::default(),
        })
    }

    fn manifests_path(&self) -> std::path::PathBuf {
        self.manifests.path().join("services.yaml")
    }

    fn write_manifests(&self, set: &ServiceSet, updated: bool) -> Result<()> {
        let mut manifests = Manifests::new();
        for index in 0..set.count {
            let name = ServiceSet::name(index);
            let endpoints = if updated {
                set.updated_endpoints(index)
            } else {
                set.endpoints.clone()
            };
            let mut port = ServicePort::new(PORT_NAME, Protocol::Tcp, SERVICE_PORT, PORT_NAME);
            if let (Frontend::NodePort(_) | Frontend::NodePortXdp(_), Some(node_port)) =
                (self.frontend, set.node_port(index))
            {
                port = port.node_port(node_port);
            }
            manifests = manifests
                .with(Service::cluster_ip(&name, &[ServiceSet::vip(index).into()]).port(port))
                .with(
                    EndpointSlice::new(&format!("{name}-1"), &name, AddressType::IPv4)
                        .ready_endpoints(endpoints.into_iter().map(Into::into))
                        .port(EndpointPort::new(PORT_NAME, Protocol::Tcp, BACKEND_PORT)),
                );
        }
        manifests.write_atomic(&self.manifests_path())
    }

    /// Waits for the agent's next `dataplane synced` line(s); returns the sum of their
    /// `elapsed`.
    fn wait_for_sync(&mut self, timeout: Duration) -> Result<Duration> {
        let agent = self.agent.as_mut().context("the agent is not running")?;
        let log = self.log.as_mut().context("the agent's log is not open")?;
        wait_for_syncs(agent, log, timeout)
    }

    /// Flags beyond the bench's common ones (manifests, cgroup, bpffs).
    fn agent_args(&self) -> Vec<String> {
        match self.frontend {
            Frontend::HookedClusterIp => Vec::new(),
            // NodePorts on the client-facing address only, as an operator restricts them to
            // the node's primary address; the backends' links carry no NodePort frontend.
            Frontend::NodePort(address) => {
                vec!["--nodeport-addresses".to_owned(), format!("{address}/32")]
            }
            Frontend::NodePortXdp(address) => vec![
                "--nodeport-addresses".to_owned(),
                format!("{address}/32"),
                "--xdp-mode".to_owned(),
                "native".to_owned(),
            ],
        }
    }
}

impl Dataplane for Switchyard {
    fn clear(&mut self, _: &Topology) -> Result<()> {
        self.log = None;
        self.costs = SyncCosts::default();
        if let Some(mut agent) = self.agent.take() {
            agent.stop()?;
            let output = agent.cleanup()?;
            if !output.status.success() {
                bail!(
                    "switchyard cleanup failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        Ok(())
    }

    fn program_all(
        &mut self,
        topology: &Topology,
        set: &ServiceSet,
        timeout: Duration,
    ) -> Result<Option<Duration>> {
        self.clear(topology)?;
        self.write_manifests(set, false)?;
        let started = Instant::now();
        let args = self.agent_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agent = Some(Agent::start(
            topology,
            &self.cgroup,
            &self.bpffs,
            &self.manifests_path(),
            &args,
        )?);
        let log_path = self.agent.as_ref().map(|a| a.log_path().to_owned());
        self.log = Some(LogTail::open(
            &log_path.context("the agent is not running")?,
        )?);
        let sync = self.wait_for_sync(timeout)?;
        let elapsed = started.elapsed();
        self.costs = SyncCosts {
            program_sync: Some(sync),
            ..SyncCosts::default()
        };
        Ok(Some(elapsed))
    }

    fn update_one(&mut self, _: &Topology, set: &ServiceSet) -> Result<Option<Duration>> {
        let pid = self.agent.as_ref().and_then(Agent::pid);
        // Whatever the agent logged since programming is not this change's.
        if let Some(log) = self.log.as_mut() {
            log.new_syncs()?;
        }
        let before = pid.and_then(CpuSample::read);
        self.write_manifests(set, true)?;
        let started = Instant::now();
        let sync = self.wait_for_sync(UPDATE_TIMEOUT)?;
        let elapsed = started.elapsed();
        let after = pid.and_then(|pid| agent_usage::wait_until_idle(pid, IDLE_STEP, IDLE_MAX));
        self.costs.change_sync = Some(sync);
        self.costs.change_cpu = before
            .zip(after)
            .map(|(before, after)| after.since(&before));
        Ok(Some(elapsed))
    }

    fn targets(&self, set: &ServiceSet) -> Vec<SocketAddr> {
        match self.frontend {
            Frontend::HookedClusterIp => vec![set.measured_target()],
            Frontend::NodePort(address) | Frontend::NodePortXdp(address) => {
                let node_port = set
                    .node_port(set.measured())
                    .expect("the measured service always has a nodePort");
                vec![SocketAddr::from((address, node_port))]
            }
        }
    }

    fn cgroup(&self) -> Option<&Path> {
        match self.frontend {
            Frontend::HookedClusterIp => Some(self.cgroup.path()),
            Frontend::NodePort(_) | Frontend::NodePortXdp(_) => None,
        }
    }

    fn agent_memory(&self) -> Option<AgentMemory> {
        AgentMemory::of(self.agent.as_ref()?.pid()?)
    }

    fn sync_costs(&self) -> SyncCosts {
        self.costs
    }
}

/// Waits (bounded by `timeout`) for the agent's next `dataplane synced` line; returns the sum
/// of the `elapsed` of the sync lines found (usually one). Fails, with the agent's log,
/// if the agent exits or does not sync in time.
pub fn wait_for_syncs(agent: &mut Agent, log: &mut LogTail, timeout: Duration) -> Result<Duration> {
    let mut total = Duration::ZERO;
    let mut seen = 0;
    let found = wait_until(timeout, Duration::from_millis(1), || {
        if agent.ensure_running().is_err() {
            return Some(Err(anyhow::anyhow!("the agent exited")));
        }
        match log.new_syncs() {
            Ok(syncs) => {
                seen += syncs.len();
                total += syncs.iter().map(|s| s.elapsed).sum::<Duration>();
                (seen > 0).then_some(Ok(()))
            }
            Err(error) => Some(Err(error)),
        }
    });
    match found {
        Some(Ok(())) => Ok(total),
        Some(Err(error)) => Err(error.context(format!("the agent's log:\n{}", agent.log()))),
        None => bail!(
            "the agent did not sync within {timeout:?}; its log:\n{}",
            agent.log()
        ),
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.stop();
            let _ = agent.cleanup();
        }
    }
}
