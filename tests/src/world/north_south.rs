//! A north-south topology: traffic that reaches the node from a machine outside the cluster,
//! for the agent's TC datapath (NodePort, externalIPs, LoadBalancer IPs).
//!
//! ```text
//!  client ──────────── node (agent) ──────────── node2 ──────────── remote backend
//!  203.0.113.2/24  ext0 203.0.113.1/24    nn0 192.168.100.1/24        10.241.1.2/24
//!  2001:db8:c::2/64     2001:db8:c::1/64      fd00:192:168::1/64      fd00:241:1::2/64
//!                        │ pod0 10.240.1.1/24, fd00:240:1::1/64
//!                      local backend 10.240.1.2/24, fd00:240:1::2/64
//! ```
//!
//! Routing, and why nothing can leave the machine: no namespace has a default route except the
//! two backends, whose default goes to their node; the node has no default route, so anything
//! it cannot route fails there (ICMP unreachable) instead of leaving. The client only has its
//! own link, routes to the pod networks and to the test's external/LB addresses
//! ([`EXTERNAL_NET4`], [`EXTERNAL_NET6`]) via the node. The node reaches the remote pod network
//! through node2; node2 has specific routes back (client link, local pods, external addresses)
//! via the node. IPv4 and IPv6 forwarding are on in both nodes, reverse-path filtering off.
//!
//! Everything is created inside namespaces: each veth is created in one test namespace with its
//! peer moved straight into another, never in the root namespace. The node namespace is a
//! [`Topology`] without backends (so [`Agent`] can run in it); the other four namespaces are
//! uniquely named ([`crate::env::names`]) and swept like the rest when a test process died. Dropping
//! a [`NorthSouth`] stops the agent and the servers, removes the cgroup, the bpffs and every
//! namespace (with their links), also when the test panics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use crate::agent::{Agent, switchyard_bin};
use crate::client::report::Attempt;
use crate::client::testkit::{ClientRequest, RunningClient, Server, Testkit};
use crate::env::bpffs::PrivateBpffs;
use crate::env::cgroup::TestCgroup;
use crate::env::names;
use crate::env::netns::{
    Namespaces, Topology, VethEnd, ip_in, sysctl, veth, wait_until_operational,
};
use crate::env::process::{run_bounded, run_checked, wait_until};
use crate::env::tempdir::TempDir;
use crate::k8s::manifests::Manifests;

/// The port both backend servers listen on (TCP and UDP).
pub const BACKEND_PORT: u16 = 8080;
/// The agent's `--node-name`; the local backend's endpoints name it.
pub const NODE_NAME: &str = "node-a";
/// The node of the remote backend.
pub const REMOTE_NODE_NAME: &str = "node-b";
/// `--cluster-cidr`: both pod networks (10.240.0.0/16 here, 10.241.0.0/16 behind node2).
pub const CLUSTER_CIDR: &str = "10.240.0.0/15,fd00:240::/31";
/// What the backend servers answer with.
pub const LOCAL_BACKEND: &str = "local";
pub const REMOTE_BACKEND: &str = "remote";

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
/// The node's address on the client's link (the NodePort address the client uses).
pub const NODE_EXT4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const NODE_EXT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
/// The node's address on the local pod's link (also a node address).
pub const NODE_POD_GW4: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 1);
pub const NODE_POD_GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 1, 0, 0, 0, 0, 1);
pub const LOCAL_POD4: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 2);
pub const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 1, 0, 0, 0, 0, 2);
/// The node's address on the link to node2 (also a node address).
pub const NODE_TO_NODE2_4: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
pub const NODE_TO_NODE2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0, 0, 0, 0, 1);
pub const NODE2_4: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
pub const NODE2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0, 0, 0, 0, 2);
pub const NODE2_POD_GW4: Ipv4Addr = Ipv4Addr::new(10, 241, 1, 1);
pub const NODE2_POD_GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x241, 1, 0, 0, 0, 0, 1);
pub const REMOTE_POD4: Ipv4Addr = Ipv4Addr::new(10, 241, 1, 2);
pub const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x241, 1, 0, 0, 0, 0, 2);
/// External and LoadBalancer IPs of the tests come from here; the client routes it via the
/// node, and nothing owns it.
pub const EXTERNAL_NET4: &str = "198.51.100.0/24";
pub const EXTERNAL_NET6: &str = "2001:db8:5e::/64";

/// Interface names (unique inside their own namespace only).
pub const NODE_CLIENT_LINK: &str = "ext0";
pub const NODE_POD_LINK: &str = "pod0";
pub const NODE_NODE2_LINK: &str = "nn0";
/// node2's end of that link.
pub const NODE2_UP_LINK: &str = "up0";

const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to serve a frontend after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Whether the veths keep their checksum offloads (the kernel default) or compute and verify
/// every checksum in software, which is what exposes a wrong incremental checksum update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offloads {
    On,
    Off,
}

/// How the local pod is wired to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The node's side of the pod link carries the pod network's gateway address (a bridged
    /// CNI's layout, reduced to one veth).
    Bridged,
    /// A routed CNI's layout (Calico, AWS VPC CNI): the node's side of the pod link has no
    /// address, the node routes the pod's /32 and /128 to it, answers ARP for the pod's
    /// gateway by proxy ARP, and the pod's IPv6 gateway is that side's link-local address.
    Routed,
}

/// The routed layout's pod gateway (Calico's), reached through proxy ARP / its MAC.
pub const ROUTED_GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const ROUTED_HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The link-local address the kernel derives from [`ROUTED_HOST_MAC`] (EUI-64).
const ROUTED_GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";

/// The north-south test world: namespaces and links, backend servers, the hooked test cgroup
/// (for in-cluster clients only), a private bpffs, the manifests file and the agent.
/// Fields drop in declaration order: the agent stops first, the namespaces go last.
pub struct NorthSouth {
    agent: Option<Agent>,
    _servers: Vec<Server>,
    manifests_dir: TempDir,
    cgroup: TestCgroup,
    bpffs: PrivateBpffs,
    namespaces: Namespaces,
    /// The node namespace, where the agent runs.
    node: Topology,
    client: String,
    node2: String,
    local: String,
    remote: String,
    /// Every (namespace, device) of every veth end.
    links: Vec<(String, String)>,
    testkit: Testkit,
}

impl NorthSouth {
    /// Builds the topology (see the module documentation), starts the two backend servers and
    /// prepares cgroup, bpffs and manifests directory. The agent is not started.
    pub fn new(testkit: Testkit, offloads: Offloads) -> Self {
        Self::with_layout(testkit, offloads, Layout::Bridged)
    }

    /// As [`NorthSouth::new`], with the local pod wired as `layout` says.
    pub fn with_layout(testkit: Testkit, offloads: Offloads, layout: Layout) -> Self {
        Self::build(testkit, offloads, layout).expect("building the north-south topology")
    }

    fn build(testkit: Testkit, offloads: Offloads, layout: Layout) -> Result<Self> {
        let node = Topology::new(0)?;
        let base = node.node_namespace().to_owned();
        let mut namespaces = Namespaces::default();
        // Derived from the node's unique name (so unique and swept like it), kind letters kept
        // apart from the Topology's own `b`/`p` suffixes.
        let client = format!("{base}c");
        let node2 = format!("{base}m");
        let local = format!("{base}l");
        let remote = format!("{base}r");
        debug_assert!(names::owner_pid(&client).is_some());
        for name in [&client, &node2, &local, &remote] {
            namespaces.add(name)?;
        }
        let spaces = Spaces {
            node: base,
            client,
            node2,
            local,
            remote,
            layout,
        };
        spaces.configure()?;
        let links = spaces.wire()?;
        spaces.route()?;
        if offloads == Offloads::Off {
            for (netns, device) in &links {
                checksum_offloads_off(netns, device)?;
            }
        }
        let Spaces {
            client,
            node2,
            local,
            remote,
            ..
        } = spaces;
        let servers = vec![
            testkit.serve(&local, LOCAL_BACKEND, &[BACKEND_PORT])?,
            testkit.serve(&remote, REMOTE_BACKEND, &[BACKEND_PORT])?,
        ];
        let bpffs = PrivateBpffs::new()?;
        let cgroup = TestCgroup::new()?;
        let manifests_dir = TempDir::new()?;
        Ok(Self {
            agent: None,
            _servers: servers,
            manifests_dir,
            cgroup,
            bpffs,
            namespaces,
            node,
            client,
            node2,
            local,
            remote,
            links,
            testkit,
        })
    }

    pub fn node_namespace(&self) -> &str {
        self.node.node_namespace()
    }

    pub fn client_namespace(&self) -> &str {
        &self.client
    }

    pub fn node2_namespace(&self) -> &str {
        &self.node2
    }

    pub fn local_backend_namespace(&self) -> &str {
        &self.local
    }

    pub fn remote_backend_namespace(&self) -> &str {
        &self.remote
    }

    /// Every namespace of the topology.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut all = vec![self.node_namespace()];
        all.extend(self.namespaces.all().iter().map(String::as_str));
        all
    }

    /// Every (namespace, device) veth end.
    pub fn links(&self) -> &[(String, String)] {
        &self.links
    }

    /// The node's own addresses (what a masqueraded flow may carry as its source).
    pub fn node_addresses(&self) -> Vec<IpAddr> {
        vec![
            NODE_EXT4.into(),
            NODE_POD_GW4.into(),
            NODE_TO_NODE2_4.into(),
            NODE_EXT6.into(),
            NODE_POD_GW6.into(),
            NODE_TO_NODE2_6.into(),
        ]
    }

    pub fn testkit(&self) -> &Testkit {
        &self.testkit
    }

    pub fn manifests_path(&self) -> PathBuf {
        self.manifests_dir.path().join("manifests.yaml")
    }

    pub fn write_manifests(&self, manifests: &Manifests) {
        manifests
            .write_atomic(&self.manifests_path())
            .expect("writing the manifests file");
    }

    /// Starts the agent in the node namespace on the manifests file (write it first), as
    /// [`NODE_NAME`] with [`CLUSTER_CIDR`], plus `extra_args`.
    pub fn start_agent(&mut self, extra_args: &[&str]) {
        let mut args = vec!["--node-name", NODE_NAME, "--cluster-cidr", CLUSTER_CIDR];
        args.extend_from_slice(extra_args);
        let agent = Agent::start(
            &self.node,
            &self.cgroup,
            &self.bpffs,
            &self.manifests_path(),
            &args,
        )
        .expect("starting the agent");
        self.agent = Some(agent);
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the agent was started")
    }

    pub fn bpffs(&self) -> &PrivateBpffs {
        &self.bpffs
    }

    /// Runs a client in the outside client namespace (not in the hooked cgroup).
    pub fn outside(&self, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .outside_client(&self.client, request)
            .unwrap_or_else(|e| panic!("running outside client {request:?}: {e:#}"))
    }

    pub fn spawn_outside(&self, request: &ClientRequest) -> RunningClient {
        self.testkit
            .spawn_outside_client(&self.client, request)
            .unwrap_or_else(|e| panic!("starting outside client {request:?}: {e:#}"))
    }

    /// Holds one TCP connection (or connected UDP socket) from the outside client, asking the
    /// backend for the address it sees on every request.
    pub fn outside_hold(
        &self,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
        udp: bool,
    ) -> RunningClient {
        self.testkit
            .outside_hold(&self.client, target, duration, every, udp)
            .unwrap_or_else(|e| panic!("starting an outside hold to {target}: {e:#}"))
    }

    /// Runs a client in `netns` (a topology namespace) outside the hooked cgroup.
    pub fn unhooked_in(&self, netns: &str, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .outside_client(netns, request)
            .unwrap_or_else(|e| panic!("running client {request:?} in {netns}: {e:#}"))
    }

    /// Runs a client in the hooked test cgroup inside the node namespace (a host process).
    pub fn hooked_node_client(&self, request: &ClientRequest) -> Vec<Attempt> {
        self.hooked_in(self.node_namespace(), request)
    }

    /// Runs a client in the hooked test cgroup inside the local backend's namespace (a pod).
    pub fn hooked_pod_client(&self, request: &ClientRequest) -> Vec<Attempt> {
        self.hooked_in(&self.local, request)
    }

    fn hooked_in(&self, netns: &str, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .client(netns, self.cgroup.path(), request)
            .unwrap_or_else(|e| panic!("running hooked client {request:?} in {netns}: {e:#}"))
    }

    /// Polls from the outside client (bounded by [`READY_TIMEOUT`]) until an attempt with
    /// `request` satisfies `accept`; fails the test with the last attempt otherwise. Also
    /// fails at once if the agent exited.
    pub fn wait_outside(
        &mut self,
        request: &ClientRequest,
        what: &str,
        accept: impl Fn(&Attempt) -> bool,
    ) -> Attempt {
        let probe = ClientRequest {
            count: 1,
            timeout: request
                .timeout
                .min(Duration::from_secs(1))
                .max(PROBE_TIMEOUT),
            ..request.clone()
        };
        let mut last = None;
        let found = wait_until(READY_TIMEOUT, PROBE_INTERVAL, || {
            if let Some(agent) = self.agent.as_mut() {
                agent
                    .ensure_running()
                    .unwrap_or_else(|e| panic!("waiting for {what}: {e:#}"));
            }
            let attempt = self.outside(&probe).pop()?;
            let done = accept(&attempt);
            last = Some(attempt.clone());
            done.then_some(attempt)
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {what} from {} ({:?}) within {READY_TIMEOUT:?}; last attempt: {last:?}",
                request.target, request.proto
            )
        })
    }

    /// Deletes the node ↔ client link and creates it again (same names and addresses, new
    /// interface indexes), as when a NIC or a CNI bridge is re-created under a running agent.
    pub fn recreate_client_link(&self) {
        let recreate = || -> Result<()> {
            ip_in(self.node_namespace(), &["link", "del", NODE_CLIENT_LINK])?;
            let (node_end, client_end) = client_link_ends(self.node_namespace(), &self.client);
            WorldBuilder { links: Vec::new() }.link(&node_end, &client_end)?;
            route_client(&self.client)
        };
        recreate().expect("re-creating the node ↔ client link");
    }

    /// Deletes the node ↔ client link (see [`NorthSouth::add_client_link`]).
    pub fn remove_client_link(&self) {
        ip_in(self.node_namespace(), &["link", "del", NODE_CLIENT_LINK])
            .expect("deleting the node ↔ client link");
    }

    /// Creates the node ↔ client link (after [`NorthSouth::remove_client_link`]), with its
    /// addresses and the client's routes.
    pub fn add_client_link(&self) {
        let add = || -> Result<()> {
            let (node_end, client_end) = client_link_ends(self.node_namespace(), &self.client);
            WorldBuilder { links: Vec::new() }.link(&node_end, &client_end)?;
            route_client(&self.client)
        };
        add().expect("creating the node ↔ client link");
    }

    /// Sets the MTU of both ends of the node ↔ node2 link (the path to the remote backend),
    /// for an MTU step down between the client and that backend.
    pub fn set_node2_link_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        for (netns, device) in [
            (self.node_namespace(), NODE_NODE2_LINK),
            (self.node2.as_str(), NODE2_UP_LINK),
        ] {
            ip_in(netns, &["link", "set", "dev", device, "mtu", &mtu])
                .unwrap_or_else(|e| panic!("setting the MTU of {device} in {netns}: {e:#}"));
        }
    }

    /// `switchyard inspect TARGET --output json` on the agent's pins.
    pub fn inspect_json(&self, target: &str) -> Value {
        let dir = self.bpffs.agent_dir();
        let output = run_checked(
            Command::new(switchyard_bin())
                .args(["inspect", target, "--output", "json", "--bpffs"])
                .arg(&dir),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("switchyard inspect {target}: {e:#}"));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("inspect {target} output is not JSON: {e}"))
    }

    /// The agent's datapath reason counters (`switchyard inspect stats`), by name.
    pub fn datapath_counters(&self) -> BTreeMap<String, u64> {
        counters_of(&self.inspect_json("stats"))
    }

    /// Starts a second agent in the node2 namespace, as [`REMOTE_NODE_NAME`] with
    /// [`CLUSTER_CIDR`], on its own manifests file, cgroup and pins (another node of the same
    /// cluster), plus `extra_args`.
    pub fn start_node2_agent(&self, manifests: &Manifests, extra_args: &[&str]) -> Node2Agent {
        Node2Agent::start(&self.node2, manifests, extra_args)
            .expect("starting the agent of the second node")
    }

    /// Checksum error counters (every nstat counter whose name contains `CsumErrors`) in
    /// `netns`.
    pub fn checksum_errors(&self, netns: &str) -> BTreeMap<String, u64> {
        checksum_errors(netns).unwrap_or_else(|e| panic!("reading nstat in {netns}: {e:#}"))
    }

    /// Routing tables and addresses of every namespace, for failure messages.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for netns in self.namespaces() {
            for args in [&["-br", "addr"][..], &["route"][..], &["-6", "route"][..]] {
                let output = run_bounded(
                    Command::new("ip").args(["-n", netns]).args(args),
                    IP_TIMEOUT,
                );
                let shown = output.map_or_else(
                    |e| format!("{e:#}"),
                    |o| String::from_utf8_lossy(&o.stdout).into_owned(),
                );
                let _ = writeln!(text, "== {netns}: ip {} ==\n{shown}", args.join(" "));
            }
        }
        text
    }
}

/// The names of the topology's namespaces.
struct Spaces {
    node: String,
    client: String,
    node2: String,
    local: String,
    remote: String,
    layout: Layout,
}

impl Spaces {
    /// Sysctls: DAD off, reverse-path filtering off, forwarding on in both nodes.
    fn configure(&self) -> Result<()> {
        for netns in [
            &self.node,
            &self.client,
            &self.node2,
            &self.local,
            &self.remote,
        ] {
            sysctl(
                netns,
                &[
                    // Link-local addresses usable at once (globals are added with nodad).
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    // Asymmetric paths (a reply through another node) must not be dropped.
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
        }
        for router in [&self.node, &self.node2] {
            sysctl(
                router,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            )?;
        }
        Ok(())
    }

    /// The four veth links; returns every (namespace, device) end.
    fn wire(&self) -> Result<Vec<(String, String)>> {
        let mut world = WorldBuilder { links: Vec::new() };
        let (node_end, client_end) = client_link_ends(&self.node, &self.client);
        world.link(&node_end, &client_end)?;
        match self.layout {
            Layout::Bridged => world.link(
                &VethEnd {
                    netns: &self.node,
                    device: NODE_POD_LINK,
                    v4: (NODE_POD_GW4, 24),
                    v6: (NODE_POD_GW6, 64),
                },
                &VethEnd {
                    netns: &self.local,
                    device: "eth0",
                    v4: (LOCAL_POD4, 24),
                    v6: (LOCAL_POD6, 64),
                },
            )?,
            Layout::Routed => world.routed_pod_link(&self.node, &self.local)?,
        }
        world.link(
            &VethEnd {
                netns: &self.node,
                device: NODE_NODE2_LINK,
                v4: (NODE_TO_NODE2_4, 24),
                v6: (NODE_TO_NODE2_6, 64),
            },
            &VethEnd {
                netns: &self.node2,
                device: NODE2_UP_LINK,
                v4: (NODE2_4, 24),
                v6: (NODE2_6, 64),
            },
        )?;
        world.link(
            &VethEnd {
                netns: &self.node2,
                device: "pod0",
                v4: (NODE2_POD_GW4, 24),
                v6: (NODE2_POD_GW6, 64),
            },
            &VethEnd {
                netns: &self.remote,
                device: "eth0",
                v4: (REMOTE_POD4, 24),
                v6: (REMOTE_POD6, 64),
            },
        )?;
        Ok(world.links)
    }

    /// Specific routes only (see the module documentation).
    fn route(&self) -> Result<()> {
        route_client(&self.client)?;
        // The node: the remote pod network via node2; no default route.
        ip_in(
            &self.node,
            &["route", "add", "10.241.0.0/16", "via", &NODE2_4.to_string()],
        )?;
        ip_in(
            &self.node,
            &[
                "-6",
                "route",
                "add",
                "fd00:241::/32",
                "via",
                &NODE2_6.to_string(),
            ],
        )?;
        // Node2: specific routes back via the node; no default route.
        let node_from_node2 = (NODE_TO_NODE2_4.to_string(), NODE_TO_NODE2_6.to_string());
        for prefix in ["203.0.113.0/24", "10.240.0.0/16", EXTERNAL_NET4] {
            ip_in(
                &self.node2,
                &["route", "add", prefix, "via", &node_from_node2.0],
            )?;
        }
        for prefix in ["2001:db8:c::/64", "fd00:240::/32", EXTERNAL_NET6] {
            ip_in(
                &self.node2,
                &["-6", "route", "add", prefix, "via", &node_from_node2.1],
            )?;
        }
        // Pods: default route via their node (which has none itself).
        let mut pods = vec![(&self.remote, NODE2_POD_GW4, NODE2_POD_GW6)];
        match self.layout {
            Layout::Bridged => pods.push((&self.local, NODE_POD_GW4, NODE_POD_GW6)),
            Layout::Routed => route_routed_pod(&self.node, &self.local)?,
        }
        for (pod, gw4, gw6) in pods {
            ip_in(pod, &["route", "add", "default", "via", &gw4.to_string()])?;
            ip_in(
                pod,
                &["-6", "route", "add", "default", "via", &gw6.to_string()],
            )?;
        }
        Ok(())
    }
}

/// The routed layout's routes: the node's /32 and /128 to the pod through its unnumbered
/// link, the pod's default routes through the gateway the node answers for.
fn route_routed_pod(node: &str, pod: &str) -> Result<()> {
    ip_in(
        node,
        &[
            "route",
            "add",
            &format!("{LOCAL_POD4}/32"),
            "dev",
            NODE_POD_LINK,
        ],
    )?;
    ip_in(
        node,
        &[
            "-6",
            "route",
            "add",
            &format!("{LOCAL_POD6}/128"),
            "dev",
            NODE_POD_LINK,
        ],
    )?;
    let gateway = ROUTED_GATEWAY4.to_string();
    ip_in(
        pod,
        &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )?;
    ip_in(
        pod,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;
    // Proxy ARP answers for the gateway only when the node has a route to it elsewhere,
    // and this node has no default route: pin the answer, as a CNI may.
    ip_in(
        pod,
        &[
            "neigh",
            "replace",
            &gateway,
            "lladdr",
            ROUTED_HOST_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    ip_in(
        pod,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            ROUTED_GATEWAY6,
            "dev",
            "eth0",
        ],
    )
}

/// The client's routes: pods and external addresses via the node, nothing else.
fn route_client(client: &str) -> Result<()> {
    let (ext4, ext6) = (NODE_EXT4.to_string(), NODE_EXT6.to_string());
    for prefix in ["10.240.0.0/15", EXTERNAL_NET4] {
        ip_in(client, &["route", "add", prefix, "via", &ext4])?;
    }
    for prefix in ["fd00:240::/31", EXTERNAL_NET6] {
        ip_in(client, &["-6", "route", "add", prefix, "via", &ext6])?;
    }
    Ok(())
}

/// The node ↔ client link's two ends.
fn client_link_ends<'a>(node: &'a str, client: &'a str) -> (VethEnd<'a>, VethEnd<'a>) {
    (
        VethEnd {
            netns: node,
            device: NODE_CLIENT_LINK,
            v4: (NODE_EXT4, 24),
            v6: (NODE_EXT6, 64),
        },
        VethEnd {
            netns: client,
            device: "eth0",
            v4: (CLIENT4, 24),
            v6: (CLIENT6, 64),
        },
    )
}

struct WorldBuilder {
    links: Vec<(String, String)>,
}

impl WorldBuilder {
    /// The routed layout's pod link: the node's side without addresses (a fixed MAC, so its
    /// link-local address is known, and proxy ARP on), the pod's side with its /32 and /128.
    fn routed_pod_link(&mut self, node: &str, pod: &str) -> Result<()> {
        ip_in(
            node,
            &[
                "link",
                "add",
                NODE_POD_LINK,
                "address",
                ROUTED_HOST_MAC,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod,
            ],
        )?;
        self.links.push((node.to_owned(), NODE_POD_LINK.to_owned()));
        self.links.push((pod.to_owned(), "eth0".to_owned()));
        sysctl(
            node,
            &[&format!("net.ipv4.conf.{NODE_POD_LINK}.proxy_arp=1")],
        )?;
        ip_in(
            pod,
            &["addr", "add", &format!("{LOCAL_POD4}/32"), "dev", "eth0"],
        )?;
        ip_in(
            pod,
            &[
                "-6",
                "addr",
                "add",
                &format!("{LOCAL_POD6}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip_in(node, &["link", "set", NODE_POD_LINK, "up"])?;
        ip_in(pod, &["link", "set", "eth0", "up"])?;
        wait_until_operational(node, NODE_POD_LINK)?;
        wait_until_operational(pod, "eth0")
    }

    /// A veth pair between `a` and `b` (see [`veth`]), recorded among the links.
    fn link(&mut self, a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<()> {
        veth(a, b)?;
        self.links.push((a.netns.to_owned(), a.device.to_owned()));
        self.links.push((b.netns.to_owned(), b.device.to_owned()));
        Ok(())
    }
}

/// `ethtool -K DEV rx off tx off`, then checks that it took.
fn checksum_offloads_off(netns: &str, device: &str) -> Result<()> {
    run_checked(
        Command::new("ip").args([
            "netns", "exec", netns, "ethtool", "-K", device, "rx", "off", "tx", "off",
        ]),
        IP_TIMEOUT,
    )?;
    let output = run_checked(
        Command::new("ip").args(["netns", "exec", netns, "ethtool", "-k", device]),
        IP_TIMEOUT,
    )?;
    let features = String::from_utf8_lossy(&output.stdout);
    for feature in ["rx-checksumming", "tx-checksumming"] {
        ensure!(
            features
                .lines()
                .any(|line| line.trim() == format!("{feature}: off")),
            "{feature} still on for {device} in {netns}:\n{features}"
        );
    }
    Ok(())
}

fn checksum_errors(netns: &str) -> Result<BTreeMap<String, u64>> {
    // -a: absolute values (ignore history), -s: leave the history alone, -z: zeros too.
    let output = run_checked(
        Command::new("ip").args(["netns", "exec", netns, "nstat", "-a", "-s", "-z"]),
        IP_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let counters: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let value = fields.next()?.parse().ok()?;
            name.contains("CsumErrors")
                .then(|| (name.to_owned(), value))
        })
        .collect();
    for required in ["TcpInCsumErrors", "UdpInCsumErrors"] {
        if !counters.contains_key(required) {
            bail!("nstat in {netns} shows no {required}:\n{text}");
        }
    }
    Ok(counters)
}

// ---------------------------------------------------------------------------------------------
// Services with external frontends, rendered as Kubernetes YAML

/// `spec.type` of an [`ExternalService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    fn as_k8s(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// A Service with a TCP and a UDP port (same port, same nodePort) targeting
/// [`BACKEND_PORT`] (or [`ExternalService::backend_port`]), its external frontends and one
/// EndpointSlice per address family.
#[derive(Debug, Clone)]
pub struct ExternalService {
    pub name: String,
    pub kind: ServiceType,
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    /// The endpoints' port (targetPort and the EndpointSlice ports).
    pub backend_port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub ingress_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`, verbatim.
    pub source_ranges: Vec<String>,
    /// `externalTrafficPolicy: Local` (else Cluster).
    pub local_policy: bool,
    pub health_check_node_port: Option<u16>,
    /// (address, nodeName) of every ready endpoint.
    pub endpoints: Vec<(IpAddr, String)>,
}

pub const SERVICE_NAMESPACE: &str = "ns";

impl ExternalService {
    pub fn new(name: &str, kind: ServiceType, cluster_ips: &[IpAddr], port: u16) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            cluster_ips: cluster_ips.to_vec(),
            port,
            backend_port: BACKEND_PORT,
            node_port: None,
            external_ips: Vec::new(),
            ingress_ips: Vec::new(),
            source_ranges: Vec::new(),
            local_policy: false,
            health_check_node_port: None,
            endpoints: Vec::new(),
        }
    }

    /// Endpoints listening on `port` instead of [`BACKEND_PORT`] (e.g. one nothing serves).
    #[must_use]
    pub fn backend_port(mut self, port: u16) -> Self {
        self.backend_port = port;
        self
    }

    #[must_use]
    pub fn node_port(mut self, port: u16) -> Self {
        self.node_port = Some(port);
        self
    }

    #[must_use]
    pub fn external_ip(mut self, ip: IpAddr) -> Self {
        self.external_ips.push(ip);
        self
    }

    #[must_use]
    pub fn ingress_ip(mut self, ip: IpAddr) -> Self {
        self.ingress_ips.push(ip);
        self
    }

    #[must_use]
    pub fn source_range(mut self, range: &str) -> Self {
        self.source_ranges.push(range.to_owned());
        self
    }

    /// `externalTrafficPolicy: Local`, with a healthCheckNodePort for a LoadBalancer (as the
    /// API server would allocate).
    #[must_use]
    pub fn local(mut self, health_check_node_port: u16) -> Self {
        self.local_policy = true;
        if self.kind == ServiceType::LoadBalancer {
            self.health_check_node_port = Some(health_check_node_port);
        }
        self
    }

    #[must_use]
    pub fn endpoint(mut self, address: IpAddr, node: &str) -> Self {
        self.endpoints.push((address, node.to_owned()));
        self
    }

    /// The local backend (both families when the service has them) on [`NODE_NAME`].
    #[must_use]
    pub fn local_endpoints(self) -> Self {
        let mut service = self.endpoint(LOCAL_POD4.into(), NODE_NAME);
        if service.has_ipv6() {
            service = service.endpoint(LOCAL_POD6.into(), NODE_NAME);
        }
        service
    }

    /// The remote backend (both families when the service has them) on
    /// [`REMOTE_NODE_NAME`].
    #[must_use]
    pub fn remote_endpoints(self) -> Self {
        let mut service = self.endpoint(REMOTE_POD4.into(), REMOTE_NODE_NAME);
        if service.has_ipv6() {
            service = service.endpoint(REMOTE_POD6.into(), REMOTE_NODE_NAME);
        }
        service
    }

    #[must_use]
    pub fn without_endpoints(mut self) -> Self {
        self.endpoints.clear();
        self
    }

    fn has_ipv6(&self) -> bool {
        self.cluster_ips.iter().any(IpAddr::is_ipv6)
    }

    fn families(&self) -> Vec<&'static str> {
        let mut families: Vec<&'static str> = self
            .cluster_ips
            .iter()
            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
            .collect();
        families.dedup();
        families
    }

    fn service_yaml(&self) -> Value {
        let port = |name: &str, protocol: &str| {
            let mut port = json!({
                "name": name,
                "protocol": protocol,
                "port": self.port,
                "targetPort": self.backend_port,
            });
            if let Some(node_port) = self.node_port {
                port["nodePort"] = json!(node_port);
            }
            port
        };
        let strings = |ips: &[IpAddr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>();
        let families = self.families();
        let mut spec = json!({
            "type": self.kind.as_k8s(),
            "clusterIP": self.cluster_ips.first().map(ToString::to_string),
            "clusterIPs": strings(&self.cluster_ips),
            "ipFamilies": families,
            "ipFamilyPolicy": if families.len() > 1 { "RequireDualStack" } else { "SingleStack" },
            "ports": [port("tcp", "TCP"), port("udp", "UDP")],
            "selector": {"app": self.name},
        });
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(strings(&self.external_ips));
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if self.kind != ServiceType::ClusterIp || !self.external_ips.is_empty() {
            spec["externalTrafficPolicy"] = json!(if self.local_policy {
                "Local"
            } else {
                "Cluster"
            });
        }
        if let Some(port) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(port);
        }
        let mut service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": SERVICE_NAMESPACE},
            "spec": spec,
        });
        if !self.ingress_ips.is_empty() {
            let ingress: Vec<Value> = self
                .ingress_ips
                .iter()
                .map(|ip| json!({"ip": ip.to_string()}))
                .collect();
            service["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        service
    }

    fn slice_yaml(&self, family: &str) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .filter(|(ip, _)| (family == "IPv4") == ip.is_ipv4())
            .map(|(ip, node)| {
                json!({
                    "addresses": [ip.to_string()],
                    "nodeName": node,
                    "conditions": {"ready": true},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-{}", self.name, family.to_lowercase()),
                "namespace": SERVICE_NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.name},
            },
            "addressType": family,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": self.backend_port},
                {"name": "udp", "protocol": "UDP", "port": self.backend_port},
            ],
            "endpoints": endpoints,
        })
    }

    /// The Service and its EndpointSlices as YAML documents.
    pub fn documents(&self) -> Vec<String> {
        let mut documents = vec![to_yaml(&self.service_yaml())];
        for family in self.families() {
            documents.push(to_yaml(&self.slice_yaml(family)));
        }
        documents
    }
}

fn to_yaml(value: &Value) -> String {
    serde_yaml::to_string(value).expect("JSON values serialize as YAML")
}

/// A manifests file holding `services`.
pub fn manifests(services: &[&ExternalService]) -> Manifests {
    services
        .iter()
        .flat_map(|service| service.documents())
        .fold(Manifests::new(), |manifests, document| {
            manifests.raw(&document)
        })
}

/// The datapath reason counters of an `inspect stats --output json` answer, by name.
fn counters_of(stats: &Value) -> BTreeMap<String, u64> {
    stats["datapath"]
        .as_object()
        .map(|counters| {
            counters
                .iter()
                .filter_map(|(name, n)| Some((name.clone(), n.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The agent of the second node (node2), with everything it owns.
pub struct Node2Agent {
    // Declared first: the agent stops before its pins, cgroup and file go.
    agent: Agent,
    _manifests_dir: TempDir,
    _cgroup: TestCgroup,
    _bpffs: PrivateBpffs,
}

impl Node2Agent {
    fn start(netns: &str, manifests: &Manifests, extra_args: &[&str]) -> Result<Self> {
        let manifests_dir = TempDir::new()?;
        let path = manifests_dir.path().join("manifests.yaml");
        manifests.write_atomic(&path)?;
        let cgroup = TestCgroup::new()?;
        let bpffs = PrivateBpffs::new()?;
        let mut args = vec![
            "--node-name",
            REMOTE_NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDR,
        ];
        args.extend_from_slice(extra_args);
        let agent = Agent::start_in_netns(netns, &cgroup, &bpffs, "--manifests", &path, &args)?;
        Ok(Self {
            agent,
            _manifests_dir: manifests_dir,
            _cgroup: cgroup,
            _bpffs: bpffs,
        })
    }

    pub fn agent(&mut self) -> &mut Agent {
        &mut self.agent
    }

    /// Where this agent pins.
    pub fn pins_dir(&self) -> &Path {
        self.agent.bpffs_dir()
    }

    /// This agent's datapath reason counters, by name.
    pub fn datapath_counters(&self) -> BTreeMap<String, u64> {
        let output = self
            .agent
            .offline(&["inspect", "stats", "--output", "json"])
            .unwrap_or_else(|e| panic!("node2: switchyard inspect stats: {e:#}"));
        let stats: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("node2: inspect stats output is not JSON: {e}"));
        counters_of(&stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_external_frontends_policy_ranges_and_slices() {
        let service = ExternalService::new(
            "web",
            ServiceType::LoadBalancer,
            &[
                "10.96.50.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            80,
        )
        .node_port(30080)
        .external_ip("198.51.100.20".parse().unwrap())
        .ingress_ip("198.51.100.10".parse().unwrap())
        .source_range(" 203.0.113.0/28")
        .local(32080)
        .local_endpoints()
        .remote_endpoints();
        let docs = service.documents();
        assert_eq!(docs.len(), 3);
        let svc: serde_yaml::Value = serde_yaml::from_str(&docs[0]).unwrap();
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], 30080);
        assert_eq!(svc["spec"]["externalIPs"][0], "198.51.100.20");
        assert_eq!(
            svc["spec"]["loadBalancerSourceRanges"][0],
            " 203.0.113.0/28"
        );
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(svc["spec"]["healthCheckNodePort"], 32080);
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(
            svc["status"]["loadBalancer"]["ingress"][0]["ip"],
            "198.51.100.10"
        );
        let v4: serde_yaml::Value = serde_yaml::from_str(&docs[1]).unwrap();
        assert_eq!(v4["addressType"], "IPv4");
        assert_eq!(v4["endpoints"][0]["addresses"][0], "10.240.1.2");
        assert_eq!(v4["endpoints"][1]["nodeName"], REMOTE_NODE_NAME);
        let v6: serde_yaml::Value = serde_yaml::from_str(&docs[2]).unwrap();
        assert_eq!(v6["endpoints"][0]["addresses"][0], "fd00:240:1::2");
        let empty = service.clone().without_endpoints().documents();
        let v4: serde_yaml::Value = serde_yaml::from_str(&empty[1]).unwrap();
        assert_eq!(v4["endpoints"].as_sequence().map(Vec::len), Some(0));
    }
}
