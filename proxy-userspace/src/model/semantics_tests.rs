//! Kubernetes 1.31–1.37 Service semantics (nftables-mode kube-proxy where modes differ):
//! health checks with only terminating local endpoints, publishNotReadyAddresses, topology
//! (node hints, zone hints, everything), externalIPs that are host addresses
//! (CVE-2020-8554) or switched off, localhost NodePorts, and what the service-CIDR guard is
//! told about ClusterIPs.
use std::net::IpAddr;

use proxy_common::{guard_flags, service_flags};

use super::{
    ModelConfig, ModelOutput, Scope, build, cluster_of, desired_of, service::service_output,
};
use crate::source::manifest;

fn ips(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().map(|text| text.parse().unwrap()).collect()
}

fn config() -> ModelConfig {
    ModelConfig {
        node_name: Some("node-a".into()),
        zone: Some("zone-a".into()),
        node_addresses: ips(&["192.168.0.2"]),
        nodeport_addresses: ips(&["192.168.0.2"]),
        api_server_addresses: ips(&["192.168.0.100"]),
        ..ModelConfig::default()
    }
}

fn build_with(yaml: &str, config: &ModelConfig) -> ModelOutput {
    let parsed = manifest::parse(yaml);
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    build(&parsed.snapshot, config)
}

fn backends(output: &ModelOutput, frontend: &str, scope: Scope) -> Vec<String> {
    let (_, found) = output
        .desired
        .frontends
        .iter()
        .find(|(key, _)| key.to_string() == frontend && key.scope == scope)
        .unwrap_or_else(|| panic!("no {frontend} in {:#?}", output.desired.frontends.keys()));
    found.backends.iter().map(ToString::to_string).collect()
}

fn flags(output: &ModelOutput, frontend: &str) -> u16 {
    output
        .desired
        .frontends
        .iter()
        .find(|(key, _)| key.to_string() == frontend && key.scope == Scope::Cluster)
        .map_or_else(|| panic!("no {frontend}"), |(_, found)| found.flags)
}

fn slice(service: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: s, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

const LB_LOCAL: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: s}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.20}]}}\n";

#[test]
fn the_health_check_fails_when_only_terminating_local_endpoints_remain_though_they_serve() {
    // kube-proxy's e2e "should fail health check node port if there are only terminating
    // endpoints": the local endpoint is terminating (still serving), a ready one is remote.
    let yaml = format!(
        "{LB_LOCAL}{}",
        slice(
            "lb",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.0.0.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.0.0.2], nodeName: node-b}]"
        )
    );
    let output = build_with(&yaml, &config());
    let check = &output.desired.health_checks[&32100];
    assert_eq!(
        check.local_endpoints, 0,
        "terminating endpoints do not count"
    );
    // ... yet external traffic arriving here still reaches the terminating local endpoint.
    assert_eq!(
        backends(&output, "203.0.113.20:80/TCP", Scope::Local),
        ["10.0.0.1:8080/TCP"]
    );
    let ready = yaml.replace(
        "ready: false, serving: true, terminating: true",
        "ready: true",
    );
    let output = build_with(&ready, &config());
    assert_eq!(output.desired.health_checks[&32100].local_endpoints, 1);
}

#[test]
fn terminating_unready_endpoints_are_reachable_only_with_publish_not_ready_addresses() {
    // kube-proxy's two e2e tests: a terminating, not-serving endpoint beside none other.
    let service = |publish: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: s}}\nspec: {{clusterIP: 10.96.0.30, publishNotReadyAddresses: {publish}, ports: [{{name: http, port: 80}}]}}\n{}",
            slice(
                "web",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.5], conditions: {ready: false, serving: false, terminating: true}}]"
            )
        )
    };
    let without = build_with(&service(false), &config());
    assert!(backends(&without, "10.96.0.30:80/TCP", Scope::Cluster).is_empty());
    let with = build_with(&service(true), &config());
    assert_eq!(
        backends(&with, "10.96.0.30:80/TCP", Scope::Cluster),
        ["10.0.0.5:8080/TCP"]
    );
}

#[test]
fn topology_prefers_node_hints_then_zone_hints_then_everything() {
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: s}\nspec: {clusterIP: 10.96.0.40, trafficDistribution: PreferSameNode, ports: [{name: http, port: 80}]}\n";
    let hinted = |a: &str, b: &str| {
        format!(
            "{web}{}",
            slice(
                "web",
                "[{name: http, port: 8080}]",
                &format!(
                    "[{{addresses: [10.0.0.1], hints: {a}}}, {{addresses: [10.0.0.2], hints: {b}}}]"
                )
            )
        )
    };
    let both = hinted(
        "{forNodes: [{name: node-a}], forZones: [{name: zone-b}]}",
        "{forNodes: [{name: node-b}], forZones: [{name: zone-a}]}",
    );
    assert_eq!(
        backends(
            &build_with(&both, &config()),
            "10.96.0.40:80/TCP",
            Scope::Cluster
        ),
        ["10.0.0.1:8080/TCP"],
        "node hints first"
    );
    let no_node_hint_here = hinted(
        "{forNodes: [{name: node-c}], forZones: [{name: zone-b}]}",
        "{forNodes: [{name: node-b}], forZones: [{name: zone-a}]}",
    );
    assert_eq!(
        backends(
            &build_with(&no_node_hint_here, &config()),
            "10.96.0.40:80/TCP",
            Scope::Cluster
        ),
        ["10.0.0.2:8080/TCP"],
        "then zone hints"
    );
    let nothing_here = hinted(
        "{forNodes: [{name: node-c}], forZones: [{name: zone-b}]}",
        "{forNodes: [{name: node-b}], forZones: [{name: zone-c}]}",
    );
    assert_eq!(
        backends(
            &build_with(&nothing_here, &config()),
            "10.96.0.40:80/TCP",
            Scope::Cluster
        ),
        ["10.0.0.1:8080/TCP", "10.0.0.2:8080/TCP"],
        "then everything"
    );
}

#[test]
fn topology_is_filtered_after_port_matching() {
    // A same-zone endpoint that lacks the port (it is in a slice for another port) must not
    // make the zone's set empty: only endpoints with the port take part in the decision.
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: s}}\nspec: {{clusterIP: 10.96.0.41, ports: [{{name: http, port: 80}}, {{name: metrics, port: 9090}}]}}\n{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-2, namespace: s, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: metrics, port: 9090}}]\nendpoints: [{{addresses: [10.0.0.9], hints: {{forZones: [{{name: zone-a}}]}}}}]\n",
        slice(
            "web",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.0.0.1], hints: {forZones: [{name: zone-b}]}}]"
        )
    );
    let output = build_with(&yaml, &config());
    assert_eq!(
        backends(&output, "10.96.0.41:80/TCP", Scope::Cluster),
        ["10.0.0.1:8080/TCP"],
        "no endpoint with port http is in zone-a: hints ignored, not an empty set"
    );
    assert_eq!(
        backends(&output, "10.96.0.41:9090/TCP", Scope::Cluster),
        ["10.0.0.9:9090/TCP"]
    );
}

#[test]
fn a_change_of_the_nodes_zone_label_recomputes_the_topology() {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: s}}\nspec: {{clusterIP: 10.96.0.42, ports: [{{name: http, port: 80}}]}}\n{}",
        slice(
            "web",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.0.0.1], hints: {forZones: [{name: zone-a}]}}, {addresses: [10.0.0.2], hints: {forZones: [{name: zone-b}]}}]"
        )
    );
    let parsed = manifest::parse(&yaml);
    let cluster = cluster_of(&parsed.snapshot);
    let id = super::ServiceId::new("s", "web");
    let output = service_output(
        cluster.service(&id).unwrap(),
        &cluster.slices_of(&id),
        &config(),
    );
    assert!(output.depends.zone, "hinted endpoints depend on the zone");
    let zone_b = ModelConfig {
        zone: Some("zone-b".into()),
        ..config()
    };
    let moved = desired_of(&cluster, &zone_b).state();
    let key = moved.frontends.keys().next().unwrap();
    assert_eq!(
        moved.frontends[key].backends[0].ip.to_string(),
        "10.0.0.2",
        "zone-b now"
    );
}

const EXTERNAL: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: s}\nspec:\n  clusterIP: 10.96.0.50\n  externalTrafficPolicy: Local\n  externalIPs: [192.168.0.2, 192.168.0.100, 198.51.100.7]\n  ports: [{name: http, port: 80}]\n";

#[test]
fn external_ips_that_are_host_addresses_are_not_for_the_host_and_are_reported() {
    let output = build_with(EXTERNAL, &config());
    for ip in ["192.168.0.2", "192.168.0.100"] {
        let frontend = format!("{ip}:80/TCP");
        assert_ne!(
            flags(&output, &frontend) & service_flags::NOT_FOR_HOST,
            0,
            "{frontend}"
        );
    }
    assert_eq!(
        flags(&output, "198.51.100.7:80/TCP") & service_flags::NOT_FOR_HOST,
        0
    );
    let reasons: Vec<String> = output.problems.iter().map(ToString::to_string).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("192.168.0.2 is this node's address (CVE-2020-8554)")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("192.168.0.100 is the API server's address")),
        "{reasons:?}"
    );
}

#[test]
fn with_external_ips_switched_off_the_field_is_ignored_entirely() {
    let off = ModelConfig {
        ignore_external_ips: true,
        ..config()
    };
    let output = build_with(EXTERNAL, &off);
    let keys: Vec<String> = output
        .desired
        .frontends
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(keys, ["10.96.0.50:80/TCP"], "only the ClusterIP");
    assert!(output.problems.is_empty(), "{:?}", output.problems);
}

#[test]
fn localhost_nodeports_are_frontends_on_loopback() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: s}\nspec: {type: NodePort, clusterIPs: [10.96.0.60, 'fd00::60'], ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]}\n";
    let with_loopback = ModelConfig {
        nodeport_addresses: ips(&["192.168.0.2", "127.0.0.1", "::1"]),
        ..config()
    };
    let output = build_with(yaml, &with_loopback);
    for frontend in [
        "127.0.0.1:30053/UDP",
        "[::1]:30053/UDP",
        "192.168.0.2:30053/UDP",
    ] {
        assert_ne!(
            flags(&output, frontend) & service_flags::NODE_PORT,
            0,
            "{frontend}"
        );
    }
}

#[test]
fn the_guard_learns_our_cluster_ips_and_another_proxys() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ours, namespace: s}\nspec: {clusterIPs: [10.96.0.70, 'fd00::70'], ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: theirs, namespace: s, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.71, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: s}\nspec: {clusterIP: None, ports: [{port: 80}]}\n";
    let parsed = manifest::parse(yaml);
    let desired = desired_of(&cluster_of(&parsed.snapshot), &config());
    let mut known: Vec<String> = desired.guard_ips().map(ToString::to_string).collect();
    known.sort();
    assert_eq!(known, ["10.96.0.70", "10.96.0.71", "fd00::70"]);
    let flag = |ip: &str| desired.guard_flags(ip.parse().unwrap());
    assert_eq!(flag("10.96.0.70"), Some(guard_flags::CLUSTER_IP));
    assert_eq!(flag("fd00::70"), Some(guard_flags::CLUSTER_IP));
    assert_eq!(flag("10.96.0.71"), Some(guard_flags::OTHER_PROXY));
    assert_eq!(flag("10.96.0.72"), None);
}

fn nodeport_service(name: &str, annotation: Option<&str>) -> String {
    let annotations = annotation.map_or_else(String::new, |value| {
        format!(", annotations: {{switchyard.dev/lb-algorithm: {value}}}")
    });
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: s{annotations}}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.1.{n}\n  externalIPs: [198.51.100.{n}]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 3200{n}\n  ports: [{{port: 80, nodePort: 3100{n}}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.{n}}}]}}}}\n{slice}",
        n = name.len(),
        slice = slice(
            name,
            "[{port: 8080}]",
            "[{addresses: [10.0.0.1], nodeName: node-a}]"
        ),
    )
}

#[test]
fn the_lb_algorithm_annotation_marks_external_frontends_maglev_and_never_cluster_ips() {
    let yaml = nodeport_service("mag", Some("maglev"));
    let output = build_with(&yaml, &config());
    assert!(output.problems.is_empty(), "{:?}", output.problems);
    for external in [
        "192.168.0.2:31003/TCP",
        "203.0.113.3:80/TCP",
        "198.51.100.3:80/TCP",
    ] {
        assert_ne!(
            flags(&output, external) & service_flags::MAGLEV,
            0,
            "{external}"
        );
        let local = output
            .desired
            .frontends
            .iter()
            .find(|(key, _)| key.to_string() == external && key.scope == Scope::Local)
            .map(|(_, frontend)| frontend.flags)
            .unwrap();
        assert_ne!(local & service_flags::MAGLEV, 0, "{external} (local scope)");
    }
    assert_eq!(
        flags(&output, "10.96.1.3:80/TCP") & service_flags::MAGLEV,
        0
    );
}

#[test]
fn the_lb_algorithm_flag_is_the_default_and_the_annotation_overrides_it() {
    let maglev_default = ModelConfig {
        lb_algorithm: super::LbAlgorithm::Maglev,
        ..config()
    };
    let plain = build_with(&nodeport_service("plain", None), &maglev_default);
    assert_ne!(
        flags(&plain, "203.0.113.5:80/TCP") & service_flags::MAGLEV,
        0
    );
    let random = build_with(&nodeport_service("rand", Some("random")), &maglev_default);
    assert_eq!(
        flags(&random, "203.0.113.4:80/TCP") & service_flags::MAGLEV,
        0
    );
    let default = build_with(&nodeport_service("plain", None), &config());
    assert_eq!(
        flags(&default, "203.0.113.5:80/TCP") & service_flags::MAGLEV,
        0
    );
}

#[test]
fn an_unknown_lb_algorithm_is_reported_and_the_default_applies_to_that_service_only() {
    let maglev_default = ModelConfig {
        lb_algorithm: super::LbAlgorithm::Maglev,
        ..config()
    };
    let yaml = format!(
        "{}{}",
        nodeport_service("bad", Some("ring-hash")),
        nodeport_service("good1", Some("random"))
    );
    let output = build_with(&yaml, &maglev_default);
    let reasons: Vec<String> = output.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        reasons,
        [
            "Service s/bad: annotation switchyard.dev/lb-algorithm: unknown value \"ring-hash\" \
             (maglev or random); the default maglev applies"
        ]
    );
    assert_ne!(
        flags(&output, "203.0.113.3:80/TCP") & service_flags::MAGLEV,
        0
    );
    assert_eq!(
        flags(&output, "203.0.113.5:80/TCP") & service_flags::MAGLEV,
        0
    );
    assert_eq!(
        backends(&output, "203.0.113.3:80/TCP", Scope::Cluster),
        ["10.0.0.1:8080/TCP"]
    );
}
