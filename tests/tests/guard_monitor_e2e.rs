//! End-to-end tests of the socket hooks' newer semantics and of `switchyard monitor`, with
//! real connections from the hooked test cgroup:
//!
//! - the service-CIDR guard (nftables mode): a port an active ClusterIP does not serve is
//!   refused, an unallocated address of a ServiceCIDR fails without a packet, and the monitor
//!   says which process, what and why;
//! - NodePorts on 127.0.0.1 and ::1 (`--nodeport-addresses localhost`), TCP and UDP;
//! - an externalIP equal to the node's address is not translated for the node's own
//!   processes, but is for pods (CVE-2020-8554).
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use switchyard_tests::client::http::get_in_netns;
use switchyard_tests::client::report::Attempt;
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::k8s::manifests::Manifests;
use switchyard_tests::world::harness::{BACKEND_PORT, Harness};
use switchyard_tests::{require_root, testkit};

fn at(text: &str) -> SocketAddr {
    text.parse().expect("an address")
}

/// A dual-stack Service `name` with a TCP port 80 and a UDP port 53 (NodePorts 30080 and
/// 30053 when `node_port`), its IPv4 and IPv6 slices, and extra spec lines.
fn service(name: &str, ips: &[&str], node_port: bool, extra: &str, harness: &Harness) -> String {
    service_on(
        name,
        ips,
        node_port,
        extra,
        (harness.backend_ipv4s(), harness.backend_ipv6s()),
    )
}

/// [`service`] with the given endpoints (IPv4, IPv6).
fn service_on(
    name: &str,
    ips: &[&str],
    node_port: bool,
    extra: &str,
    (v4, v6): (Vec<IpAddr>, Vec<IpAddr>),
) -> String {
    let ports = if node_port {
        "[{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]"
    } else {
        "[{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]"
    };
    let kind = if node_port { "NodePort" } else { "ClusterIP" };
    let ips: Vec<String> = ips.iter().map(|ip| format!("'{ip}'")).collect();
    let endpoints = |addresses: Vec<IpAddr>| {
        addresses
            .iter()
            .map(|ip| format!("{{addresses: ['{ip}']}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let slice_ports = format!(
        "[{{name: http, port: {BACKEND_PORT}}}, {{name: dns, port: {BACKEND_PORT}, protocol: UDP}}]"
    );
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: e2e}}\nspec:\n  type: {kind}\n  clusterIPs: [{}]\n  ports: {ports}\n{extra}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-v4, namespace: e2e, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: {slice_ports}\nendpoints: [{}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-v6, namespace: e2e, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv6\nports: {slice_ports}\nendpoints: [{}]\n---\n",
        ips.join(", "),
        endpoints(v4),
        endpoints(v6),
    )
}

fn one(harness: &Harness, proto: ClientProto, target: SocketAddr) -> Attempt {
    harness
        .client(&ClientRequest::new(proto, target).timeout(Duration::from_secs(2)))
        .pop()
        .expect("one attempt")
}

fn counter(harness: &Harness, reason: &str) -> u64 {
    let (status, text) = get_in_netns(
        harness.topology().node_namespace(),
        at("127.0.0.1:10249"),
        "/metrics",
    )
    .expect("GET /metrics");
    assert_eq!(status, 200);
    let series = format!("switchyard_datapath_events_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn the_guard_refuses_other_ports_drops_unallocated_addresses_and_the_monitor_says_why() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let manifests = format!(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {{name: kubernetes}}\nspec: {{cidrs: [10.96.50.0/24, 'fd00:96::50:0/112']}}\n---\n{}",
        service(
            "web",
            &["10.96.50.10", "fd00:96::50:10"],
            false,
            "",
            &harness
        )
    );
    harness.write_manifests(&Manifests::new().raw(&manifests));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at("10.96.50.10:80"));

    // Nothing is written to the ring buffer while nobody monitors.
    let monitor = Command::new(switchyard_tests::agent::switchyard_bin())
        .args(["monitor", "--output", "json", "--duration", "8s", "--bpffs"])
        .arg(harness.agent().bpffs_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchyard monitor");
    // The monitor takes its lease at once; give it a moment to start.
    sleep(Duration::from_millis(800));

    for (proto, target) in [
        (ClientProto::Tcp, "10.96.50.10:81"),
        (ClientProto::UdpConnected, "10.96.50.10:81"),
        (ClientProto::UdpUnconnected, "[fd00:96::50:10]:81"),
    ] {
        let attempt = one(&harness, proto, at(target));
        assert_eq!(
            attempt.errno,
            Some(libc::ECONNREFUSED),
            "{proto:?} {target}: a port the ClusterIP does not serve is refused: {attempt:?}"
        );
        assert!(attempt.elapsed_ms < 1000, "at once: {attempt:?}");
    }
    for (proto, target) in [
        (ClientProto::Tcp, "10.96.50.99:80"),
        (ClientProto::UdpConnected, "[fd00:96::50:99]:53"),
    ] {
        let attempt = one(&harness, proto, at(target));
        assert_eq!(
            attempt.errno,
            Some(libc::EPERM),
            "{proto:?} {target}: an unallocated service address fails without a packet: {attempt:?}"
        );
    }
    let served = one(&harness, ClientProto::Tcp, at("10.96.50.10:80"));
    assert!(served.ok, "the Service's own port still works: {served:?}");
    // Outside every ServiceCIDR and no ClusterIP: untouched (no route in the test namespace).
    let elsewhere = one(&harness, ClientProto::Tcp, at("10.96.60.1:80"));
    assert!(
        !matches!(elsewhere.errno, Some(libc::EPERM | libc::ECONNREFUSED)),
        "not the guard's business: {elsewhere:?}"
    );
    assert!(counter(&harness, "guard_rejected") >= 3);
    assert!(counter(&harness, "guard_dropped") >= 2);

    let output = monitor.wait_with_output().expect("the monitor ends");
    assert!(
        output.status.success(),
        "monitor: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let find = |verdict: &str, frontend: &str| {
        events
            .iter()
            .find(|event| event["verdict"] == verdict && event["frontend"] == frontend)
            .unwrap_or_else(|| panic!("no {verdict} event for {frontend} in {events:#?}"))
    };
    let refused = find("refused", "10.96.50.10:81");
    assert_eq!(refused["reason"], "guard_rejected");
    assert_eq!(refused["protocol"], "TCP");
    assert_eq!(refused["hook"], "connect");
    assert_eq!(refused["comm"], "sy-testkit", "{refused}");
    assert!(refused["pid"].as_u64().is_some_and(|pid| pid > 1));
    assert!(
        refused["why"]
            .as_str()
            .is_some_and(|why| why.contains("active ClusterIP")),
        "{refused}"
    );
    let unconnected = find("refused", "[fd00:96::50:10]:81");
    assert_eq!(unconnected["hook"], "sendmsg");
    let dropped = find("dropped", "10.96.50.99:80");
    assert_eq!(dropped["reason"], "guard_dropped");
    let translated = find("translated", "10.96.50.10:80");
    assert_eq!(translated["service"], "e2e/web:http");
    let backends: BTreeSet<String> = harness
        .backend_ipv4s()
        .iter()
        .map(|ip| SocketAddr::new(*ip, BACKEND_PORT).to_string())
        .collect();
    assert!(
        backends.contains(translated["backend"].as_str().unwrap_or_default()),
        "{translated}"
    );
    // The lease is gone with the monitor: nothing more is written (a new monitor would
    // start from an empty buffer of new events only).
    assert_eq!(counter(&harness, "monitor_events_lost"), 0);
}

#[test]
fn localhost_nodeports_serve_tcp_and_udp_on_both_families() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let manifests = service("np", &["10.96.51.10", "fd00:96::51:10"], true, "", &harness);
    harness.write_manifests(&Manifests::new().raw(&manifests));
    harness.start_agent(&["--nodeport-addresses", "localhost"]);
    harness.wait_until_translated(ClientProto::Tcp, at("127.0.0.1:30080"));
    let names: BTreeSet<String> = (0..2)
        .map(switchyard_tests::world::harness::backend_name)
        .collect();
    for (proto, target) in [
        (ClientProto::Tcp, "127.0.0.1:30080"),
        (ClientProto::UdpConnected, "127.0.0.1:30053"),
        (ClientProto::UdpUnconnected, "127.0.0.1:30053"),
        (ClientProto::Tcp, "[::1]:30080"),
        (ClientProto::UdpConnected, "[::1]:30053"),
        (ClientProto::UdpUnconnected, "[::1]:30053"),
    ] {
        let attempt = one(&harness, proto, at(target));
        assert!(attempt.ok, "{proto:?} {target}: {attempt:?}");
        assert!(
            attempt
                .backend
                .as_ref()
                .is_some_and(|name| names.contains(name)),
            "{proto:?} {target} reached a backend: {attempt:?}"
        );
        assert_eq!(
            attempt.peer,
            Some(at(target)),
            "{proto:?}: the application sees the NodePort it asked for"
        );
    }
}

#[test]
fn an_external_ip_equal_to_the_nodes_address_is_not_for_the_node_but_is_for_pods() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let node_address = harness.backends()[0].node_ipv4;
    // The one endpoint is the pod that connects below (its namespace routes nowhere else).
    let pod = harness.backends()[1].clone();
    let manifests = service_on(
        "ext",
        &["10.96.52.10", "fd00:96::52:10"],
        false,
        &format!("  externalIPs: ['{node_address}', 198.51.100.52]\n"),
        (vec![IpAddr::V4(pod.ipv4)], vec![IpAddr::V6(pod.ipv6)]),
    );
    harness.write_manifests(&Manifests::new().raw(&manifests));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at("198.51.100.52:80"));
    let target = SocketAddr::new(IpAddr::V4(node_address), 80);
    let bypassed = counter(&harness, "host_external_ip_bypassed");
    // From the node's own network namespace (the agent's): the real address, where nothing
    // listens on port 80.
    let host = one(&harness, ClientProto::Tcp, target);
    assert!(!host.ok && host.backend.is_none(), "{host:?}");
    assert_eq!(host.errno, Some(libc::ECONNREFUSED), "{host:?}");
    assert!(counter(&harness, "host_external_ip_bypassed") > bypassed);
    // From a pod (another network namespace in the hooked cgroup): translated.
    let attempt = harness
        .client_in(
            &pod.namespace,
            &ClientRequest::new(ClientProto::Tcp, target),
        )
        .pop()
        .expect("one attempt");
    assert!(attempt.ok, "a pod reaches the Service: {attempt:?}");
    assert!(attempt.backend.is_some(), "{attempt:?}");
}

/// kube-proxy's two e2e tests: a terminating, unready endpoint stays reachable only when its
/// Service sets `publishNotReadyAddresses`.
#[test]
fn terminating_unready_endpoints_are_reachable_only_with_publish_not_ready_addresses() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 1);
    let backend = harness.backend_ipv4s()[0];
    let service = |name: &str, ip: &str, publish: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: e2e}}\nspec: {{clusterIP: {ip}, publishNotReadyAddresses: {publish}, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: e2e, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}}}]\nendpoints: [{{addresses: ['{backend}'], conditions: {{ready: false, serving: false, terminating: true}}}}]\n---\n"
        )
    };
    let manifests = format!(
        "{}{}",
        service("published", "10.96.53.10", true),
        service("unpublished", "10.96.53.11", false)
    );
    harness.write_manifests(&Manifests::new().raw(&manifests));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at("10.96.53.10:80"));
    let refused =
        harness.wait_until_errno(ClientProto::Tcp, at("10.96.53.11:80"), libc::ECONNREFUSED);
    assert!(refused.backend.is_none(), "{refused:?}");
}

/// With `--bpf-log-level trace` the programs load with every log statement enabled (the
/// verifier accepts them) and the datapath works as usual.
#[test]
fn the_programs_load_and_translate_with_bpf_logging_on() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 1);
    let manifests = service(
        "logged",
        &["10.96.54.10", "fd00:96::54:10"],
        false,
        "",
        &harness,
    );
    harness.write_manifests(&Manifests::new().raw(&manifests));
    harness.start_agent(&["--bpf-log-level", "trace"]);
    harness.wait_until_translated(ClientProto::Tcp, at("10.96.54.10:80"));
    for (proto, target) in [
        (ClientProto::UdpConnected, "10.96.54.10:53"),
        (ClientProto::UdpUnconnected, "[fd00:96::54:10]:53"),
    ] {
        let attempt = one(&harness, proto, at(target));
        assert!(attempt.ok, "{proto:?} {target}: {attempt:?}");
    }
}
