//! End-to-end test of the healthCheckNodePort listeners: the agent, in the node namespace as
//! node `node-a`, answers a LoadBalancer Service's health check as kube-proxy does, on every
//! node address (IPv4 and IPv6, probed from a neighbouring namespace as a load balancer would),
//! following the Service's local endpoints and closing the port when the Service stops asking
//! for one (policy Cluster, deletion).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Result;
use switchyard_tests::client::http::get_in_netns;
use switchyard_tests::k8s::manifests::Manifests;
use switchyard_tests::world::harness::{BACKEND_PORT, Harness};
use switchyard_tests::{require_root, testkit};

const NODE: &str = "node-a";
const HEALTH_CHECK_PORT: u16 = 32_100;
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10_249);
/// Manifests are re-read within a second; a sync follows at most 100 ms later.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The LoadBalancer Service `hc/lb` with one endpoint at `endpoint` on node `endpoint_node`.
/// With `local`, externalTrafficPolicy is Local and the Service has a healthCheckNodePort (the
/// API server allocates one only then, and clears it when the policy becomes Cluster).
fn load_balancer(local: bool, endpoint: IpAddr, endpoint_node: &str) -> Manifests {
    load_balancer_with(local, endpoint, endpoint_node, "{ready: true}")
}

/// [`load_balancer`] with the endpoint's `conditions`.
fn load_balancer_with(
    local: bool,
    endpoint: IpAddr,
    endpoint_node: &str,
    conditions: &str,
) -> Manifests {
    let policy = if local {
        format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_CHECK_PORT}\n")
    } else {
        "  externalTrafficPolicy: Cluster\n".to_owned()
    };
    Manifests::new().raw(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: hc}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.7.10\n  ports: [{{name: http, port: 80, nodePort: 31080}}]\n{policy}status:\n  loadBalancer:\n    ingress: [{{ip: 192.0.2.70}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: lb-1, namespace: hc, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}}}]\nendpoints:\n  - {{addresses: ['{endpoint}'], nodeName: {endpoint_node}, conditions: {conditions}}}\n"
    ))
}

/// Where the health check is probed from: a namespace linked to the node, as a load balancer.
struct Probe {
    netns: String,
    node_ipv4: Ipv4Addr,
    node_ipv6: Ipv6Addr,
}

impl Probe {
    fn get(&self, ip: IpAddr) -> Result<(u16, String)> {
        get_in_netns(
            &self.netns,
            SocketAddr::new(ip, HEALTH_CHECK_PORT),
            "/anything",
        )
    }

    fn ipv4(&self) -> Result<(u16, String)> {
        self.get(IpAddr::V4(self.node_ipv4))
    }

    fn ipv6(&self) -> Result<(u16, String)> {
        self.get(IpAddr::V6(self.node_ipv6))
    }
}

/// Polls `probe` until `accept` takes its outcome; panics with the last outcome otherwise.
fn wait_for<T: std::fmt::Debug>(
    harness: &mut Harness,
    what: &str,
    mut probe: impl FnMut() -> Result<T>,
    accept: impl Fn(&Result<T>) -> bool,
) -> Result<T> {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        harness
            .agent()
            .ensure_running()
            .unwrap_or_else(|e| panic!("waiting for {what}: {e:#}"));
        let outcome = probe();
        if accept(&outcome) {
            return outcome;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {CHANGE_TIMEOUT:?}; last: {outcome:?}"
        );
        sleep(Duration::from_millis(100));
    }
}

fn body(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

fn status_is(status: u16) -> impl Fn(&Result<(u16, String)>) -> bool {
    move |outcome| matches!(outcome, Ok((got, _)) if *got == status)
}

fn refused(outcome: &Result<(u16, String)>) -> bool {
    outcome.as_ref().is_err_and(|error| {
        error
            .downcast_ref::<io::Error>()
            .is_some_and(|error| error.kind() == io::ErrorKind::ConnectionRefused)
    })
}

/// The value of an integer metric series on the agent's metrics endpoint.
fn metric(harness: &Harness, series: &str) -> u64 {
    let (status, text) = get_in_netns(harness.topology().node_namespace(), METRICS, "/metrics")
        .unwrap_or_else(|e| panic!("GET /metrics: {e:#}"));
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn the_health_check_node_port_follows_local_endpoints_and_closes_with_the_policy() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backends().to_vec();
    let endpoint = IpAddr::V4(backends[1].ipv4);
    let probe = Probe {
        netns: backends[0].namespace.clone(),
        node_ipv4: backends[0].node_ipv4,
        node_ipv6: backends[0].node_ipv6,
    };
    harness.write_manifests(&load_balancer(true, endpoint, NODE));
    harness.start_agent(&["--node-name", NODE]);

    // A local ready endpoint: 200 with kube-proxy's body, on the node's IPv4 and IPv6.
    let (_, text) = wait_for(
        &mut harness,
        "a healthy health check",
        || probe.ipv4(),
        status_is(200),
    )
    .expect("accepted");
    assert_eq!(
        body(&text),
        serde_json::json!({
            "service": {"namespace": "hc", "name": "lb"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        })
    );
    let (status, text) = probe.ipv6().expect("the IPv6 node address answers too");
    assert_eq!(status, 200, "{text}");
    assert_eq!(body(&text)["localEndpoints"], 1);
    assert_eq!(metric(&harness, "switchyard_health_check_node_ports"), 1);
    assert_eq!(
        metric(
            &harness,
            "switchyard_health_check_node_port_bind_failures_total"
        ),
        0
    );

    // The local endpoint terminates but still serves (kube-proxy's e2e "should fail health
    // check node port if there are only terminating endpoints"): 503, so load balancers stop
    // sending new flows here, though flows arriving meanwhile still reach it.
    harness.write_manifests(&load_balancer_with(
        true,
        endpoint,
        NODE,
        "{ready: false, serving: true, terminating: true}",
    ));
    let (_, text) = wait_for(
        &mut harness,
        "a failing health check with only a terminating local endpoint",
        || probe.ipv4(),
        status_is(503),
    )
    .expect("accepted");
    assert_eq!(body(&text)["localEndpoints"], 0, "{text}");
    assert_eq!(body(&text)["serviceProxyHealthy"], true, "{text}");
    assert_eq!(probe.ipv6().expect("IPv6 answers").0, 503);
    harness.write_manifests(&load_balancer(true, endpoint, NODE));
    wait_for(
        &mut harness,
        "a healthy health check again",
        || probe.ipv4(),
        status_is(200),
    )
    .expect("accepted");

    // The endpoint moves to another node: 503 with no local endpoint, same listener.
    harness.write_manifests(&load_balancer(true, endpoint, "node-b"));
    let (_, text) = wait_for(
        &mut harness,
        "an unhealthy health check",
        || probe.ipv4(),
        status_is(503),
    )
    .expect("accepted");
    assert_eq!(body(&text)["localEndpoints"], 0, "{text}");
    assert_eq!(body(&text)["serviceProxyHealthy"], true, "{text}");
    assert_eq!(probe.ipv6().expect("IPv6 answers").0, 503);

    // externalTrafficPolicy Cluster: no health check any more, the port refuses connections.
    harness.write_manifests(&load_balancer(false, endpoint, "node-b"));
    wait_for(
        &mut harness,
        "a closed health-check port",
        || probe.ipv4(),
        refused,
    )
    .expect_err("refused");
    assert!(refused(&probe.ipv6()), "IPv6 is closed too");
    assert_eq!(metric(&harness, "switchyard_health_check_node_ports"), 0);

    // Local again, with the endpoint back on this node: the same port opens again at once.
    harness.write_manifests(&load_balancer(true, endpoint, NODE));
    wait_for(
        &mut harness,
        "a reopened health check",
        || probe.ipv4(),
        status_is(200),
    )
    .expect("accepted");

    // The Service is deleted: the port closes.
    harness.write_manifests(&Manifests::new());
    wait_for(
        &mut harness,
        "a health-check port closed with its Service",
        || probe.ipv4(),
        refused,
    )
    .expect_err("refused");
}
