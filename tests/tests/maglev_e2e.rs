//! Maglev across nodes, end to end in the multi-node world (`switchyard_tests::world::cluster`):
//! every agent runs `--lb-algorithm maglev` with the same `--maglev-hash-seed`, and a
//! LoadBalancer IP (externalTrafficPolicy Cluster) is steered by the balancer to node 0 or
//! node 1, while the Service's endpoints are node 2's pods. With `--lb-mode dsr` the client's
//! address reaches the endpoint, so a flow can change ingress node mid-stream.
//!
//! - 10 000 one-shot UDP flows (two client addresses × 5 000 ports) go through node 0, then
//!   the same tuples through node 1: each node's conntrack (`inspect conntrack`, the agent's
//!   own decoding of the pinned maps) names the same backend for every tuple.
//! - One TCP connection exchanges data through node 0, is rerouted to node 1 (which has never
//!   seen its SYN) and keeps exchanging with the same backend.
//!
//! Needs root.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_tests::client::report::failures;
use switchyard_tests::env::netns::ip_in;
use switchyard_tests::k8s::external_service::{ExternalService, ServiceType};
use switchyard_tests::world::cluster::network::steer;
use switchyard_tests::world::cluster::workload::{ClusterService, PodPhase};
use switchyard_tests::world::cluster::{CLIENT, Cluster, ClusterConfig};
use switchyard_tests::{require_root, testkit};

const NODES: usize = 3;
/// The two ingress nodes the balancer switches between.
const NODE_A: usize = 0;
const NODE_B: usize = 1;
/// The node whose pods are the Service's endpoints.
const ENDPOINTS: usize = 2;
const PODS_PER_NODE: usize = 5;
const PORT: u16 = 80;
const NODE_PORT: u16 = 30140;
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);
/// The same text on every node, as one DaemonSet's arguments give it.
const SEED: &str = "maglev-e2e-shared-seed";
/// A second client address on the client's link, so tuples differ in address as well as port.
const CLIENT_2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
const FIRST_PORT: u16 = 20_000;
const PORTS_PER_ADDRESS: u32 = 5_000;
const FLOWS: usize = 10_000;
/// The bound of one scatter of every tuple.
const SCATTER_MAX: Duration = Duration::from_secs(20);
/// How long a node's conntrack may take to show what was sent through it.
const SETTLE: Duration = Duration::from_secs(5);

/// `maglev-lb`: LoadBalancer at [`LB_IP`], externalTrafficPolicy Cluster, node 2's pods.
fn service() -> ClusterService {
    ClusterService::new(
        ExternalService::new(
            "maglev-lb",
            ServiceType::LoadBalancer,
            &["10.96.0.40".parse().expect("IPv4")],
            PORT,
        )
        .node_port(NODE_PORT)
        .ingress_ip(LB_IP.into()),
    )
    .on_nodes(&[ENDPOINTS])
}

fn frontend() -> SocketAddr {
    SocketAddr::from((LB_IP, PORT))
}

/// The TC flows of `node` to the frontend over `protocol`: client address → backend address
/// (both `IP:PORT`), from `inspect conntrack --output json`.
fn flows(cluster: &mut Cluster, node: usize, protocol: &str) -> BTreeMap<String, Value> {
    let output = cluster
        .agent(node)
        .offline(&["inspect", "conntrack", "--output", "json"])
        .expect("inspect conntrack");
    let items: Value = serde_json::from_slice(&output.stdout).expect("inspect conntrack JSON");
    let frontend = frontend().to_string();
    items
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|item| {
            item["kind"] == "tc"
                && item["protocol"] == protocol
                && item["frontend"] == frontend.as_str()
        })
        .filter_map(|item| Some((item["client"].as_str()?.to_owned(), item)))
        .collect()
}

/// Polls `node`'s flows until there are at least `count` (at most [`SETTLE`]).
fn settled_flows(
    cluster: &mut Cluster,
    node: usize,
    protocol: &str,
    count: usize,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let flows = flows(cluster, node, protocol);
        if flows.len() >= count || Instant::now() >= deadline {
            return flows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every tuple sent through `node`: client → backend, with Maglev's choice counted.
fn scatter_through(cluster: &mut Cluster, node: usize) -> BTreeMap<String, String> {
    steer(cluster.balancer_netns(), LB_IP.into(), &[node]).expect("steering the LB IP");
    let picked_before = cluster.datapath_counter(node, "tc_maglev_picked");
    let sent = cluster
        .testkit()
        .scatter(
            cluster.client_netns(),
            frontend(),
            &[CLIENT.into(), CLIENT_2.into()],
            FIRST_PORT,
            PORTS_PER_ADDRESS,
            SCATTER_MAX,
        )
        .expect("scattering UDP flows");
    assert_eq!(sent as usize, FLOWS, "datagrams sent through node {node}");
    let flows = settled_flows(cluster, node, "udp", FLOWS);
    let picked = cluster.datapath_counter(node, "tc_maglev_picked") - picked_before;
    assert!(
        picked >= FLOWS as u64,
        "node {node}: Maglev picked {picked} backends for {FLOWS} new flows"
    );
    flows
        .into_iter()
        .map(|(client, item)| {
            assert_eq!(
                item["direct_server_return"], true,
                "node {node}: {client} is a DSR flow"
            );
            let backend = item["backend"].as_str().expect("a backend").to_owned();
            (client, backend)
        })
        .collect()
}

/// Every expected client tuple (`IP:PORT`).
fn expected_clients() -> BTreeSet<String> {
    [CLIENT, CLIENT_2]
        .into_iter()
        .flat_map(|ip| {
            (0..PORTS_PER_ADDRESS).map(move |offset| {
                let port = u32::from(FIRST_PORT) + offset;
                format!("{ip}:{port}")
            })
        })
        .collect()
}

/// The 10 000 tuples get the same backend through either node, and the backends share them.
fn same_backend_through_both_nodes(cluster: &mut Cluster) {
    let through_a = scatter_through(cluster, NODE_A);
    let through_b = scatter_through(cluster, NODE_B);
    let expected = expected_clients();
    assert_eq!(expected.len(), FLOWS);
    for (node, flows) in [(NODE_A, &through_a), (NODE_B, &through_b)] {
        let seen: BTreeSet<&String> = flows.keys().collect();
        let missing: Vec<&String> = expected.iter().filter(|c| !seen.contains(c)).collect();
        assert!(
            missing.is_empty(),
            "node {node} tracks no flow for {} tuples, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    let differing: Vec<(&String, &String, &String)> = expected
        .iter()
        .filter_map(|client| {
            let (a, b) = (&through_a[client], &through_b[client]);
            (a != b).then_some((client, a, b))
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{} of {FLOWS} tuples got another backend through node {NODE_B} than through node \
         {NODE_A}, e.g. {:?}",
        differing.len(),
        &differing[..differing.len().min(5)]
    );
    // The agreement means something only if the flows are spread: every endpoint has its
    // share (1/N of the tuples, give or take a third).
    let endpoints: BTreeSet<String> = cluster
        .pods()
        .iter()
        .filter(|pod| pod.node == ENDPOINTS && pod.phase == PodPhase::Ready)
        .map(|pod| pod.address.to_string())
        .collect();
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    for backend in through_a.values() {
        let ip = backend
            .rsplit_once(':')
            .map_or(backend.as_str(), |(ip, _)| ip);
        *shares.entry(ip.to_owned()).or_default() += 1;
    }
    let chosen: BTreeSet<String> = shares.keys().cloned().collect();
    assert_eq!(chosen, endpoints, "the backends chosen: {shares:?}");
    let fair = FLOWS / endpoints.len();
    for (backend, share) in &shares {
        assert!(
            share * 3 >= fair * 2 && share * 3 <= fair * 4,
            "{backend} got {share} of {FLOWS} tuples (fair: {fair}): {shares:?}"
        );
    }
}

/// One TCP connection through node 0, then rerouted through node 1 (which picks the flow up
/// from a mid-stream segment): no failure, one backend throughout, the client's address seen.
fn connection_survives_a_change_of_ingress_node(cluster: &mut Cluster) {
    steer(cluster.balancer_netns(), LB_IP.into(), &[NODE_A]).expect("steering to node A");
    let hold = cluster.outside_hold(
        frontend(),
        Duration::from_secs(6),
        Duration::from_millis(100),
    );
    let before = hold
        .wait_for_attempts(5, Duration::from_secs(5))
        .expect("the held connection started through node A")
        .len();
    let on_a = settled_flows(cluster, NODE_A, "tcp", 1);
    assert_eq!(on_a.len(), 1, "node {NODE_A}'s TCP flows: {on_a:#?}");
    steer(cluster.balancer_netns(), LB_IP.into(), &[NODE_B]).expect("steering to node B");
    let on_b = settled_flows(cluster, NODE_B, "tcp", 1);
    let attempts = hold.finish().expect("held connection");
    assert!(
        failures(&attempts).is_empty(),
        "the connection across the change of node: {:?}",
        failures(&attempts)
    );
    assert!(
        attempts.len() >= before + 10,
        "{} exchanges, {before} of them before the change of node",
        attempts.len()
    );
    let backends: BTreeSet<&str> = attempts
        .iter()
        .filter_map(|attempt| attempt.backend.as_deref())
        .collect();
    assert_eq!(backends.len(), 1, "one backend throughout: {backends:?}");
    assert!(
        attempts
            .iter()
            .all(|a| a.seen_as.map(|s| s.ip()) == Some(IpAddr::from(CLIENT))),
        "the backend sees the client's address throughout"
    );
    // Node B carried the same flow (the client's tuple) to the same backend.
    assert_eq!(on_b.len(), 1, "node {NODE_B}'s TCP flows: {on_b:#?}");
    let (client, flow_a) = on_a.iter().next().expect("one flow");
    let flow_b = &on_b[client];
    assert_eq!(
        flow_b["backend"], flow_a["backend"],
        "the backend on both nodes"
    );
    assert_eq!(flow_b["direct_server_return"], true, "node B: a DSR flow");
    let pod = backends.first().copied().unwrap_or_default();
    let address = cluster
        .pods()
        .iter()
        .find(|p| p.name == pod)
        .map(|p| p.address.to_string())
        .expect("the answering pod");
    assert!(
        flow_a["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with(&format!("{address}:"))),
        "conntrack names {} but {pod} ({address}) answered",
        flow_a["backend"]
    );
}

#[test]
fn nodes_with_the_same_seed_agree_on_every_flow_and_a_flow_can_change_node_mid_stream() {
    require_root!();
    let mut cluster = Cluster::start(
        testkit!(),
        ClusterConfig::new(NODES, 1, PODS_PER_NODE)
            .service(service())
            .agent_args(&[
                "--lb-mode",
                "dsr",
                "--lb-algorithm",
                "maglev",
                "--maglev-hash-seed",
                SEED,
            ]),
    );
    ip_in(
        cluster.client_netns(),
        &["addr", "add", &format!("{CLIENT_2}/24"), "dev", "eth0"],
    )
    .expect("a second client address");
    same_backend_through_both_nodes(&mut cluster);
    connection_survives_a_change_of_ingress_node(&mut cluster);
}
