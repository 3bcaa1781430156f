//! Direct Server Return end to end in the multi-node world (`switchyard_tests::world::cluster`): an
//! external client reaches a NodePort on node 0 whose only endpoints are pods on node 1.
//! Node 0 sends the requests on with the client's address and the frontend option; node 1
//! delivers them and its pods' replies go from node 1 straight to the client, with node 0's
//! address and the NodePort as their source. TCP and UDP, IPv4 and IPv6; node 1's agent
//! restarted mid-connection; `--lb-mode hybrid` masquerades UDP. Needs root.
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use switchyard_tests::client::report::{Attempt, failures};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::k8s::external_service::{ExternalService, ServiceType};
use switchyard_tests::world::cluster::workload::{ClusterService, PodPhase};
use switchyard_tests::world::cluster::{CLIENT, CLIENT6, Cluster, ClusterConfig};
use switchyard_tests::{require_root, testkit};

const PORT: u16 = 80;
const NODE_PORT: u16 = 30090;
const NODES: usize = 3;
/// Node 0 takes the traffic; node 1 has the endpoints.
const INGRESS: usize = 0;
const ENDPOINTS: usize = 1;
/// The node switched to `--lb-mode hybrid`.
const HYBRID: usize = 2;
/// Exchanges per protocol and family.
const COUNT: u32 = 20;
/// Packets node 0's uplink may receive beyond the client's own (neighbour discovery and the
/// like): far fewer than the replies (at least one per exchange) that SNAT would bring back.
const BACKGROUND_PACKETS: u64 = 8;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `dsr-web`: NodePort, externalTrafficPolicy Cluster, backed by node 1's pods only.
fn service() -> ClusterService {
    ClusterService::new(
        ExternalService::new(
            "dsr-web",
            ServiceType::NodePort,
            &[
                "10.96.0.20".parse().expect("IPv4"),
                "fd00:96::20".parse().expect("IPv6"),
            ],
            PORT,
        )
        .node_port(NODE_PORT),
    )
    .on_nodes(&[ENDPOINTS])
}

fn request(proto: ClientProto, target: SocketAddr) -> ClientRequest {
    ClientRequest::new(proto, target)
        .count(COUNT)
        .timeout(Duration::from_secs(1))
        .ask_peer()
}

/// A link's packet counters (rx, tx) inside `netns`.
fn link_packets(netns: &str, link: &str) -> (u64, u64) {
    let read = |which: &str| -> u64 {
        let output = Command::new("ip")
            .args(["netns", "exec", netns, "cat"])
            .arg(format!("/sys/class/net/{link}/statistics/{which}_packets"))
            .output()
            .expect("reading link statistics");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{netns}/{link} {which}_packets: {e}"))
    };
    (read("rx"), read("tx"))
}

fn node1_pods(cluster: &Cluster) -> Vec<String> {
    cluster.pods_on(ENDPOINTS, PodPhase::Ready)
}

#[track_caller]
fn assert_served_by_node1(cluster: &Cluster, attempts: &[Attempt], what: &str) {
    assert!(
        failures(attempts).is_empty(),
        "{what}: failures {:?}",
        failures(attempts)
    );
    assert_eq!(attempts.len(), COUNT as usize, "{what}: attempts");
    let pods = node1_pods(cluster);
    for attempt in attempts {
        let backend = attempt.backend.as_deref().unwrap_or_default();
        assert!(
            pods.iter().any(|pod| pod == backend),
            "{what}: answered by {backend}, not a pod of node 1 {pods:?}"
        );
    }
}

/// `COUNT` exchanges from the client through node 0 (IPv6 when `ipv6`): served by node 1's
/// pods, which see the client's address, and node 0's uplink receives the client's packets
/// but not the replies.
fn exchange_bypassing_the_ingress_node(cluster: &Cluster, ipv6: bool, proto: ClientProto) {
    let (family, client, frontend) = if ipv6 {
        (
            "IPv6",
            IpAddr::from(CLIENT6),
            IpAddr::from(cluster.node_address6(INGRESS)),
        )
    } else {
        (
            "IPv4",
            IpAddr::from(CLIENT),
            IpAddr::from(cluster.node_address(INGRESS)),
        )
    };
    let ingress_netns = cluster.node_netns(INGRESS);
    let client_netns = cluster.client_netns();
    let what = format!("{family} {proto:?} through node {INGRESS}");
    let ingress_before = link_packets(ingress_netns, "up0");
    let client_before = link_packets(client_netns, "eth0");
    let attempts = cluster.outside_client(&request(proto, sa(frontend, NODE_PORT)));
    let ingress_after = link_packets(ingress_netns, "up0");
    let client_after = link_packets(client_netns, "eth0");
    assert_served_by_node1(cluster, &attempts, &what);
    for attempt in &attempts {
        assert_eq!(
            attempt.seen_as.map(|seen| seen.ip()),
            Some(client),
            "{what}: the backend sees the client's address"
        );
        assert_eq!(
            attempt.peer.map(|peer| peer.ip()),
            Some(frontend),
            "{what}: the client talks to the frontend"
        );
    }
    let received_by_ingress = ingress_after.0 - ingress_before.0;
    let (client_rx, client_tx) = (
        client_after.0 - client_before.0,
        client_after.1 - client_before.1,
    );
    assert!(
        client_rx >= u64::from(COUNT),
        "{what}: the client received {client_rx} packets"
    );
    assert!(
        received_by_ingress <= client_tx + BACKGROUND_PACKETS,
        "{what}: node {INGRESS}'s uplink received {received_by_ingress} packets, the client sent {client_tx} and received {client_rx}: replies came back through the ingress node"
    );
}

/// `inspect conntrack` on both nodes: node 0's flows are marked DSR, node 1 lists the reply
/// entries of its pods with the client and the frontend.
fn assert_inspect_shows_dsr(cluster: &mut Cluster) {
    let frontend = sa(cluster.node_address(INGRESS), NODE_PORT).to_string();
    let mut items = |node: usize| -> Vec<Value> {
        let output = cluster
            .agent(node)
            .offline(&["inspect", "conntrack", "--output", "json"])
            .expect("inspect conntrack");
        serde_json::from_slice::<Value>(&output.stdout)
            .expect("inspect conntrack JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let ingress = items(INGRESS);
    assert!(
        ingress.iter().any(|item| item["kind"] == "tc"
            && item["direct_server_return"] == true
            && item["frontend"] == frontend.as_str()),
        "node {INGRESS}: no DSR flow in {ingress:#?}"
    );
    let endpoints = items(ENDPOINTS);
    assert!(
        endpoints.iter().any(|item| item["kind"] == "dsr-reply"
            && item["frontend"] == frontend.as_str()
            && item["client"]
                .as_str()
                .is_some_and(|client| client.starts_with(&CLIENT.to_string()))),
        "node {ENDPOINTS}: no DSR reply entry in {endpoints:#?}"
    );
}

#[test]
fn dsr_replies_bypass_the_ingress_node_keep_the_client_address_and_survive_an_agent_restart() {
    require_root!();
    let mut cluster = Cluster::start(
        testkit!(),
        ClusterConfig::new(NODES, 1, 1)
            .service(service())
            .agent_args(&["--lb-mode", "dsr"]),
    );
    let encoded_before = cluster.datapath_counter(INGRESS, "tc_dsr_encoded");
    let replies_before = cluster.datapath_counter(ENDPOINTS, "tc_dsr_reply");

    for family in [false, true] {
        for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
            exchange_bypassing_the_ingress_node(&cluster, family, proto);
        }
    }
    let encoded = cluster.datapath_counter(INGRESS, "tc_dsr_encoded") - encoded_before;
    let replies = cluster.datapath_counter(ENDPOINTS, "tc_dsr_reply") - replies_before;
    assert!(
        encoded >= 4 * u64::from(COUNT),
        "node {INGRESS} encoded {encoded} packets"
    );
    assert!(
        replies >= 4 * u64::from(COUNT),
        "node {ENDPOINTS} sent {replies} DSR replies"
    );
    assert_inspect_shows_dsr(&mut cluster);
    assert_eq!(
        cluster.datapath_counter(INGRESS, "tc_ct_reply"),
        0,
        "no reply passed node {INGRESS}"
    );

    // The endpoint node's agent restarts while a connection is open: its reverse entries live
    // in pinned maps, so the connection keeps working.
    let target = sa(cluster.node_address(INGRESS), NODE_PORT);
    let hold = cluster.outside_hold(target, Duration::from_secs(5), Duration::from_millis(100));
    hold.wait_for_attempts(3, Duration::from_secs(5))
        .expect("the held connection started");
    cluster.restart_agent(ENDPOINTS);
    let attempts = hold.finish().expect("held connection");
    assert!(
        attempts.len() >= 10,
        "held connection: {} exchanges",
        attempts.len()
    );
    assert!(
        failures(&attempts).is_empty(),
        "held connection across the restart: {:?}",
        failures(&attempts)
    );
    assert!(
        attempts
            .iter()
            .all(|a| a.seen_as.map(|s| s.ip()) == Some(IpAddr::from(CLIENT))),
        "held connection: the client's address throughout"
    );

    // Hybrid on node 2 (whose conntrack holds no DSR flow that a reused client port could
    // meet: a tracked flow keeps its mode): TCP keeps DSR, UDP is masqueraded.
    cluster.restart_agent_with(HYBRID, &["--lb-mode", "hybrid"]);
    let target = sa(cluster.node_address(HYBRID), NODE_PORT);
    let udp = cluster.outside_client(&request(ClientProto::UdpConnected, target));
    assert_served_by_node1(&cluster, &udp, "hybrid UDP");
    assert!(
        udp.iter()
            .all(|a| a.seen_as.is_some_and(|s| s.ip() != IpAddr::from(CLIENT))),
        "hybrid UDP is masqueraded: {:?}",
        udp.iter().map(|a| a.seen_as).collect::<Vec<_>>()
    );
    let tcp = cluster.outside_client(&request(ClientProto::Tcp, target));
    assert_served_by_node1(&cluster, &tcp, "hybrid TCP");
    assert!(
        tcp.iter()
            .all(|a| a.seen_as.map(|s| s.ip()) == Some(IpAddr::from(CLIENT))),
        "hybrid TCP keeps DSR and the client's address"
    );
}
