//! ClusterIP Services and their EndpointSlices → frontends with ordered backend sets.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use proxy_common::service_flags;

use super::{
    BackendAddr, ClusterSnapshot, DesiredState, Frontend, FrontendKey, ModelConfig, ModelOutput,
    ObjectKind, Problem, Protocol, Scope, ServicePortName,
    endpoints::{self, PortRef, categorize},
    parse_ip_lenient,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A frontend's backend count lives in a u16 (the master entry's `count`).
const MAX_BACKENDS: usize = u16::MAX as usize;

/// Collects problems once each, in a stable order.
#[derive(Default)]
pub(super) struct Problems(BTreeSet<(ObjectKind, String, String, String)>);

impl Problems {
    pub(super) fn report(
        &mut self,
        kind: ObjectKind,
        namespace: &str,
        name: &str,
        reason: impl Into<String>,
    ) {
        self.0
            .insert((kind, namespace.to_owned(), name.to_owned(), reason.into()));
    }

    fn into_vec(self) -> Vec<Problem> {
        self.0
            .into_iter()
            .map(|(kind, namespace, name, reason)| Problem {
                kind,
                namespace,
                name,
                reason,
            })
            .collect()
    }
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned())
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_else(|| "<unnamed>".to_owned())
}

/// Parses a Kubernetes protocol name; `None` (unset) means TCP.
pub(super) fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("protocol SCTP is not supported by the socket datapath; port ignored".into()),
        other => Err(format!("unknown protocol {other:?}; port ignored")),
    }
}

fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

/// A Service port the model will program.
struct UsablePort {
    name: String,
    port: u16,
    protocol: Protocol,
}

fn usable_ports(
    ports: &[ServicePort],
    ns: &str,
    name: &str,
    problems: &mut Problems,
) -> Vec<UsablePort> {
    let mut usable = Vec::new();
    for port in ports {
        let port_name = port.name.clone().unwrap_or_default();
        let protocol = match parse_protocol(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                problems.report(
                    ObjectKind::Service,
                    ns,
                    name,
                    format!("port {port_name:?}: {reason}"),
                );
                continue;
            }
        };
        let Some(number) = parse_port(port.port) else {
            problems.report(
                ObjectKind::Service,
                ns,
                name,
                format!(
                    "port {port_name:?}: port {} is out of range 1-65535; port ignored",
                    port.port
                ),
            );
            continue;
        };
        usable.push(UsablePort {
            name: port_name,
            port: number,
            protocol,
        });
    }
    usable
}

/// The service's cluster IPs, or `None` when the Service is not a ClusterIP frontend at all.
fn cluster_ips(
    service: &Service,
    ns: &str,
    name: &str,
    problems: &mut Problems,
) -> Option<Vec<IpAddr>> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let texts: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => {
            problems.report(
                ObjectKind::Service,
                ns,
                name,
                "no clusterIP set (only an API server allocates one); service ignored",
            );
            return None;
        }
    };
    // Headless services are DNS-only.
    if texts.contains(&"None") {
        return None;
    }
    let mut ips = Vec::new();
    for text in texts {
        match parse_ip_lenient(text) {
            Some(ip) if !ips.contains(&ip) => ips.push(ip),
            Some(_) => {}
            None => problems.report(
                ObjectKind::Service,
                ns,
                name,
                format!("clusterIP {text:?} is not an IP address; address ignored"),
            ),
        }
    }
    Some(ips)
}

/// Groups slices by the (namespace, service name) they belong to.
fn index_slices<'a>(
    slices: &'a [Arc<EndpointSlice>],
    problems: &mut Problems,
) -> HashMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut index: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices.iter().map(AsRef::as_ref) {
        let ns = namespace_of(&slice.metadata);
        match slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        {
            Some(service) => index.entry((ns, service.clone())).or_default().push(slice),
            None => problems.report(
                ObjectKind::EndpointSlice,
                &ns,
                &name_of(&slice.metadata),
                format!("missing label {SERVICE_NAME_LABEL}; slice ignored"),
            ),
        }
    }
    index
}

/// Label that hands a Service to another proxy (kube-proxy skips such Services too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Whether this proxy handles the Service: unlabelled ones always, labelled ones only when
/// `--service-proxy-name` claims that name.
fn handled_by_us(service: &Service, config: &ModelConfig) -> bool {
    match service
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
    {
        None => true,
        Some(name) => config.service_proxy_name.as_deref() == Some(name.as_str()),
    }
}

/// The node's zone label, from the Node object named like this node (if the source has it).
fn node_zone<'a>(snapshot: &'a ClusterSnapshot, config: &ModelConfig) -> Option<&'a str> {
    let name = config.node_name.as_deref()?;
    snapshot
        .nodes
        .iter()
        .find(|node| node.metadata.name.as_deref() == Some(name))?
        .metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .map(String::as_str)
}

/// The node label carrying its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

/// Per-Service settings that shape its frontends.
struct Policies {
    internal_local: bool,
    affinity_timeout_secs: u32,
}

fn policies(service: &Service) -> Policies {
    let spec = service.spec.as_ref();
    let affinity_timeout_secs =
        if spec.and_then(|s| s.session_affinity.as_deref()) == Some("ClientIP") {
            spec.and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
        } else {
            0
        };
    Policies {
        internal_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
        affinity_timeout_secs,
    }
}

/// What building a frontend needs to know about its Service and this node.
struct FrontendContext<'a> {
    ns: &'a str,
    name: &'a str,
    node: Option<&'a str>,
    zone: Option<&'a str>,
    policies: &'a Policies,
}

/// One frontend: the endpoints this node may use for traffic to `key`.
fn frontend_for(
    context: &FrontendContext<'_>,
    key: FrontendKey,
    port: &UsablePort,
    service_slices: &[&EndpointSlice],
    problems: &mut Problems,
) -> Frontend {
    let FrontendContext {
        ns,
        name,
        node,
        zone,
        policies,
    } = *context;
    let port_ref = PortRef {
        name: &port.name,
        protocol: port.protocol,
    };
    let endpoints = endpoints::collect(service_slices, key.ip.is_ipv4(), &port_ref, node, problems);
    let local = policies.internal_local;
    let sets = categorize(&endpoints, node, zone, !local, local);
    let chosen = if local { &sets.local } else { &sets.cluster };
    let mut backends: Vec<BackendAddr> = chosen
        .iter()
        .map(|e| BackendAddr {
            ip: e.ip,
            port: e.port,
            protocol: port.protocol,
        })
        .collect();
    if backends.len() > MAX_BACKENDS {
        let reason = format!(
            "{key} has {} endpoints; only the first {MAX_BACKENDS} are used",
            backends.len()
        );
        problems.report(ObjectKind::Service, ns, name, reason);
        backends.truncate(MAX_BACKENDS);
    }
    let mut flags = service_flags::CLUSTER_IP;
    if backends.is_empty() && sets.any_usable {
        // Endpoints exist, but not for this node's traffic: DROP, not REJECT.
        flags |= service_flags::NO_LOCAL_ENDPOINTS;
    }
    Frontend {
        service: ServicePortName {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            port_name: port.name.clone(),
        },
        backends,
        flags,
        affinity_timeout_secs: policies.affinity_timeout_secs,
    }
}

/// Computes the desired dataplane state from the cluster objects.
pub fn build(snapshot: &ClusterSnapshot, config: &ModelConfig) -> ModelOutput {
    let mut problems = Problems::default();
    let slices = index_slices(&snapshot.endpoint_slices, &mut problems);
    let node = config.node_name.as_deref();
    let zone = node_zone(snapshot, config);
    let mut services: Vec<&Service> = snapshot.services.iter().map(AsRef::as_ref).collect();
    services.sort_by_key(|service| (namespace_of(&service.metadata), name_of(&service.metadata)));

    let mut frontends = BTreeMap::new();
    for service in services
        .into_iter()
        .filter(|service| handled_by_us(service, config))
    {
        let ns = namespace_of(&service.metadata);
        let name = name_of(&service.metadata);
        let Some(ips) = cluster_ips(service, &ns, &name, &mut problems) else {
            continue;
        };
        let policies = policies(service);
        let ports = service
            .spec
            .as_ref()
            .and_then(|spec| spec.ports.as_deref())
            .unwrap_or_default();
        let ports = usable_ports(ports, &ns, &name, &mut problems);
        let service_slices = slices
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for ip in &ips {
            for port in &ports {
                let key = FrontendKey {
                    ip: *ip,
                    port: port.port,
                    protocol: port.protocol,
                    scope: Scope::Cluster,
                };
                if let Some(existing) = frontends.get(&key) {
                    let existing: &Frontend = existing;
                    problems.report(
                        ObjectKind::Service,
                        &ns,
                        &name,
                        format!(
                            "{key} is already served by {}; port ignored",
                            existing.service
                        ),
                    );
                    continue;
                }
                let context = FrontendContext {
                    ns: &ns,
                    name: &name,
                    node,
                    zone,
                    policies: &policies,
                };
                let frontend = frontend_for(&context, key, port, service_slices, &mut problems);
                frontends.insert(key, frontend);
            }
        }
    }
    ModelOutput {
        desired: DesiredState {
            frontends,
            health_checks: BTreeMap::new(),
        },
        problems: problems.into_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest;

    fn build_yaml(yaml: &str) -> ModelOutput {
        let parsed = manifest::parse(yaml);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        build(&parsed.snapshot, &ModelConfig::default())
    }

    fn backends_of(output: &ModelOutput, frontend: &str) -> Vec<String> {
        let (_, found) = output
            .desired
            .frontends
            .iter()
            .find(|(key, _)| key.to_string() == frontend)
            .unwrap_or_else(|| {
                panic!(
                    "no frontend {frontend} in {:#?}",
                    output.desired.frontends.keys()
                )
            });
        found.backends.iter().map(ToString::to_string).collect()
    }

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: dns, port: 53, protocol: UDP}\n";

    fn slice(name: &str, family: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    #[test]
    fn backend_port_comes_from_the_slice_port_with_the_same_name_and_protocol() {
        let yaml = format!(
            "{WEB}{}",
            slice(
                "web-1",
                "IPv4",
                "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
                "[{addresses: [10.0.0.1]}]"
            )
        );
        let output = build_yaml(&yaml);
        assert_eq!(
            backends_of(&output, "10.96.0.10:80/TCP"),
            ["10.0.0.1:8080/TCP"]
        );
        assert_eq!(
            backends_of(&output, "10.96.0.10:53/UDP"),
            ["10.0.0.1:5353/UDP"]
        );
        // Port 53 exists only for UDP: it must not capture TCP.
        assert!(
            !output
                .desired
                .frontends
                .keys()
                .any(|key| key.to_string() == "10.96.0.10:53/TCP")
        );
    }

    #[test]
    fn several_slices_merge_and_not_ready_endpoints_are_left_out() {
        let yaml = format!(
            "{WEB}{}{}",
            slice(
                "web-1",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2], conditions: {ready: false}}]"
            ),
            slice(
                "web-2",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.3], conditions: {ready: true}}]"
            ),
        );
        assert_eq!(
            backends_of(&build_yaml(&yaml), "10.96.0.10:80/TCP"),
            ["10.0.0.1:8080/TCP", "10.0.0.3:8080/TCP"]
        );
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_counts_and_duplicates_collapse() {
        let yaml = format!(
            "{WEB}{}{}",
            slice(
                "web-1",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1, 10.0.0.9]}]"
            ),
            slice(
                "web-2",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1]}]"
            ),
        );
        assert_eq!(
            backends_of(&build_yaml(&yaml), "10.96.0.10:80/TCP"),
            ["10.0.0.1:8080/TCP"]
        );
    }

    #[test]
    fn a_service_without_endpoints_is_still_a_frontend_so_connects_are_refused() {
        let output = build_yaml(WEB);
        assert!(backends_of(&output, "10.96.0.10:80/TCP").is_empty());
    }

    #[test]
    fn dual_stack_services_program_both_families_from_their_own_slices() {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00::10']\n  ports: [{{name: http, port: 80}}]\n{}{}",
            slice(
                "web-v4",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1]}]"
            ),
            slice(
                "web-v6",
                "IPv6",
                "[{name: http, port: 8080}]",
                "[{addresses: ['fd00::1']}]"
            ),
        );
        let output = build_yaml(&yaml);
        assert_eq!(
            backends_of(&output, "10.96.0.10:80/TCP"),
            ["10.0.0.1:8080/TCP"]
        );
        assert_eq!(
            backends_of(&output, "[fd00::10]:80/TCP"),
            ["[fd00::1]:8080/TCP"]
        );
    }

    #[test]
    fn headless_and_external_name_services_are_ignored() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.com}\n";
        let output = build_yaml(yaml);
        assert!(output.desired.frontends.is_empty());
        assert!(output.problems.is_empty(), "{:?}", output.problems);
    }

    #[test]
    fn cluster_ips_with_leading_zeros_are_programmed_canonically() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: z}\nspec: {clusterIP: 010.096.000.010, ports: [{port: 80}]}\n";
        let output = build_yaml(yaml);
        assert_eq!(
            output.desired.frontends.keys().next().unwrap().to_string(),
            "10.96.0.10:80/TCP"
        );
    }

    #[test]
    fn bad_parts_are_reported_by_object_and_skipped_while_the_rest_applies() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: mixed, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: ok, port: 80}\n  - {name: big, port: 70000}\n  - {name: sctp, port: 90, protocol: SCTP}\n  - {name: odd, port: 91, protocol: QUIC}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: badip, namespace: shop}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n";
        let output = build_yaml(yaml);
        let keys: Vec<String> = output
            .desired
            .frontends
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(keys, ["10.96.0.20:80/TCP"]);
        let reasons: Vec<String> = output.problems.iter().map(ToString::to_string).collect();
        assert_eq!(reasons.len(), 4, "{reasons:#?}");
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("Service shop/mixed") && r.contains("70000"))
        );
        assert!(reasons.iter().any(|r| r.contains("SCTP")));
        assert!(reasons.iter().any(|r| r.contains("\"QUIC\"")));
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("Service shop/badip") && r.contains("10.96.0.300"))
        );
    }

    #[test]
    fn a_clusterip_port_claimed_twice_goes_to_the_first_service_by_name() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let output = build_yaml(yaml);
        assert_eq!(
            output
                .desired
                .frontends
                .values()
                .next()
                .unwrap()
                .service
                .name,
            "a"
        );
        assert_eq!(output.problems.len(), 1);
        assert!(
            output.problems[0]
                .to_string()
                .starts_with("Service default/b")
        );
    }

    #[test]
    fn slices_without_the_service_name_label_or_with_foreign_addresses_are_reported() {
        let yaml = format!(
            "{WEB}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: orphan, namespace: shop}}\naddressType: IPv4\nendpoints: []\n{}",
            slice(
                "web-1",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: ['fd00::1']}, {addresses: [10.0.0.1]}]"
            ),
        );
        let output = build_yaml(&yaml);
        assert_eq!(
            backends_of(&output, "10.96.0.10:80/TCP"),
            ["10.0.0.1:8080/TCP"]
        );
        let reasons: Vec<String> = output.problems.iter().map(ToString::to_string).collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("EndpointSlice shop/orphan") && r.contains("missing label")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("EndpointSlice shop/web-1") && r.contains("fd00::1")),
            "{reasons:?}"
        );
    }
}
