//! ClusterIP Services and their EndpointSlices → frontends with ordered backend sets.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{EndpointPort, EndpointSlice},
};
use proxy_common::service_flags;

use super::{
    BackendAddr, ClusterSnapshot, DesiredState, Frontend, FrontendKey, ModelOutput, NodeFacts,
    ObjectKind, Problem, Protocol, Scope, ServicePortName, parse_ip_lenient,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Collects problems once each, in a stable order.
#[derive(Default)]
struct Problems(BTreeSet<(ObjectKind, String, String, String)>);

impl Problems {
    fn report(&mut self, kind: ObjectKind, namespace: &str, name: &str, reason: impl Into<String>) {
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
fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
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

fn address_type_matches(slice: &EndpointSlice, ip: IpAddr) -> bool {
    match slice.address_type.as_str() {
        "IPv4" => ip.is_ipv4(),
        "IPv6" => ip.is_ipv6(),
        _ => false,
    }
}

/// The slice port serving `port`: same name (unset = "") and same protocol.
fn matching_slice_port<'a>(
    slice_ports: &'a [EndpointPort],
    port: &UsablePort,
) -> Option<&'a EndpointPort> {
    slice_ports.iter().find(|candidate| {
        candidate.name.as_deref().unwrap_or_default() == port.name
            && parse_protocol(candidate.protocol.as_deref()).ok() == Some(port.protocol)
    })
}

/// Ready backends of one service port in one address family, merged over all slices.
fn backends_for(
    slices: &[&EndpointSlice],
    vip: IpAddr,
    port: &UsablePort,
    problems: &mut Problems,
) -> Vec<BackendAddr> {
    let mut backends = BTreeSet::new();
    for slice in slices
        .iter()
        .filter(|slice| address_type_matches(slice, vip))
    {
        let ns = namespace_of(&slice.metadata);
        let slice_name = name_of(&slice.metadata);
        let Some(slice_port) = slice
            .ports
            .as_deref()
            .and_then(|ports| matching_slice_port(ports, port))
        else {
            continue;
        };
        let Some(backend_port) = slice_port.port.and_then(parse_port) else {
            problems.report(
                ObjectKind::EndpointSlice,
                &ns,
                &slice_name,
                format!(
                    "port {:?} has no valid port number; port ignored",
                    port.name
                ),
            );
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            // Only the first address counts (the EndpointSlice API's contract).
            let Some(text) = endpoint.addresses.first() else {
                continue;
            };
            match parse_ip_lenient(text) {
                Some(ip) if ip.is_ipv4() == vip.is_ipv4() => {
                    backends.insert(BackendAddr {
                        ip,
                        port: backend_port,
                        protocol: port.protocol,
                    });
                }
                _ => problems.report(
                    ObjectKind::EndpointSlice,
                    &ns,
                    &slice_name,
                    format!(
                        "endpoint address {text:?} is not an {} address; endpoint ignored",
                        slice.address_type
                    ),
                ),
            }
        }
    }
    backends.into_iter().collect()
}

/// Groups slices by the (namespace, service name) they belong to.
fn index_slices<'a>(
    slices: &'a [EndpointSlice],
    problems: &mut Problems,
) -> HashMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut index: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
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

/// Computes the desired dataplane state from the cluster objects.
pub fn build(snapshot: &ClusterSnapshot, _node: &NodeFacts) -> ModelOutput {
    let mut problems = Problems::default();
    let slices = index_slices(&snapshot.endpoint_slices, &mut problems);
    let mut services: Vec<&Service> = snapshot.services.iter().collect();
    services.sort_by_key(|service| (namespace_of(&service.metadata), name_of(&service.metadata)));

    let mut frontends = BTreeMap::new();
    for service in services {
        let ns = namespace_of(&service.metadata);
        let name = name_of(&service.metadata);
        let Some(ips) = cluster_ips(service, &ns, &name, &mut problems) else {
            continue;
        };
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
                let frontend = Frontend {
                    service: ServicePortName {
                        namespace: ns.clone(),
                        name: name.clone(),
                        port_name: port.name.clone(),
                    },
                    backends: backends_for(service_slices, *ip, port, &mut problems),
                    flags: service_flags::CLUSTER_IP,
                    affinity_timeout_secs: 0,
                };
                frontends.insert(key, frontend);
            }
        }
    }
    ModelOutput {
        desired: DesiredState { frontends },
        problems: problems.into_vec(),
    }
}
