//! The model: Kubernetes objects (and node facts) to the desired dataplane state. All Service
//! semantics live here; nothing from aya leaks in and no k8s-openapi type leaks out.
//!
//! `input` cuts objects down to what the semantics read; `cluster` holds them and says which
//! Services a change touched; `service` computes one Service's frontends (a pure function);
//! `desired` keeps every Service's output and the rules across Services, so that a change
//! costs what it touches. [`build`] is the same function over a whole cluster at once.
pub mod cluster;
pub mod desired;
mod endpoints;
mod external;
#[cfg(test)]
mod external_tests;
pub mod input;
mod ip;
pub mod lb_algorithm;
pub mod problems;
#[cfg(test)]
mod semantics_tests;
pub mod service;

pub use input::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, ZONE_LABEL};
pub use ip::{parse_cidr_lenient, parse_ip_lenient};
pub use lb_algorithm::{LB_ALGORITHM_ANNOTATION, LbAlgorithm};
pub use problems::{ObjectKind, Problem, ServiceId};

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};

/// A whole cluster as Kubernetes objects (a parsed manifests file, test fixtures).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Nodes the source knows of; the model reads this node's zone from its own.
    pub nodes: Vec<Arc<Node>>,
    /// The ranges ClusterIPs are allocated from (the service-CIDR guard).
    pub service_cidrs: Vec<Arc<ServiceCIDR>>,
}

/// The agent's settings that the model depends on.
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    /// This node's name, as endpoints' `nodeName` spells it.
    pub node_name: Option<String>,
    /// This node's zone (its Node object's `topology.kubernetes.io/zone` label).
    pub zone: Option<String>,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this value are ours;
    /// Services labelled with any other value belong to another proxy.
    pub service_proxy_name: Option<String>,
    /// Every address of this node (loopback and IPv6 link-local excluded). A
    /// loadBalancerSourceRange that covers one of them also admits the LB IPs themselves as
    /// sources (traffic from the node to its own LB IP that comes back with that source).
    pub node_addresses: Vec<IpAddr>,
    /// The node addresses NodePorts open on (`--nodeport-addresses` already applied).
    pub nodeport_addresses: Vec<IpAddr>,
    /// `--allow-service-external-ips=false`: `spec.externalIPs` is ignored entirely.
    pub ignore_external_ips: bool,
    /// The API server's addresses: an externalIP equal to one (or to a node address) is never
    /// translated for the host's own processes (CVE-2020-8554).
    pub api_server_addresses: Vec<IpAddr>,
    /// `--lb-algorithm`: how north-south flows of Services without (a valid)
    /// `switchyard.dev/lb-algorithm` annotation choose their backend.
    pub lb_algorithm: LbAlgorithm,
}

/// L4 protocols the dataplane translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// Which backend set of a service a frontend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The frontend's main entry: for ClusterIPs the set the internal traffic policy picks,
    /// for external frontends all usable endpoints of the cluster.
    Cluster,
    /// The second entry of an external frontend with externalTrafficPolicy Local: this node's
    /// endpoints, for traffic from outside the cluster.
    Local,
}

impl Scope {
    /// Both scopes, cluster first (the order of frontend keys).
    pub const ALL: [Self; 2] = [Self::Cluster, Self::Local];
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cluster => "cluster",
            Self::Local => "local",
        })
    }
}

/// An address range, its address masked to the prefix (`203.0.113.0/25`, `fd00::/64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    ip: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The first range in `Cidr`'s order (0.0.0.0/0), a lower bound for range queries.
    pub const FIRST: Self = Self {
        ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// The range of `prefix` bits around `ip`; `None` when the prefix is longer than the
    /// address.
    pub fn new(ip: IpAddr, prefix: u8) -> Option<Self> {
        let ip = match ip {
            IpAddr::V4(v4) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            _ => return None,
        };
        Some(Self { ip, prefix })
    }

    /// The range holding exactly `ip` (/32 or /128).
    pub fn host(ip: IpAddr) -> Self {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        Self { ip, prefix }
    }

    /// The range's first address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The number of leading bits that must match.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (of the same family) lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix).is_some_and(|masked| masked.ip == self.ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// A service address as the datapath matches it: (IP, port, protocol, scope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A backend as the datapath addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Which Service port a frontend belongs to (for logs and dumps).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// One frontend of the desired state with its backends in slot order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServicePortName,
    pub backends: Vec<BackendAddr>,
    /// `proxy_common::service_flags`: the frontend's kind (ClusterIP, NodePort, external IP,
    /// LoadBalancer) and how the datapath treats it.
    pub flags: u16,
    pub affinity_timeout_secs: u32,
    /// With flag `SOURCE_RANGES`: the only sources allowed to open new flows (same family as
    /// the frontend).
    pub source_ranges: BTreeSet<Cidr>,
}

/// A Service's healthCheckNodePort (type LoadBalancer with externalTrafficPolicy Local): what
/// the node's health-check listener on that port reports to the load balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Local endpoints that are ready (serving-but-terminating ones do not count).
    pub local_endpoints: usize,
}

/// What the dataplane should look like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Health-check listeners by healthCheckNodePort.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// The model's answer: the desired state and what it had to skip.
#[derive(Clone, Debug, Default)]
pub struct ModelOutput {
    pub desired: DesiredState,
    pub problems: Vec<Problem>,
}

impl ModelConfig {
    /// The settings with this node's zone read from its Node object in `snapshot`, unless set.
    fn with_zone_from(&self, snapshot: &ClusterSnapshot) -> Self {
        let mut config = self.clone();
        if config.zone.is_none()
            && let Some(name) = &config.node_name
        {
            config.zone = snapshot
                .nodes
                .iter()
                .find(|node| node.metadata.name.as_deref() == Some(name))
                .and_then(|node| node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned());
        }
        config
    }
}

/// Converts a snapshot into the model's input.
pub fn cluster_of(snapshot: &ClusterSnapshot) -> cluster::Cluster {
    let mut cluster = cluster::Cluster::default();
    cluster.replace_services(
        snapshot
            .services
            .iter()
            .map(|service| Arc::new(input::ServiceInput::from(service.as_ref())))
            .collect(),
    );
    cluster.replace_slices(
        snapshot
            .endpoint_slices
            .iter()
            .map(|slice| Arc::new(input::SliceInput::from(slice.as_ref())))
            .collect(),
    );
    cluster.replace_nodes(
        snapshot
            .nodes
            .iter()
            .map(|node| Arc::new(input::NodeInput::from(node.as_ref())))
            .collect(),
    );
    cluster.replace_service_cidrs(
        snapshot
            .service_cidrs
            .iter()
            .map(|object| Arc::new(input::ServiceCidrInput::from(object.as_ref())))
            .collect(),
    );
    cluster
}

/// Every Service of `cluster` through the model: the full recomputation.
pub fn desired_of(cluster: &cluster::Cluster, config: &ModelConfig) -> desired::Desired {
    let mut desired = desired::Desired::default();
    for id in cluster.service_ids() {
        let service = cluster.service(id).expect("listed ids exist");
        let output = service::service_output(service, &cluster.slices_of(id), config);
        desired.insert(id, output);
    }
    desired
}

/// The problems of slices that serve no Service (no `kubernetes.io/service-name` label).
pub fn unlabelled_slice_problems(cluster: &cluster::Cluster) -> Vec<Problem> {
    cluster
        .unlabelled_slices()
        .map(|slice| Problem {
            kind: ObjectKind::EndpointSlice,
            namespace: slice.key.namespace.to_string(),
            name: slice.key.name.to_string(),
            reason: format!("missing label {SERVICE_NAME_LABEL}; slice ignored"),
        })
        .collect()
}

/// Computes the desired dataplane state of a whole cluster at once.
pub fn build(snapshot: &ClusterSnapshot, config: &ModelConfig) -> ModelOutput {
    let cluster = cluster_of(snapshot);
    let desired = desired_of(&cluster, &config.with_zone_from(snapshot));
    let mut problems: std::collections::BTreeSet<Problem> =
        desired.problems().into_iter().collect();
    problems.extend(unlabelled_slice_problems(&cluster));
    ModelOutput {
        desired: desired.state(),
        problems: problems.into_iter().collect(),
    }
}
