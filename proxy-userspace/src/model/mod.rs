//! The model: a pure function from Kubernetes objects (and node facts) to the desired dataplane
//! state. All Service semantics live here; nothing from aya or k8s-openapi leaks out of it.
mod endpoints;
mod ip;
mod service;

pub use ip::parse_ip_lenient;
pub use service::{SERVICE_PROXY_NAME_LABEL, ZONE_LABEL, build};

use std::{collections::BTreeMap, fmt, net::IpAddr};

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// Everything the model reads: the cluster objects as the source last saw them (shared, so a
/// snapshot of a large cluster is cheap to take).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Nodes the source knows of; the model reads this node's zone from its own.
    pub nodes: Vec<Arc<Node>>,
}

/// The agent's settings that the model depends on.
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    /// This node's name, as endpoints' `nodeName` spells it.
    pub node_name: Option<String>,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this value are ours;
    /// Services labelled with any other value belong to another proxy.
    pub service_proxy_name: Option<String>,
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
    /// All usable endpoints of the cluster.
    Cluster,
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
    pub namespace: String,
    pub name: String,
    pub port_name: String,
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
    pub flags: u16,
    pub affinity_timeout_secs: u32,
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

/// Kind of object a problem refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
        })
    }
}

/// A part of an object the model could not use: reported, counted and skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// The model's answer: the desired state and what it had to skip.
#[derive(Clone, Debug, Default)]
pub struct ModelOutput {
    pub desired: DesiredState,
    pub problems: Vec<Problem>,
}
