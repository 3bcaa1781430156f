//! The layout of `switchyard-dsr` and its masqueraded twin `switchyard-tc-2node`: the tests
//! crate's multi-node cluster (`switchyard_tests::world::cluster`: node namespaces each running its
//! own agent from the test API server, a router, an external client; no route off the
//! machine; everything removed on drop). The external client connects to a NodePort on node 0
//! whose endpoints are all pods on node 1. Two Services differ only in their
//! `switchyard.dev/forwarding-mode` annotation: `snat` (node 0 masquerades, replies come back
//! through it) and `dsr` (node 1's replies go straight to the client). Same agents, hops and
//! pods, so the pair shows what DSR saves over masquerading. The harness needs three nodes;
//! node 2 carries no traffic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use switchyard_tests::client::testkit::Testkit;
use switchyard_tests::k8s::external_service::{ExternalService, ServiceType};
use switchyard_tests::world::cluster::workload::{ClusterService, PodPhase};
use switchyard_tests::world::cluster::{Cluster, ClusterConfig};

use super::lanes::{CLIENT_SYSCTLS, sysctl};
use super::loadgen::{self, Load, Server};
use super::modes::Mode;
use super::services::SERVICE_PORT;

const NODES: usize = 3;
/// Node 0 takes the client's connections; node 1 has every endpoint.
const INGRESS: usize = 0;
const ENDPOINTS: usize = 1;
/// Where the bench's servers listen in node 1's pods (the harness's own servers hold the
/// tests' backend port).
const SERVER_PORT: u16 = 8081;
/// Connections of the check that each Service takes the path it is named after.
pub const CHECK_CONNECTIONS: u64 = 20;
const ANNOTATION: &str = "switchyard.dev/forwarding-mode";

/// The running two-node world. Fields drop in order: the bench's servers stop before the
/// cluster (agents, API server, namespaces) goes.
pub struct TwoNode {
    _servers: Vec<Server>,
    cluster: Cluster,
}

/// What tells the two Services apart.
struct Twin {
    name: &'static str,
    cluster_ip: &'static str,
    /// Dual stack as the harness's other Services; the bench uses IPv4.
    cluster_ip6: &'static str,
    node_port: u16,
    forwarding: &'static str,
}

fn twin(mode: Mode) -> Result<Twin> {
    Ok(match mode {
        Mode::SwitchyardTc2Node => Twin {
            name: "snat-web",
            cluster_ip: "10.96.0.30",
            cluster_ip6: "fd00:96::30",
            node_port: 30_100,
            forwarding: "snat",
        },
        Mode::SwitchyardDsr => Twin {
            name: "dsr-web",
            cluster_ip: "10.96.0.31",
            cluster_ip6: "fd00:96::31",
            node_port: 30_101,
            forwarding: "dsr",
        },
        _ => bail!("{mode} is not measured in the two-node cluster"),
    })
}

fn service(mode: Mode) -> Result<ClusterService> {
    let twin = twin(mode)?;
    let addresses: Vec<IpAddr> = [twin.cluster_ip, twin.cluster_ip6]
        .iter()
        .map(|address| address.parse().context("a twin's ClusterIP"))
        .collect::<Result<_>>()?;
    let service = ExternalService::new(twin.name, ServiceType::NodePort, &addresses, SERVICE_PORT)
        .backend_port(SERVER_PORT)
        .node_port(twin.node_port);
    Ok(ClusterService::new(service)
        .on_nodes(&[ENDPOINTS])
        .annotation(ANNOTATION, twin.forwarding))
}

impl TwoNode {
    /// Builds the cluster with `endpoints` pods per node, starts the bench's servers in node
    /// 1's pods and checks that each Service takes its path.
    pub fn new(endpoints: usize) -> Result<Self> {
        let testkit = Testkit::new(crate::workspace_root().join("target/release/sy-testkit"));
        let config = ClusterConfig::new(NODES, 1, endpoints)
            .service(service(Mode::SwitchyardTc2Node)?)
            .service(service(Mode::SwitchyardDsr)?);
        let cluster = Cluster::try_start(testkit, config).context("starting the cluster")?;
        sysctl(cluster.client_netns(), &CLIENT_SYSCTLS)?;
        let servers = cluster
            .pods_on(ENDPOINTS, PodPhase::Ready)
            .iter()
            .map(|pod| {
                let netns = cluster
                    .pod_netns(pod)
                    .with_context(|| format!("pod {pod} has no namespace"))?;
                loadgen::serve_on(netns, SERVER_PORT)
            })
            .collect::<Result<_>>()?;
        let mut world = Self {
            _servers: servers,
            cluster,
        };
        for mode in Mode::TWO_NODE {
            world
                .check_path(mode)
                .with_context(|| format!("checking the path of {mode}"))?;
        }
        Ok(world)
    }

    pub fn client_namespace(&self) -> &str {
        self.cluster.client_netns()
    }

    /// Where the client connects for `mode`: the twin's NodePort on node 0.
    pub fn target(&self, mode: Mode) -> Result<SocketAddr> {
        Ok(SocketAddr::from((
            self.cluster.node_address(INGRESS),
            twin(mode)?.node_port,
        )))
    }

    /// A few connections through `mode`'s Service all succeed, and node 0 encodes DSR packets
    /// for them exactly when the Service is the DSR one (otherwise the pair would measure
    /// the same path twice).
    fn check_path(&mut self, mode: Mode) -> Result<()> {
        let before = self.encoded()?;
        let summary = loadgen::run(
            self.client_namespace(),
            None,
            &[self.target(mode)?],
            &Load::Latency {
                connections: CHECK_CONNECTIONS,
                max: Duration::from_secs(20),
            },
        )?;
        ensure!(
            summary.ok == CHECK_CONNECTIONS,
            "{} of {CHECK_CONNECTIONS} connections succeeded (first error: {})",
            summary.ok,
            summary.first_error.unwrap_or_default()
        );
        let encoded = self.encoded()? - before;
        if mode == Mode::SwitchyardDsr {
            ensure!(
                encoded >= CHECK_CONNECTIONS,
                "node {INGRESS} encoded only {encoded} DSR packets for {CHECK_CONNECTIONS} \
                 connections"
            );
        } else {
            ensure!(
                encoded == 0,
                "node {INGRESS} encoded {encoded} DSR packets for masqueraded connections"
            );
        }
        Ok(())
    }

    /// Node 0's `tc_dsr_encoded` counter (packets sent on with the frontend encoded).
    fn encoded(&mut self) -> Result<u64> {
        let output = self
            .cluster
            .agent(INGRESS)
            .offline(&["inspect", "stats", "--output", "json"])?;
        ensure!(
            output.status.success(),
            "inspect stats on node {INGRESS} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stats: Value =
            serde_json::from_slice(&output.stdout).context("inspect stats is not JSON")?;
        stats["datapath"]["tc_dsr_encoded"]
            .as_u64()
            .or_else(|| stats["datapath"].is_object().then_some(0))
            .context("inspect stats has no datapath counters")
    }
}
