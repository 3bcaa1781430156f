//! End-to-end tests of ClusterIP Services against the real agent.
//!
//! Each test builds its own namespaces, cgroup, bpffs and agent (see `Harness`), so tests run in
//! parallel and clean up through guards even when they fail. Clients only ever run inside the
//! test's node namespace, which has no route out of the machine.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use switchyard_tests::client::report::{Attempt, assert_all_ok, backend_counts, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::bpffs::pinned_objects;
use switchyard_tests::env::process::wait_until;
use switchyard_tests::k8s::manifests::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Manifests, Protocol, Service, ServicePort,
    TargetPort,
};
use switchyard_tests::world::harness::{BACKEND_PORT, Harness, backend_name};
use switchyard_tests::{require_root, testkit};

const SERVICE_PORT: u16 = 80;
const TCP_PORT_NAME: &str = "http";
const UDP_PORT_NAME: &str = "dns";
/// How soon a manifests change must show in the dataplane.
const RELOAD_DEADLINE: Duration = Duration::from_secs(1);
/// A refusal by the hook takes microseconds; anything near the client timeout is not one.
const IMMEDIATE: Duration = Duration::from_millis(200);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid IP literal")
}

fn at(vip: IpAddr) -> SocketAddr {
    SocketAddr::new(vip, SERVICE_PORT)
}

/// A ClusterIP Service with a TCP and a UDP port, both on 80, targeting `target`.
fn service(name: &str, vips: &[IpAddr], target: impl Into<TargetPort> + Clone) -> Service {
    Service::cluster_ip(name, vips)
        .port(ServicePort::new(
            TCP_PORT_NAME,
            Protocol::Tcp,
            SERVICE_PORT,
            target.clone(),
        ))
        .port(ServicePort::new(
            UDP_PORT_NAME,
            Protocol::Udp,
            SERVICE_PORT,
            target,
        ))
}

/// The EndpointSlice of `service` listing `backends` (of one family) as ready on the backend
/// port, under both port names.
fn slice(service: &str, family: AddressType, backends: &[IpAddr]) -> EndpointSlice {
    let suffix = match family {
        AddressType::IPv4 => "v4",
        AddressType::IPv6 => "v6",
    };
    EndpointSlice::new(&format!("{service}-{suffix}"), service, family)
        .ready_endpoints(backends.iter().copied())
        .port(EndpointPort::new(
            TCP_PORT_NAME,
            Protocol::Tcp,
            BACKEND_PORT,
        ))
        .port(EndpointPort::new(
            UDP_PORT_NAME,
            Protocol::Udp,
            BACKEND_PORT,
        ))
}

/// One IPv4 Service `name` at `vip` with `backends` behind it.
fn ipv4_service(name: &str, vip: &str, backends: &[IpAddr]) -> Manifests {
    Manifests::new().backed_service(
        name,
        &[ip(vip)],
        &[
            (TCP_PORT_NAME, Protocol::Tcp, SERVICE_PORT),
            (UDP_PORT_NAME, Protocol::Udp, SERVICE_PORT),
        ],
        backends,
    )
}

/// Starts the agent and waits (bounded) until `vip` is translated over TCP.
fn start_and_wait(harness: &mut Harness, manifests: &Manifests, vip: IpAddr) {
    harness.write_manifests(manifests);
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at(vip));
}

fn assert_peers_are(attempts: &[Attempt], expected: SocketAddr, what: &str) {
    for attempt in attempts {
        assert_eq!(attempt.peer, Some(expected), "{what}: peer of {attempt:?}");
    }
}

fn all_backends(harness: &Harness) -> BTreeSet<String> {
    harness.backend_names().into_iter().collect()
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target).count(count)
}

#[test]
fn tcp_connections_spread_evenly_and_getpeername_reports_the_vip() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.10");
    let manifests = ipv4_service("web", "10.96.0.10", &harness.backend_ipv4s());
    start_and_wait(&mut harness, &manifests, vip);

    let attempts = harness.client(&tcp(at(vip), 300));
    assert_eq!(attempts.len(), 300);
    assert_all_ok(&attempts, "TCP to the VIP");
    assert_peers_are(&attempts, at(vip), "TCP getpeername");
    let counts = backend_counts(&attempts);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        all_backends(&harness)
    );
    for (backend, count) in &counts {
        assert!(
            *count >= 60,
            "{backend} got only {count} of 300: {counts:?}"
        );
    }
}

#[test]
fn udp_connected_and_unconnected_reach_all_backends_and_see_the_vip() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.11");
    let manifests = ipv4_service("dns", "10.96.0.11", &harness.backend_ipv4s());
    start_and_wait(&mut harness, &manifests, vip);

    for proto in [ClientProto::UdpConnected, ClientProto::UdpUnconnected] {
        let what = format!("{proto:?} to the VIP");
        let attempts = harness.client(&ClientRequest::new(proto, at(vip)).count(60));
        assert_all_ok(&attempts, &what);
        assert_peers_are(&attempts, at(vip), &what);
        for attempt in &attempts {
            assert_eq!(attempt.source, Some(at(vip)), "{what}: recvfrom source");
        }
        assert_eq!(reached(&attempts), all_backends(&harness), "{what}");
    }
}

#[test]
fn named_target_port_resolves_through_the_endpoint_slice_port() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.12");
    // targetPort "http" names a container port; only the EndpointSlice says it is 8080.
    let manifests = Manifests::new()
        .with(service("named", &[vip], TCP_PORT_NAME))
        .with(slice("named", AddressType::IPv4, &harness.backend_ipv4s()));
    start_and_wait(&mut harness, &manifests, vip);

    let attempts = harness.client(&tcp(at(vip), 60));
    assert_all_ok(&attempts, "TCP to a named target port");
    assert_peers_are(&attempts, at(vip), "TCP getpeername");
    assert_eq!(reached(&attempts), all_backends(&harness));
}

/// Polls with batches of `batch` connections until `done` holds for the attempts made since
/// `since`; fails unless it does by `since + RELOAD_DEADLINE` (a batch started before the
/// deadline may finish after it).
fn poll_until_reloaded(
    harness: &Harness,
    target: SocketAddr,
    since: Instant,
    batch: u32,
    done: impl Fn(&[Attempt], &[Attempt]) -> bool,
) -> Duration {
    let mut seen = Vec::new();
    while since.elapsed() < RELOAD_DEADLINE {
        let latest = harness.client(&tcp(target, batch).timeout(Duration::from_millis(300)));
        seen.extend(latest.iter().cloned());
        if done(&latest, &seen) {
            return since.elapsed();
        }
    }
    panic!(
        "new backend set not observed within {RELOAD_DEADLINE:?} of the write; \
         backends seen since: {:?}",
        backend_counts(&seen)
    );
}

#[test]
fn scaling_by_rewriting_the_manifests_applies_within_a_second() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.13");
    let everyone = harness.backend_ipv4s();
    start_and_wait(
        &mut harness,
        &ipv4_service("scale", "10.96.0.13", &everyone),
        vip,
    );
    assert_eq!(
        reached(&harness.client(&tcp(at(vip), 60))),
        all_backends(&harness)
    );

    // 3 -> 1
    let remaining = backend_name(0);
    harness.write_manifests(&ipv4_service("scale", "10.96.0.13", &everyone[..1]));
    let written = Instant::now();
    let took = poll_until_reloaded(&harness, at(vip), written, 10, |latest, _| {
        latest
            .iter()
            .all(|a| a.ok && a.backend.as_deref() == Some(remaining.as_str()))
    });
    eprintln!("scale down observed after {took:?}");
    std::thread::sleep(RELOAD_DEADLINE.saturating_sub(written.elapsed()));
    let attempts = harness.client(&tcp(at(vip), 50));
    assert_all_ok(&attempts, "TCP after scaling down");
    assert_eq!(reached(&attempts), BTreeSet::from([remaining]));

    // 1 -> 3
    harness.write_manifests(&ipv4_service("scale", "10.96.0.13", &everyone));
    let written = Instant::now();
    let took = poll_until_reloaded(&harness, at(vip), written, 15, |_, seen| {
        reached(seen) == all_backends(&harness)
    });
    eprintln!("scale up observed after {took:?}");
    std::thread::sleep(RELOAD_DEADLINE.saturating_sub(written.elapsed()));
    let attempts = harness.client(&tcp(at(vip), 60));
    assert_all_ok(&attempts, "TCP after scaling up");
    assert_eq!(reached(&attempts), all_backends(&harness));
}

#[test]
fn services_without_usable_endpoints_refuse_immediately() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    let empty = ip("10.96.0.30");
    let unready = ip("10.96.0.31");
    let sliceless = ip("10.96.0.32");
    // The not-ready endpoints are real, serving backends: reaching one would be a bug.
    let unready_slice = backends.iter().fold(
        EndpointSlice::new("unready-v4", "unready", AddressType::IPv4)
            .port(EndpointPort::new(
                TCP_PORT_NAME,
                Protocol::Tcp,
                BACKEND_PORT,
            ))
            .port(EndpointPort::new(
                UDP_PORT_NAME,
                Protocol::Udp,
                BACKEND_PORT,
            )),
        |slice, backend| slice.endpoint(Endpoint::not_ready(*backend)),
    );
    let manifests = Manifests::new()
        .with(service("empty", &[empty], BACKEND_PORT))
        .with(slice("empty", AddressType::IPv4, &[]))
        .with(service("unready", &[unready], BACKEND_PORT))
        .with(unready_slice)
        .with(service("sliceless", &[sliceless], BACKEND_PORT));
    harness.write_manifests(&manifests);
    harness.start_agent(&[]);
    // Before the agent is up the VIP is simply unroutable (ENETUNREACH).
    harness.wait_until_errno(ClientProto::Tcp, at(empty), libc::ECONNREFUSED);

    for (name, vip) in [
        ("empty", empty),
        ("unready", unready),
        ("sliceless", sliceless),
    ] {
        for proto in ClientProto::ALL {
            let attempts = harness.client(&ClientRequest::new(proto, at(vip)).count(10));
            for attempt in &attempts {
                assert_eq!(
                    attempt.errno,
                    Some(libc::ECONNREFUSED),
                    "{name} service over {proto:?}: {attempt:?}"
                );
                assert!(
                    Duration::from_millis(attempt.elapsed_ms) < IMMEDIATE,
                    "{name} service over {proto:?} was not refused at once: {attempt:?}"
                );
            }
        }
    }
}

#[test]
fn ipv6_clusterip_translates_and_getpeername_reports_the_ipv6_vip() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("fd00:96::a");
    let manifests = Manifests::new()
        .with(service("web6", &[vip], BACKEND_PORT))
        .with(slice("web6", AddressType::IPv6, &harness.backend_ipv6s()));
    start_and_wait(&mut harness, &manifests, vip);

    let attempts = harness.client(&tcp(at(vip), 60));
    assert_all_ok(&attempts, "TCP to the IPv6 VIP");
    assert_peers_are(&attempts, at(vip), "TCP getpeername over IPv6");
    assert_eq!(reached(&attempts), all_backends(&harness));
}

#[test]
fn dual_stack_service_is_reachable_on_both_cluster_ips() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip4 = ip("10.96.0.20");
    let vip6 = ip("fd00:96::14");
    let manifests = Manifests::new()
        .with(service("dual", &[vip4, vip6], BACKEND_PORT))
        .with(slice("dual", AddressType::IPv4, &harness.backend_ipv4s()))
        .with(slice("dual", AddressType::IPv6, &harness.backend_ipv6s()));
    start_and_wait(&mut harness, &manifests, vip4);
    harness.wait_until_translated(ClientProto::Tcp, at(vip6));

    for vip in [vip4, vip6] {
        let what = format!("TCP to dual-stack VIP {vip}");
        let attempts = harness.client(&tcp(at(vip), 60));
        assert_all_ok(&attempts, &what);
        assert_peers_are(&attempts, at(vip), &what);
        assert_eq!(reached(&attempts), all_backends(&harness), "{what}");
    }
}

#[test]
fn traffic_to_a_backend_address_is_left_untouched() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.14");
    let manifests = Manifests::new()
        .with(service("direct", &[vip], BACKEND_PORT))
        .with(slice("direct", AddressType::IPv4, &harness.backend_ipv4s()))
        .with(slice("direct", AddressType::IPv6, &harness.backend_ipv6s()));
    start_and_wait(&mut harness, &manifests, vip);

    let chosen = harness.backends()[1].clone();
    for real in [IpAddr::V4(chosen.ipv4), IpAddr::V6(chosen.ipv6)] {
        let target = SocketAddr::new(real, BACKEND_PORT);
        for proto in ClientProto::ALL {
            let what = format!("{proto:?} straight to {target}");
            let attempts = harness.client(&ClientRequest::new(proto, target).count(20));
            assert_all_ok(&attempts, &what);
            assert_peers_are(&attempts, target, &what);
            for attempt in attempts.iter().filter(|a| a.source.is_some()) {
                assert_eq!(attempt.source, Some(target), "{what}: recvfrom source");
            }
            assert_eq!(
                reached(&attempts),
                BTreeSet::from([backend_name(chosen.index)]),
                "{what}"
            );
        }
    }
}

/// Waits (bounded) until a line of the agent log satisfies `accept`.
fn wait_for_log_line(harness: &mut Harness, accept: impl Fn(&str) -> bool) -> Option<String> {
    let agent = harness.agent();
    wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        agent
            .log()
            .lines()
            .find(|line| accept(line))
            .map(str::to_owned)
    })
}

#[test]
fn a_service_with_an_invalid_field_is_logged_and_skipped() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    let (before, after) = (ip("10.96.0.40"), ip("10.96.0.41"));
    let bad = "\
apiVersion: v1
kind: Service
metadata:
  name: bad-port
  namespace: team-a
spec:
  type: ClusterIP
  clusterIP: 10.96.0.42
  clusterIPs: [10.96.0.42]
  ipFamilies: [IPv4]
  ports:
  - name: http
    protocol: TCP
    port: not-a-number
    targetPort: 8080
";
    let manifests = ipv4_service("before", "10.96.0.40", &backends)
        .raw(bad)
        .with(service("after", &[after], BACKEND_PORT))
        .with(slice("after", AddressType::IPv4, &backends));
    start_and_wait(&mut harness, &manifests, before);
    harness.wait_until_translated(ClientProto::Tcp, at(after));

    let warning = wait_for_log_line(&mut harness, |line| {
        line.contains("Service") && line.contains("team-a/bad-port")
    });
    assert!(
        warning.is_some(),
        "the agent log does not name the skipped Service team-a/bad-port"
    );
    eprintln!(
        "skipped document reported as: {}",
        warning.unwrap_or_default()
    );
    for vip in [before, after] {
        assert_all_ok(&harness.client(&tcp(at(vip), 20)), &format!("TCP to {vip}"));
    }
}

#[test]
fn a_document_with_invalid_yaml_is_skipped_without_losing_the_others() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    let (before, after) = (ip("10.96.0.43"), ip("10.96.0.44"));
    // Bad indentation: a syntax error confined to this one document.
    let broken = "\
apiVersion: v1
kind: Service
metadata:
  name: broken-yaml
    namespace: default
spec:
  clusterIP: 10.96.0.45
";
    let manifests = ipv4_service("before", "10.96.0.43", &backends)
        .raw(broken)
        .with(service("after", &[after], BACKEND_PORT))
        .with(slice("after", AddressType::IPv4, &backends));
    start_and_wait(&mut harness, &manifests, before);
    harness.wait_until_translated(ClientProto::Tcp, at(after));

    let warning = wait_for_log_line(&mut harness, |line| line.to_lowercase().contains("warn"));
    assert!(
        warning.is_some(),
        "the agent did not warn about the broken document"
    );
    eprintln!(
        "broken document reported as: {}",
        warning.unwrap_or_default()
    );
    for vip in [before, after] {
        assert_all_ok(&harness.client(&tcp(at(vip), 20)), &format!("TCP to {vip}"));
    }
}

#[test]
fn sigkill_and_restart_lose_no_connection_and_cleanup_removes_the_dataplane() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.50");
    let backends = harness.backend_ipv4s();
    start_and_wait(
        &mut harness,
        &ipv4_service("sturdy", "10.96.0.50", &backends),
        vip,
    );

    // An established connection, and a stream of new ones, across a SIGKILL and a restart.
    let held_connection = harness.hold(at(vip), Duration::from_secs(6), Duration::from_millis(100));
    held_connection
        .wait_for_attempts(1, Duration::from_secs(2))
        .expect("the held connection answered");
    let stream = harness.spawn_client(&tcp(at(vip), 400).interval(Duration::from_millis(10)));
    stream
        .wait_for_attempts(80, Duration::from_secs(5))
        .expect("the connection loop got going");
    harness.agent().kill().expect("SIGKILL the agent");
    // The pinned dataplane must carry traffic on its own while no agent runs.
    std::thread::sleep(Duration::from_millis(300));
    harness.agent().restart().expect("restarting the agent");

    let attempts = stream.finish().expect("the connection loop finished");
    assert_eq!(attempts.len(), 400);
    assert_all_ok(&attempts, "new connections across SIGKILL and restart");
    assert_peers_are(&attempts, at(vip), "getpeername across the restart");

    let held = held_connection
        .finish()
        .expect("the held connection finished");
    assert!(
        held.len() >= 40,
        "only {} requests on the held connection",
        held.len()
    );
    assert_all_ok(&held, "the held connection");
    let held_backends = reached(&held);
    assert_eq!(
        held_backends.len(),
        1,
        "held connection switched backend: {held_backends:?}"
    );

    // The restarted agent is in charge: it applies a change.
    let added = ip("10.96.0.51");
    harness.write_manifests(
        &ipv4_service("sturdy", "10.96.0.50", &backends)
            .with(service("added", &[added], BACKEND_PORT))
            .with(slice("added", AddressType::IPv4, &backends)),
    );
    harness.wait_until_translated(ClientProto::Tcp, at(added));

    harness.agent().kill().expect("SIGKILL the agent");
    let pins_dir = harness.agent().bpffs_dir().to_owned();
    let pins = pinned_objects(&pins_dir).expect("listing pins");
    assert!(
        !pins.is_empty(),
        "the agent pinned nothing under {}",
        pins_dir.display()
    );
    let output = harness.agent().cleanup().expect("running cleanup");
    assert!(
        output.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let left = pinned_objects(&pins_dir).expect("listing pins");
    assert!(left.is_empty(), "cleanup left pins behind: {left:?}");

    // Untranslated, the VIP is just an unroutable address in the isolated namespace.
    for proto in [ClientProto::Tcp, ClientProto::UdpUnconnected] {
        let attempts = harness.client(
            &ClientRequest::new(proto, at(vip))
                .count(3)
                .timeout(Duration::from_millis(500)),
        );
        for attempt in &attempts {
            assert!(
                !attempt.ok,
                "{proto:?} still translated after cleanup: {attempt:?}"
            );
            assert!(
                [libc::ENETUNREACH, libc::EHOSTUNREACH, libc::ETIMEDOUT]
                    .contains(&attempt.errno.unwrap_or_default()),
                "{proto:?} after cleanup: {attempt:?}"
            );
        }
    }
}

/// Reads one counter from the `counters:` line of `switchyard dump`.
fn counter(dump: &str, name: &str) -> u64 {
    let line = dump
        .lines()
        .find(|line| line.starts_with("counters:"))
        .expect("dump prints counters");
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {line:?}"))
}

#[test]
fn dump_shows_the_programmed_service_and_the_datapath_counters() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.13");
    let manifests = ipv4_service("counted", "10.96.0.13", &harness.backend_ipv4s());
    start_and_wait(&mut harness, &manifests, vip);
    assert_all_ok(&harness.client(&tcp(at(vip), 50)), "TCP to the VIP");

    let output = std::process::Command::new(switchyard_tests::agent::switchyard_bin())
        .arg("dump")
        .arg("--bpffs")
        .arg(harness.agent().bpffs_dir())
        .output()
        .expect("run switchyard dump");
    let dump = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        dump.contains(
            "frontend 10.96.0.13:80/TCP scope=cluster flags=cluster-ip affinity=0s count=3"
        ),
        "{dump}"
    );
    assert!(counter(&dump, "translated") >= 50, "{dump}");
    // Every getpeername of the 50 connections showed the VIP.
    assert!(counter(&dump, "rev_nat_applied") >= 50, "{dump}");
    // Closed sockets take their reverse-NAT entries with them (the sock_release hook).
    assert!(counter(&dump, "sock_rev_nat_released") >= 50, "{dump}");
}

#[test]
fn dual_stack_sockets_reach_an_ipv4_service_through_its_mapped_address() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = ip("10.96.0.14");
    let manifests = ipv4_service("mapped", "10.96.0.14", &harness.backend_ipv4s());
    start_and_wait(&mut harness, &manifests, vip);
    // An AF_INET6 socket (as Java and other dual-stack runtimes use) to ::ffff:10.96.0.14.
    let mapped = ip("::ffff:10.96.0.14");
    for proto in [ClientProto::Tcp, ClientProto::UdpConnected] {
        let attempts = harness.client(&ClientRequest::new(proto, at(mapped)).count(60));
        assert_all_ok(&attempts, &format!("{proto:?} to the mapped VIP"));
        assert_peers_are(&attempts, at(mapped), "getpeername shows the mapped VIP");
        assert_eq!(reached(&attempts), all_backends(&harness), "{proto:?}");
    }
}
