//! A cluster on one machine: several node namespaces, each running its own agent with its own
//! `--node-name`, all following one test API server; pods on every node behind a routed CNI's
//! unnumbered host veths; a router joining the nodes; an external client; and a load balancer
//! that steers a LoadBalancer IP to the nodes whose health-check node port answers 200.
//!
//! IPv4 addresses shown; every link also carries IPv6 (fd00:172:16:i::2 for a node's uplink,
//! fd00:172:17:i::2 towards the balancer, fd00:240:0:i::HOST/128 for pods, 2001:db8:c::2 for
//! the client, 2001:db8:5e::/64 for LB addresses; pods route IPv6 through their host side's
//! link-local address).
//!
//! ```text
//!                       client 203.0.113.2
//!                          │
//!   node i ── up0 172.16.i.2 ─── router (n<i> 172.16.i.1) ─── lb0 172.31.0.1
//!     │   └── lb0 172.17.i.2 ───────────────────────────────── balancer (n<i> 172.17.i.1,
//!     │                                                          up0 172.31.0.2, owns 198.51.100.0/24)
//!     ├── p<host> (no address) ── pod 10.240.i.<host>/32   (the Services' backends)
//!     └── cp0     (no address) ── client pod 10.240.i.2/32 (in the node agent's cgroup)
//! ```
//!
//! Routing, and why nothing can leave the machine: only pods have a default route (to their
//! node); nodes route the other nodes, every pod network and the client's link through the
//! router, their own pods by /32 and /128 routes; the router knows each node's pod network and sends
//! the LB addresses to the balancer; the client routes only node addresses and LB addresses to
//! the router; the balancer's route for a LoadBalancer IP names the healthy nodes as equal-cost
//! next hops (L4 hash), and is `unreachable` when there is none. Replies of LB traffic go from
//! the node through the router straight to the client, as with a cloud's pass-through LB.
//!
//! The API server listens on 127.0.0.1 inside every node namespace; each agent has its own
//! kubeconfig, cgroup (the node's pods' cgroup: its socket hooks serve the node's client pod)
//! and bpffs. Node objects carry the InternalIPs (both families) and the
//! `topology.kubernetes.io/zone` label.
//! Every pod runs `sy-testkit serve` answering its own name on [`BACKEND_PORT`] (TCP and UDP).
//! Dropping the [`Cluster`] stops the balancer, the agents, the servers and the API server and
//! deletes every namespace (with their links), also when the test panics.

pub mod balancer;
pub mod network;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
use serde_json::Value;

use self::balancer::Balancer;
pub use self::network::{CLIENT, CLIENT6, node_balancer_address};
use self::network::{
    CLIENT_POD_HOST, CLUSTER_CIDR, Fabric, MAX_NODES, NODE_BALANCER_LINK, NODE_UPLINK,
    PodAddresses, add_namespace, node_address, node_address6, pod_address, pod_address6, wire_pod,
};
use self::workload::{ClusterService, PodPhase, PodRecord};
use crate::agent::Agent;
use crate::client::http::get_in_netns;
use crate::client::report::Attempt;
use crate::client::testkit::BACKEND_PORT;
use crate::client::testkit::{ClientRequest, RunningClient, Server, Testkit};
use crate::env::names;
use crate::env::netns::Namespaces;
use crate::env::process::wait_until;
use crate::k8s::apiserver::{ApiServer, ApiServerConfig, Kind};
use crate::k8s::external_service::SERVICE_NAMESPACE;
use crate::k8s::objects;
use crate::world::agent_host::AgentHost;

/// How long agents may take to start and serve the first state.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every running agent may take to follow a change of the API server's objects.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTHZ: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// One entry per node: its zone label. At least 3 nodes.
    pub zones: Vec<String>,
    /// Pods started (ready) on every node before the agents start.
    pub pods_per_node: usize,
    /// The Services, all backed by the pods (of the nodes each names).
    pub services: Vec<ClusterService>,
    /// Extra arguments of every node's agent (e.g. `--lb-mode dsr`).
    pub agent_args: Vec<String>,
}

impl ClusterConfig {
    /// `nodes` nodes, in zones `zone-a`, `zone-b`, ... round robin over `zones` zones.
    pub fn new(nodes: usize, zones: usize, pods_per_node: usize) -> Self {
        let zones = (0..nodes)
            .map(|node| {
                let letter = char::from(b'a' + u8::try_from(node % zones.max(1)).unwrap_or(0));
                format!("zone-{letter}")
            })
            .collect();
        Self {
            zones,
            pods_per_node,
            services: Vec::new(),
            agent_args: Vec::new(),
        }
    }

    /// Adds arguments to every node's agent command line.
    #[must_use]
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args
            .extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    #[must_use]
    pub fn service(mut self, service: ClusterService) -> Self {
        self.services.push(service);
        self
    }
}

/// One node: its namespace and its agent with everything the agent owns (the kubeconfig in
/// the host's files).
struct Node {
    host: AgentHost,
    netns: String,
    name: String,
    zone: String,
    kubeconfig: PathBuf,
}

/// The multi-node test world (see the module documentation).
pub struct Cluster {
    // Drop order: the balancer stops probing, the agents stop, the servers stop, the API
    // server goes, then every namespace.
    balancer: Option<Balancer>,
    nodes: Vec<Node>,
    servers: BTreeMap<String, Server>,
    api: ApiServer,
    namespaces: Namespaces,
    base: String,
    router: String,
    client: String,
    balancer_netns: String,
    pods: Vec<PodRecord>,
    pod_netns: BTreeMap<String, String>,
    addresses: PodAddresses,
    services: Vec<ClusterService>,
    testkit: Testkit,
    /// Extra arguments of each node's agent, by node.
    agent_args: Vec<Vec<String>>,
}

impl Cluster {
    /// Builds the world, publishes Nodes, Services and the initial pods' slices, starts every
    /// agent and waits until each serves them, and starts the balancer for the first Service
    /// with a LoadBalancer IP and a health-check node port.
    pub fn start(testkit: Testkit, config: ClusterConfig) -> Self {
        Self::try_start(testkit, config).expect("building the multi-node cluster")
    }

    /// [`Self::start`], returning the error instead of panicking (for callers that are not
    /// tests, such as the benchmark).
    pub fn try_start(testkit: Testkit, config: ClusterConfig) -> Result<Self> {
        let count = config.zones.len();
        ensure!(
            (3..=MAX_NODES).contains(&count),
            "a cluster has 3 to {MAX_NODES} nodes, not {count}"
        );
        crate::env::stale::sweep_once();
        let base = names::unique('n');
        let mut namespaces = Namespaces::default();
        let router = format!("{base}r");
        let client = format!("{base}c");
        let balancer_netns = format!("{base}l");
        let node_netns: Vec<String> = (0..count).map(|i| format!("{base}n{i}")).collect();
        for name in [&router, &client, &balancer_netns]
            .into_iter()
            .chain(&node_netns)
        {
            add_namespace(&mut namespaces, name)?;
        }
        Fabric {
            router: &router,
            client: &client,
            balancer: &balancer_netns,
            nodes: &node_netns,
        }
        .build()?;
        let api = ApiServer::start_with(ApiServerConfig {
            extra_netns: node_netns.clone(),
            ..ApiServerConfig::default()
        })?;
        let mut nodes = Vec::with_capacity(count);
        for (index, (netns, zone)) in node_netns.iter().zip(&config.zones).enumerate() {
            let host = AgentHost::new(netns)?;
            let kubeconfig = api.write_kubeconfig_in(netns, host.files_dir())?;
            nodes.push(Node {
                host,
                netns: netns.clone(),
                name: format!("node-{index}"),
                zone: zone.clone(),
                kubeconfig,
            });
        }
        let mut cluster = Self {
            balancer: None,
            nodes,
            servers: BTreeMap::new(),
            api,
            namespaces,
            base,
            router,
            client,
            balancer_netns,
            pods: Vec::new(),
            pod_netns: BTreeMap::new(),
            addresses: PodAddresses::default(),
            services: config.services,
            testkit,
            agent_args: vec![config.agent_args; count],
        };
        for node in 0..count {
            cluster.add_client_pod(node)?;
            cluster.publish_node(node);
            for _ in 0..config.pods_per_node {
                let pod = cluster.try_add_pod(node)?;
                cluster.set_phase_of(&pod, PodPhase::Ready)?;
            }
        }
        cluster.try_publish()?;
        for node in 0..count {
            cluster.try_start_agent(node)?;
        }
        for node in 0..count {
            cluster.wait_ready(node)?;
        }
        cluster.try_wait_converged(START_TIMEOUT)?;
        if let Some((address, port)) = cluster.balanced_frontend() {
            let balancer =
                Balancer::start(&cluster.balancer_netns, address, port, (0..count).collect())?;
            cluster.balancer = Some(balancer);
        }
        Ok(cluster)
    }

    // ------------------------------------------------------------------------------------
    // The world

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `node-<index>`, the agent's `--node-name` and the Node object's name.
    pub fn node_name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    pub fn node_netns(&self, node: usize) -> &str {
        &self.nodes[node].netns
    }

    pub fn zone(&self, node: usize) -> &str {
        &self.nodes[node].zone
    }

    /// A node's IPv4 InternalIP (where the external client reaches NodePorts).
    pub fn node_address(&self, node: usize) -> Ipv4Addr {
        node_address(node)
    }

    /// A node's IPv6 InternalIP.
    pub fn node_address6(&self, node: usize) -> Ipv6Addr {
        node_address6(node)
    }

    pub fn client_netns(&self) -> &str {
        &self.client
    }

    pub fn router_netns(&self) -> &str {
        &self.router
    }

    pub fn balancer_netns(&self) -> &str {
        &self.balancer_netns
    }

    /// Every namespace of the world (nodes, router, client, balancer, pods).
    pub fn namespaces(&self) -> &[String] {
        self.namespaces.all()
    }

    /// The nodes', router's, client's and balancer's namespaces (not the pods').
    pub fn infrastructure_namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self.nodes.iter().map(|node| node.netns.clone()).collect();
        all.extend([
            self.router.clone(),
            self.client.clone(),
            self.balancer_netns.clone(),
        ]);
        all
    }

    /// The load balancer (the cluster has one when a Service has a LoadBalancer IP and a
    /// health-check node port).
    pub fn balancer(&self) -> &Balancer {
        self.balancer
            .as_ref()
            .expect("no Service with a LoadBalancer IP and a health-check node port")
    }

    pub fn api(&self) -> &ApiServer {
        &self.api
    }

    pub fn testkit(&self) -> &Testkit {
        &self.testkit
    }

    // ------------------------------------------------------------------------------------
    // Pods

    /// Every pod the cluster knows, in creation order.
    pub fn pods(&self) -> &[PodRecord] {
        &self.pods
    }

    /// Names of the pods in `phase`.
    pub fn pods_in(&self, phase: PodPhase) -> Vec<String> {
        self.pods
            .iter()
            .filter(|pod| pod.phase == phase)
            .map(|pod| pod.name.clone())
            .collect()
    }

    /// Names of the pods on `node` in `phase`.
    pub fn pods_on(&self, node: usize, phase: PodPhase) -> Vec<String> {
        self.pods
            .iter()
            .filter(|pod| pod.node == node && pod.phase == phase)
            .map(|pod| pod.name.clone())
            .collect()
    }

    /// Creates a pod on `node` (namespace, routed link, server answering its name), not yet
    /// ready; returns its name.
    pub fn add_pod(&mut self, node: usize) -> String {
        self.try_add_pod(node)
            .unwrap_or_else(|e| panic!("adding a pod on node {node}: {e:#}"))
    }

    fn try_add_pod(&mut self, node: usize) -> Result<String> {
        let host = self.addresses.next(node)?;
        let name = format!("n{node}-p{host}");
        let netns = format!("{}p{node}x{host}", self.base);
        let address = pod_address(node, host);
        let address6 = pod_address6(node, host);
        add_namespace(&mut self.namespaces, &netns)?;
        wire_pod(
            &self.nodes[node].netns,
            &format!("p{host}"),
            &netns,
            address,
            address6,
        )?;
        let server = self.testkit.serve(&netns, &name, &[BACKEND_PORT])?;
        self.servers.insert(name.clone(), server);
        self.pod_netns.insert(name.clone(), netns);
        self.pods.push(PodRecord {
            name: name.clone(),
            node,
            address,
            address6,
            phase: PodPhase::Starting,
        });
        Ok(name)
    }

    fn add_client_pod(&mut self, node: usize) -> Result<()> {
        let netns = self.client_pod_netns(node);
        add_namespace(&mut self.namespaces, &netns)?;
        wire_pod(
            &self.nodes[node].netns,
            "cp0",
            &netns,
            pod_address(node, CLIENT_POD_HOST),
            pod_address6(node, CLIENT_POD_HOST),
        )
    }

    fn client_pod_netns(&self, node: usize) -> String {
        format!("{}q{node}", self.base)
    }

    /// The namespace of pod `name`, while it exists.
    pub fn pod_netns(&self, name: &str) -> Option<&str> {
        self.pod_netns.get(name).map(String::as_str)
    }

    /// The IPv4 address of pod `name`.
    pub fn pod_address(&self, name: &str) -> Ipv4Addr {
        self.pod(name).address
    }

    /// The IPv6 address of pod `name`.
    pub fn pod_address6(&self, name: &str) -> Ipv6Addr {
        self.pod(name).address6
    }

    fn pod(&self, name: &str) -> &PodRecord {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Sets the phase of `names` (the API objects change at the next [`Self::publish`]).
    pub fn set_phase(&mut self, names: &[String], phase: PodPhase) {
        for name in names {
            self.set_phase_of(name, phase)
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    fn set_phase_of(&mut self, name: &str, phase: PodPhase) -> Result<()> {
        let pod = self
            .pods
            .iter_mut()
            .find(|pod| pod.name == name)
            .with_context(|| format!("no pod {name}"))?;
        pod.phase = phase;
        Ok(())
    }

    /// Stops pod `name`'s server and deletes its namespace (its process exited).
    pub fn stop_pod(&mut self, name: &str) {
        self.servers.remove(name);
        if let Some(netns) = self.pod_netns.remove(name) {
            self.namespaces
                .remove(&netns)
                .unwrap_or_else(|e| panic!("deleting pod {name}: {e:#}"));
        }
    }

    // ------------------------------------------------------------------------------------
    // API objects

    /// Writes every Service and its EndpointSlice, from the pods' phases, to the API server.
    pub fn publish(&self) {
        self.try_publish()
            .unwrap_or_else(|e| panic!("publishing the workload: {e:#}"));
    }

    fn try_publish(&self) -> Result<()> {
        for service in &self.services {
            let (object, slices) = service.objects(
                &self.pods,
                |node| self.nodes[node].name.clone(),
                |node| self.nodes[node].zone.clone(),
            )?;
            self.api.apply(&object);
            for slice in &slices {
                self.api.apply(slice);
            }
        }
        Ok(())
    }

    fn publish_node(&self, node: usize) {
        let mut object = objects::node(
            &self.nodes[node].name,
            Some(self.nodes[node].zone.as_str()),
            &[],
        );
        object.status = Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    address: node_address(node).to_string(),
                    type_: "InternalIP".into(),
                },
                NodeAddress {
                    address: node_address6(node).to_string(),
                    type_: "InternalIP".into(),
                },
            ]),
            ..NodeStatus::default()
        });
        self.api.apply(&object);
    }

    /// Replaces the Services (e.g. another policy) and publishes them.
    pub fn set_services(&mut self, services: Vec<ClusterService>) {
        self.services = services;
        self.publish();
    }

    // ------------------------------------------------------------------------------------
    // Agents

    fn try_start_agent(&mut self, node: usize) -> Result<()> {
        let Node {
            host,
            name,
            kubeconfig,
            ..
        } = &mut self.nodes[node];
        let mut args = vec!["--node-name", name, "--cluster-cidr", CLUSTER_CIDR];
        args.extend(self.agent_args[node].iter().map(String::as_str));
        host.start_agent_with_source("--kubeconfig", kubeconfig, &args)
    }

    fn wait_ready(&mut self, node: usize) -> Result<()> {
        let netns = self.nodes[node].netns.clone();
        let ready = wait_until(START_TIMEOUT, Duration::from_millis(50), || {
            if let Some(agent) = self.nodes[node].host.started_agent_mut()
                && let Err(e) = agent.ensure_running()
            {
                return Some(Err(e));
            }
            let answer = get_in_netns(&netns, HEALTHZ, "/readyz").ok()?;
            (answer.0 == 200).then_some(Ok(()))
        });
        match ready {
            Some(result) => result.with_context(|| format!("the agent of node {node}")),
            None => bail!("the agent of node {node} was not ready within {START_TIMEOUT:?}"),
        }
    }

    /// The agent of `node` (panics when it was stopped for good).
    pub fn agent(&mut self, node: usize) -> &mut Agent {
        self.nodes[node]
            .host
            .started_agent_mut()
            .unwrap_or_else(|| panic!("node {node} has no agent"))
    }

    /// A datapath reason counter of `node`'s agent (`inspect stats`), 0 when absent.
    pub fn datapath_counter(&mut self, node: usize, name: &str) -> u64 {
        let output = self
            .agent(node)
            .offline(&["inspect", "stats", "--output", "json"])
            .expect("inspect stats");
        let stats: Value = serde_json::from_slice(&output.stdout).expect("inspect stats JSON");
        stats["datapath"][name].as_u64().unwrap_or(0)
    }

    /// SIGKILLs the agent of `node` and starts it again with the same command line (its pins
    /// stay: the dataplane keeps serving meanwhile); returns once it is ready.
    pub fn restart_agent(&mut self, node: usize) {
        self.agent(node)
            .restart()
            .and_then(|()| self.wait_ready(node))
            .unwrap_or_else(|e| panic!("restarting the agent of node {node}: {e:#}"));
    }

    /// SIGKILLs the agent of `node` and starts it with `extra_args` in place of its extra
    /// arguments (its pins stay); returns once it is ready.
    pub fn restart_agent_with(&mut self, node: usize, extra_args: &[&str]) {
        if let Some(mut agent) = self.nodes[node].host.take_agent() {
            agent
                .kill()
                .unwrap_or_else(|e| panic!("stopping the agent of node {node}: {e:#}"));
        }
        self.agent_args[node] = extra_args.iter().map(|arg| (*arg).to_owned()).collect();
        self.try_start_agent(node)
            .and_then(|()| self.wait_ready(node))
            .unwrap_or_else(|e| panic!("restarting the agent of node {node}: {e:#}"));
    }

    /// Node loss: the node's agent dies, its links go down (its pods become unreachable),
    /// then the control plane notices: its pods leave the slices (their servers stop) and its
    /// Node object is deleted.
    pub fn lose_node(&mut self, node: usize) {
        if let Some(mut agent) = self.nodes[node].host.take_agent() {
            agent
                .kill()
                .unwrap_or_else(|e| panic!("killing the agent of node {node}: {e:#}"));
        }
        network::isolate(&self.nodes[node].netns, &[NODE_UPLINK, NODE_BALANCER_LINK])
            .unwrap_or_else(|e| panic!("taking node {node}'s links down: {e:#}"));
    }

    /// The control plane's side of a node loss: the lost node's pods leave the slices, their
    /// servers stop, and its Node object is deleted.
    pub fn forget_node(&mut self, node: usize) {
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|pod| pod.node == node && pod.phase != PodPhase::Removed)
            .map(|pod| pod.name.clone())
            .collect();
        self.set_phase(&gone, PodPhase::Removed);
        self.publish();
        for pod in &gone {
            self.stop_pod(pod);
        }
        assert!(
            self.api.delete(Kind::Node, "", &self.nodes[node].name),
            "node {node} had no Node object"
        );
    }

    /// Whether `node` has a running agent.
    pub fn has_agent(&self, node: usize) -> bool {
        self.nodes[node].host.started_agent().is_some()
    }

    /// Waits until every running agent programs, for every frontend of every Service
    /// (ClusterIP, NodePorts, LB IPs and their node-local entries; TCP and UDP), the
    /// backends kube-proxy would pick on that node (see [`Self::expected_backends`]).
    pub fn wait_converged(&mut self) {
        self.try_wait_converged(CONVERGE_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    fn try_wait_converged(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(difference) = self.mismatch()? else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                bail!("the agents did not converge within {timeout:?}: {difference}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first difference between what an agent programs and what it should, if any.
    fn mismatch(&mut self) -> Result<Option<String>> {
        for node in 0..self.nodes.len() {
            let Some(agent) = self.nodes[node].host.started_agent_mut() else {
                continue;
            };
            agent
                .ensure_running()
                .with_context(|| format!("node {node}"))?;
            let output = agent.offline(&["inspect", "services", "--output", "json"])?;
            let programmed: Value = serde_json::from_slice(&output.stdout)
                .with_context(|| format!("node {node}: inspect services is not JSON"))?;
            let entries = programmed.as_array().cloned().unwrap_or_default();
            for service in &self.services {
                let cluster_ips = &service.template.cluster_ips;
                let prefix = format!("{NAMESPACE}/{}:", service.name());
                let mine: Vec<&Value> = entries
                    .iter()
                    .filter(|entry| {
                        entry["service"]
                            .as_str()
                            .is_some_and(|s| s.starts_with(&prefix))
                    })
                    .collect();
                for cluster_ip in cluster_ips {
                    let programmed = mine.iter().any(|entry| {
                        frontend_ip(entry) == Some(*cluster_ip) && entry["scope"] == "cluster"
                    });
                    if !programmed {
                        return Ok(Some(format!(
                            "node {node} has no frontend at ClusterIP {cluster_ip} of {}",
                            service.name()
                        )));
                    }
                }
                for entry in mine {
                    let ip = frontend_ip(entry);
                    let set = if entry["scope"] == "local" {
                        BackendSet::NodeLocal
                    } else if ip.is_some_and(|ip| cluster_ips.contains(&ip)) {
                        BackendSet::Internal
                    } else {
                        BackendSet::External
                    };
                    let ipv6 = ip.is_some_and(|ip| ip.is_ipv6());
                    let expected = self.expected_backends(service, node, set, ipv6);
                    let actual = backends_of(entry);
                    if actual.as_ref() != Some(&expected) {
                        return Ok(Some(format!(
                            "node {node} programs {} ({set:?}) with {actual:?}, expected \
                             {expected:?}",
                            entry["frontend"]
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The addresses kube-proxy would use for `service` on `node` for the frontends of `set`:
    /// ready endpoints, else the serving terminating ones; then, for the ClusterIP with
    /// internalTrafficPolicy Local only this node's, else with PreferClose only its zone's
    /// when that zone has some. The node-local set of an eTP Local frontend is this node's
    /// ready endpoints, else its serving terminating ones. IPv6 addresses with `ipv6`.
    pub fn expected_backends(
        &self,
        service: &ClusterService,
        node: usize,
        set: BackendSet,
        ipv6: bool,
    ) -> BTreeSet<IpAddr> {
        let only_here = match set {
            BackendSet::NodeLocal => true,
            BackendSet::Internal => service.internal_local,
            BackendSet::External => false,
        };
        let candidates: Vec<&PodRecord> = self
            .pods
            .iter()
            .filter(|pod| service.nodes.as_ref().is_none_or(|n| n.contains(&pod.node)))
            .filter(|pod| !only_here || pod.node == node)
            .collect();
        let pick = |phase: PodPhase| -> Vec<&PodRecord> {
            candidates
                .iter()
                .copied()
                .filter(|pod| pod.phase == phase)
                .collect()
        };
        let mut chosen = pick(PodPhase::Ready);
        if chosen.is_empty() {
            chosen = pick(PodPhase::Terminating);
        }
        if service.prefer_close && !only_here {
            let zone = &self.nodes[node].zone;
            let near: Vec<&PodRecord> = chosen
                .iter()
                .copied()
                .filter(|pod| &self.nodes[pod.node].zone == zone)
                .collect();
            if !near.is_empty() {
                chosen = near;
            }
        }
        chosen
            .iter()
            .map(|pod| {
                if ipv6 {
                    IpAddr::V6(pod.address6)
                } else {
                    IpAddr::V4(pod.address)
                }
            })
            .collect()
    }

    /// The LoadBalancer IPs and health-check node port the balancer serves.
    fn balanced_frontend(&self) -> Option<(Vec<IpAddr>, u16)> {
        self.services.iter().find_map(|service| {
            let port = service.template.health_check_node_port?;
            let addresses = service.template.ingress_ips.clone();
            (!addresses.is_empty()).then_some((addresses, port))
        })
    }

    /// `GET /` on `node`'s health-check node port `port`, from the balancer: status and body.
    pub fn health_check(&self, node: usize, port: u16) -> (u16, String) {
        get_in_netns(
            &self.balancer_netns,
            SocketAddr::from((node_balancer_address(node), port)),
            "/",
        )
        .unwrap_or_else(|e| panic!("health check of node {node} on port {port}: {e:#}"))
    }

    // ------------------------------------------------------------------------------------
    // Clients

    /// Runs `request` from `node`'s client pod (its sockets meet that node's hooks).
    pub fn pod_client(&self, node: usize, request: &ClientRequest) -> Vec<Attempt> {
        self.spawn_pod_client(node, request)
            .finish()
            .unwrap_or_else(|e| panic!("client on node {node}: {e:#}"))
    }

    pub fn spawn_pod_client(&self, node: usize, request: &ClientRequest) -> RunningClient {
        self.testkit
            .spawn_client(
                &self.client_pod_netns(node),
                self.nodes[node].host.cgroup().path(),
                request,
            )
            .unwrap_or_else(|e| panic!("starting a client on node {node}: {e:#}"))
    }

    /// One TCP connection from `node`'s client pod, a request every `every` for `duration`.
    pub fn pod_hold(
        &self,
        node: usize,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
    ) -> RunningClient {
        self.testkit
            .hold(
                &self.client_pod_netns(node),
                self.nodes[node].host.cgroup().path(),
                target,
                duration,
                every,
            )
            .unwrap_or_else(|e| panic!("starting a held connection on node {node}: {e:#}"))
    }

    /// Runs `request` from the external client.
    pub fn outside_client(&self, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .outside_client(&self.client, request)
            .unwrap_or_else(|e| panic!("external client: {e:#}"))
    }

    pub fn spawn_outside_client(&self, request: &ClientRequest) -> RunningClient {
        self.testkit
            .spawn_outside_client(&self.client, request)
            .unwrap_or_else(|e| panic!("starting the external client: {e:#}"))
    }

    /// One TCP connection from the external client (asking for the address the backend saw).
    pub fn outside_hold(
        &self,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
    ) -> RunningClient {
        self.testkit
            .outside_hold(&self.client, target, duration, every, false)
            .unwrap_or_else(|e| panic!("starting an external held connection: {e:#}"))
    }
}

/// Which of a Service's endpoint sets a frontend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendSet {
    /// The ClusterIP (internalTrafficPolicy applies).
    Internal,
    /// NodePorts and LB IPs, scope cluster (what pods and the node get).
    External,
    /// The node-local entry of an externalTrafficPolicy Local frontend (traffic from outside).
    NodeLocal,
}

/// The IP of an `inspect services` entry's frontend (`IP:PORT/PROTO`, `[IPv6]:PORT/PROTO`).
fn frontend_ip(entry: &Value) -> Option<IpAddr> {
    entry["frontend"].as_str().and_then(socket_ip)
}

/// The IP of `ADDRESS:PORT/PROTO`.
fn socket_ip(text: &str) -> Option<IpAddr> {
    let (address, _) = text.split_once('/')?;
    address.parse::<SocketAddr>().ok().map(|sa| sa.ip())
}

/// The backend addresses of an `inspect services` entry.
fn backends_of(entry: &Value) -> Option<BTreeSet<IpAddr>> {
    entry["backends"]
        .as_array()?
        .iter()
        .map(|backend| socket_ip(backend["address"].as_str()?))
        .collect()
}

/// `SERVICE_NAMESPACE`, where the cluster's Services live.
pub const NAMESPACE: &str = SERVICE_NAMESPACE;
