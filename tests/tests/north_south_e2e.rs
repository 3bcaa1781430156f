//! End-to-end tests of the north-south (TC) datapath with real packets: a client outside the
//! cluster (its own namespace, not in the hooked cgroup) reaches NodePorts, externalIPs and
//! LoadBalancer IPs of the node running the agent, whose backends are a local pod and a pod
//! behind a second node. See `switchyard_tests::world::north_south` for the topology; no namespace
//! has a route off the machine.
//!
//! Every wait is bounded; the slowest checks are the DROP ones, which need a client timeout.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::process::Command;
use std::time::{Duration, Instant};

use switchyard_tests::client::report::{Attempt, backend_counts};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest, RunningClient};
use switchyard_tests::env::process::run_checked;
use switchyard_tests::k8s::external_service::{
    ExternalService, SERVICE_NAMESPACE, ServiceType, manifests,
};
use switchyard_tests::world::north_south::{
    BACKEND_PORT, CLIENT4, CLIENT6, LOCAL_BACKEND, LOCAL_POD4, LOCAL_POD6, NODE_EXT4, NODE_EXT6,
    NODE_POD_GW4, NorthSouth, Offloads, REMOTE_BACKEND, REMOTE_NODE_NAME, REMOTE_POD4, REMOTE_POD6,
};
use switchyard_tests::{require_root, testkit};

const ETIMEDOUT: i32 = libc::ETIMEDOUT;
const ECONNREFUSED: i32 = libc::ECONNREFUSED;
const EHOSTUNREACH: i32 = libc::EHOSTUNREACH;
const ENETUNREACH: i32 = libc::ENETUNREACH;
/// The agent's default `--snat-port-range`.
const DEFAULT_SNAT_PORTS: RangeInclusive<u16> =
    proxy_common::DEFAULT_SNAT_PORTS.0..=proxy_common::DEFAULT_SNAT_PORTS.1;
/// Client timeout for checks that expect a DROP (the client must wait this long).
const DROP_TIMEOUT: Duration = Duration::from_secs(1);
/// A REJECT (RST or ICMP) arrives in well under this.
const IMMEDIATE_MS: u64 = 500;
const SERVICE_PORT: u16 = 80;
/// A port nothing listens on in the backends.
const CLOSED_PORT: u16 = 8081;
/// Exchanges per protocol and frontend where both backends must answer: with a random
/// choice between two, one backend is missed with probability 2^-19.
const BALANCE_COUNT: u32 = 20;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid IP literal")
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// eTP Cluster: LoadBalancer with NodePort 30080, externalIP .20 and LB IP .10, both backends.
fn web() -> ExternalService {
    ExternalService::new(
        "web",
        ServiceType::LoadBalancer,
        &[ip("10.96.50.10")],
        SERVICE_PORT,
    )
    .node_port(30080)
    .external_ip(ip("198.51.100.20"))
    .ingress_ip(ip("198.51.100.10"))
    .local_endpoints()
    .remote_endpoints()
}

/// eTP Local: NodePort 30081, externalIP .21, LB IP .11, both backends (one local).
fn web_local() -> ExternalService {
    ExternalService::new(
        "web-local",
        ServiceType::LoadBalancer,
        &[ip("10.96.50.11")],
        SERVICE_PORT,
    )
    .node_port(30081)
    .external_ip(ip("198.51.100.21"))
    .ingress_ip(ip("198.51.100.11"))
    .local(32081)
    .local_endpoints()
    .remote_endpoints()
}

/// Dual-stack eTP Cluster: NodePort 30082, externalIPs .22 / ::22, LB IPs .12 / ::12.
fn web_dual() -> ExternalService {
    ExternalService::new(
        "web-dual",
        ServiceType::LoadBalancer,
        &[ip("10.96.50.12"), ip("fd00:96::50:12")],
        SERVICE_PORT,
    )
    .node_port(30082)
    .external_ip(ip("198.51.100.22"))
    .external_ip(ip("2001:db8:5e::22"))
    .ingress_ip(ip("198.51.100.12"))
    .ingress_ip(ip("2001:db8:5e::12"))
    .local_endpoints()
    .remote_endpoints()
}

/// (label, address) of each external frontend of `service` in one family, as the outside
/// client reaches them: NodePort on the node's client-facing address, externalIPs, LB IPs.
fn frontends(service: &ExternalService, v6: bool) -> Vec<(String, SocketAddr)> {
    let mut all = Vec::new();
    if let Some(node_port) = service.node_port {
        let node = if v6 {
            IpAddr::from(NODE_EXT6)
        } else {
            IpAddr::from(NODE_EXT4)
        };
        all.push((format!("{} NodePort", service.name), sa(node, node_port)));
    }
    for external in service.external_ips.iter().filter(|a| a.is_ipv6() == v6) {
        all.push((
            format!("{} externalIP", service.name),
            sa(*external, service.port),
        ));
    }
    for ingress in service.ingress_ips.iter().filter(|a| a.is_ipv6() == v6) {
        all.push((
            format!("{} LB IP", service.name),
            sa(*ingress, service.port),
        ));
    }
    all
}

fn request(proto: ClientProto, target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(proto, target)
        .count(count)
        .timeout(Duration::from_millis(1500))
        .ask_peer()
}

/// Runs every request from the outside client at the same time; results in request order.
fn outside_all(ns: &NorthSouth, requests: &[ClientRequest]) -> Vec<Vec<Attempt>> {
    let running: Vec<RunningClient> = requests.iter().map(|r| ns.spawn_outside(r)).collect();
    running
        .into_iter()
        .zip(requests)
        .map(|(client, request)| {
            client
                .finish()
                .unwrap_or_else(|e| panic!("outside client {request:?}: {e:#}"))
        })
        .collect()
}

fn reached(attempts: &[Attempt]) -> BTreeSet<String> {
    backend_counts(attempts).into_keys().collect()
}

fn both_backends() -> BTreeSet<String> {
    BTreeSet::from([LOCAL_BACKEND.to_owned(), REMOTE_BACKEND.to_owned()])
}

fn only_local() -> BTreeSet<String> {
    BTreeSet::from([LOCAL_BACKEND.to_owned()])
}

fn assert_all_ok(attempts: &[Attempt], what: &str) {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty() && !attempts.is_empty(),
        "{what}: {} of {} attempts failed, e.g. {:?}",
        failed.len(),
        attempts.len(),
        failed.first()
    );
}

/// What the client sees must be the frontend it used: getpeername for connected sockets, and
/// the reply's source address for every UDP exchange (the reverse translation).
fn assert_answers_come_from(attempts: &[Attempt], target: SocketAddr, what: &str) {
    for attempt in attempts {
        assert_eq!(attempt.peer, Some(target), "{what}: peer of {attempt:?}");
        if let Some(source) = attempt.source {
            assert_eq!(source, target, "{what}: reply source of {attempt:?}");
        }
    }
}

/// eTP Cluster over every protocol to each frontend: every exchange works, both backends
/// answer, answers come from the frontend, and each backend saw a node address with a source
/// port from `snat_ports`.
fn check_masqueraded_balance(
    ns: &NorthSouth,
    targets: &[(String, SocketAddr)],
    count: u32,
    snat_ports: &RangeInclusive<u16>,
) {
    let mut requests = Vec::new();
    let mut labels = Vec::new();
    for (label, target) in targets {
        for proto in ClientProto::ALL {
            requests.push(request(proto, *target, count));
            labels.push((format!("{proto:?} to {label} {target}"), *target));
        }
    }
    let node_addresses = ns.node_addresses();
    for (attempts, (what, target)) in outside_all(ns, &requests).iter().zip(&labels) {
        assert_all_ok(attempts, what);
        assert_answers_come_from(attempts, *target, what);
        assert_eq!(reached(attempts), both_backends(), "{what}: {attempts:?}");
        for attempt in attempts {
            let seen = attempt.seen_as.expect("the backend reports what it saw");
            assert!(
                node_addresses.contains(&seen.ip()),
                "{what}: eTP Cluster must masquerade to a node address, the backend saw {seen} \
                 ({attempt:?})"
            );
            assert!(
                snat_ports.contains(&seen.port()),
                "{what}: masqueraded source port {} outside {snat_ports:?} ({attempt:?})",
                seen.port()
            );
        }
    }
}

/// eTP Local from outside: every exchange reaches the local backend only, which sees the
/// client's own address.
fn check_local_preserves_client(ns: &NorthSouth, targets: &[(String, SocketAddr)], count: u32) {
    let mut requests = Vec::new();
    let mut labels = Vec::new();
    for (label, target) in targets {
        for proto in ClientProto::ALL {
            requests.push(request(proto, *target, count));
            labels.push((format!("{proto:?} to {label} {target}"), *target));
        }
    }
    for (attempts, (what, target)) in outside_all(ns, &requests).iter().zip(&labels) {
        assert_all_ok(attempts, what);
        assert_answers_come_from(attempts, *target, what);
        assert_eq!(reached(attempts), only_local(), "{what}: {attempts:?}");
        let client = if target.is_ipv6() {
            IpAddr::from(CLIENT6)
        } else {
            IpAddr::from(CLIENT4)
        };
        for attempt in attempts {
            assert_eq!(
                attempt.seen_as.map(|s| s.ip()),
                Some(client),
                "{what}: eTP Local must keep the client address ({attempt:?})"
            );
        }
    }
}

/// TCP and connected UDP to each target, `count` each, all at once; every attempt must fail
/// with `errno` (ETIMEDOUT for a DROP, after the full timeout; ECONNREFUSED for a REJECT, at
/// once).
fn check_all_fail_with(ns: &NorthSouth, targets: &[(String, SocketAddr)], count: u32, errno: i32) {
    let mut requests = Vec::new();
    let mut labels = Vec::new();
    for (label, target) in targets {
        for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
            requests.push(request(proto, *target, count).timeout(DROP_TIMEOUT));
            labels.push(format!("{proto:?} to {label} {target}"));
        }
    }
    for (attempts, what) in outside_all(ns, &requests).iter().zip(&labels) {
        for attempt in attempts {
            assert_eq!(attempt.errno, Some(errno), "{what}: {attempt:?}");
            assert!(
                !attempt.ok && attempt.backend.is_none(),
                "{what}: {attempt:?}"
            );
            if errno == ETIMEDOUT {
                assert!(
                    attempt.elapsed_ms + 50 >= u64::try_from(DROP_TIMEOUT.as_millis()).unwrap(),
                    "{what}: a DROP makes the client wait its whole timeout: {attempt:?}"
                );
            } else {
                assert!(
                    attempt.elapsed_ms < IMMEDIATE_MS,
                    "{what}: a REJECT answers at once: {attempt:?}"
                );
            }
        }
    }
}

/// Starts the agent on `services` and waits until the outside client gets an answer from a
/// backend through the first service's first frontend.
fn start(ns: &mut NorthSouth, services: &[&ExternalService], extra_args: &[&str]) {
    ns.write_manifests(&manifests(services));
    ns.start_agent(extra_args);
    let (label, target) = frontends(services[0], false)
        .into_iter()
        .next()
        .expect("an external frontend");
    ns.wait_outside(
        &request(ClientProto::Tcp, target, 1),
        &format!("answer from a backend through {label}"),
        |a| a.ok && [LOCAL_BACKEND, REMOTE_BACKEND].contains(&a.backend.as_deref().unwrap_or("")),
    );
}

fn counter(ns: &NorthSouth, name: &str) -> u64 {
    ns.datapath_counters().get(name).copied().unwrap_or(0)
}

/// Readies the veth peers around the node for the XDP fast path.
fn prepare_xdp_peers(ns: &NorthSouth) {
    // XDP_REDIRECT into a veth queues the frame on its peer's NAPI ring: the peer
    // must run XDP or have GRO on (the kernel's veth XDP notes). The node's own
    // ends get XDP from the agent; the peers outside the node get GRO. They also
    // send full checksums, as frames from a wire have them (XDP passes frames
    // whose checksum offload is pending to TC: see `xdp::checksum_pending`).
    let node = ns.node_namespace().to_owned();
    for (netns, device) in ns.links().to_vec() {
        if netns != node {
            run_checked(
                Command::new("ip").args([
                    "netns", "exec", &netns, "ethtool", "-K", &device, "gro", "on", "tx", "off",
                ]),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("GRO on {netns}/{device}: {e:#}"));
        }
    }
}

/// Which north-south datapath a test runs on: TC alone, or TC with the XDP fast path
/// (`--xdp-mode native`), where the same checks must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    Tc,
    Xdp,
}

impl Datapath {
    /// Prepares the topology and starts the agent on `services` (see [`start`]).
    fn start(self, ns: &mut NorthSouth, services: &[&ExternalService]) {
        match self {
            Self::Tc => start(ns, services, &[]),
            Self::Xdp => {
                prepare_xdp_peers(ns);
                start(ns, services, &["--xdp-mode", "native"]);
            }
        }
    }

    /// With XDP, the traffic of the test went through it: flows' packets both ways were
    /// forwarded by XDP (the counters TC and XDP share), not only by TC.
    fn assert_used(self, ns: &NorthSouth) {
        if self == Self::Xdp {
            let counters = ns.datapath_counters();
            for name in ["xdp_forwarded", "xdp_replied", "tc_new_flow"] {
                assert!(
                    counters.get(name).copied().unwrap_or(0) > 0,
                    "with --xdp-mode native, {name} must have counted packets: {counters:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn topology_self_test_routes_plainly_and_nothing_leaves() {
    require_root!();
    let ns = NorthSouth::new(testkit!(), Offloads::On);

    // Plain routing, no agent: the client reaches both pods through the node (and node2), and
    // the pods see the client's own address.
    for (pod, name, client) in [
        (
            IpAddr::from(LOCAL_POD4),
            LOCAL_BACKEND,
            IpAddr::from(CLIENT4),
        ),
        (
            IpAddr::from(REMOTE_POD4),
            REMOTE_BACKEND,
            IpAddr::from(CLIENT4),
        ),
        (
            IpAddr::from(LOCAL_POD6),
            LOCAL_BACKEND,
            IpAddr::from(CLIENT6),
        ),
        (
            IpAddr::from(REMOTE_POD6),
            REMOTE_BACKEND,
            IpAddr::from(CLIENT6),
        ),
    ] {
        for proto in ClientProto::ALL {
            let target = sa(pod, BACKEND_PORT);
            let attempts = ns.outside(&request(proto, target, 3));
            let what = format!("{proto:?} from the client to pod {target}");
            assert_all_ok(&attempts, &what);
            assert_answers_come_from(&attempts, target, &what);
            for attempt in &attempts {
                assert_eq!(attempt.backend.as_deref(), Some(name), "{what}");
                assert_eq!(attempt.seen_as.map(|s| s.ip()), Some(client), "{what}");
            }
        }
    }

    // No default route anywhere but in the pods (whose default is their node).
    for netns in [
        ns.client_namespace(),
        ns.node_namespace(),
        ns.node2_namespace(),
    ] {
        for family in ["-4", "-6"] {
            let output = std::process::Command::new("ip")
                .args(["-n", netns, family, "route", "show", "default"])
                .output()
                .expect("ip route");
            assert!(
                output.status.success() && output.stdout.is_empty(),
                "{netns} has a default route ({family}): {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                ns.describe()
            );
        }
    }

    // Addresses nobody routes fail at once; addresses routed to the node but owned by nobody
    // fail at the node (ICMP unreachable) or time out: nothing is forwarded further.
    let fast = ClientRequest::new(ClientProto::Tcp, sa(ip("192.0.2.1"), 80))
        .timeout(Duration::from_millis(800));
    for netns in [
        ns.client_namespace(),
        ns.node_namespace(),
        ns.node2_namespace(),
    ] {
        let attempts = ns.unhooked_in(netns, &fast);
        assert_eq!(
            attempts[0].errno,
            Some(ENETUNREACH),
            "TCP from {netns} to an unrouted address: {attempts:?}"
        );
    }
    for target in [sa(ip("198.51.100.254"), 80), sa(ip("2001:db8:5e::fe"), 80)] {
        for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
            let attempts =
                ns.outside(&ClientRequest::new(proto, target).timeout(Duration::from_millis(800)));
            assert!(
                attempts
                    .iter()
                    .all(|a| !a.ok
                        && matches!(a.errno, Some(EHOSTUNREACH | ENETUNREACH | ETIMEDOUT))),
                "{proto:?} to {target}, routed to the node but owned by nobody: {attempts:?}"
            );
        }
    }
    for pod_netns in [ns.local_backend_namespace(), ns.remote_backend_namespace()] {
        let attempts = ns.unhooked_in(pod_netns, &fast);
        assert!(
            attempts
                .iter()
                .all(|a| !a.ok && matches!(a.errno, Some(EHOSTUNREACH | ENETUNREACH | ETIMEDOUT))),
            "TCP from pod {pod_netns} to an address beyond its node: {attempts:?}"
        );
    }

    // Without the agent a NodePort is just a closed port of the node.
    let attempts = ns.outside(&ClientRequest::new(ClientProto::Tcp, sa(NODE_EXT4, 30080)));
    assert_eq!(attempts[0].errno, Some(ECONNREFUSED), "{attempts:?}");
}

#[test]
fn etp_cluster_balances_node_port_external_ip_and_lb_ip_and_masquerades() {
    require_root!();
    etp_cluster_balances_node_port_external_ip_and_lb_ip_and_masquerades_on(Datapath::Tc);
}

#[test]
fn etp_cluster_balances_node_port_external_ip_and_lb_ip_and_masquerades_with_xdp() {
    require_root!();
    etp_cluster_balances_node_port_external_ip_and_lb_ip_and_masquerades_on(Datapath::Xdp);
}

fn etp_cluster_balances_node_port_external_ip_and_lb_ip_and_masquerades_on(datapath: Datapath) {
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let web = web();
    datapath.start(&mut ns, &[&web]);

    let mut targets = frontends(&web, false);
    // The NodePort is open on every node address, not only the client-facing one.
    targets.push((
        "web NodePort (pod-link address)".into(),
        sa(NODE_POD_GW4, 30080),
    ));
    check_masqueraded_balance(&ns, &targets, BALANCE_COUNT, &DEFAULT_SNAT_PORTS);
    let counters = ns.datapath_counters();
    assert!(
        counters.get("tc_new_flow").copied().unwrap_or(0) > 0,
        "new flows through TC are counted: {counters:?}"
    );
    check_inspect_lists_masqueraded_flows(&ns, &targets);
    datapath.assert_used(&ns);
}

/// `inspect conntrack` lists the flows just made (still within their closing lifetime): the
/// outside client to each frontend, masqueraded to a node address, to a backend of `ns/web`.
fn check_inspect_lists_masqueraded_flows(ns: &NorthSouth, targets: &[(String, SocketAddr)]) {
    let listed = ns.inspect_json("conntrack");
    let flows: Vec<&serde_json::Value> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item["kind"] == "tc")
        .collect();
    let node_addresses = ns.node_addresses();
    let backends = [
        sa(LOCAL_POD4, BACKEND_PORT).to_string(),
        sa(REMOTE_POD4, BACKEND_PORT).to_string(),
    ];
    for (label, target) in targets {
        for protocol in ["tcp", "udp"] {
            let flow = flows
                .iter()
                .find(|f| f["frontend"] == target.to_string() && f["protocol"] == protocol)
                .unwrap_or_else(|| panic!("no {protocol} flow to {label} {target} in {listed:#}"));
            let text = |field: &str| flow[field].as_str().unwrap_or_default().to_owned();
            assert_eq!(
                flow["service"],
                format!("{SERVICE_NAMESPACE}/web:{protocol}")
            );
            assert_eq!(
                text("client").parse::<SocketAddr>().map(|c| c.ip()),
                Ok(IpAddr::from(CLIENT4))
            );
            assert_eq!(flow["masqueraded"], true, "{flow}");
            let source: SocketAddr = text("translated_source").parse().expect("an address");
            assert!(node_addresses.contains(&source.ip()), "{flow}");
            assert!(DEFAULT_SNAT_PORTS.contains(&source.port()), "{flow}");
            assert!(backends.contains(&text("backend")), "{flow}");
            assert!(flow["expires_in_seconds"].as_u64().is_some(), "{flow}");
        }
    }
}

#[test]
fn ipv6_frontends_balance_and_masquerade() {
    require_root!();
    ipv6_frontends_balance_and_masquerade_on(Datapath::Tc);
}

#[test]
fn ipv6_frontends_balance_and_masquerade_with_xdp() {
    require_root!();
    ipv6_frontends_balance_and_masquerade_on(Datapath::Xdp);
}

fn ipv6_frontends_balance_and_masquerade_on(datapath: Datapath) {
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let dual = web_dual();
    datapath.start(&mut ns, &[&dual]);

    check_masqueraded_balance(
        &ns,
        &frontends(&dual, true),
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );
    // The IPv4 frontends of the same dual-stack Service work as well.
    check_masqueraded_balance(
        &ns,
        &frontends(&dual, false),
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );
    datapath.assert_used(&ns);
}

#[test]
fn etp_local_keeps_the_client_address_then_drops_then_rejects() {
    require_root!();
    etp_local_keeps_the_client_address_then_drops_then_rejects_on(Datapath::Tc);
}

#[test]
fn etp_local_keeps_the_client_address_then_drops_then_rejects_with_xdp() {
    require_root!();
    etp_local_keeps_the_client_address_then_drops_then_rejects_on(Datapath::Xdp);
}

fn etp_local_keeps_the_client_address_then_drops_then_rejects_on(datapath: Datapath) {
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let service = web_local();
    datapath.start(&mut ns, &[&service]);
    let targets = frontends(&service, false);

    // Endpoints here and on node-b: only the local one answers, and it sees the client.
    check_local_preserves_client(&ns, &targets, 12);

    // Only a remote endpoint: DROP, the client times out.
    ns.write_manifests(&manifests(&[&service
        .clone()
        .without_endpoints()
        .remote_endpoints()]));
    let (label, nodeport) = targets[0].clone();
    ns.wait_outside(
        &request(ClientProto::Tcp, nodeport, 1).timeout(DROP_TIMEOUT),
        &format!("DROP (timeout) at {label} with only a remote endpoint"),
        |a| a.errno == Some(ETIMEDOUT),
    );
    let dropped_before = counter(&ns, "tc_dropped_no_local_endpoint");
    check_all_fail_with(&ns, &targets, 2, ETIMEDOUT);
    assert!(
        counter(&ns, "tc_dropped_no_local_endpoint") > dropped_before,
        "drops for lack of a local endpoint are counted"
    );

    // No endpoint at all: REJECT, TCP RST and ICMP port unreachable give ECONNREFUSED at once.
    ns.write_manifests(&manifests(&[&service.clone().without_endpoints()]));
    ns.wait_outside(
        &request(ClientProto::Tcp, nodeport, 1).timeout(DROP_TIMEOUT),
        &format!("REJECT at {label} without endpoints"),
        |a| a.errno == Some(ECONNREFUSED),
    );
    let rejected_before = counter(&ns, "tc_rejected");
    check_all_fail_with(&ns, &targets, 3, ECONNREFUSED);
    assert!(
        counter(&ns, "tc_rejected") > rejected_before,
        "rejections are counted"
    );

    // And back: the local endpoint serves again.
    ns.write_manifests(&manifests(&[&service]));
    ns.wait_outside(
        &request(ClientProto::Tcp, nodeport, 1),
        &format!("answer at {label} once the local endpoint is back"),
        |a| a.ok,
    );
    check_local_preserves_client(&ns, &targets, 4);
    datapath.assert_used(&ns);
}

#[test]
fn load_balancer_source_ranges_drop_outside_sources_on_lb_ips_only() {
    require_root!();
    load_balancer_source_ranges_drop_outside_sources_on_lb_ips_only_on(Datapath::Tc);
}

#[test]
fn load_balancer_source_ranges_drop_outside_sources_on_lb_ips_only_with_xdp() {
    require_root!();
    load_balancer_source_ranges_drop_outside_sources_on_lb_ips_only_on(Datapath::Xdp);
}

fn load_balancer_source_ranges_drop_outside_sources_on_lb_ips_only_on(datapath: Datapath) {
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let lb = |name: &str, last: u8, node_port: u16| {
        ExternalService::new(
            name,
            ServiceType::LoadBalancer,
            &[IpAddr::from([10, 96, 51, last])],
            SERVICE_PORT,
        )
        .node_port(node_port)
        .ingress_ip(IpAddr::from([198, 51, 100, last]))
        .local_endpoints()
        .remote_endpoints()
    };
    // The client (203.0.113.2) is inside 203.0.113.0/28 and outside 192.0.2.0/24.
    let allowed = lb("lb-allowed", 30, 30030)
        .source_range("192.0.2.0/24")
        .source_range("203.0.113.0/28");
    let denied = lb("lb-denied", 31, 30031)
        .source_range("192.0.2.0/24")
        .external_ip(ip("198.51.100.33"));
    // Ranges are whitespace-trimmed (kube-proxy).
    let trimmed = lb("lb-trimmed", 32, 30032).source_range(" 203.0.113.0/28");
    datapath.start(&mut ns, &[&allowed, &denied, &trimmed]);

    let lb_ip = |service: &ExternalService| {
        (
            format!("{} LB IP", service.name),
            sa(service.ingress_ips[0], SERVICE_PORT),
        )
    };
    check_masqueraded_balance(
        &ns,
        &[lb_ip(&allowed), lb_ip(&trimmed)],
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );

    let before = counter(&ns, "tc_dropped_source_range");
    check_all_fail_with(&ns, &[lb_ip(&denied)], 2, ETIMEDOUT);
    assert!(
        counter(&ns, "tc_dropped_source_range") > before,
        "source-range drops are counted"
    );

    // Source ranges apply to LB IPs only: the same Service's NodePort and externalIP serve.
    check_masqueraded_balance(
        &ns,
        &[
            ("lb-denied NodePort".into(), sa(NODE_EXT4, 30031)),
            ("lb-denied externalIP".into(), sa(ip("198.51.100.33"), 80)),
        ],
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );
    datapath.assert_used(&ns);
}

#[test]
fn stale_conntrack_of_an_etp_local_node_port_never_rewrites_a_direct_connection() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    // Local endpoint only: the backend sees the client's own address and port, so the reply
    // tuple of the NodePort flow is exactly the tuple of a direct connection from that port.
    let service = web_local().without_endpoints().local_endpoints();
    start(&mut ns, &[&service], &[]);
    let nodeport = sa(NODE_EXT4, 30081);
    let pod = sa(LOCAL_POD4, BACKEND_PORT);

    for port in 40_001..=40_008_u16 {
        let client = sa(CLIENT4, port);
        let via_nodeport = ns.outside(
            &ClientRequest::new(ClientProto::Tcp, nodeport)
                .source_port(port)
                .ask_peer(),
        );
        let what = format!("TCP from {client} to NodePort {nodeport}");
        assert_all_ok(&via_nodeport, &what);
        assert_eq!(via_nodeport[0].seen_as, Some(client), "{what}");
        assert_eq!(via_nodeport[0].backend.as_deref(), Some(LOCAL_BACKEND));

        // Same client port, straight to the pod (routed through the node, not a service): the
        // backend's SYN-ACK matches the old flow's reply tuple and must not be rewritten.
        let direct = ns.outside(
            &ClientRequest::new(ClientProto::Tcp, pod)
                .source_port(port)
                .ask_peer(),
        );
        let what = format!("TCP from {client} directly to pod {pod} after the NodePort flow");
        assert_all_ok(&direct, &what);
        assert_eq!(direct[0].seen_as, Some(client), "{what}");
        assert_eq!(direct[0].peer, Some(pod), "{what}");
    }
    let counters = ns.datapath_counters();
    eprintln!(
        "stale-conntrack trap: tc_stale_ct_purged={:?} tc_syn_restarted={:?}",
        counters.get("tc_stale_ct_purged"),
        counters.get("tc_syn_restarted")
    );
}

#[test]
fn checksums_stay_correct_with_veth_offloads_off() {
    require_root!();
    checksums_stay_correct_with_veth_offloads_off_on(Datapath::Tc);
}

#[test]
fn checksums_stay_correct_with_veth_offloads_off_with_xdp() {
    require_root!();
    checksums_stay_correct_with_veth_offloads_off_on(Datapath::Xdp);
}

fn checksums_stay_correct_with_veth_offloads_off_on(datapath: Datapath) {
    let mut ns = NorthSouth::new(testkit!(), Offloads::Off);
    let (cluster, local, dual) = (web(), web_local(), web_dual());
    // Answers the datapath makes up (REJECT: TCP RST, ICMP port unreachable) and errors from
    // a backend (its RST, its ICMP port unreachable, translated back) must carry correct
    // checksums too, or the client drops them and times out instead of being refused.
    let empty = ExternalService::new(
        "web-empty",
        ServiceType::NodePort,
        &[ip("10.96.50.13"), ip("fd00:96::50:13")],
        SERVICE_PORT,
    )
    .node_port(30083);
    let closed = ExternalService::new(
        "web-closed",
        ServiceType::NodePort,
        &[ip("10.96.50.14"), ip("fd00:96::50:14")],
        SERVICE_PORT,
    )
    .node_port(30084)
    .backend_port(CLOSED_PORT)
    .local_endpoints()
    .remote_endpoints();
    datapath.start(&mut ns, &[&cluster, &local, &dual, &empty, &closed]);
    let watched = [
        ns.client_namespace().to_owned(),
        ns.local_backend_namespace().to_owned(),
        ns.remote_backend_namespace().to_owned(),
        ns.node_namespace().to_owned(),
        ns.node2_namespace().to_owned(),
    ];

    check_masqueraded_balance(
        &ns,
        &frontends(&cluster, false),
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );
    check_masqueraded_balance(
        &ns,
        &frontends(&dual, true),
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );
    check_local_preserves_client(&ns, &frontends(&local, false), 6);
    for v6 in [false, true] {
        let before = counter(&ns, "tc_rejected");
        check_all_fail_with(&ns, &frontends(&empty, v6), 3, ECONNREFUSED);
        assert!(counter(&ns, "tc_rejected") > before, "REJECTs are counted");
        check_all_fail_with(&ns, &frontends(&closed, v6), 3, ECONNREFUSED);
    }
    // Plain forwarded traffic as a control.
    for target in [sa(REMOTE_POD4, BACKEND_PORT), sa(REMOTE_POD6, BACKEND_PORT)] {
        for proto in ClientProto::ALL {
            assert_all_ok(
                &ns.outside(&request(proto, target, 3)),
                &format!("{proto:?} directly to {target}"),
            );
        }
    }

    for netns in &watched {
        let errors = ns.checksum_errors(netns);
        eprintln!("checksum error counters in {netns}: {errors:?}");
        assert!(
            errors.values().all(|&n| n == 0),
            "checksum errors in {netns}: {errors:?}"
        );
    }
    datapath.assert_used(&ns);
}

#[test]
fn agent_sigkill_and_restart_keep_established_flows_and_fail_no_new_connection() {
    require_root!();
    agent_sigkill_and_restart_keep_established_flows_and_fail_no_new_connection_on(Datapath::Tc);
}

#[test]
fn agent_sigkill_and_restart_keep_established_flows_and_fail_no_new_connection_with_xdp() {
    require_root!();
    agent_sigkill_and_restart_keep_established_flows_and_fail_no_new_connection_on(Datapath::Xdp);
}

fn agent_sigkill_and_restart_keep_established_flows_and_fail_no_new_connection_on(
    datapath: Datapath,
) {
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let (cluster, local) = (web(), web_local());
    datapath.start(&mut ns, &[&cluster, &local]);
    let nodeport = sa(NODE_EXT4, 30080);
    let lb_ip = sa(ip("198.51.100.10"), SERVICE_PORT);
    let local_lb_ip = sa(ip("198.51.100.11"), SERVICE_PORT);

    let hold_for = Duration::from_secs(12);
    let every = Duration::from_millis(100);
    let holds = [
        ("TCP hold to the NodePort (masqueraded)", nodeport, false),
        ("UDP hold to the LB IP (masqueraded)", lb_ip, true),
        ("TCP hold to the eTP Local LB IP", local_lb_ip, false),
    ]
    .map(|(what, target, udp)| (what, ns.outside_hold(target, hold_for, every, udp)));
    for (what, hold) in &holds {
        hold.wait_for_attempts(1, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
    // New connections all along: at most 160 per loop, about 8 s.
    let loops = [
        request(ClientProto::Tcp, nodeport, 160)
            .interval(Duration::from_millis(50))
            .timeout(Duration::from_secs(2)),
        request(ClientProto::UdpConnected, lb_ip, 160)
            .interval(Duration::from_millis(50))
            .timeout(Duration::from_secs(2)),
        request(ClientProto::Tcp, local_lb_ip, 160)
            .interval(Duration::from_millis(50))
            .timeout(Duration::from_secs(2)),
    ];
    let running: Vec<RunningClient> = loops.iter().map(|r| ns.spawn_outside(r)).collect();

    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    ns.agent().kill().expect("SIGKILL the agent");
    std::thread::sleep(Duration::from_millis(1500));
    ns.agent().restart().expect("restarting the agent");
    eprintln!("agent down for {:?}", killed.elapsed());

    for (client, request) in running.into_iter().zip(&loops) {
        let attempts = client.finish().expect("connection loop");
        let what = format!(
            "{:?} loop to {} across the restart",
            request.proto, request.target
        );
        assert_eq!(attempts.len(), 160, "{what}");
        assert_all_ok(&attempts, &what);
        assert_answers_come_from(&attempts, request.target, &what);
    }
    for (what, hold) in holds {
        let attempts = hold.finish().expect("hold");
        assert!(
            attempts.len() >= 100,
            "{what}: only {} requests",
            attempts.len()
        );
        assert_all_ok(&attempts, what);
        // The same flow all along: same backend, same translated source.
        let backends: BTreeSet<_> = attempts.iter().map(|a| a.backend.clone()).collect();
        let seen: BTreeSet<_> = attempts.iter().map(|a| a.seen_as).collect();
        assert_eq!(backends.len(), 1, "{what}: backend changed: {backends:?}");
        assert_eq!(seen.len(), 1, "{what}: translated source changed: {seen:?}");
    }
    ns.agent()
        .ensure_running()
        .expect("the restarted agent keeps running");
    check_masqueraded_balance(
        &ns,
        &[("web NodePort".into(), nodeport)],
        BALANCE_COUNT,
        &DEFAULT_SNAT_PORTS,
    );
    datapath.assert_used(&ns);
}

#[test]
fn a_minute_without_the_agent_fails_no_north_south_connection() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let cluster = web();
    start(&mut ns, &[&cluster], &[]);
    let nodeport = sa(NODE_EXT4, 30080);
    let lb_ip = sa(ip("198.51.100.10"), SERVICE_PORT);
    // New connections every 100 ms for 65 s: before, during and after a minute without agent.
    let loops = [
        request(ClientProto::Tcp, nodeport, 650)
            .interval(Duration::from_millis(100))
            .timeout(Duration::from_secs(2)),
        request(ClientProto::UdpConnected, lb_ip, 650)
            .interval(Duration::from_millis(100))
            .timeout(Duration::from_secs(2)),
    ];
    let running: Vec<RunningClient> = loops.iter().map(|r| ns.spawn_outside(r)).collect();
    std::thread::sleep(Duration::from_secs(2));
    ns.agent().kill().expect("SIGKILL the agent");
    std::thread::sleep(Duration::from_mins(1));
    ns.agent().restart().expect("restarting the agent");
    for (client, request) in running.into_iter().zip(&loops) {
        let attempts = client.finish().expect("connection loop");
        let what = format!(
            "{:?} loop to {} across a minute without the agent",
            request.proto, request.target
        );
        assert_eq!(attempts.len(), 650, "{what}");
        assert_all_ok(&attempts, &what);
        assert_answers_come_from(&attempts, request.target, &what);
        eprintln!(
            "MEASURED: {what}: {} exchanges, none failed",
            attempts.len()
        );
    }
    ns.agent()
        .ensure_running()
        .expect("the restarted agent keeps running");
}

#[test]
fn hooked_host_and_pod_clients_reach_node_ports_and_lb_ips_through_the_socket_hooks() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let (cluster, local) = (web(), web_local());
    start(&mut ns, &[&cluster, &local], &[]);
    let before = ns.datapath_counters();

    let targets = [
        ("web NodePort", sa(NODE_EXT4, 30080)),
        ("web NodePort (pod-link address)", sa(NODE_POD_GW4, 30080)),
        ("web LB IP", sa(ip("198.51.100.10"), SERVICE_PORT)),
        ("web externalIP", sa(ip("198.51.100.20"), SERVICE_PORT)),
        // eTP Local short-circuit: in-cluster sources use every endpoint.
        ("web-local NodePort", sa(NODE_EXT4, 30081)),
        ("web-local LB IP", sa(ip("198.51.100.11"), SERVICE_PORT)),
    ];
    for (who, pod) in [("host", false), ("pod", true)] {
        for (label, target) in targets {
            for proto in ClientProto::ALL {
                let request = request(proto, target, BALANCE_COUNT);
                let attempts = if pod {
                    ns.hooked_pod_client(&request)
                } else {
                    ns.hooked_node_client(&request)
                };
                let what = format!("{proto:?} from a hooked {who} to {label} {target}");
                assert_all_ok(&attempts, &what);
                assert_answers_come_from(&attempts, target, &what);
                assert_eq!(reached(&attempts), both_backends(), "{what}");
            }
        }
    }

    let after = ns.datapath_counters();
    let delta = |name: &str| {
        after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(name).copied().unwrap_or(0))
    };
    assert!(
        delta("translated") >= u64::from(2 * 6 * 3 * BALANCE_COUNT),
        "the socket hooks translated the in-cluster connections: before {before:?}, after {after:?}"
    );
    assert_eq!(
        delta("tc_new_flow"),
        0,
        "in-cluster clients must not take the TC path: before {before:?}, after {after:?}"
    );
}

#[test]
fn node_port_addresses_and_snat_port_range_flags() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    // Something of the node's own listens on the NodePort number: addresses outside
    // --nodeport-addresses are not NodePorts and reach it.
    let _node_server = ns
        .testkit()
        .serve(ns.node_namespace(), "node-itself", &[30080])
        .expect("a server of the node's own");
    let cluster = web();
    start(
        &mut ns,
        &[&cluster],
        &[
            "--nodeport-addresses",
            "203.0.113.0/24",
            "--snat-port-range",
            "62000-62099",
        ],
    );

    check_masqueraded_balance(
        &ns,
        &[("web NodePort".into(), sa(NODE_EXT4, 30080))],
        BALANCE_COUNT,
        &(62_000..=62_099),
    );
    // TCP only: the node's own UDP server (unconnected, bound to the wildcard address) would
    // answer from the address of its route to the client, not from the address asked.
    for proto in [ClientProto::Tcp] {
        let target = sa(NODE_POD_GW4, 30080);
        let attempts = ns.outside(&request(proto, target, 4));
        let what = format!("{proto:?} to {target}, a node address outside --nodeport-addresses");
        assert_all_ok(&attempts, &what);
        for attempt in &attempts {
            assert_eq!(attempt.backend.as_deref(), Some("node-itself"), "{what}");
            assert_eq!(
                attempt.seen_as.map(|s| s.ip()),
                Some(IpAddr::from(CLIENT4)),
                "{what}"
            );
        }
    }
}

/// The ServiceCIDR guard on the TC path (KEP-1880, as nftables-mode kube-proxy): a packet
/// that reaches the node for an active ClusterIP on a port it does not serve is refused with a
/// RST, and one for an unallocated address inside a ServiceCIDR is dropped; the ClusterIP's
/// own port still works. The client is a pod outside the hooked cgroup, so its packets go
/// through the node, where only the TC program sees them.
#[test]
fn the_service_cidr_guard_refuses_and_drops_through_the_node() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let service = web();
    ns.write_manifests(&manifests(&[&service]).raw(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.50.0/24]}\n",
    ));
    ns.start_agent(&[]);
    ns.wait_outside(
        &request(ClientProto::Tcp, sa(NODE_EXT4, 30080), 1),
        "an answer through the NodePort",
        |a| a.ok,
    );
    let pod = ns.local_backend_namespace().to_owned();
    let attempt = |target: &str| {
        let target: SocketAddr = target.parse().expect("an address");
        let request = request(ClientProto::Tcp, target, 1).timeout(Duration::from_millis(700));
        ns.unhooked_in(&pod, &request).pop().expect("one attempt")
    };
    let served = attempt("10.96.50.10:80");
    assert!(served.ok, "the ClusterIP's own port: {served:?}");

    let before = ns.datapath_counters();
    let refused = attempt("10.96.50.10:81");
    assert_eq!(
        refused.errno,
        Some(libc::ECONNREFUSED),
        "a port the ClusterIP does not serve: {refused:?}"
    );
    let dropped = attempt("10.96.50.99:80");
    assert_eq!(
        dropped.errno,
        Some(ETIMEDOUT),
        "an unallocated address of the ServiceCIDR: {dropped:?}"
    );
    let after = ns.datapath_counters();
    let moved = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    assert!(moved("tc_guard_rejected") >= 1, "{after:?}");
    assert!(moved("tc_guard_dropped") >= 1, "{after:?}");
}

/// What the TC program logs (aya-log, debug) when a translated destination has no route.
const NO_ROUTE_RECORD: &str = "no route to a translated destination";

/// Sends one connection to `target` from outside (it cannot succeed) and returns the agent's
/// log once the datapath counted a FIB failure for it.
fn provoke_fib_failure(ns: &mut NorthSouth, target: SocketAddr) -> String {
    let before = counter(ns, "tc_fib_failed");
    let attempts =
        ns.outside(&request(ClientProto::Tcp, target, 1).timeout(Duration::from_millis(500)));
    assert!(attempts.iter().all(|a| !a.ok), "{attempts:?}");
    assert!(
        counter(ns, "tc_fib_failed") > before,
        "no FIB failure counted: {:?}",
        ns.datapath_counters()
    );
    ns.agent().log()
}

/// A rare datapath event (a NodePort whose only endpoint the node has no route to) is counted
/// always, and logged by the eBPF program through aya-log into the agent's own log only with
/// `--bpf-log-level`: at the record's level and under `switchyard::bpf`, though the agent's
/// own level stays info.
#[test]
fn a_rare_datapath_event_reaches_the_agents_log_only_with_bpf_logging_on() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let unroutable = ExternalService::new(
        "unroutable",
        ServiceType::NodePort,
        &[ip("10.96.50.40")],
        SERVICE_PORT,
    )
    .node_port(30090)
    .endpoint(ip("100.64.0.9"), REMOTE_NODE_NAME);
    let target = sa(NODE_EXT4, 30090);
    start(&mut ns, &[&web(), &unroutable], &[]);
    let log = provoke_fib_failure(&mut ns, target);
    assert!(!log.contains(NO_ROUTE_RECORD), "logged while off:\n{log}");

    ns.agent()
        .restart_with(&["--bpf-log-level", "debug"])
        .expect("agent restarted");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = provoke_fib_failure(&mut ns, target);
        if let Some(line) = log.lines().find(|line| line.contains(NO_ROUTE_RECORD)) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no aya-log record in the agent's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        line.contains("DEBUG") && line.contains("switchyard::bpf"),
        "{line}"
    );
}

/// Link pins of the TC program on `device`, anywhere under the agent's bpffs directory.
fn tc_link_pins(ns: &NorthSouth, device: &str) -> Vec<String> {
    let prefix = format!("sy_tc_ingress-{device}@");
    let mut found = Vec::new();
    let mut pending = vec![ns.bpffs().agent_dir()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                pending.push(path);
            } else if name.starts_with(&prefix) {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn an_interface_recreated_under_the_running_agent_gets_the_tc_program_again() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let web = web();
    start(&mut ns, &[&web], &[]);
    assert_eq!(tc_link_pins(&ns, "ext0").len(), 1, "attached at start");

    // Same name and addresses, new index: without a new attachment the node's own stack
    // would answer the NodePort with a reset.
    ns.recreate_client_link();
    let node_port = sa(NODE_EXT4, 30080);
    ns.wait_outside(
        &request(ClientProto::Tcp, node_port, 1),
        "answer from a backend through the re-created link",
        |a| a.ok && a.backend.is_some(),
    );
    let targets = [("web NodePort (re-created link)".to_owned(), node_port)];
    check_masqueraded_balance(&ns, &targets, BALANCE_COUNT, &DEFAULT_SNAT_PORTS);
    let pins = tc_link_pins(&ns, "ext0");
    assert_eq!(
        pins.len(),
        1,
        "the defunct link's pin is replaced, not kept beside the new one: {pins:?}"
    );
    assert!(
        ns.agent()
            .log()
            .contains("TC ingress attached to a new interface"),
        "the agent says so"
    );
}

#[test]
fn a_conntrack_capacity_change_migrates_established_flows_without_a_gap() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let cluster = web();
    start(&mut ns, &[&cluster], &[]);
    let nodeport = sa(NODE_EXT4, 30080);
    let lb_ip = sa(ip("198.51.100.10"), SERVICE_PORT);

    // Masqueraded flows live on their conntrack entries (and their SNAT ports): a flow whose
    // entries did not move into the new map would lose its translation or change source.
    let holds = [
        ("TCP hold to the NodePort (masqueraded)", nodeport, false),
        ("UDP hold to the LB IP (masqueraded)", lb_ip, true),
    ]
    .map(|(what, target, udp)| {
        (
            what,
            ns.outside_hold(
                target,
                Duration::from_secs(10),
                Duration::from_millis(100),
                udp,
            ),
        )
    });
    for (what, hold) in &holds {
        hold.wait_for_attempts(1, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
    let new_flows = request(ClientProto::Tcp, nodeport, 120)
        .interval(Duration::from_millis(50))
        .timeout(Duration::from_secs(2));
    let running = ns.spawn_outside(&new_flows);
    std::thread::sleep(Duration::from_secs(2));
    ns.agent()
        .restart_with(&["--bpf-ct-global-max", "16384", "--bpf-lb-map-max", "65536"])
        .expect("restarting the agent with other capacities");

    let attempts = running.finish().expect("connection loop");
    assert_eq!(attempts.len(), 120);
    // The README's one window: a connection the old programs set up in the instant between
    // the last copy before their links go and the copy after may be reset. At most one of
    // these 120 (one every 50 ms) falls into it; nothing else may fail.
    let (ok, failed): (Vec<Attempt>, Vec<Attempt>) = attempts.into_iter().partition(|a| a.ok);
    assert!(
        failed.len() <= 1 && failed.iter().all(|a| a.errno == Some(libc::ECONNRESET)),
        "new NodePort connections across the migration: {failed:?}"
    );
    assert_answers_come_from(&ok, nodeport, "new NodePort connections");
    for (what, hold) in holds {
        let attempts = hold.finish().expect("hold");
        assert!(
            attempts.len() >= 80,
            "{what}: only {} requests",
            attempts.len()
        );
        assert_all_ok(&attempts, what);
        let backends: BTreeSet<_> = attempts.iter().map(|a| a.backend.clone()).collect();
        let seen: BTreeSet<_> = attempts.iter().map(|a| a.seen_as).collect();
        assert_eq!(backends.len(), 1, "{what}: backend changed: {backends:?}");
        assert_eq!(seen.len(), 1, "{what}: translated source changed: {seen:?}");
    }
    let log = ns.agent().log();
    assert!(
        log.contains("migrating map CT4_V1") && log.contains("map migration complete"),
        "{log}"
    );
    ns.agent()
        .ensure_running()
        .expect("the migrated agent keeps running");
}

/// The backend a running hold's latest answered attempt reached.
fn latest_backend(hold: &RunningClient) -> Option<String> {
    hold.attempts_so_far()
        .iter()
        .rev()
        .find(|attempt| attempt.ok)
        .and_then(|attempt| attempt.backend.clone())
}

/// Waits until every hold's latest answer comes from `backend`.
fn wait_for_holds(holds: &[(String, RunningClient)], backend: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stuck: Vec<(&str, Option<String>)> = holds
            .iter()
            .map(|(label, hold)| (label.as_str(), latest_backend(hold)))
            .filter(|(_, latest)| latest.as_deref() != Some(backend))
            .collect();
        if stuck.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: these UDP flows never moved to {backend}: {stuck:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kube-proxy's UDP conntrack reconciler on the TC path, for every frontend kind: a UDP flow
/// (one connected socket, the same 5-tuple throughout) to a NodePort, an externalIP and an LB
/// IP follows its Service's endpoints. When its backend departs, the flow is removed and the
/// next datagram reaches a serving endpoint; while the Service has no endpoint at all the
/// flows are left alone; when endpoints return, flows to departed backends go again. The
/// reconciler's metrics count it by family and protocol.
#[test]
fn udp_flows_of_departed_endpoints_are_removed_for_every_frontend_kind() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let local_only = web().without_endpoints().local_endpoints();
    start(&mut ns, &[&local_only], &[]);
    let holds: Vec<(String, RunningClient)> = frontends(&local_only, false)
        .into_iter()
        .map(|(label, target)| {
            let hold = ns.outside_hold(
                target,
                Duration::from_secs(40),
                Duration::from_millis(100),
                true,
            );
            (label, hold)
        })
        .collect();
    wait_for_holds(&holds, LOCAL_BACKEND, "the first endpoint");

    // The endpoint moves: the flows' backend departed (it still answers, so only the
    // reconciler can move them).
    let remote_only = web().without_endpoints().remote_endpoints();
    ns.write_manifests(&manifests(&[&remote_only]));
    wait_for_holds(&holds, REMOTE_BACKEND, "after the endpoint moved");

    // No endpoint at all: the flows are left alone (new ones would be refused).
    ns.write_manifests(&manifests(&[&web().without_endpoints()]));
    std::thread::sleep(Duration::from_secs(2));
    for (label, hold) in &holds {
        let recent: Vec<Attempt> = hold.attempts_so_far().into_iter().rev().take(5).collect();
        assert!(
            recent
                .iter()
                .all(|a| a.ok && a.backend.as_deref() == Some(REMOTE_BACKEND)),
            "{label}: with no endpoint the flow is kept: {recent:?}"
        );
    }

    // Endpoints return (0 → N): flows to the departed backend go, the next datagram reaches
    // the new endpoint.
    ns.write_manifests(&manifests(&[&local_only]));
    wait_for_holds(&holds, LOCAL_BACKEND, "after endpoints returned");
    for (_, hold) in holds {
        drop(hold);
    }
    let (_, metrics) = switchyard_tests::client::http::get_in_netns(
        ns.node_namespace(),
        sa(ip("127.0.0.1"), 10_249),
        "/metrics",
    )
    .expect("GET /metrics");
    let deleted: u64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\",protocol=\"UDP\"} ",
            )?
            .parse()
            .ok()
        })
        .unwrap_or_else(|| panic!("no reconciler counter in\n{metrics}"));
    assert!(deleted >= 6, "two moves of three flows: {deleted}");
}

/// Link pins of any program on `device` (TC and XDP).
fn link_pins(ns: &NorthSouth, device: &str) -> Vec<String> {
    let mut pins = tc_link_pins(ns, device);
    let prefix = format!("sy_xdp_ingress-{device}@");
    let mut pending = vec![ns.bpffs().agent_dir()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                pending.push(path);
            } else if name.starts_with(&prefix) {
                pins.push(name);
            }
        }
    }
    pins
}

/// An interface whose driver has no native XDP (a bridge carrying a node address, inside the
/// node namespace): `--xdp-mode native` refuses to start, naming it, and leaves no link
/// behind; `best-effort` warns naming it, keeps it on TC alone and still accelerates the
/// others.
#[test]
fn xdp_native_refuses_an_interface_without_driver_xdp_and_best_effort_leaves_it_on_tc() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let node = ns.node_namespace().to_owned();
    for args in [
        vec!["link", "add", "syxbr0", "type", "bridge"],
        vec!["addr", "add", "192.0.2.99/32", "dev", "syxbr0"],
        vec!["link", "set", "syxbr0", "up"],
    ] {
        run_checked(
            Command::new("ip").args(["-n", &node]).args(&args),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
    let web = web();
    ns.write_manifests(&manifests(&[&web]));
    ns.start_agent(&["--xdp-mode", "native"]);
    let status = ns
        .agent()
        .wait_for_exit(Duration::from_secs(30))
        .expect("--xdp-mode native must refuse to start");
    assert!(!status.success(), "exit status {status}");
    let log = ns.agent().log();
    assert!(
        log.contains("--xdp-mode native") && log.contains("syxbr0"),
        "the error must name the mode and the interface: {log}"
    );
    for device in ["ext0", "syxbr0"] {
        assert!(
            link_pins(&ns, device).is_empty(),
            "the failed start left links on {device}: {:?}",
            link_pins(&ns, device)
        );
    }

    prepare_xdp_peers(&ns);
    ns.agent()
        .restart_with(&["--xdp-mode", "best-effort"])
        .expect("restarting with best-effort");
    let (label, target) = frontends(&web, false)[0].clone();
    ns.wait_outside(
        &request(ClientProto::Tcp, target, 1),
        &format!("answer through {label} with best-effort"),
        |a| a.ok,
    );
    check_masqueraded_balance(&ns, &[(label, target)], BALANCE_COUNT, &DEFAULT_SNAT_PORTS);
    let log = ns.agent().log();
    assert!(
        log.lines()
            .any(|line| line.contains("best-effort") && line.contains("syxbr0")),
        "best-effort must warn naming the interface: {log}"
    );
    assert!(
        !link_pins(&ns, "syxbr0")
            .iter()
            .any(|pin| pin.starts_with("sy_xdp"))
    );
    assert_eq!(link_pins(&ns, "syxbr0").len(), 1, "TC stays on the bridge");
    Datapath::Xdp.assert_used(&ns);
}
