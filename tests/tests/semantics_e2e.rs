//! End-to-end tests of the Service semantics beyond plain ClusterIP: traffic policies (DROP
//! versus REJECT), terminating-endpoint fallback and ClientIP session affinity, through the
//! real agent and datapath. The agent runs as node `node-a`; endpoints name their node.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::thread::sleep;
use std::time::Duration;

use switchyard_tests::client::report::{Attempt, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::k8s::manifests::Manifests;
use switchyard_tests::world::harness::{BACKEND_PORT, Harness, backend_name};
use switchyard_tests::{require_root, testkit};

const NODE: &str = "node-a";
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
/// What a destroyed, disconnected UDP socket reports next, depending on the call.
const SOCKET_DESTROYED: [i32; 3] = [
    103, /* ECONNABORTED */
    107, /* ENOTCONN */
    89,  /* EDESTADDRREQ */
];

fn vip(text: &str) -> SocketAddr {
    SocketAddr::new(text.parse().expect("valid VIP"), 80)
}

/// One endpoint line of an EndpointSlice: address, node and conditions (YAML flow mapping).
fn endpoint(address: IpAddr, node: &str, conditions: &str) -> String {
    format!("  - {{addresses: ['{address}'], nodeName: {node}, conditions: {{{conditions}}}}}\n")
}

/// A Service with a TCP and a UDP port 80 (plus extra spec fields) and one EndpointSlice with
/// the given endpoint lines.
fn service(name: &str, cluster_ip: &str, spec_extra: &str, endpoints: &[String]) -> Manifests {
    let endpoints = if endpoints.is_empty() {
        "  []\n".to_owned()
    } else {
        endpoints.concat()
    };
    Manifests::new().raw(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: sem}}\nspec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: 80}}, {{name: udp, port: 80, protocol: UDP}}]\n{spec_extra}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: sem, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}}}, {{name: udp, port: {BACKEND_PORT}, protocol: UDP}}]\nendpoints:\n{endpoints}"
    ))
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target)
        .count(count)
        .timeout(Duration::from_millis(1500))
}

fn start(harness: &mut Harness, manifests: &Manifests) {
    harness.write_manifests(manifests);
    harness.start_agent(&["--node-name", NODE]);
}

#[test]
fn internal_traffic_policy_local_uses_this_node_only_then_drops_then_rejects() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let ips = harness.backend_ipv4s();
    let target = vip("10.96.1.10");
    let local_spec = "  internalTrafficPolicy: Local\n";
    let mixed = [
        endpoint(ips[0], NODE, ""),
        endpoint(ips[1], "node-b", ""),
        endpoint(ips[2], "node-b", ""),
    ];
    start(
        &mut harness,
        &service("local", "10.96.1.10", local_spec, &mixed),
    );
    harness.wait_until_translated(ClientProto::Tcp, target);
    let attempts = harness.client(&tcp(target, 40));
    assert_eq!(
        reached(&attempts),
        BTreeSet::from([backend_name(0)]),
        "{attempts:?}"
    );

    // Endpoints exist, but none on this node: kube-proxy DROPs. No endpoint is reached and the
    // caller learns it at once (EHOSTUNREACH), not as a refusal.
    let remote_only = [
        endpoint(ips[1], "node-b", ""),
        endpoint(ips[2], "node-b", ""),
    ];
    harness.write_manifests(&service("local", "10.96.1.10", local_spec, &remote_only));
    let dropped = harness.wait_until_errno(ClientProto::Tcp, target, EHOSTUNREACH);
    assert!(dropped.elapsed_ms < 200, "{dropped:?}");
    for proto in [ClientProto::UdpConnected, ClientProto::UdpUnconnected] {
        let attempts = harness.client(&ClientRequest::new(proto, target).count(5));
        assert!(
            attempts.iter().all(|a| a.errno == Some(EHOSTUNREACH)),
            "{proto:?}: {attempts:?}"
        );
    }

    // No usable endpoint anywhere: REJECT.
    harness.write_manifests(&service("local", "10.96.1.10", local_spec, &[]));
    harness.wait_until_errno(ClientProto::Tcp, target, ECONNREFUSED);
}

#[test]
fn terminating_endpoints_serve_only_while_no_endpoint_is_ready() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let ips = harness.backend_ipv4s();
    let target = vip("10.96.1.11");
    let draining = "ready: false, serving: true, terminating: true";
    let gone = "ready: false, serving: false, terminating: true";
    let with_ready = [
        endpoint(ips[0], NODE, ""),
        endpoint(ips[1], NODE, draining),
        endpoint(ips[2], NODE, gone),
    ];
    start(
        &mut harness,
        &service("drain", "10.96.1.11", "", &with_ready),
    );
    harness.wait_until_translated(ClientProto::Tcp, target);
    assert_eq!(
        reached(&harness.client(&tcp(target, 30))),
        BTreeSet::from([backend_name(0)])
    );

    // The ready endpoint goes: the serving+terminating one takes over, the not-serving one never.
    let without_ready = [
        endpoint(ips[1], NODE, draining),
        endpoint(ips[2], NODE, gone),
    ];
    harness.write_manifests(&service("drain", "10.96.1.11", "", &without_ready));
    let expected = BTreeSet::from([backend_name(1)]);
    let mut last = Vec::new();
    for _ in 0..20 {
        last = harness.client(&tcp(target, 10));
        if reached(&last) == expected && last.iter().all(|a| a.ok) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert_eq!(reached(&last), expected, "{last:?}");
    assert_eq!(reached(&harness.client(&tcp(target, 30))), expected);
}

#[test]
fn client_ip_affinity_sticks_expires_and_forgets_a_backend_that_left() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let ips = harness.backend_ipv4s();
    let target = vip("10.96.1.12");
    let all: Vec<String> = ips.iter().map(|ip| endpoint(*ip, NODE, "")).collect();
    let sticky = |timeout: u32| {
        format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n"
        )
    };
    start(
        &mut harness,
        &service("sticky", "10.96.1.12", &sticky(1), &all),
    );
    harness.wait_until_translated(ClientProto::Tcp, target);

    // Within the timeout every new connection from this client goes to the same backend; after
    // a pause longer than the timeout the choice is random again, so over a few pauses another
    // backend shows up (the chance that it never does is (1/3)^8).
    let mut first_choices = BTreeSet::new();
    for _ in 0..8 {
        sleep(Duration::from_millis(1300));
        let burst = harness.client(&tcp(target, 15));
        let backends = reached(&burst);
        assert_eq!(backends.len(), 1, "sticky within the timeout: {burst:?}");
        first_choices.extend(backends);
        if first_choices.len() > 1 {
            break;
        }
    }
    assert!(
        first_choices.len() > 1,
        "affinity never expired: {first_choices:?}"
    );

    // A long timeout; the backend the client sticks to leaves: the client moves on and sticks
    // to another one, never back to the departed backend.
    harness.write_manifests(&service("sticky", "10.96.1.12", &sticky(3600), &all));
    sleep(Duration::from_millis(1500));
    let stuck = reached(&harness.client(&tcp(target, 10)));
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    let departed = stuck.into_iter().next().expect("one backend");
    let index = (0..3)
        .find(|i| backend_name(*i) == departed)
        .expect("a known backend");
    let remaining: Vec<String> = (0..3)
        .filter(|i| *i != index)
        .map(|i| endpoint(ips[i], NODE, ""))
        .collect();
    harness.write_manifests(&service("sticky", "10.96.1.12", &sticky(3600), &remaining));
    sleep(Duration::from_millis(1500));
    let after = harness.client(&tcp(target, 20));
    let now = reached(&after);
    assert_eq!(now.len(), 1, "sticky to one new backend: {after:?}");
    assert!(
        !now.contains(&departed),
        "went back to the departed backend: {after:?}"
    );
}

#[test]
fn a_connected_udp_socket_aimed_at_a_departed_backend_is_destroyed() {
    require_root!();

    let mut harness = Harness::new(testkit!(), 2);
    let ips = harness.backend_ipv4s();
    let target = vip("10.96.1.13");
    let both = [endpoint(ips[0], NODE, ""), endpoint(ips[1], NODE, "")];
    start(&mut harness, &service("udp", "10.96.1.13", "", &both));
    harness.wait_until_translated(ClientProto::UdpConnected, target);

    // One long-lived connected UDP socket, as a DNS client or a metrics agent keeps.
    let hold = harness.hold_udp(target, Duration::from_secs(5), Duration::from_millis(100));
    let early = hold
        .wait_for_attempts(5, Duration::from_secs(3))
        .expect("first answers");
    let departed = early[0].backend.clone().expect("an answer");
    assert!(
        early.iter().all(|a| a.backend.as_ref() == Some(&departed)),
        "one socket, one backend: {early:?}"
    );
    let index = (0..2)
        .find(|i| backend_name(*i) == departed)
        .expect("a known backend");

    // The backend leaves the Service but keeps running and answering: without the cure the
    // socket would keep talking to it for as long as it lives.
    harness.write_manifests(&service(
        "udp",
        "10.96.1.13",
        "",
        &[endpoint(ips[1 - index], NODE, "")],
    ));
    let attempts = hold.finish().expect("the hold client ends by itself");
    let destroyed = attempts
        .iter()
        .position(|a| {
            a.errno
                .is_some_and(|errno| SOCKET_DESTROYED.contains(&errno))
        })
        .unwrap_or_else(|| panic!("the socket was never destroyed: {attempts:?}"));
    let after: Vec<&Attempt> = attempts[destroyed + 1..].iter().filter(|a| a.ok).collect();
    assert!(
        after.len() >= 10,
        "the client reconnected and kept going: {attempts:?}"
    );
    assert!(
        after
            .iter()
            .all(|a| a.backend.as_deref() == Some(backend_name(1 - index).as_str())),
        "after the destroy only the remaining backend answers: {attempts:?}"
    );
}
