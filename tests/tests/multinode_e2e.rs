//! End-to-end tests of a cluster on one machine (`switchyard_tests::world::cluster`): three nodes, each
//! with its own agent following one test API server, pods on every node behind a routed CNI's
//! host veths, a router between the nodes, an external client and a load balancer that follows
//! the health-check node ports. Scenarios: the harness itself, a rolling update under load, node
//! loss, topology and traffic policies across nodes, and an agent restart during a rolling
//! update.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use switchyard_tests::client::report::{Attempt, failures, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest, RunningClient};
use switchyard_tests::k8s::external_service::{ExternalService, ServiceType};
use switchyard_tests::world::cluster::workload::{ClusterService, PodPhase};
use switchyard_tests::world::cluster::{CLIENT, CLIENT6, Cluster, ClusterConfig};
use switchyard_tests::{require_root, testkit};

const PORT: u16 = 80;
/// The eTP Cluster NodePort Service (dual-stack).
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const WEB_NODE_PORT: u16 = 30080;
/// The eTP Local LoadBalancer Service (dual-stack).
const LB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
const LB_NODE_PORT: u16 = 30081;
const LB_HEALTH_PORT: u16 = 32081;
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x5e, 0, 0, 0, 0, 0x10);
const NODES: usize = 3;
/// The agent counts distinct local ready endpoint addresses across families in
/// `localEndpoints` (its model test says so): a dual-stack pod counts twice. (kube-proxy runs one
/// proxier per family, sharing one health server, and reports one family's count.)
const LOCAL_ENDPOINT_ADDRESSES_PER_POD: usize = 2;
const PODS_PER_NODE: usize = 2;
/// Connections of a burst that must reach every one of up to 6 backends (each missed with
/// probability (5/6)^60 < 2e-5).
const BURST: u32 = 60;
/// The pause between connections of the load loops.
const LOAD_INTERVAL: Duration = Duration::from_millis(25);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_secs(10);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target)
        .count(count)
        .timeout(ATTEMPT_TIMEOUT)
}

/// `web`: NodePort, externalTrafficPolicy Cluster.
fn web() -> ClusterService {
    ClusterService::new(
        ExternalService::new(
            "web",
            ServiceType::NodePort,
            &[WEB_VIP.into(), WEB_VIP6.into()],
            PORT,
        )
        .node_port(WEB_NODE_PORT),
    )
}

/// `web-lb`: LoadBalancer at [`LB_IP`], externalTrafficPolicy Local.
fn web_lb() -> ClusterService {
    ClusterService::new(
        ExternalService::new(
            "web-lb",
            ServiceType::LoadBalancer,
            &[LB_VIP.into(), LB_VIP6.into()],
            PORT,
        )
        .node_port(LB_NODE_PORT)
        .ingress_ip(LB_IP.into())
        .ingress_ip(LB_IP6.into())
        .local(LB_HEALTH_PORT),
    )
}

fn cluster_with(services: Vec<ClusterService>) -> Cluster {
    let config = services.into_iter().fold(
        ClusterConfig::new(NODES, 2, PODS_PER_NODE),
        ClusterConfig::service,
    );
    Cluster::start(testkit!(), config)
}

fn names_on(cluster: &Cluster, nodes: &[usize]) -> BTreeSet<String> {
    cluster
        .pods()
        .iter()
        .filter(|pod| nodes.contains(&pod.node) && pod.phase == PodPhase::Ready)
        .map(|pod| pod.name.clone())
        .collect()
}

fn all_ok(attempts: &[Attempt], what: &str) {
    let failures: Vec<(usize, &Attempt)> = attempts
        .iter()
        .enumerate()
        .filter(|(_, attempt)| !attempt.ok)
        .collect();
    assert!(
        !attempts.is_empty() && failures.is_empty(),
        "{what}: {} of {} attempts failed (index, attempt): {failures:?}",
        failures.len(),
        attempts.len(),
    );
}

#[test]
fn the_cluster_harness_wires_nodes_pods_router_client_and_balancer() {
    require_root!();
    let cluster = cluster_with(vec![web(), web_lb()]);
    let every_pod = names_on(&cluster, &[0, 1, 2]);
    assert_eq!(every_pod.len(), NODES * PODS_PER_NODE);

    // Each node's own agent serves its client pod; pods on the other nodes answer through the
    // router. Both families.
    for node in 0..NODES {
        for vip in [IpAddr::V4(WEB_VIP), IpAddr::V6(WEB_VIP6)] {
            let attempts = cluster.pod_client(node, &tcp(sa(vip, PORT), BURST));
            all_ok(&attempts, &format!("ClusterIP {vip} from node {node}"));
            assert_eq!(reached(&attempts), every_pod, "{vip} from node {node}");
        }
    }
    // The external client reaches every node's NodePort, and through it every pod (masqueraded
    // to other nodes).
    for node in 0..NODES {
        let addresses = [
            IpAddr::V4(cluster.node_address(node)),
            IpAddr::V6(cluster.node_address6(node)),
        ];
        for address in addresses {
            let attempts = cluster.outside_client(&tcp(sa(address, WEB_NODE_PORT), BURST));
            all_ok(&attempts, &format!("NodePort {address} of node {node}"));
            assert_eq!(reached(&attempts), every_pod, "NodePort {address}");
        }
    }
    // Every node has local endpoints of the eTP Local Service: each health check answers 200
    // for its own two pods, and the balancer spreads the LB IP over all three nodes, keeping
    // the client's address.
    for node in 0..NODES {
        let (status, body) = cluster.health_check(node, LB_HEALTH_PORT);
        assert_eq!(status, 200, "health check of node {node}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON health check");
        assert_eq!(
            body["localEndpoints"],
            LOCAL_ENDPOINT_ADDRESSES_PER_POD * PODS_PER_NODE,
            "node {node}: {body}"
        );
    }
    cluster
        .balancer()
        .wait_for(&[0, 1, 2], SETTLE)
        .expect("balancer");
    for (lb_ip, client) in [
        (IpAddr::V4(LB_IP), IpAddr::V4(CLIENT)),
        (IpAddr::V6(LB_IP6), IpAddr::V6(CLIENT6)),
    ] {
        let attempts = cluster.outside_client(&tcp(sa(lb_ip, PORT), BURST).ask_peer());
        all_ok(&attempts, &format!("LB IP {lb_ip}"));
        assert_eq!(
            reached(&attempts),
            every_pod,
            "{lb_ip} through the balancer"
        );
        assert!(
            attempts
                .iter()
                .all(|a| a.seen_as.map(|s| s.ip()) == Some(client)),
            "eTP Local keeps the client's address: {attempts:?}"
        );
    }

    // Only pods have a default route (to their node, which has none): nothing leaves the
    // machine.
    for netns in cluster.infrastructure_namespaces() {
        for family in ["-4", "-6"] {
            let output = Command::new("ip")
                .args([family, "-n", &netns, "route", "show", "default"])
                .output()
                .expect("ip route");
            let routes = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success() && routes.trim().is_empty(),
                "{netns} has a default route ({family}): {routes}"
            );
        }
    }
    let namespaces: Vec<String> = cluster.namespaces().to_vec();
    drop(cluster);
    for netns in namespaces {
        assert!(
            !Path::new("/run/netns").join(&netns).exists(),
            "{netns} outlived the cluster"
        );
    }
}

/// The load loops of a rolling update: a new connection every [`LOAD_INTERVAL`] to the
/// ClusterIP from every node's client pod, to a NodePort from outside, and to the LB IP.
struct Load {
    clients: Vec<(String, RunningClient)>,
}

impl Load {
    fn start(cluster: &Cluster, count: u32) -> Self {
        let request = |target| tcp(target, count).interval(LOAD_INTERVAL);
        let mut clients: Vec<(String, RunningClient)> = (0..NODES)
            .map(|node| {
                (
                    format!("ClusterIP from node {node}"),
                    cluster.spawn_pod_client(node, &request(sa(WEB_VIP, PORT))),
                )
            })
            .collect();
        clients.push((
            "NodePort of node 1 from outside".into(),
            cluster.spawn_outside_client(&request(sa(cluster.node_address(1), WEB_NODE_PORT))),
        ));
        clients.push((
            "LB IP from outside".into(),
            cluster.spawn_outside_client(&request(sa(LB_IP, PORT))),
        ));
        // IPv6 too (the Services are dual-stack).
        clients.push((
            "IPv6 ClusterIP from node 1".into(),
            cluster.spawn_pod_client(1, &request(sa(WEB_VIP6, PORT))),
        ));
        clients.push((
            "IPv6 LB IP from outside".into(),
            cluster.spawn_outside_client(&request(sa(LB_IP6, PORT))),
        ));
        // UDP too: a new connected socket per exchange.
        let udp = |target| {
            ClientRequest::new(ClientProto::UdpConnected, target)
                .count(count)
                .timeout(ATTEMPT_TIMEOUT)
                .interval(LOAD_INTERVAL)
        };
        clients.push((
            "UDP ClusterIP from node 2".into(),
            cluster.spawn_pod_client(2, &udp(sa(WEB_VIP, PORT))),
        ));
        clients.push((
            "UDP NodePort of node 2 from outside".into(),
            cluster.spawn_outside_client(&udp(sa(cluster.node_address(2), WEB_NODE_PORT))),
        ));
        Self { clients }
    }

    /// How many attempts each loop reported so far.
    fn marks(&self) -> Vec<usize> {
        self.clients
            .iter()
            .map(|(_, client)| client.attempts_so_far().len())
            .collect()
    }

    fn wait_started(&self) {
        for (what, client) in &self.clients {
            client
                .wait_for_attempts(5, SETTLE)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
    }

    fn finish(self) -> Vec<(String, Vec<Attempt>)> {
        self.clients
            .into_iter()
            .map(|(what, client)| {
                let attempts = client.finish().unwrap_or_else(|e| panic!("{what}: {e:#}"));
                (what, attempts)
            })
            .collect()
    }
}

/// Held connections opened to the old pods before the update.
struct Holds {
    holds: Vec<(String, RunningClient)>,
}

impl Holds {
    fn start(cluster: &Cluster, duration: Duration) -> Self {
        let every = Duration::from_millis(100);
        let mut holds: Vec<(String, RunningClient)> = (0..NODES)
            .map(|node| {
                (
                    format!("held ClusterIP connection from node {node}"),
                    cluster.pod_hold(node, sa(WEB_VIP, PORT), duration, every),
                )
            })
            .collect();
        holds.push((
            "held NodePort connection".into(),
            cluster.outside_hold(sa(cluster.node_address(0), WEB_NODE_PORT), duration, every),
        ));
        holds.push((
            "held LB connection".into(),
            cluster.outside_hold(sa(LB_IP, PORT), duration, every),
        ));
        for (what, hold) in &holds {
            hold.wait_for_attempts(1, SETTLE)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        Self { holds }
    }

    fn marks(&self) -> Vec<usize> {
        self.holds
            .iter()
            .map(|(_, hold)| hold.attempts_so_far().len())
            .collect()
    }

    /// Every request on every held connection answered, by one old pod throughout, and some
    /// of them after the old pods turned terminating (`marks`).
    fn finish(self, old: &BTreeSet<String>, terminating_marks: &[usize]) {
        for ((what, hold), mark) in self.holds.into_iter().zip(terminating_marks) {
            let attempts = hold.finish().unwrap_or_else(|e| panic!("{what}: {e:#}"));
            all_ok(&attempts, &what);
            let backends = reached(&attempts);
            assert_eq!(backends.len(), 1, "{what} moved: {backends:?}");
            assert!(
                backends.is_subset(old),
                "{what} was not to an old pod: {backends:?}"
            );
            assert!(
                attempts.len() > *mark,
                "{what} ended before the old pods turned terminating: lengthen HOLD"
            );
        }
    }
}

/// Replaces every pod the way a Deployment does (new pods ready, then the old ones serving
/// and terminating, then removed and stopped) under load. `during` runs after the new pods
/// are ready (e.g. an agent restart).
fn rolling_update(cluster: &mut Cluster, during: impl FnOnce(&mut Cluster)) {
    const HOLD: Duration = Duration::from_secs(8);
    const LOAD_COUNT: u32 = 700;
    let old: BTreeSet<String> = cluster.pods_in(PodPhase::Ready).into_iter().collect();
    let balancer_history = cluster.balancer().history();
    let holds = Holds::start(cluster, HOLD);
    let load = Load::start(cluster, LOAD_COUNT);
    load.wait_started();

    // New pods on every node become ready (surge).
    let mut new = BTreeSet::new();
    for node in 0..NODES {
        for _ in 0..PODS_PER_NODE {
            new.insert(cluster.add_pod(node));
        }
    }
    let new_list: Vec<String> = new.iter().cloned().collect();
    cluster.set_phase(&new_list, PodPhase::Ready);
    cluster.publish();
    cluster.wait_converged();
    during(cluster);

    // The old pods terminate but still serve.
    let old_list: Vec<String> = old.iter().cloned().collect();
    cluster.set_phase(&old_list, PodPhase::Terminating);
    cluster.publish();
    cluster.wait_converged();
    let terminating_marks = holds.marks();
    holds.finish(&old, &terminating_marks);

    // They leave the slices; once every agent follows, nothing new may reach them, and then
    // their processes exit.
    cluster.set_phase(&old_list, PodPhase::Removed);
    cluster.publish();
    cluster.wait_converged();
    let removed_marks = load.marks();
    for pod in &old_list {
        cluster.stop_pod(pod);
    }
    for ((what, attempts), mark) in load.finish().into_iter().zip(removed_marks) {
        all_ok(&attempts, &what);
        // The attempt in flight at the mark may have started before it.
        let later = attempts.get(mark + 1..).unwrap_or_default();
        assert!(
            !later.is_empty(),
            "{what}: the load ended before the update did; raise LOAD_COUNT"
        );
        let late_backends = reached(later);
        assert!(
            late_backends.is_disjoint(&old),
            "{what}: new connections reached removed pods: {:?}",
            late_backends.intersection(&old).collect::<Vec<_>>()
        );
        eprintln!(
            "{what}: {} connections, 0 failed, {} after the old pods left",
            attempts.len(),
            later.len()
        );
    }
    // The eTP Local LB never lost a node: every node kept a ready local endpoint (and a
    // restarting agent's health-check port is closed for less than the unhealthy threshold).
    assert_eq!(
        cluster.balancer().history(),
        balancer_history,
        "the balancer changed its nodes"
    );
    assert_eq!(balancer_history.last(), Some(&vec![0, 1, 2]));
}

#[test]
fn a_rolling_update_under_load_fails_no_connection_and_drains_terminating_pods() {
    require_root!();
    let mut cluster = cluster_with(vec![web(), web_lb()]);
    cluster
        .balancer()
        .wait_for(&[0, 1, 2], SETTLE)
        .expect("balancer");
    rolling_update(&mut cluster, |_| {});
}

#[test]
fn an_agent_restart_during_a_rolling_update_keeps_traffic_flowing_and_converges() {
    require_root!();
    let mut cluster = cluster_with(vec![web(), web_lb()]);
    cluster
        .balancer()
        .wait_for(&[0, 1, 2], SETTLE)
        .expect("balancer");
    rolling_update(&mut cluster, |cluster| {
        let started = Instant::now();
        cluster.restart_agent(1);
        eprintln!(
            "the agent of node 1 was ready {:?} after SIGKILL",
            started.elapsed()
        );
        assert!(
            cluster.agent(1).log().contains("start #2"),
            "the agent of node 1 was not restarted"
        );
    });
    // The restarted agent follows later changes too.
    let gone = cluster.pods_on(1, PodPhase::Ready);
    cluster.set_phase(&gone[..1], PodPhase::Removed);
    cluster.publish();
    cluster.wait_converged();
}

#[test]
fn a_lost_node_is_routed_around_by_the_other_nodes_and_the_balancer() {
    const LOST: usize = 2;
    const LOAD_COUNT: u32 = 500;
    require_root!();
    let mut cluster = cluster_with(vec![web(), web_lb()]);
    let balancer_ready = cluster.balancer().wait_for(&[0, 1, 2], SETTLE);
    balancer_ready.expect("balancer");
    let lost_pods: BTreeSet<String> = names_on(&cluster, &[LOST]);
    let request = |target| tcp(target, LOAD_COUNT).interval(LOAD_INTERVAL);
    let mut loads: Vec<(String, RunningClient)> = (0..NODES)
        .filter(|node| *node != LOST)
        .map(|node| {
            (
                format!("ClusterIP from node {node}"),
                cluster.spawn_pod_client(node, &request(sa(WEB_VIP, PORT))),
            )
        })
        .collect();
    loads.push((
        "NodePort of node 0 from outside".into(),
        cluster.spawn_outside_client(&request(sa(cluster.node_address(0), WEB_NODE_PORT))),
    ));
    let lb_load = cluster.spawn_outside_client(&request(sa(LB_IP, PORT)));
    for (what, load) in &loads {
        load.wait_for_attempts(5, SETTLE)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }

    cluster.lose_node(LOST);
    let lost_at = Instant::now();
    // The balancer drops the node as soon as its health check fails.
    cluster
        .balancer()
        .wait_for(&[0, 1], SETTLE)
        .expect("the balancer drops the lost node");
    let balancer_mark = lb_load.attempts_so_far().len();
    eprintln!(
        "the balancer stopped using the lost node after {:?}",
        lost_at.elapsed()
    );
    cluster.forget_node(LOST);
    let forgotten_at = Instant::now();
    cluster.wait_converged();
    eprintln!(
        "the other nodes followed the slices {:?} after the pods left them",
        forgotten_at.elapsed()
    );
    let marks: Vec<usize> = loads
        .iter()
        .map(|(_, load)| load.attempts_so_far().len())
        .collect();

    for ((what, load), mark) in loads.into_iter().zip(marks) {
        let attempts = load.finish().unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let later = attempts.get(mark + 1..).unwrap_or_default();
        assert!(!later.is_empty(), "{what}: the load ended too early");
        all_ok(
            later,
            &format!(
                "{what} after the slices changed (from attempt {})",
                mark + 1
            ),
        );
        assert!(
            reached(later).is_disjoint(&lost_pods),
            "{what}: new connections to deleted pods"
        );
        eprintln!(
            "{what}: {} connections, {} failed while the node was lost and still listed, 0 after",
            attempts.len(),
            failures(&attempts).len()
        );
    }
    let attempts = lb_load.finish().expect("LB load");
    let later = attempts.get(balancer_mark + 1..).unwrap_or_default();
    assert!(!later.is_empty(), "the LB load ended too early");
    all_ok(later, "LB IP after the balancer dropped the lost node");
    assert_eq!(
        cluster.balancer().history().last(),
        Some(&vec![0, 1]),
        "the balancer went back to the lost node"
    );
}

#[test]
fn topology_and_traffic_policies_hold_across_nodes() {
    require_root!();
    // Zones round robin over two: nodes 0 and 2 in zone-a, node 1 in zone-b.
    let near_vip = Ipv4Addr::new(10, 96, 0, 20);
    let local_vip = Ipv4Addr::new(10, 96, 0, 21);
    let near = ClusterService::new(ExternalService::new(
        "near",
        ServiceType::ClusterIp,
        &[near_vip.into()],
        PORT,
    ))
    .prefer_close();
    let local = ClusterService::new(ExternalService::new(
        "local",
        ServiceType::ClusterIp,
        &[local_vip.into()],
        PORT,
    ))
    .internal_local();
    // The eTP Local LoadBalancer has endpoints on nodes 0 and 1 only.
    let lb = web_lb().on_nodes(&[0, 1]);
    let cluster = cluster_with(vec![near, local, lb]);
    assert_eq!(
        (cluster.zone(0), cluster.zone(1), cluster.zone(2)),
        ("zone-a", "zone-b", "zone-a")
    );

    for node in 0..NODES {
        let same_zone: Vec<usize> = (0..NODES)
            .filter(|other| cluster.zone(*other) == cluster.zone(node))
            .collect();
        let attempts = cluster.pod_client(node, &tcp(sa(near_vip, PORT), BURST));
        all_ok(&attempts, &format!("PreferClose from node {node}"));
        assert_eq!(
            reached(&attempts),
            names_on(&cluster, &same_zone),
            "PreferClose from node {node} stays in {}",
            cluster.zone(node)
        );
        let attempts = cluster.pod_client(node, &tcp(sa(local_vip, PORT), BURST));
        all_ok(
            &attempts,
            &format!("internalTrafficPolicy Local from node {node}"),
        );
        assert_eq!(
            reached(&attempts),
            names_on(&cluster, &[node]),
            "internalTrafficPolicy Local from node {node} stays on it"
        );
    }

    // Each node's health-check node port answers for its own endpoints.
    let per_node = LOCAL_ENDPOINT_ADDRESSES_PER_POD * PODS_PER_NODE;
    for (node, expected) in [(0, per_node), (1, per_node), (2, 0)] {
        let (status, body) = cluster.health_check(node, LB_HEALTH_PORT);
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON health check");
        assert_eq!(body["localEndpoints"], expected, "node {node}: {body}");
        assert_eq!(status, if expected > 0 { 200 } else { 503 }, "node {node}");
    }
    cluster
        .balancer()
        .wait_for(&[0, 1], SETTLE)
        .expect("the balancer uses the nodes with endpoints");
    let attempts = cluster.outside_client(&tcp(sa(LB_IP, PORT), BURST).ask_peer());
    all_ok(&attempts, "LB IP");
    assert_eq!(reached(&attempts), names_on(&cluster, &[0, 1]));
    for attempt in &attempts {
        assert_eq!(
            attempt.seen_as.map(|seen| seen.ip()),
            Some(IpAddr::V4(CLIENT)),
            "the client's address is preserved end to end: {attempt:?}"
        );
    }
    // Straight to a node's NodePort: its own endpoints, client address kept; a node without
    // any drops.
    for node in [0, 1] {
        let target = sa(cluster.node_address(node), LB_NODE_PORT);
        let attempts = cluster.outside_client(&tcp(target, 20).ask_peer());
        all_ok(&attempts, &format!("eTP Local NodePort of node {node}"));
        assert!(reached(&attempts).is_subset(&names_on(&cluster, &[node])));
        assert!(
            attempts
                .iter()
                .all(|a| a.seen_as.map(|s| s.ip()) == Some(IpAddr::V4(CLIENT)))
        );
    }
    let target = sa(cluster.node_address(2), LB_NODE_PORT);
    let attempts = cluster.outside_client(&tcp(target, 2));
    assert!(
        attempts.iter().all(|a| !a.ok),
        "node 2 has no local endpoint, yet: {attempts:?}"
    );
}

/// A client port whose SYN went to a pod of the lost node (unanswered) and that connects again
/// from the same port once the pod left the slices must get a live pod: a new connection never
/// goes to a deleted pod, even when its tuple matches an unanswered flow's.
#[test]
fn a_client_port_that_met_a_lost_pod_reaches_a_live_pod_after_the_slices_change() {
    const LOST: usize = 2;
    const PORTS: u16 = 24;
    require_root!();
    let mut cluster = cluster_with(vec![web()]);
    let lost_pods = names_on(&cluster, &[LOST]);
    cluster.lose_node(LOST);
    let target = sa(cluster.node_address(0), WEB_NODE_PORT);
    let first: Vec<(u16, RunningClient)> = (0..PORTS)
        .map(|i| {
            let port = 50_000 + i;
            let request = tcp(target, 1).source_port(port);
            (port, cluster.spawn_outside_client(&request))
        })
        .collect();
    let unanswered: Vec<u16> = first
        .into_iter()
        .filter_map(|(port, client)| {
            let attempts = client.finish().expect("client");
            attempts.iter().any(|a| !a.ok).then_some(port)
        })
        .collect();
    // Each port met one of the lost node's 2 pods out of 6 with probability 1/3.
    assert!(
        !unanswered.is_empty(),
        "no port met a lost pod; the check below would prove nothing"
    );
    cluster.forget_node(LOST);
    cluster.wait_converged();
    for port in unanswered {
        let attempts = cluster.outside_client(&tcp(target, 1).source_port(port));
        all_ok(
            &attempts,
            &format!("client port {port} after the slices changed"),
        );
        assert!(reached(&attempts).is_disjoint(&lost_pods));
    }
}
