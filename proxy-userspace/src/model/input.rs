//! The model's input: Services, EndpointSlices and Nodes cut down to the fields the Service
//! semantics read. Sources convert every object as it arrives, so the agent never holds a
//! whole Kubernetes object (an EndpointSlice with ten endpoints is ~6 KiB as k8s-openapi
//! types, a few hundred bytes here). Values stay as the API spells them (strings, optional
//! flags): judging them is the model's job, which reports what it cannot use.
use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::problems::ServiceId;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service to another proxy (kube-proxy skips such Services too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service's forwarding mode for external traffic to remote endpoints (`snat` or `dsr`),
/// overriding `--lb-mode` (Cilium's `service.cilium.io/forwarding-mode` is the precedent).
pub const FORWARDING_MODE_ANNOTATION: &str = "switchyard.dev/forwarding-mode";
/// The node label carrying its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to remove (KEP-3836: load
/// balancers should stop sending new connections to it).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Namespace and name of an object as the model names it (`default` and `<unnamed>` when the
/// object lacks them, which only hand-written manifests do).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: namespace(meta.namespace.as_deref().unwrap_or("default")),
            name: meta.name.as_deref().unwrap_or("<unnamed>").into(),
        }
    }
}

/// One shared copy of each namespace's name: a cluster has few namespaces and many objects
/// in each (100 000 objects would otherwise hold 100 000 copies of the same few strings).
pub fn namespace(name: &str) -> Arc<str> {
    static NAMESPACES: std::sync::LazyLock<std::sync::Mutex<crate::hash::FastSet<Arc<str>>>> =
        std::sync::LazyLock::new(std::sync::Mutex::default);
    let mut namespaces = NAMESPACES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = namespaces.get(name) {
        return known.clone();
    }
    let interned: Arc<str> = name.into();
    namespaces.insert(interned.clone());
    interned
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The value of an enumerated API field (protocol, type, policy, address type). The values
/// Kubernetes defines are borrowed, not allocated: at 100 000 Services these fields were
/// tens of megabytes of three-letter strings.
pub type Word = Cow<'static, str>;

const WORDS: [&str; 19] = [
    "TCP",
    "UDP",
    "SCTP",
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "ExternalName",
    "Cluster",
    "Local",
    "None",
    "ClientIP",
    "IPv4",
    "IPv6",
    "FQDN",
    "VIP",
    "Proxy",
    "PreferClose",
    "PreferSameZone",
    "PreferSameNode",
];

/// `value` as a [`Word`]: one of Kubernetes' own values borrowed, anything else owned.
pub fn word(value: Option<&str>) -> Option<Word> {
    let value = value?;
    Some(WORDS.iter().find(|known| **known == value).map_or_else(
        || Cow::Owned(value.to_owned()),
        |known| Cow::Borrowed(*known),
    ))
}

/// One port of a Service (`spec.ports[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInput {
    pub name: Option<String>,
    pub protocol: Option<Word>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// One `status.loadBalancer.ingress[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressInput {
    pub ip: Option<String>,
    pub ip_mode: Option<Word>,
}

/// What the model reads of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInput {
    pub id: ServiceId,
    /// The `service.kubernetes.io/service-proxy-name` label.
    pub proxy_name: Option<String>,
    /// The [`FORWARDING_MODE_ANNOTATION`] annotation.
    pub forwarding_mode: Option<String>,
    /// Whether the object has a spec at all.
    pub has_spec: bool,
    pub type_: Option<Word>,
    pub cluster_ip: Option<String>,
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ServicePortInput>,
    pub external_ips: Vec<String>,
    pub load_balancer_ingress: Vec<IngressInput>,
    pub load_balancer_source_ranges: Vec<String>,
    pub external_traffic_policy: Option<Word>,
    pub internal_traffic_policy: Option<Word>,
    pub health_check_node_port: Option<i32>,
    pub session_affinity: Option<Word>,
    pub affinity_timeout_seconds: Option<i32>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready_addresses: bool,
    /// The `switchyard.dev/lb-algorithm` annotation, as written.
    pub lb_algorithm: Option<String>,
}

impl ServiceInput {
    /// The Service's type (`ClusterIP` when unset).
    pub fn type_name(&self) -> &str {
        self.type_.as_deref().unwrap_or("ClusterIP")
    }
}

impl From<&Service> for ServiceInput {
    fn from(service: &Service) -> Self {
        let key = ObjectKey::of(&service.metadata);
        let spec = service.spec.as_ref();
        let ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        Self {
            id: ServiceId {
                namespace: key.namespace,
                name: key.name,
            },
            proxy_name: label(&service.metadata, SERVICE_PROXY_NAME_LABEL),
            lb_algorithm: service
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(super::LB_ALGORITHM_ANNOTATION))
                .cloned(),
            forwarding_mode: service
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(FORWARDING_MODE_ANNOTATION).cloned()),
            has_spec: spec.is_some(),
            type_: spec.and_then(|s| word(s.type_.as_deref())),
            cluster_ip: spec.and_then(|s| s.cluster_ip.clone()),
            cluster_ips: spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default(),
            ports: spec
                .and_then(|s| s.ports.as_deref())
                .unwrap_or_default()
                .iter()
                .map(|port| ServicePortInput {
                    name: port.name.clone(),
                    protocol: word(port.protocol.as_deref()),
                    port: port.port,
                    node_port: port.node_port,
                })
                .collect(),
            external_ips: spec
                .and_then(|s| s.external_ips.clone())
                .unwrap_or_default(),
            load_balancer_ingress: ingress
                .iter()
                .map(|entry| IngressInput {
                    ip: entry.ip.clone(),
                    ip_mode: word(entry.ip_mode.as_deref()),
                })
                .collect(),
            load_balancer_source_ranges: spec
                .and_then(|s| s.load_balancer_source_ranges.clone())
                .unwrap_or_default(),
            external_traffic_policy: spec.and_then(|s| word(s.external_traffic_policy.as_deref())),
            internal_traffic_policy: spec.and_then(|s| word(s.internal_traffic_policy.as_deref())),
            health_check_node_port: spec.and_then(|s| s.health_check_node_port),
            session_affinity: spec.and_then(|s| word(s.session_affinity.as_deref())),
            affinity_timeout_seconds: spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            publish_not_ready_addresses: spec
                .and_then(|s| s.publish_not_ready_addresses)
                .unwrap_or(false),
        }
    }
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortInput {
    pub name: Option<String>,
    pub protocol: Option<Word>,
    pub port: Option<i32>,
}

/// One endpoint of an EndpointSlice: its first address (the only one that counts), its
/// conditions as the API spells them, its node and its topology hints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInput {
    pub address: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// What the model reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInput {
    pub key: ObjectKey,
    /// The `kubernetes.io/service-name` label: the Service in the slice's namespace it serves.
    pub service_name: Option<String>,
    pub address_type: Word,
    pub ports: Vec<SlicePortInput>,
    pub endpoints: Vec<EndpointInput>,
}

impl SliceInput {
    /// The Service this slice belongs to, if it is labelled with one.
    pub fn service(&self) -> Option<ServiceId> {
        self.service_name.as_deref().map(|name| ServiceId {
            namespace: self.key.namespace.clone(),
            name: name.into(),
        })
    }
}

impl From<&EndpointSlice> for SliceInput {
    fn from(slice: &EndpointSlice) -> Self {
        Self {
            key: ObjectKey::of(&slice.metadata),
            service_name: label(&slice.metadata, SERVICE_NAME_LABEL),
            address_type: word(Some(&slice.address_type)).unwrap_or_default(),
            ports: slice
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|port| SlicePortInput {
                    name: port.name.clone(),
                    protocol: word(port.protocol.as_deref()),
                    port: port.port,
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|endpoint| {
                    let conditions = endpoint.conditions.as_ref();
                    let hints = endpoint.hints.as_ref();
                    EndpointInput {
                        address: endpoint.addresses.first().cloned(),
                        ready: conditions.and_then(|c| c.ready),
                        serving: conditions.and_then(|c| c.serving),
                        terminating: conditions.and_then(|c| c.terminating),
                        node_name: endpoint.node_name.clone(),
                        zone_hints: hints
                            .and_then(|h| h.for_zones.as_ref())
                            .map(|zones| zones.iter().map(|z| z.name.clone()).collect())
                            .unwrap_or_default(),
                        node_hints: hints
                            .and_then(|h| h.for_nodes.as_ref())
                            .map(|nodes| nodes.iter().map(|n| n.name.clone()).collect())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

/// One `status.addresses[]` entry of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddressInput {
    pub type_: String,
    pub address: String,
}

/// What the agent reads of a Node (its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInput {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<NodeAddressInput>,
    /// `metadata.deletionTimestamp` is set: the Node is being deleted.
    pub deleting: bool,
    /// The keys of `spec.taints`.
    pub taint_keys: Vec<String>,
}

impl NodeInput {
    /// Whether load balancers should keep sending new connections to this node (kube-proxy's
    /// `nodeEligible`, KEP-3836): not while the Node is being deleted or carries the cluster
    /// autoscaler's to-be-deleted taint.
    pub fn eligible(&self) -> bool {
        !self.deleting && !self.taint_keys.iter().any(|key| key == TO_BE_DELETED_TAINT)
    }
}

impl From<&Node> for NodeInput {
    fn from(node: &Node) -> Self {
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: label(&node.metadata, ZONE_LABEL),
            addresses: node
                .status
                .as_ref()
                .and_then(|status| status.addresses.as_deref())
                .unwrap_or_default()
                .iter()
                .map(|address| NodeAddressInput {
                    type_: address.type_.clone(),
                    address: address.address.clone(),
                })
                .collect(),
            deleting: node.metadata.deletion_timestamp.is_some(),
            taint_keys: node
                .spec
                .as_ref()
                .and_then(|spec| spec.taints.as_deref())
                .unwrap_or_default()
                .iter()
                .map(|taint| taint.key.clone())
                .collect(),
        }
    }
}

/// What the agent reads of a ServiceCIDR (`networking.k8s.io/v1`): the ranges ClusterIPs are
/// allocated from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCidrInput {
    pub name: String,
    /// `spec.cidrs`, as the API spells them.
    pub cidrs: Vec<String>,
}

impl From<&ServiceCIDR> for ServiceCidrInput {
    fn from(object: &ServiceCIDR) -> Self {
        Self {
            name: object.metadata.name.clone().unwrap_or_default(),
            cidrs: object
                .spec
                .as_ref()
                .and_then(|spec| spec.cidrs.clone())
                .unwrap_or_default(),
        }
    }
}

fn label(meta: &ObjectMeta, name: &str) -> Option<String> {
    meta.labels.as_ref()?.get(name).cloned()
}
