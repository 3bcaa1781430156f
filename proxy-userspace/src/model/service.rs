//! One Service and its EndpointSlices → its frontend candidates (ClusterIPs, NodePorts,
//! load-balancer IPs, externalIPs) with ordered backend sets, and its health-check node port.
//! A pure function of that one Service, its slices and this node's facts: the unit of work of
//! the incremental control plane. Which candidate gets an address two Services claim is
//! decided across Services, in `desired`.
use std::{collections::BTreeSet, net::IpAddr};

use proxy_common::service_flags;

use super::{
    BackendAddr, Cidr, Frontend, FrontendKey, HealthCheck, LB_ALGORITHM_ANNOTATION, LbAlgorithm,
    ModelConfig, Protocol, Scope, ServicePortName,
    endpoints::{self, Categorized, Endpoint, PortRef, categorize},
    external::{self, Exposure},
    input::{ServiceInput, SliceInput},
    parse_ip_lenient,
    problems::{Problem, Problems, ServiceId, parse_port, parse_protocol},
};

/// A frontend's backend count lives in a u16 (the master entry's `count`).
const MAX_BACKENDS: usize = u16::MAX as usize;

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
    node_port: Option<i32>,
    port_name: &str,
    node_ports: bool,
    id: &ServiceId,
    problems: &mut Problems,
) -> Option<u16> {
    let number = node_port.filter(|number| *number != 0)?;
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
    service: &ServiceInput,
    node_ports: bool,
    problems: &mut Problems,
) -> Vec<UsablePort> {
    let id = &service.id;
    let mut usable = Vec::new();
    for port in &service.ports {
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
        let node_port = node_port_of(port.node_port, &port_name, node_ports, id, problems);
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
fn cluster_ips(service: &ServiceInput, problems: &mut Problems) -> Option<Vec<IpAddr>> {
    if !service.has_spec || service.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let texts: Vec<&str> = match (&service.cluster_ips, &service.cluster_ip) {
        (ips, _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => {
            service.id.report(
                problems,
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
            None => service.id.report(
                problems,
                format!("clusterIP {text:?} is not an IP address; address ignored"),
            ),
        }
    }
    Some(ips)
}

/// The ClusterIPs of a Service with ports that another proxy handles (read leniently; what
/// cannot be read is that proxy's business).
fn other_proxy_ips(service: &ServiceInput) -> Vec<IpAddr> {
    if !service.has_spec || service.ports.is_empty() {
        return Vec::new();
    }
    let texts: Vec<&str> = if service.cluster_ips.is_empty() {
        service.cluster_ip.iter().map(String::as_str).collect()
    } else {
        service.cluster_ips.iter().map(String::as_str).collect()
    };
    let mut ips: Vec<IpAddr> = texts.into_iter().filter_map(parse_ip_lenient).collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// Whether this proxy handles the Service: unlabelled ones always, labelled ones only when
/// `--service-proxy-name` claims that name.
fn handled_by_us(service: &ServiceInput, config: &ModelConfig) -> bool {
    match &service.proxy_name {
        None => true,
        Some(name) => config.service_proxy_name.as_deref() == Some(name.as_str()),
    }
}

/// kube-proxy's default ClientIP affinity timeout (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

/// Per-Service settings that shape its frontends.
struct Policies {
    internal_local: bool,
    affinity_timeout_secs: u32,
    /// `service_flags::MAGLEV` for the Service's external frontends, or 0.
    external_algorithm_flag: u16,
    /// `FORWARD_DSR` / `FORWARD_SNAT` from the forwarding-mode annotation (0: `--lb-mode`).
    forward_flag: u16,
}

/// The service flag the forwarding-mode annotation asks for; `Err` names a value that is
/// neither `snat` nor `dsr` (the Service then follows `--lb-mode`).
fn forwarding_flag(service: &ServiceInput) -> Result<u16, String> {
    match service.forwarding_mode.as_deref().map(str::trim) {
        None => Ok(0),
        Some(mode) if mode.eq_ignore_ascii_case("snat") => Ok(service_flags::FORWARD_SNAT),
        Some(mode) if mode.eq_ignore_ascii_case("dsr") => Ok(service_flags::FORWARD_DSR),
        Some(other) => Err(format!(
            "annotation {}: {other:?} is neither \"snat\" nor \"dsr\"; --lb-mode applies",
            super::input::FORWARDING_MODE_ANNOTATION
        )),
    }
}

/// The Service's algorithm: its annotation's, or `--lb-algorithm` when it has none or one
/// the agent does not know (reported; the rest of the Service is programmed as usual).
fn lb_algorithm(
    service: &ServiceInput,
    config: &ModelConfig,
    problems: &mut Problems,
) -> LbAlgorithm {
    let Some(text) = service.lb_algorithm.as_deref() else {
        return config.lb_algorithm;
    };
    LbAlgorithm::parse(text).unwrap_or_else(|| {
        service.id.report(
            problems,
            format!(
                "annotation {LB_ALGORITHM_ANNOTATION}: unknown value {text:?} (maglev or \
                 random); the default {} applies",
                config.lb_algorithm
            ),
        );
        config.lb_algorithm
    })
}

fn policies(service: &ServiceInput, config: &ModelConfig, problems: &mut Problems) -> Policies {
    let affinity_timeout_secs = if service.session_affinity.as_deref() == Some("ClientIP") {
        service
            .affinity_timeout_seconds
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
    } else {
        0
    };
    let external_algorithm_flag = match lb_algorithm(service, config, problems) {
        LbAlgorithm::Maglev => service_flags::MAGLEV,
        LbAlgorithm::Random => 0,
    };
    Policies {
        internal_local: service.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout_secs,
        external_algorithm_flag,
        forward_flag: forwarding_flag(service).unwrap_or(0),
    }
}

/// Frontend kinds, in the order they claim addresses when two Services want the same one: a
/// ClusterIP is never displaced by another Service's external frontend (externalIPs are set
/// by whoever may edit a Service, CVE-2020-8554), and externalIPs come last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
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
    pub fn part(self) -> &'static str {
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub kind: Kind,
    /// The cluster-scope key the candidate claims.
    pub key: FrontendKey,
    pub cluster: Frontend,
    /// Boxed: most frontends have no twin, and outputs live as long as their Service.
    pub local: Option<Box<Frontend>>,
    /// UDP ports: every serving endpoint of the Service port in the frontend's family,
    /// whatever the traffic policy or topology says (kube-proxy's conntrack reconciler keeps
    /// UDP flows to these and removes the others).
    pub serving: Vec<BackendAddr>,
}

impl Candidate {
    /// The frontend this candidate programs for a key of its address (either scope).
    pub fn frontend(&self, scope: Scope) -> Option<&Frontend> {
        match scope {
            Scope::Cluster => Some(&self.cluster),
            Scope::Local => self.local.as_deref(),
        }
    }
}

/// Which node facts a Service's frontends depend on, so that a change of those facts
/// recomputes exactly the Services it can affect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one independent yes/no per node fact"
)]
pub struct NodeDependence {
    /// Topology hints (this node's zone label).
    pub zone: bool,
    /// NodePorts (where they open: `--nodeport-addresses` over the node's addresses).
    pub nodeport_addresses: bool,
    /// loadBalancerSourceRanges (a range covering a node address admits the LB IPs).
    pub node_addresses: bool,
    /// Endpoints on some node (local or not depends on the node's name, which never changes;
    /// kept for completeness of the dependency record).
    pub node_name: bool,
}

/// What one Service contributes to the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceOutput {
    /// Frontends it claims, in its own order (ties between its candidates go to the first).
    pub candidates: Vec<Candidate>,
    /// Its healthCheckNodePort, if it asks for one.
    pub health_check: Option<(u16, HealthCheck)>,
    /// What could not be used, of the Service and of its EndpointSlices.
    pub problems: Vec<Problem>,
    pub depends: NodeDependence,
    /// A ClusterIP of the Service leaves no endpoint to this node (kube-proxy's
    /// no-local-endpoints gauge, traffic policy internal).
    pub no_local_endpoints: bool,
    /// Its ClusterIPs that have a frontend (the service-CIDR guard refuses their other
    /// ports).
    pub cluster_ips: Vec<IpAddr>,
    /// The ClusterIPs of a Service another proxy serves (`service-proxy-name`): the guard
    /// leaves them alone.
    pub other_proxy_ips: Vec<IpAddr>,
}

/// What building a Service's frontends needs to know about it and this node.
struct ServiceContext<'a> {
    service: &'a ServiceInput,
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
    fn id(&self) -> &ServiceId {
        &self.service.id
    }

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
            self.id().report(problems, reason);
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
                namespace: self.id().namespace.clone(),
                name: self.id().name.clone(),
                port_name: port.name.as_str().into(),
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
        serving: &[BackendAddr],
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
                serving: serving.to_vec(),
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
            let mut flags =
                kind.flag() | self.policies.external_algorithm_flag | self.policies.forward_flag;
            if ranges.is_some() {
                flags |= service_flags::SOURCE_RANGES;
            }
            if kind == Kind::ExternalIp && self.host_address(ip).is_some() {
                flags |= service_flags::NOT_FOR_HOST;
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
                Box::new(self.frontend(port, backends, flags, &ranges))
            });
            candidates.push(Candidate {
                kind,
                key,
                cluster: self.frontend(port, cluster_backends, cluster_flags, &ranges),
                local,
                serving: serving.to_vec(),
            });
        }
        candidates
    }

    /// An externalIP that is this node's address or the API server's would capture the host's
    /// own connections to it (CVE-2020-8554): it is served for pods and for traffic from
    /// outside, never for the host's processes.
    fn host_address(&self, ip: IpAddr) -> Option<&'static str> {
        if self.config.node_addresses.contains(&ip) {
            Some("this node's address")
        } else if self.config.api_server_addresses.contains(&ip) {
            Some("the API server's address")
        } else {
            None
        }
    }

    fn report_host_external_ips(&self, problems: &mut Problems) {
        for ip in &self.exposure.external_ips {
            if let Some(what) = self.host_address(*ip) {
                self.id().report(
                    problems,
                    format!("externalIP {ip} is {what} (CVE-2020-8554): not translated for the node's own processes, only for pods and traffic from outside"),
                );
            }
        }
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
                self.id().report(
                    problems,
                    format!("{what} {ip} is {family} but the Service has no {family} clusterIP; address ignored"),
                );
            }
        }
    }
}

/// A UDP port's serving endpoints, whatever the policies say (what the conntrack reconciler
/// keeps flows to); nothing for TCP.
fn udp_serving(endpoints: &[Endpoint], protocol: Protocol) -> Vec<BackendAddr> {
    if protocol != Protocol::Udp {
        return Vec::new();
    }
    endpoints
        .iter()
        .filter(|e| e.serving)
        .map(|e| BackendAddr {
            ip: e.ip,
            port: e.port,
            protocol,
        })
        .collect()
}

/// What one Service (with its EndpointSlices, in a stable order) contributes, as seen from
/// this node.
pub fn service_output(
    service: &ServiceInput,
    slices: &[&SliceInput],
    config: &ModelConfig,
) -> ServiceOutput {
    let mut problems = Problems::default();
    let mut output = ServiceOutput::default();
    if !handled_by_us(service, config) {
        output.other_proxy_ips = other_proxy_ips(service);
        return output;
    }
    output.depends = NodeDependence {
        zone: slices
            .iter()
            .any(|slice| slice.endpoints.iter().any(|e| !e.zone_hints.is_empty())),
        nodeport_addresses: service.ports.iter().any(|port| port.node_port.is_some()),
        // Source ranges (a range covering a node address admits the LB IPs) and externalIPs
        // (one that is a node address is not for the host, CVE-2020-8554).
        node_addresses: !service.load_balancer_source_ranges.is_empty()
            || (!service.external_ips.is_empty() && !config.ignore_external_ips),
        node_name: !slices.is_empty(),
    };
    let Some(ips) = cluster_ips(service, &mut problems) else {
        output.problems = problems.into_vec();
        return output;
    };
    let exposure = external::read(service, config.ignore_external_ips, &mut problems);
    let ports = usable_ports(service, exposure.node_ports, &mut problems);
    let context = ServiceContext {
        service,
        config,
        policies: policies(service, config, &mut problems),
        exposure,
    };
    if let Err(reason) = forwarding_flag(service) {
        service.id.report(&mut problems, reason);
    }
    context.report_foreign_families(&ips, &mut problems);
    context.report_host_external_ips(&mut problems);
    let node = config.node_name.as_deref();
    let zone = config.zone.as_deref();
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
            let endpoints = endpoints::collect(
                slices,
                ipv4,
                &port_ref,
                node,
                service.publish_not_ready_addresses,
                &mut problems,
            );
            local_ready.extend(
                endpoints
                    .iter()
                    .filter(|e| e.local && e.ready)
                    .map(|e| e.ip),
            );
            let sets = categorize(&endpoints, node, zone, true, true);
            let serving = udp_serving(&endpoints, port.protocol);
            output.candidates.extend(context.port_frontends(
                &family_ips,
                ipv4,
                port,
                &sets,
                &serving,
                &mut problems,
            ));
        }
    }
    for candidate in &output.candidates {
        if candidate.kind == Kind::ClusterIp && !output.cluster_ips.contains(&candidate.key.ip) {
            output.cluster_ips.push(candidate.key.ip);
        }
    }
    output.no_local_endpoints = output.candidates.iter().any(|candidate| {
        let flags = candidate.cluster.flags;
        flags & service_flags::NO_LOCAL_ENDPOINTS != 0 && flags & service_flags::CLUSTER_IP != 0
    });
    output.health_check = context.exposure.health_check_node_port.map(|port| {
        (
            port,
            HealthCheck {
                namespace: service.id.namespace.to_string(),
                name: service.id.name.to_string(),
                local_endpoints: local_ready.len(),
            },
        )
    });
    output.problems = problems.into_vec();
    // Outputs live as long as their Service: no room for growth (a vector that grew by push
    // holds four candidates' worth for one).
    output.candidates.shrink_to_fit();
    output.cluster_ips.shrink_to_fit();
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{ModelOutput, build},
        source::manifest,
    };

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
                .name
                .as_ref(),
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
