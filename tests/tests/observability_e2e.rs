//! End-to-end tests of what an operator sees: the metrics endpoint (names and values after
//! known changes), the health endpoints across the agent's lifecycle and while its node
//! drains (KEP-3836).

use std::net::SocketAddr;
use std::thread::sleep;
use std::time::{Duration, Instant};

use switchyard_tests::client::http::get_in_netns;
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::apiserver::{ApiServer, Kind};
use switchyard_tests::k8s::manifests::Manifests;
use switchyard_tests::k8s::objects;
use switchyard_tests::world::harness::{BACKEND_PORT, Harness};
use switchyard_tests::{require_root, testkit};

const METRICS: &str = "127.0.0.1:10249";
const HEALTH: &str = "127.0.0.1:10256";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("valid address")
}

fn get(harness: &Harness, address: &str, path: &str) -> (u16, String) {
    get_in_netns(harness.topology().node_namespace(), addr(address), path)
        .unwrap_or_else(|e| panic!("GET {path} on {address}: {e:#}"))
}

/// The value of the metric line that starts with `series` (name plus labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// An integer-valued series (counters and gauges of counts).
fn count(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no integer series {series} in:\n{text}"))
}

fn web(backends: &[std::net::IpAddr]) -> Manifests {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|ip| format!("{{addresses: ['{ip}']}}"))
        .collect();
    Manifests::new().raw(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: obs}}\nspec: {{clusterIP: 10.96.6.10, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: obs, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}}}]\nendpoints: [{}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: broken, namespace: obs}}\nspec: {{clusterIP: 10.96.6.11, ports: [{{name: big, port: 70000}}]}}\n",
        endpoints.join(", ")
    ))
}

#[test]
fn metrics_report_syncs_map_fill_changes_and_datapath_reasons() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let target = addr("10.96.6.10:80");
    harness.write_manifests(&web(&harness.backend_ipv4s()));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, target);
    let attempts = harness.client(&ClientRequest::new(ClientProto::Tcp, target).count(40));
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");

    let (status, text) = get(&harness, METRICS, "/metrics");
    assert_eq!(status, 200);
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(
        metric(
            &text,
            "kubeproxy_network_programming_duration_seconds_count"
        ) >= 1.0
    );
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.0e9);
    assert!(
        metric(
            &text,
            "switchyard_datapath_events_total{reason=\"translated\"}"
        ) >= 40.0
    );
    assert_eq!(
        count(&text, "switchyard_bpf_map_entries{map=\"BACKEND4_V1\"}"),
        3
    );
    // Master entry plus three slots for web; the broken Service's only port is skipped.
    assert_eq!(
        count(&text, "switchyard_bpf_map_entries{map=\"SVC4_V1\"}"),
        4
    );
    assert_eq!(
        count(&text, "switchyard_bpf_map_capacity{map=\"SVC4_V1\"}"),
        262_144
    );
    assert_eq!(count(&text, "switchyard_invalid_object_parts_total"), 1);
    // Socket translations are counted by the agent's upkeep (at start, then every 10 s), never
    // at scrape time: no client socket was open at a count (map_sizing_e2e counts a held one).
    assert_eq!(
        count(&text, "switchyard_socket_translations{family=\"ipv4\"}"),
        0
    );
    let endpoint_changes = count(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total");

    // Scale down: one more EndpointSlice change, fewer backends in the maps.
    harness.write_manifests(&web(&harness.backend_ipv4s()[..1]));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, text) = get(&harness, METRICS, "/metrics");
        let backends = count(&text, "switchyard_bpf_map_entries{map=\"BACKEND4_V1\"}");
        if backends == 1 {
            assert_eq!(
                count(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
                endpoint_changes + 1
            );
            assert!(metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scale-down never showed in the metrics:\n{text}"
        );
        sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&harness, METRICS, "/nope").0, 404);
}

#[test]
fn health_endpoints_follow_the_agent_lifecycle() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 1);
    // An API server whose lists are slow: the agent runs but has not synced yet.
    let api =
        ApiServer::start_in_netns(harness.topology().node_namespace()).expect("test API server");
    api.set_list_delay(Duration::from_secs(3));
    let kubeconfig_dir = TempDir::new().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(kubeconfig_dir.path());
    harness.start_agent_with_kubeconfig(&kubeconfig, &[]);

    let before = Instant::now() + Duration::from_secs(2);
    let mut saw_not_ready = false;
    while Instant::now() < before {
        if let Ok((status, body)) =
            get_in_netns(harness.topology().node_namespace(), addr(HEALTH), "/readyz")
        {
            assert_eq!(status, 503, "ready before the first sync: {body}");
            let (health, body) = get(&harness, HEALTH, "/healthz");
            assert_eq!(health, 503, "healthy before any sync: {body}");
            saw_not_ready = true;
        }
        sleep(Duration::from_millis(100));
    }
    assert!(
        saw_not_ready,
        "the health endpoint never answered while the first list was slow"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&harness, HEALTH, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready after the first list"
        );
        sleep(Duration::from_millis(100));
    }
    let (status, body) = get(&harness, HEALTH, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"lastUpdated\"") && body.contains("\"nodeEligible\": true"),
        "{body}"
    );
    assert_eq!(get(&harness, HEALTH, "/livez").0, 200);
}

/// Polls `path` on the health port until it answers `status`; returns the body.
fn wait_for_status(harness: &Harness, path: &str, status: u16, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The endpoint may not listen yet right after the agent starts.
        let answer = get_in_netns(harness.topology().node_namespace(), addr(HEALTH), path);
        if let Ok((got, body)) = &answer
            && *got == status
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {status} ({what}); last: {answer:?}"
        );
        sleep(Duration::from_millis(100));
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn healthz_fails_while_the_node_drains_and_livez_does_not() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 1);
    let api =
        ApiServer::start_in_netns(harness.topology().node_namespace()).expect("test API server");
    api.apply(&objects::node("node-a", Some("zone-a"), &[]));
    let kubeconfig_dir = TempDir::new().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(kubeconfig_dir.path());
    harness.start_agent_with_kubeconfig(&kubeconfig, &["--node-name", "node-a"]);
    let body = wait_for_status(&harness, "/healthz", 200, "synced, node eligible");
    assert_eq!(json(&body)["nodeEligible"], true, "{body}");

    // The cluster autoscaler is about to remove the node: load balancers must drain it, but
    // the agent itself is alive (kubelet must not restart it) and keeps serving.
    api.apply(&objects::node(
        "node-a",
        Some("zone-a"),
        &["ToBeDeletedByClusterAutoscaler"],
    ));
    let body = wait_for_status(&harness, "/healthz", 503, "to-be-deleted taint");
    assert_eq!(json(&body)["nodeEligible"], false, "{body}");
    assert!(json(&body)["lastUpdated"].is_string(), "{body}");
    assert!(json(&body)["currentTime"].is_string(), "{body}");
    let (status, body) = get(&harness, HEALTH, "/livez");
    assert_eq!(status, 200, "livez ignores the node: {body}");
    assert!(json(&body).get("nodeEligible").is_none(), "{body}");

    // The taint goes (scale-down cancelled): eligible again.
    api.apply(&objects::node("node-a", Some("zone-a"), &[]));
    wait_for_status(&harness, "/healthz", 200, "taint removed");

    // The Node object is being deleted: not eligible, for good.
    api.mark_for_deletion(Kind::Node, "", "node-a")
        .expect("the Node exists");
    let body = wait_for_status(&harness, "/healthz", 503, "deletionTimestamp set");
    assert_eq!(json(&body)["nodeEligible"], false, "{body}");
    assert_eq!(get(&harness, HEALTH, "/livez").0, 200);

    let (_, text) = get(&harness, METRICS, "/metrics");
    assert!(
        count(&text, "kubeproxy_proxy_healthz_total{code=\"503\"}") >= 2,
        "{text}"
    );
    assert!(count(&text, "kubeproxy_proxy_healthz_total{code=\"200\"}") >= 2);
    assert!(count(&text, "kubeproxy_proxy_livez_total{code=\"200\"}") >= 2);
    assert_eq!(count(&text, "kubeproxy_proxy_livez_total{code=\"503\"}"), 0);
}

fn inspect(harness: &mut Harness, args: &[&str]) -> String {
    let output = std::process::Command::new(switchyard_tests::agent::switchyard_bin())
        .arg("inspect")
        .args(args)
        .arg("--bpffs")
        .arg(harness.agent().bpffs_dir())
        .output()
        .expect("run switchyard inspect");
    assert!(
        output.status.success(),
        "inspect {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[test]
fn inspect_names_services_and_shows_backends_sockets_and_counters_with_the_agent_stopped() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let target = addr("10.96.6.10:80");
    let ips = harness.backend_ipv4s();
    harness.write_manifests(&web(&ips));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, target);
    assert!(
        harness
            .client(&ClientRequest::new(ClientProto::Tcp, target).count(20))
            .iter()
            .all(|a| a.ok)
    );
    // A connection held open is visible as a socket translation.
    let hold = harness.hold(target, Duration::from_secs(4), Duration::from_millis(200));
    hold.wait_for_attempts(1, Duration::from_secs(3))
        .expect("the held connection answers");
    harness.agent().kill().expect("SIGKILL the agent");

    let services: serde_json::Value =
        serde_json::from_str(&inspect(&mut harness, &["services", "-o", "json"])).expect("JSON");
    let web = services
        .as_array()
        .and_then(|all| all.iter().find(|s| s["frontend"] == "10.96.6.10:80/TCP"))
        .unwrap_or_else(|| panic!("no web frontend in {services}"));
    assert_eq!(web["service"], "obs/web:http");
    assert_eq!(web["backend_count"], 3);
    let mut addresses: Vec<String> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect();
    addresses.sort();
    let mut expected: Vec<String> = ips
        .iter()
        .map(|ip| format!("{ip}:{BACKEND_PORT}/TCP"))
        .collect();
    expected.sort();
    assert_eq!(addresses, expected);

    let table = inspect(&mut harness, &["services"]);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|header| header.starts_with("FRONTEND")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("10.96.6.10:80/TCP") && line.contains("obs/web:http")),
        "{table}"
    );

    let backends = inspect(&mut harness, &["backends"]);
    assert_eq!(
        backends
            .lines()
            .filter(|line| line.contains("obs/web:http"))
            .count(),
        3,
        "{backends}"
    );

    let sockets: serde_json::Value =
        serde_json::from_str(&inspect(&mut harness, &["conntrack", "-o", "json"])).expect("JSON");
    assert!(
        sockets.as_array().is_some_and(|all| all
            .iter()
            .any(|s| s["service"] == "obs/web:http" && s["frontend"] == "10.96.6.10:80")),
        "the held connection is not listed: {sockets}"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&inspect(&mut harness, &["stats", "-o", "json"])).expect("JSON");
    assert!(
        stats["datapath"]["translated"]
            .as_u64()
            .is_some_and(|n| n >= 21),
        "{stats}"
    );
    assert!(
        stats["maps"].as_array().is_some_and(|maps| maps
            .iter()
            .any(|m| m["map"] == "BACKEND4_V1" && m["entries"] == 3)),
        "{stats}"
    );
    drop(hold);
}
