//! Behaviours of NodePorts, externalIPs, load-balancer IPs, externalTrafficPolicy,
//! loadBalancerSourceRanges and health-check node ports (kube-proxy's semantics).
use std::net::IpAddr;

use proxy_common::service_flags::{
    CLUSTER_IP, EXTERNAL_IP, EXTERNAL_LOCAL, FORWARD_DSR, FORWARD_SNAT, LOAD_BALANCER,
    NO_LOCAL_ENDPOINTS, NODE_PORT, SOURCE_RANGES,
};

use super::{Frontend, ModelConfig, ModelOutput, Scope, build};
use crate::source::manifest;

fn ips(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().map(|text| text.parse().unwrap()).collect()
}

/// This node: `node-a`, addresses 192.168.0.2, 10.1.0.2 and fd00:192::2; NodePorts on the
/// first and the last.
fn config() -> ModelConfig {
    ModelConfig {
        node_name: Some("node-a".into()),
        node_addresses: ips(&["192.168.0.2", "10.1.0.2", "fd00:192::2"]),
        nodeport_addresses: ips(&["192.168.0.2", "fd00:192::2"]),
        ..ModelConfig::default()
    }
}

fn build_with(yaml: &str, config: &ModelConfig) -> ModelOutput {
    let parsed = manifest::parse(yaml);
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    build(&parsed.snapshot, config)
}

fn build_yaml(yaml: &str) -> ModelOutput {
    build_with(yaml, &config())
}

fn find<'a>(output: &'a ModelOutput, frontend: &str, scope: Scope) -> Option<&'a Frontend> {
    output
        .desired
        .frontends
        .iter()
        .find(|(key, _)| key.to_string() == frontend && key.scope == scope)
        .map(|(_, found)| found)
}

fn get<'a>(output: &'a ModelOutput, frontend: &str, scope: Scope) -> &'a Frontend {
    find(output, frontend, scope).unwrap_or_else(|| {
        panic!(
            "no {scope} frontend {frontend} in {:#?}",
            output.desired.frontends.keys()
        )
    })
}

fn backends(frontend: &Frontend) -> Vec<String> {
    frontend.backends.iter().map(ToString::to_string).collect()
}

fn ranges(frontend: &Frontend) -> Vec<String> {
    frontend
        .source_ranges
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn reasons(output: &ModelOutput) -> Vec<String> {
    output.problems.iter().map(ToString::to_string).collect()
}

fn service(name: &str, spec: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: p}}\nspec: {spec}\nstatus: {status}\n"
    )
}

fn slice(service: &str, family: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{family}, namespace: p, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: [{{name: http, port: 8080}}]\nendpoints: {endpoints}\n"
    )
}

/// A ready endpoint here (10.244.1.1) and one on node-b (10.244.2.1).
const HERE_AND_THERE: &str =
    "[{addresses: [10.244.1.1], nodeName: node-a}, {addresses: [10.244.2.1], nodeName: node-b}]";

#[test]
fn nodeports_open_on_every_nodeport_address_of_the_service_families() {
    let yaml = service(
        "np",
        "{type: NodePort, clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{}",
    ) + &slice("np", "IPv4", HERE_AND_THERE)
        + &service(
            "np-v4",
            "{type: NodePort, clusterIP: 10.96.0.2, ports: [{name: http, port: 80, nodePort: 30081}]}",
            "{}",
        );
    let output = build_yaml(&yaml);
    let v4 = get(&output, "192.168.0.2:30080/TCP", Scope::Cluster);
    assert_eq!(v4.flags, NODE_PORT);
    assert_eq!(backends(v4), ["10.244.1.1:8080/TCP", "10.244.2.1:8080/TCP"]);
    let v6 = get(&output, "[fd00:192::2]:30080/TCP", Scope::Cluster);
    assert_eq!(v6.flags, NODE_PORT, "no IPv6 endpoint: REJECT");
    assert!(v6.backends.is_empty());
    assert!(
        find(&output, "10.1.0.2:30080/TCP", Scope::Cluster).is_none(),
        "a node address outside --nodeport-addresses"
    );
    assert!(find(&output, "192.168.0.2:30081/TCP", Scope::Cluster).is_some());
    assert!(
        find(&output, "[fd00:192::2]:30081/TCP", Scope::Cluster).is_none(),
        "a single-stack IPv4 Service opens no IPv6 NodePort"
    );
    assert!(output.problems.is_empty(), "{:?}", reasons(&output));
}

#[test]
fn a_nodeport_on_a_clusterip_service_is_reported_and_not_opened() {
    let yaml = service(
        "odd",
        "{clusterIP: 10.96.0.1, ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{}",
    );
    let output = build_yaml(&yaml);
    assert_eq!(output.desired.frontends.len(), 1, "the ClusterIP only");
    assert!(
        reasons(&output)
            .iter()
            .any(|r| r.starts_with("Service p/odd") && r.contains("nodePort 30080")),
        "{:?}",
        reasons(&output)
    );
}

#[test]
fn external_ips_are_frontends_on_the_service_port_parsed_leniently_and_by_family() {
    let yaml = service(
        "ext",
        "{clusterIP: 10.96.0.1, externalIPs: [203.0.113.010, 'fd00::9', not-an-ip], ports: [{name: http, port: 80}]}",
        "{}",
    ) + &slice("ext", "IPv4", HERE_AND_THERE);
    let output = build_yaml(&yaml);
    let external = get(&output, "203.0.113.10:80/TCP", Scope::Cluster);
    assert_eq!(external.flags, EXTERNAL_IP);
    assert_eq!(backends(external).len(), 2);
    assert_eq!(
        get(&output, "10.96.0.1:80/TCP", Scope::Cluster).flags,
        CLUSTER_IP
    );
    let reasons = reasons(&output);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("externalIP fd00::9 is IPv6 but the Service has no IPv6 clusterIP")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("\"not-an-ip\"")),
        "{reasons:?}"
    );
    assert_eq!(output.desired.frontends.len(), 2);
}

#[test]
fn vip_mode_ingress_ips_are_frontends_and_proxy_mode_ones_and_load_balancer_ip_are_not() {
    let yaml = service(
        "lb",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerIP: 198.51.100.1, ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8, ipMode: VIP}, {ip: 9.9.9.9, ipMode: Proxy}, {hostname: lb.example.com}]}}",
    ) + &slice("lb", "IPv4", HERE_AND_THERE);
    let output = build_yaml(&yaml);
    for lb in ["1.2.3.4:80/TCP", "5.6.7.8:80/TCP"] {
        let frontend = get(&output, lb, Scope::Cluster);
        assert_eq!(frontend.flags, LOAD_BALANCER, "{lb}");
        assert_eq!(backends(frontend).len(), 2, "{lb}");
    }
    assert!(find(&output, "9.9.9.9:80/TCP", Scope::Cluster).is_none());
    assert!(find(&output, "198.51.100.1:80/TCP", Scope::Cluster).is_none());
    assert_eq!(
        get(&output, "192.168.0.2:30080/TCP", Scope::Cluster).flags,
        NODE_PORT
    );
    assert!(output.problems.is_empty(), "{:?}", reasons(&output));
}

#[test]
fn external_frontends_use_the_cluster_wide_set_whatever_the_internal_traffic_policy() {
    let yaml = service(
        "itp",
        "{type: NodePort, clusterIP: 10.96.0.1, internalTrafficPolicy: Local, externalIPs: [203.0.113.1], ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{}",
    ) + &slice("itp", "IPv4", HERE_AND_THERE);
    let output = build_yaml(&yaml);
    assert_eq!(
        backends(get(&output, "10.96.0.1:80/TCP", Scope::Cluster)),
        ["10.244.1.1:8080/TCP"]
    );
    for external in ["192.168.0.2:30080/TCP", "203.0.113.1:80/TCP"] {
        assert_eq!(
            backends(get(&output, external, Scope::Cluster)),
            ["10.244.1.1:8080/TCP", "10.244.2.1:8080/TCP"],
            "{external}"
        );
    }
}

#[test]
fn external_traffic_policy_local_adds_a_node_local_twin_to_every_external_frontend() {
    let yaml = service(
        "etp",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, externalIPs: [203.0.113.1], sessionAffinity: ClientIP, ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}]}}",
    ) + &slice("etp", "IPv4", HERE_AND_THERE);
    let output = build_yaml(&yaml);
    let clusterip = get(&output, "10.96.0.1:80/TCP", Scope::Cluster);
    assert_eq!(
        clusterip.flags, CLUSTER_IP,
        "eTP does not touch the ClusterIP"
    );
    assert!(find(&output, "10.96.0.1:80/TCP", Scope::Local).is_none());
    for (frontend, kind) in [
        ("192.168.0.2:30080/TCP", NODE_PORT),
        ("203.0.113.1:80/TCP", EXTERNAL_IP),
        ("1.2.3.4:80/TCP", LOAD_BALANCER),
    ] {
        let cluster = get(&output, frontend, Scope::Cluster);
        assert_eq!(cluster.flags, kind | EXTERNAL_LOCAL, "{frontend}");
        assert_eq!(backends(cluster).len(), 2, "pods short-circuit to all");
        let local = get(&output, frontend, Scope::Local);
        assert_eq!(local.flags, kind, "{frontend}");
        assert_eq!(backends(local), ["10.244.1.1:8080/TCP"], "{frontend}");
        assert_eq!(local.affinity_timeout_secs, 10_800, "{frontend}");
        assert_eq!(cluster.affinity_timeout_secs, 10_800, "{frontend}");
    }
}

#[test]
fn external_traffic_policy_local_drops_without_local_endpoints_and_rejects_without_any() {
    let spec = "{type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
    let elsewhere = service("etp", spec, "{}")
        + &slice(
            "etp",
            "IPv4",
            "[{addresses: [10.244.2.1], nodeName: node-b}]",
        );
    let output = build_yaml(&elsewhere);
    let local = get(&output, "192.168.0.2:30080/TCP", Scope::Local);
    assert!(local.backends.is_empty());
    assert_eq!(local.flags, NODE_PORT | NO_LOCAL_ENDPOINTS, "DROP");
    let cluster = get(&output, "192.168.0.2:30080/TCP", Scope::Cluster);
    assert_eq!(backends(cluster), ["10.244.2.1:8080/TCP"]);

    let nowhere = service("etp", spec, "{}");
    let output = build_yaml(&nowhere);
    let local = get(&output, "192.168.0.2:30080/TCP", Scope::Local);
    assert_eq!(local.flags, NODE_PORT, "REJECT");
    let cluster = get(&output, "192.168.0.2:30080/TCP", Scope::Cluster);
    assert_eq!(cluster.flags, NODE_PORT | EXTERNAL_LOCAL, "REJECT");
    assert!(cluster.backends.is_empty());
}

#[test]
fn external_traffic_policy_local_falls_back_to_local_terminating_endpoints_on_its_own() {
    let yaml = service(
        "etp",
        "{type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{}",
    ) + &slice(
        "etp",
        "IPv4",
        "[{addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.244.2.1], nodeName: node-b}]",
    );
    let output = build_yaml(&yaml);
    assert_eq!(
        backends(get(&output, "192.168.0.2:30080/TCP", Scope::Local)),
        ["10.244.1.1:8080/TCP"]
    );
    assert_eq!(
        backends(get(&output, "192.168.0.2:30080/TCP", Scope::Cluster)),
        ["10.244.2.1:8080/TCP"]
    );
}

#[test]
fn external_traffic_policy_local_applies_only_to_externally_accessible_services() {
    // A ClusterIP Service with a leftover load-balancer status is not externally accessible:
    // its LB IP is served with cluster-wide endpoints.
    let stale = service(
        "stale",
        "{clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{name: http, port: 80}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}]}}",
    );
    // A ClusterIP Service with externalIPs is.
    let external = service(
        "ext",
        "{clusterIP: 10.96.0.2, externalTrafficPolicy: Local, externalIPs: [203.0.113.1], ports: [{name: http, port: 80}]}",
        "{}",
    );
    let output = build_yaml(&(stale + &external));
    assert_eq!(
        get(&output, "1.2.3.4:80/TCP", Scope::Cluster).flags,
        LOAD_BALANCER
    );
    assert!(find(&output, "1.2.3.4:80/TCP", Scope::Local).is_none());
    assert!(find(&output, "203.0.113.1:80/TCP", Scope::Local).is_some());
}

#[test]
fn source_ranges_guard_load_balancer_ips_only_trimmed_lenient_and_of_the_frontend_family() {
    let yaml = service(
        "fw",
        "{type: LoadBalancer, clusterIPs: [10.96.0.1, 'fd00::1'], externalIPs: [203.0.113.1], loadBalancerSourceRanges: [' 203.0.113.000/025', '2001:db8::/64', 'bogus'], ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}, {ip: 'fd00:1b::4'}]}}",
    );
    let output = build_yaml(&yaml);
    let v4 = get(&output, "1.2.3.4:80/TCP", Scope::Cluster);
    assert_eq!(v4.flags, LOAD_BALANCER | SOURCE_RANGES);
    assert_eq!(ranges(v4), ["203.0.113.0/25"]);
    let v6 = get(&output, "[fd00:1b::4]:80/TCP", Scope::Cluster);
    assert_eq!(ranges(v6), ["2001:db8::/64"]);
    for unguarded in [
        "192.168.0.2:30080/TCP",
        "203.0.113.1:80/TCP",
        "10.96.0.1:80/TCP",
    ] {
        let frontend = get(&output, unguarded, Scope::Cluster);
        assert_eq!(frontend.flags & SOURCE_RANGES, 0, "{unguarded}");
        assert!(frontend.source_ranges.is_empty(), "{unguarded}");
    }
    assert!(
        reasons(&output)
            .iter()
            .any(|r| r.starts_with("Service p/fw") && r.contains("\"bogus\" is not a CIDR")),
        "{:?}",
        reasons(&output)
    );
}

#[test]
fn source_ranges_of_the_other_family_only_leave_the_frontend_open() {
    let yaml = service(
        "fw",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerSourceRanges: ['2001:db8::/64'], ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}]}}",
    );
    let output = build_yaml(&yaml);
    let lb = get(&output, "1.2.3.4:80/TCP", Scope::Cluster);
    assert_eq!(lb.flags, LOAD_BALANCER);
    assert!(output.problems.is_empty(), "{:?}", reasons(&output));
}

#[test]
fn unreadable_source_ranges_close_the_load_balancer_ips() {
    let yaml = service(
        "fw",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerSourceRanges: ['10.0.0.0/33'], ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}]}}",
    );
    let output = build_yaml(&yaml);
    let lb = get(&output, "1.2.3.4:80/TCP", Scope::Cluster);
    assert_eq!(lb.flags, LOAD_BALANCER | SOURCE_RANGES);
    assert!(lb.source_ranges.is_empty(), "no source is admitted");
    assert_eq!(output.problems.len(), 2, "{:?}", reasons(&output));
}

#[test]
fn a_range_covering_a_node_address_admits_the_load_balancer_ips_as_sources() {
    let yaml = service(
        "fw",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, loadBalancerSourceRanges: [10.1.0.0/16], ports: [{name: http, port: 80, nodePort: 30080}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8}]}}",
    );
    let output = build_yaml(&yaml);
    for scope in [Scope::Cluster, Scope::Local] {
        let lb = get(&output, "1.2.3.4:80/TCP", scope);
        assert_ne!(lb.flags & SOURCE_RANGES, 0, "{scope}");
        assert_eq!(
            ranges(lb),
            ["1.2.3.4/32", "5.6.7.8/32", "10.1.0.0/16"],
            "{scope}"
        );
    }
    let elsewhere = ModelConfig {
        node_addresses: ips(&["192.168.0.2"]),
        ..config()
    };
    let output = build_with(&yaml, &elsewhere);
    assert_eq!(
        ranges(get(&output, "1.2.3.4:80/TCP", Scope::Cluster)),
        ["10.1.0.0/16"]
    );
}

#[test]
fn an_external_ip_never_takes_another_services_cluster_ip() {
    // "a-hijack" sorts first, but a ClusterIP claims its address before any externalIP.
    let yaml = service(
        "a-hijack",
        "{clusterIP: 10.96.0.1, externalTrafficPolicy: Local, externalIPs: [10.96.0.2], ports: [{name: http, port: 80}]}",
        "{}",
    ) + &service(
        "b-victim",
        "{clusterIP: 10.96.0.2, ports: [{name: http, port: 80}]}",
        "{}",
    );
    let output = build_yaml(&yaml);
    assert_eq!(
        get(&output, "10.96.0.2:80/TCP", Scope::Cluster)
            .service
            .name
            .as_ref(),
        "b-victim"
    );
    assert!(
        find(&output, "10.96.0.2:80/TCP", Scope::Local).is_none(),
        "the loser's node-local twin goes with it"
    );
    assert!(
        reasons(&output)
            .iter()
            .any(|r| r.starts_with("Service p/a-hijack")
                && r.contains("already served by p/b-victim:http; externalIP ignored")),
        "{:?}",
        reasons(&output)
    );
}

#[test]
fn health_checks_count_distinct_local_ready_endpoint_ips_of_load_balancers_with_local_policy() {
    let yaml = service(
        "lb",
        "{type: LoadBalancer, clusterIPs: [10.96.0.1, 'fd00::1'], externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{name: http, port: 80, nodePort: 30080}, {name: alt, port: 81, nodePort: 30081}]}",
        "{}",
    ) + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lb-1, namespace: p, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv4\nports: [{name: http, port: 8080}, {name: alt, port: 8081}]\nendpoints:\n- {addresses: [10.244.1.1], nodeName: node-a}\n- {addresses: [10.244.1.2], nodeName: node-a}\n- {addresses: [10.244.1.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}\n- {addresses: [10.244.2.1], nodeName: node-b}\n"
        + &slice(
            "lb",
            "IPv6",
            "[{addresses: ['fd00:244::1'], nodeName: node-a}]",
        )
        + &service(
            "np",
            "{type: NodePort, clusterIP: 10.96.0.2, externalTrafficPolicy: Local, healthCheckNodePort: 32001, ports: [{name: http, port: 80, nodePort: 30090}]}",
            "{}",
        );
    let output = build_yaml(&yaml);
    let checks: Vec<(u16, String, usize)> = output
        .desired
        .health_checks
        .iter()
        .map(|(port, check)| {
            (
                *port,
                format!("{}/{}", check.namespace, check.name),
                check.local_endpoints,
            )
        })
        .collect();
    assert_eq!(
        checks,
        [(32000, "p/lb".to_owned(), 3)],
        "two IPv4 and one IPv6 ready here, counted once across ports; terminating and remote ones do not count; NodePort Services get none"
    );
}

#[test]
fn health_check_problems_are_reported() {
    let yaml = service(
        "a",
        "{type: LoadBalancer, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80, nodePort: 30080}]}",
        "{}",
    ) + &service(
        "b",
        "{type: LoadBalancer, clusterIP: 10.96.0.2, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80, nodePort: 30081}]}",
        "{}",
    ) + &service(
        "c",
        "{type: LoadBalancer, clusterIP: 10.96.0.3, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30082}]}",
        "{}",
    );
    let output = build_yaml(&yaml);
    assert_eq!(
        output
            .desired
            .health_checks
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [32000]
    );
    assert_eq!(output.desired.health_checks[&32000].name, "a");
    let reasons = reasons(&output);
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("Service p/b") && r.contains("already used by p/a")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("Service p/c") && r.contains("no healthCheckNodePort")),
        "{reasons:?}"
    );
}

#[test]
fn a_headless_service_has_no_external_frontends() {
    let yaml = service(
        "headless",
        "{clusterIP: None, externalIPs: [203.0.113.1], ports: [{name: http, port: 80}]}",
        "{loadBalancer: {ingress: [{ip: 1.2.3.4}]}}",
    );
    let output = build_yaml(&yaml);
    assert!(output.desired.frontends.is_empty());
}

/// A Service with the forwarding-mode annotation `mode` (a NodePort and an LB IP).
fn annotated(name: &str, mode: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: p, annotations: {{switchyard.dev/forwarding-mode: {mode}}}}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80, nodePort: {}}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 1.2.3.{}}}]}}}}\n",
        name.len(),
        30000 + name.len(),
        name.len()
    )
}

#[test]
fn forwarding_mode_annotation_marks_external_frontends_and_a_bad_value_is_one_services_problem() {
    let yaml = annotated("d", "dsr") + &annotated("sn", "snat") + &annotated("bad", "direct");
    let output = build_yaml(&yaml);
    assert_eq!(
        get(&output, "1.2.3.1:80/TCP", Scope::Cluster).flags,
        LOAD_BALANCER | FORWARD_DSR
    );
    assert_eq!(
        get(&output, "192.168.0.2:30001/TCP", Scope::Cluster).flags,
        NODE_PORT | FORWARD_DSR
    );
    assert_eq!(
        get(&output, "10.96.0.1:80/TCP", Scope::Cluster).flags,
        CLUSTER_IP,
        "ClusterIPs never use DSR"
    );
    assert_eq!(
        get(&output, "1.2.3.2:80/TCP", Scope::Cluster).flags,
        LOAD_BALANCER | FORWARD_SNAT
    );
    // An invalid value: reported for that Service only, which follows --lb-mode.
    assert_eq!(
        get(&output, "1.2.3.3:80/TCP", Scope::Cluster).flags,
        LOAD_BALANCER
    );
    let problems = reasons(&output);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("p/bad") && problems[0].contains("\"direct\""),
        "{problems:?}"
    );
}
