//! End-to-end tests of the north-south datapath on a routed CNI's layout (see
//! `switchyard_tests::world::north_south::Layout::Routed`: the local pod sits behind an unnumbered
//! host veth with /32 and /128 routes and proxy ARP), with `--interfaces` naming only the
//! external device, as a pattern, or left to its default; interfaces that appear after the
//! agent started; and loadBalancerSourceRanges for pods, whose sockets meet the socket hooks.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use switchyard_tests::client::http::get_in_netns;
use switchyard_tests::client::report::{Attempt, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::k8s::external_service::{ExternalService, ServiceType, manifests};
use switchyard_tests::world::north_south::{
    CLIENT4, CLIENT6, CLUSTER_CIDR, LOCAL_BACKEND, Layout, NODE_EXT4, NODE_EXT6, NODE_NAME,
    NorthSouth, Offloads, REMOTE_BACKEND,
};
use switchyard_tests::{require_root, testkit};

const SERVICE_PORT: u16 = 80;
/// Exchanges per protocol and frontend where both backends must answer (one is missed with
/// probability 2^-(COUNT-1)).
const COUNT: u32 = 16;
const DROP_TIMEOUT: Duration = Duration::from_secs(1);
const HEALTH: &str = "127.0.0.1:10256";
const WAIT: Duration = Duration::from_secs(10);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid IP literal")
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Dual-stack eTP Cluster, local and remote endpoints: masqueraded flows to the local pod.
fn cluster() -> ExternalService {
    ExternalService::new(
        "routed",
        ServiceType::LoadBalancer,
        &[ip("10.96.60.10"), ip("fd00:96::60:10")],
        SERVICE_PORT,
    )
    .node_port(30090)
    .external_ip(ip("198.51.100.60"))
    .external_ip(ip("2001:db8:5e::60"))
    .ingress_ip(ip("198.51.100.61"))
    .ingress_ip(ip("2001:db8:5e::61"))
    .local_endpoints()
    .remote_endpoints()
}

/// Dual-stack eTP Local: unmasqueraded flows to the local pod, whose replies go to the
/// client's own address.
fn local() -> ExternalService {
    ExternalService::new(
        "routed-local",
        ServiceType::LoadBalancer,
        &[ip("10.96.60.11"), ip("fd00:96::60:11")],
        SERVICE_PORT,
    )
    .node_port(30091)
    .external_ip(ip("198.51.100.62"))
    .external_ip(ip("2001:db8:5e::62"))
    .ingress_ip(ip("198.51.100.63"))
    .ingress_ip(ip("2001:db8:5e::63"))
    .local(32091)
    .local_endpoints()
    .remote_endpoints()
}

/// NodePort, externalIP and LB IP of `service` in both families, as the outside client
/// reaches them.
fn frontends(service: &ExternalService) -> Vec<(String, SocketAddr)> {
    let mut all = Vec::new();
    if let Some(node_port) = service.node_port {
        all.push((
            format!("{} NodePort", service.name),
            sa(NODE_EXT4, node_port),
        ));
        all.push((
            format!("{} NodePort v6", service.name),
            sa(NODE_EXT6, node_port),
        ));
    }
    for external in &service.external_ips {
        all.push((
            format!("{} externalIP", service.name),
            sa(*external, SERVICE_PORT),
        ));
    }
    for ingress in &service.ingress_ips {
        all.push((
            format!("{} LB IP", service.name),
            sa(*ingress, SERVICE_PORT),
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

/// Every protocol to every frontend of `service` from outside, all at once: every exchange
/// works, answers come from the frontend, and the backends in `expected` answer.
fn check_serves(ns: &NorthSouth, service: &ExternalService, expected: &[&str], what: &str) {
    let mut running = Vec::new();
    for (label, target) in frontends(service) {
        for proto in ClientProto::ALL {
            let request = request(proto, target, COUNT);
            running.push((
                format!("{what}: {proto:?} to {label} {target}"),
                target,
                ns.spawn_outside(&request),
            ));
        }
    }
    let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    for (what, target, client) in running {
        let attempts = client
            .finish()
            .unwrap_or_else(|e| panic!("{what}: client failed: {e:#}"));
        let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
        assert!(
            failed.is_empty() && !attempts.is_empty(),
            "{what}: {} of {} attempts failed, e.g. {:?}",
            failed.len(),
            attempts.len(),
            failed.first()
        );
        for attempt in &attempts {
            assert_eq!(attempt.peer, Some(target), "{what}: peer of {attempt:?}");
            if let Some(source) = attempt.source {
                assert_eq!(source, target, "{what}: reply source of {attempt:?}");
            }
        }
        assert_eq!(reached(&attempts), expected, "{what}: {attempts:?}");
    }
}

/// eTP Local keeps the client's address all the way to the local pod.
fn check_local_sees_client(ns: &NorthSouth, service: &ExternalService, what: &str) {
    for (label, target) in frontends(service) {
        let attempts = ns.outside(&request(ClientProto::Tcp, target, 2));
        let client = if target.is_ipv6() {
            IpAddr::from(CLIENT6)
        } else {
            IpAddr::from(CLIENT4)
        };
        for attempt in &attempts {
            assert!(attempt.ok, "{what}: {label} {target}: {attempt:?}");
            assert_eq!(
                attempt.seen_as.map(|s| s.ip()),
                Some(client),
                "{what}: {label}: eTP Local keeps the client address ({attempt:?})"
            );
        }
    }
}

/// Link pins of the TC program on `device` under the agent's bpffs directory.
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

fn readyz(ns: &NorthSouth) -> Option<(u16, String)> {
    get_in_netns(
        ns.node_namespace(),
        HEALTH.parse().expect("address"),
        "/readyz",
    )
    .ok()
}

/// Waits (bounded) until `/readyz` answers as `accept` wants; the last answer.
fn wait_readyz(ns: &NorthSouth, what: &str, accept: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some((status, body)) = readyz(ns) {
            if accept(status, &body) {
                return body;
            }
            last = Some((status, body));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: /readyz never did; last answer {last:?}");
}

fn wait_served(ns: &mut NorthSouth, target: SocketAddr, what: &str) {
    ns.wait_outside(&request(ClientProto::Tcp, target, 1), what, |a| {
        a.ok && [LOCAL_BACKEND, REMOTE_BACKEND].contains(&a.backend.as_deref().unwrap_or(""))
    });
}

fn counter(ns: &NorthSouth, name: &str) -> u64 {
    ns.datapath_counters().get(name).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn routed_pod_layout_serves_local_endpoints_with_external_interfaces_only_a_pattern_or_the_default()
{
    require_root!();
    let mut ns = NorthSouth::with_layout(testkit!(), Offloads::On, Layout::Routed);
    let (cluster, local) = (cluster(), local());
    ns.write_manifests(&manifests(&[&cluster, &local]));
    let variants: [(&str, &[&str]); 3] = [
        ("--interfaces ext0", &["--interfaces", "ext0"]),
        ("--interfaces ext+", &["--interfaces", "ext+"]),
        ("default interfaces", &[]),
    ];
    for (index, (what, args)) in variants.into_iter().enumerate() {
        if index == 0 {
            ns.start_agent(args);
        } else {
            // A new agent takes over and retires the previous one's links: what serves
            // afterwards is the new agent's choice of interfaces.
            let mut all = vec!["--node-name", NODE_NAME, "--cluster-cidr", CLUSTER_CIDR];
            all.extend_from_slice(args);
            ns.agent().restart_with(&all).expect("restarting the agent");
        }
        wait_served(&mut ns, sa(NODE_EXT4, 30090), what);
        wait_readyz(&ns, what, |status, _| status == 200);
        assert_eq!(
            tc_link_pins(&ns, "pod0").len(),
            1,
            "{what}: the pod's unnumbered host veth carries the program"
        );
        check_serves(&ns, &cluster, &[LOCAL_BACKEND, REMOTE_BACKEND], what);
        check_serves(&ns, &local, &[LOCAL_BACKEND], what);
        check_local_sees_client(&ns, &local, what);
    }
}

#[test]
fn an_interface_named_before_it_exists_is_attached_when_it_appears() {
    require_root!();
    let mut ns = NorthSouth::with_layout(testkit!(), Offloads::On, Layout::Routed);
    // externalIPs and LB IPs only: NodePorts follow the node's addresses, which the agent
    // re-reads on its own schedule, not when an interface appears.
    let mut cluster = cluster();
    cluster.node_port = None;
    ns.write_manifests(&manifests(&[&cluster]));
    ns.remove_client_link();
    ns.start_agent(&["--interfaces", "ext0"]);

    let body = wait_readyz(&ns, "not ready while ext0 is missing", |status, body| {
        status == 503 && body.contains("ext0")
    });
    assert!(body.contains("does not exist"), "{body}");
    ns.agent()
        .ensure_running()
        .expect("a missing --interfaces entry must not make the agent exit");

    ns.add_client_link();
    wait_served(
        &mut ns,
        sa(cluster.external_ips[0], SERVICE_PORT),
        "externalIP through the late ext0",
    );
    wait_readyz(&ns, "ready once ext0 is attached", |status, _| {
        status == 200
    });
    assert_eq!(tc_link_pins(&ns, "ext0").len(), 1);
    check_serves(
        &ns,
        &cluster,
        &[LOCAL_BACKEND, REMOTE_BACKEND],
        "late interface",
    );
    assert!(
        ns.agent()
            .log()
            .contains("TC ingress attached to a new interface"),
        "the agent says so"
    );
}

#[test]
fn pods_outside_load_balancer_source_ranges_are_dropped_and_inside_ones_served() {
    require_root!();
    let mut ns = NorthSouth::with_layout(testkit!(), Offloads::On, Layout::Routed);
    let lb = |name: &str, last: u8| {
        ExternalService::new(
            name,
            ServiceType::LoadBalancer,
            &[IpAddr::from([10, 96, 61, last])],
            SERVICE_PORT,
        )
        .ingress_ip(IpAddr::from([198, 51, 100, last]))
        .remote_endpoints()
    };
    // The pod (10.240.1.2) is inside 10.240.0.0/16 and outside 192.0.2.0/24; the node's
    // client-side address (203.0.113.1) inside 203.0.113.0/28.
    let allowed = lb("pods-allowed", 70)
        .source_range("10.240.0.0/16")
        .source_range("203.0.113.0/28");
    let denied = lb("pods-denied", 71).source_range("192.0.2.0/24");
    ns.write_manifests(&manifests(&[&allowed, &denied]));
    ns.start_agent(&[]);
    wait_readyz(&ns, "first sync", |status, _| status == 200);

    let allowed_ip = sa(allowed.ingress_ips[0], SERVICE_PORT);
    let denied_ip = sa(denied.ingress_ips[0], SERVICE_PORT);
    let deferred = counter(&ns, "sock_source_range_deferred");
    for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
        let what = format!("{proto:?} from a pod to {allowed_ip}, inside the ranges");
        let attempts = ns.hooked_pod_client(&request(proto, allowed_ip, 4));
        assert!(
            attempts.iter().all(|a| a.ok) && !attempts.is_empty(),
            "{what}: {attempts:?}"
        );
        assert_eq!(
            reached(&attempts),
            BTreeSet::from([REMOTE_BACKEND.to_owned()])
        );
        assert!(
            attempts.iter().all(|a| a.peer == Some(allowed_ip)),
            "{what}: {attempts:?}"
        );
    }
    let dropped = counter(&ns, "tc_dropped_source_range");
    for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
        let what = format!("{proto:?} from a pod to {denied_ip}, outside the ranges");
        let attempts = ns.hooked_pod_client(&request(proto, denied_ip, 2).timeout(DROP_TIMEOUT));
        for attempt in &attempts {
            assert!(
                !attempt.ok && attempt.backend.is_none(),
                "{what}: dropped, as kube-proxy does: {attempt:?}"
            );
            assert_eq!(attempt.errno, Some(libc::ETIMEDOUT), "{what}: {attempt:?}");
        }
    }
    assert!(
        counter(&ns, "sock_source_range_deferred") > deferred,
        "the socket hooks left the restricted LB IP to the packet path"
    );
    assert!(
        counter(&ns, "tc_dropped_source_range") > dropped,
        "the TC program on the pod's host veth dropped the outside source"
    );

    // A node process bound to a node address: the socket hooks see the source and decide.
    let bound = IpAddr::from(NODE_EXT4);
    let refused = counter(&ns, "sock_source_range_dropped");
    for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
        let what = format!("{proto:?} from the node bound to {bound} to {allowed_ip}");
        let attempts = ns.hooked_node_client(&request(proto, allowed_ip, 4).source_ip(bound));
        assert!(
            attempts.iter().all(|a| a.ok) && !attempts.is_empty(),
            "{what}: {attempts:?}"
        );
        assert_eq!(
            reached(&attempts),
            BTreeSet::from([REMOTE_BACKEND.to_owned()])
        );
        let what = format!("{proto:?} from the node bound to {bound} to {denied_ip}");
        let attempts = ns.hooked_node_client(&request(proto, denied_ip, 2).source_ip(bound));
        for attempt in &attempts {
            assert_eq!(
                attempt.errno,
                Some(libc::EPERM),
                "{what}: refused at connect: {attempt:?}"
            );
        }
    }
    assert!(counter(&ns, "sock_source_range_dropped") > refused);
}
