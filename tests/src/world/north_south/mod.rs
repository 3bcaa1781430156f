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
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use self::network::{
    Spaces, WorldBuilder, checksum_errors, checksum_offloads_off, client_link_ends, route_client,
};
use crate::agent::{Agent, switchyard_bin};
use crate::client::report::Attempt;
use crate::client::testkit::{ClientRequest, RunningClient, Server, Testkit};
use crate::env::names;
use crate::env::netns::{IP_TIMEOUT, Namespaces, ip_in};
use crate::env::process::{run_bounded, run_checked};
use crate::k8s::external_service::ExternalService;
use crate::k8s::manifests::Manifests;
use crate::world::agent_host::AgentHost;

mod network;

/// The port both backend servers listen on (TCP and UDP).
pub use crate::client::testkit::BACKEND_PORT;
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

const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

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
pub const ROUTED_HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The link-local address the kernel derives from [`ROUTED_HOST_MAC`] (EUI-64).
pub const ROUTED_GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";

/// The north-south test world: namespaces and links, backend servers, the hooked test cgroup
/// (for in-cluster clients only), a private bpffs, the manifests file and the agent.
/// Fields drop in declaration order: the agent stops first, the namespaces go last.
/// It dereferences to the node's [`AgentHost`] for the agent, the cgroup, the bpffs and the
/// manifests file.
pub struct NorthSouth {
    host: AgentHost,
    _servers: Vec<Server>,
    /// Every namespace, the node's (where the agent runs) first.
    namespaces: Namespaces,
    node: String,
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
        crate::env::stale::sweep_once();
        let node = names::unique('n');
        let base = node.clone();
        let mut namespaces = Namespaces::default();
        namespaces.add(&node)?;
        // Derived from the node's unique name (so unique and swept like it).
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
        Ok(Self {
            host: AgentHost::new(&node)?,
            _servers: servers,
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
        &self.node
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
        self.namespaces.all().iter().map(String::as_str).collect()
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

    /// Starts the agent in the node namespace on the manifests file (write it first), as
    /// [`NODE_NAME`] with [`CLUSTER_CIDR`], plus `extra_args`.
    pub fn start_agent(&mut self, extra_args: &[&str]) {
        let mut args = vec!["--node-name", NODE_NAME, "--cluster-cidr", CLUSTER_CIDR];
        args.extend_from_slice(extra_args);
        self.host.start_agent(&args);
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
            .client(netns, self.cgroup().path(), request)
            .unwrap_or_else(|e| panic!("running hooked client {request:?} in {netns}: {e:#}"))
    }

    /// Polls from the outside client (bounded by [`crate::world::agent_host::READY_TIMEOUT`]) until an attempt with
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
        let Self {
            host,
            testkit,
            client,
            ..
        } = self;
        host.wait_for(
            &format!("{what} from {} ({:?})", request.target, request.proto),
            |_| {
                testkit
                    .outside_client(client, &probe)
                    .unwrap_or_else(|e| panic!("running outside client {probe:?}: {e:#}"))
                    .pop()
            },
            accept,
        )
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
        let dir = self.bpffs().agent_dir();
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

/// Endpoints on this world's pods.
impl ExternalService {
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
    host: AgentHost,
}

impl Node2Agent {
    fn start(netns: &str, manifests: &Manifests, extra_args: &[&str]) -> Result<Self> {
        let mut host = AgentHost::new(netns)?;
        manifests.write_atomic(&host.manifests_path())?;
        let mut args = vec![
            "--node-name",
            REMOTE_NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDR,
        ];
        args.extend_from_slice(extra_args);
        host.start_agent_with_source("--manifests", &host.manifests_path(), &args)?;
        Ok(Self { host })
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.host.agent()
    }

    /// Where this agent pins.
    pub fn pins_dir(&self) -> &Path {
        self.started().bpffs_dir()
    }

    /// This agent's datapath reason counters, by name.
    pub fn datapath_counters(&self) -> BTreeMap<String, u64> {
        let output = self
            .started()
            .offline(&["inspect", "stats", "--output", "json"])
            .unwrap_or_else(|e| panic!("node2: switchyard inspect stats: {e:#}"));
        let stats: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("node2: inspect stats output is not JSON: {e}"));
        counters_of(&stats)
    }

    fn started(&self) -> &Agent {
        self.host
            .started_agent()
            .expect("a Node2Agent starts its agent")
    }
}

impl Deref for NorthSouth {
    type Target = AgentHost;

    fn deref(&self) -> &AgentHost {
        &self.host
    }
}

impl DerefMut for NorthSouth {
    fn deref_mut(&mut self) -> &mut AgentHost {
        &mut self.host
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::external_service::ServiceType;

    #[test]
    fn local_and_remote_endpoints_name_their_pods_and_nodes_in_every_family() {
        let dual = ExternalService::new(
            "web",
            ServiceType::NodePort,
            &[
                "10.96.50.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            80,
        )
        .local_endpoints()
        .remote_endpoints();
        assert_eq!(
            dual.endpoints,
            vec![
                (LOCAL_POD4.into(), NODE_NAME.to_owned()),
                (LOCAL_POD6.into(), NODE_NAME.to_owned()),
                (REMOTE_POD4.into(), REMOTE_NODE_NAME.to_owned()),
                (REMOTE_POD6.into(), REMOTE_NODE_NAME.to_owned()),
            ]
        );
        let single = ExternalService::new(
            "web",
            ServiceType::NodePort,
            &["10.96.50.10".parse().unwrap()],
            80,
        )
        .local_endpoints();
        assert_eq!(
            single.endpoints,
            vec![(LOCAL_POD4.into(), NODE_NAME.to_owned())]
        );
    }
}
