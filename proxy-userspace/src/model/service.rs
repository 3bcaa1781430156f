//! Services and their EndpointSlices → frontends (ClusterIPs, NodePorts, load-balancer IPs,
//! externalIPs) with ordered backend sets, and health-check node ports.
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
    BackendAddr, Cidr, ClusterSnapshot, DesiredState, Frontend, FrontendKey, HealthCheck,
    ModelConfig, ModelOutput, ObjectKind, Problem, Protocol, Scope, ServicePortName,
    endpoints::{self, Categorized, Endpoint, PortRef, categorize},
    external::{self, Exposure},
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
    /// The port's nodePort, on NodePort and LoadBalancer Services.
    node_port: Option<u16>,
}

/// The port's nodePort: only NodePort and LoadBalancer Services open one (the API server
/// clears it on other types, so one there comes from a hand-written object).
fn node_port_of(
    port: &ServicePort,
    port_name: &str,
    node_ports: bool,
    id: &ServiceId<'_>,
    problems: &mut Problems,
) -> Option<u16> {
    let number = port.node_port.filter(|number| *number != 0)?;
    if !node_ports {
        id.report(
            problems,
            format!("port {port_name:?}: nodePort {number} on a Service that is neither NodePort nor LoadBalancer; nodePort ignored"),
        );
        return None;
    }
    let parsed = parse_port(number);
    if parsed.is_none() {
        id.report(
            problems,
            format!(
                "port {port_name:?}: nodePort {number} is out of range 1-65535; nodePort ignored"
            ),
        );
    }
    parsed
}

fn usable_ports(
    ports: &[ServicePort],
    node_ports: bool,
    id: &ServiceId<'_>,
    problems: &mut Problems,
) -> Vec<UsablePort> {
    let mut usable = Vec::new();
    for port in ports {
        let port_name = port.name.clone().unwrap_or_default();
        let protocol = match parse_protocol(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                id.report(problems, format!("port {port_name:?}: {reason}"));
                continue;
            }
        };
        let Some(number) = parse_port(port.port) else {
            id.report(
                problems,
                format!(
                    "port {port_name:?}: port {} is out of range 1-65535; port ignored",
                    port.port
                ),
            );
            continue;
        };
        let node_port = node_port_of(port, &port_name, node_ports, id, problems);
        usable.push(UsablePort {
            name: port_name,
            port: number,
            protocol,
            node_port,
        });
    }
    usable
}

/// The service's cluster IPs, or `None` when the Service gets no frontend at all: headless,
/// ExternalName and ClusterIP-less Services are skipped whole by kube-proxy
/// (`ShouldSkipService`), NodePorts and external addresses included.
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

/// Which Service a problem or a frontend belongs to.
pub(super) struct ServiceId<'a> {
    pub ns: &'a str,
    pub name: &'a str,
}

impl ServiceId<'_> {
    pub(super) fn report(&self, problems: &mut Problems, reason: impl Into<String>) {
        problems.report(ObjectKind::Service, self.ns, self.name, reason);
    }
}

/// Frontend kinds, in the order they claim addresses when two Services want the same one: a
/// ClusterIP is never displaced by another Service's external frontend (externalIPs are set
/// by whoever may edit a Service, CVE-2020-8554), and externalIPs come last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl Kind {
    fn flag(self) -> u16 {
        match self {
            Self::ClusterIp => service_flags::CLUSTER_IP,
            Self::NodePort => service_flags::NODE_PORT,
            Self::LoadBalancer => service_flags::LOAD_BALANCER,
            Self::ExternalIp => service_flags::EXTERNAL_IP,
        }
    }

    /// What a clash makes the model skip.
    fn part(self) -> &'static str {
        match self {
            Self::ClusterIp => "port",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "load-balancer IP",
            Self::ExternalIp => "externalIP",
        }
    }
}

/// A frontend claiming `key` and, with externalTrafficPolicy Local, its node-local twin at the
/// same address (scope Local). The two stand or fall together.
struct Candidate {
    kind: Kind,
    key: FrontendKey,
    cluster: Frontend,
    local: Option<Frontend>,
}

/// What building a Service's frontends needs to know about it and this node.
struct ServiceContext<'a> {
    id: ServiceId<'a>,
    config: &'a ModelConfig,
    policies: Policies,
    exposure: Exposure,
}

/// `flag` when a frontend has no backend although endpoints exist elsewhere: DROP (the traffic
/// policy leaves none for this node), not REJECT.
fn no_local_flag(backends: &[BackendAddr], sets: &Categorized) -> u16 {
    if backends.is_empty() && sets.any_usable {
        service_flags::NO_LOCAL_ENDPOINTS
    } else {
        0
    }
}

impl ServiceContext<'_> {
    fn backends(
        &self,
        key: FrontendKey,
        endpoints: &[Endpoint],
        problems: &mut Problems,
    ) -> Vec<BackendAddr> {
        let mut backends: Vec<BackendAddr> = endpoints
            .iter()
            .map(|e| BackendAddr {
                ip: e.ip,
                port: e.port,
                protocol: key.protocol,
            })
            .collect();
        if backends.len() > MAX_BACKENDS {
            let reason = format!(
                "{key} has {} endpoints; only the first {MAX_BACKENDS} are used",
                backends.len()
            );
            self.id.report(problems, reason);
            backends.truncate(MAX_BACKENDS);
        }
        backends
    }

    fn frontend(
        &self,
        port: &UsablePort,
        backends: Vec<BackendAddr>,
        flags: u16,
        source_ranges: &BTreeSet<Cidr>,
    ) -> Frontend {
        Frontend {
            service: ServicePortName {
                namespace: self.id.ns.to_owned(),
                name: self.id.name.to_owned(),
                port_name: port.name.clone(),
            },
            backends,
            flags,
            affinity_timeout_secs: self.policies.affinity_timeout_secs,
            source_ranges: source_ranges.clone(),
        }
    }

    /// The frontends of one service port in one family: its ClusterIPs, then its NodePorts,
    /// load-balancer IPs and externalIPs.
    fn port_frontends(
        &self,
        cluster_ips: &[IpAddr],
        ipv4: bool,
        port: &UsablePort,
        sets: &Categorized,
        problems: &mut Problems,
    ) -> Vec<Candidate> {
        let mut candidates = Vec::new();
        let key_for = |ip: IpAddr, number: u16| FrontendKey {
            ip,
            port: number,
            protocol: port.protocol,
            scope: Scope::Cluster,
        };
        // ClusterIP: internalTrafficPolicy picks the set.
        let internal = if self.policies.internal_local {
            &sets.local
        } else {
            &sets.cluster
        };
        for ip in cluster_ips {
            let key = key_for(*ip, port.port);
            let backends = self.backends(key, internal, problems);
            let flags = service_flags::CLUSTER_IP | no_local_flag(&backends, sets);
            candidates.push(Candidate {
                kind: Kind::ClusterIp,
                key,
                cluster: self.frontend(port, backends, flags, &BTreeSet::new()),
                local: None,
            });
        }
        // Exposure frontends: internalTrafficPolicy does not apply to them.
        let family = |ip: &&IpAddr| ip.is_ipv4() == ipv4;
        let node_ports = port.node_port.into_iter().flat_map(|number| {
            self.config
                .nodeport_addresses
                .iter()
                .filter(family)
                .map(move |ip| (Kind::NodePort, *ip, number))
        });
        let load_balancers = self
            .exposure
            .load_balancer_ips
            .iter()
            .filter(family)
            .map(|ip| (Kind::LoadBalancer, *ip, port.port));
        let external_ips = self
            .exposure
            .external_ips
            .iter()
            .filter(family)
            .map(|ip| (Kind::ExternalIp, *ip, port.port));
        let lb_ranges = self
            .exposure
            .source_ranges_for(ipv4, &self.config.node_addresses);
        let external_local = self.exposure.external_local;
        for (kind, ip, number) in node_ports.chain(load_balancers).chain(external_ips) {
            let key = key_for(ip, number);
            // loadBalancerSourceRanges guard load-balancer IPs only, never NodePorts.
            let ranges = lb_ranges.as_ref().filter(|_| kind == Kind::LoadBalancer);
            let mut flags = kind.flag();
            if ranges.is_some() {
                flags |= service_flags::SOURCE_RANGES;
            }
            let ranges: BTreeSet<Cidr> = ranges.into_iter().flatten().copied().collect();
            let cluster_backends = self.backends(key, &sets.cluster, problems);
            let cluster_flags = if external_local {
                flags | service_flags::EXTERNAL_LOCAL
            } else {
                flags
            };
            let local = external_local.then(|| {
                let local_key = FrontendKey {
                    scope: Scope::Local,
                    ..key
                };
                let backends = self.backends(local_key, &sets.local, problems);
                let flags = flags | no_local_flag(&backends, sets);
                self.frontend(port, backends, flags, &ranges)
            });
            candidates.push(Candidate {
                kind,
                key,
                cluster: self.frontend(port, cluster_backends, cluster_flags, &ranges),
                local,
            });
        }
        candidates
    }

    /// Exposure addresses of a family the Service has no ClusterIP of are not served: each
    /// of kube-proxy's single-family proxiers skips a Service without a ClusterIP of its own.
    fn report_foreign_families(&self, cluster_ips: &[IpAddr], problems: &mut Problems) {
        let lists = [
            ("externalIP", &self.exposure.external_ips),
            ("load-balancer ingress IP", &self.exposure.load_balancer_ips),
        ];
        for (what, ips) in lists {
            for ip in ips
                .iter()
                .filter(|ip| !cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()))
            {
                let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                self.id.report(
                    problems,
                    format!("{what} {ip} is {family} but the Service has no {family} clusterIP; address ignored"),
                );
            }
        }
    }
}

/// What the model knows about this node.
struct NodeFacts<'a> {
    name: Option<&'a str>,
    zone: Option<&'a str>,
}

/// One Service's frontend candidates (appended to `candidates`) and its health check.
fn service_frontends(
    service: &Service,
    slices: &HashMap<(String, String), Vec<&EndpointSlice>>,
    node: &NodeFacts<'_>,
    config: &ModelConfig,
    candidates: &mut Vec<Candidate>,
    problems: &mut Problems,
) -> Option<(u16, HealthCheck)> {
    let ns = namespace_of(&service.metadata);
    let name = name_of(&service.metadata);
    let ips = cluster_ips(service, &ns, &name, problems)?;
    let id = ServiceId {
        ns: &ns,
        name: &name,
    };
    let exposure = external::read(service, &id, problems);
    let ports = service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_deref())
        .unwrap_or_default();
    let ports = usable_ports(ports, exposure.node_ports, &id, problems);
    let context = ServiceContext {
        id,
        config,
        policies: policies(service),
        exposure,
    };
    context.report_foreign_families(&ips, problems);
    let service_slices = slices
        .get(&(ns.clone(), name.clone()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    // Distinct addresses of this node's ready endpoints, all ports and families together
    // (kube-proxy's `LocalReadyEndpoints`): what the health check reports.
    let mut local_ready = BTreeSet::new();
    for ipv4 in [true, false] {
        let family_ips: Vec<IpAddr> = ips
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv4() == ipv4)
            .collect();
        if family_ips.is_empty() {
            continue;
        }
        for port in &ports {
            let port_ref = PortRef {
                name: &port.name,
                protocol: port.protocol,
            };
            let endpoints =
                endpoints::collect(service_slices, ipv4, &port_ref, node.name, problems);
            local_ready.extend(
                endpoints
                    .iter()
                    .filter(|e| e.local && e.ready)
                    .map(|e| e.ip),
            );
            let sets = categorize(&endpoints, node.name, node.zone, true, true);
            candidates.extend(context.port_frontends(&family_ips, ipv4, port, &sets, problems));
        }
    }
    let port = context.exposure.health_check_node_port?;
    Some((
        port,
        HealthCheck {
            namespace: ns.clone(),
            name: name.clone(),
            local_endpoints: local_ready.len(),
        },
    ))
}

/// Gives each address to the first candidate that claims it, reporting the others.
fn claim(
    mut candidates: Vec<Candidate>,
    problems: &mut Problems,
) -> BTreeMap<FrontendKey, Frontend> {
    // A stable sort: within a kind, Services keep their name order.
    candidates.sort_by_key(|candidate| candidate.kind);
    let mut frontends = BTreeMap::new();
    for candidate in candidates {
        if let Some(existing) = frontends.get(&candidate.key) {
            let existing: &Frontend = existing;
            let service = &candidate.cluster.service;
            problems.report(
                ObjectKind::Service,
                &service.namespace,
                &service.name,
                format!(
                    "{} is already served by {}; {} ignored",
                    candidate.key,
                    existing.service,
                    candidate.kind.part()
                ),
            );
            continue;
        }
        if let Some(local) = candidate.local {
            let local_key = FrontendKey {
                scope: Scope::Local,
                ..candidate.key
            };
            frontends.insert(local_key, local);
        }
        frontends.insert(candidate.key, candidate.cluster);
    }
    frontends
}

/// Computes the desired dataplane state from the cluster objects.
pub fn build(snapshot: &ClusterSnapshot, config: &ModelConfig) -> ModelOutput {
    let mut problems = Problems::default();
    let slices = index_slices(&snapshot.endpoint_slices, &mut problems);
    let node = NodeFacts {
        name: config.node_name.as_deref(),
        zone: node_zone(snapshot, config),
    };
    let mut services: Vec<&Service> = snapshot.services.iter().map(AsRef::as_ref).collect();
    services.sort_by_key(|service| (namespace_of(&service.metadata), name_of(&service.metadata)));

    let mut candidates = Vec::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for service in services
        .into_iter()
        .filter(|service| handled_by_us(service, config))
    {
        let Some((port, check)) = service_frontends(
            service,
            &slices,
            &node,
            config,
            &mut candidates,
            &mut problems,
        ) else {
            continue;
        };
        if let Some(existing) = health_checks.get(&port) {
            let reason = format!(
                "healthCheckNodePort {port} is already used by {}/{}; no health check served",
                existing.namespace, existing.name
            );
            problems.report(ObjectKind::Service, &check.namespace, &check.name, reason);
        } else {
            health_checks.insert(port, check);
        }
    }
    ModelOutput {
        desired: DesiredState {
            frontends: claim(candidates, &mut problems),
            health_checks,
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
