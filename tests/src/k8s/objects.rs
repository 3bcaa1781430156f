//! Typed Kubernetes objects for tests that talk to the test API server.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Service, ServicePort, ServiceSpec, Taint};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::client::testkit::BACKEND_PORT;

/// Object metadata: `name` in `namespace` (`None` for cluster-scoped objects) with `labels`.
pub fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..ObjectMeta::default()
    }
}

/// A ClusterIP Service at `vip` with one TCP port named `http`.
pub fn cluster_ip_service(namespace: &str, name: &str, vip: SocketAddr) -> Service {
    Service {
        metadata: meta(Some(namespace), name, &[]),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(vip.ip().to_string()),
            cluster_ips: Some(vec![vip.ip().to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(vip.port()),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The IPv4 EndpointSlice `<service>-abc` listing `backends` as ready on port `http`
/// ([`BACKEND_PORT`]).
pub fn endpoint_slice(namespace: &str, service: &str, backends: &[IpAddr]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            &format!("{service}-abc"),
            &[("kubernetes.io/service-name", service)],
        ),
        address_type: "IPv4".into(),
        endpoints: backends
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(BACKEND_PORT)),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// The Node `name` in `zone` (its `topology.kubernetes.io/zone` label) with these taint keys
/// (effect NoSchedule, as the cluster autoscaler sets `ToBeDeletedByClusterAutoscaler`).
pub fn node(name: &str, zone: Option<&str>, taints: &[&str]) -> Node {
    let mut metadata = meta(None, name, &[]);
    if let Some(zone) = zone {
        metadata.labels = Some(BTreeMap::from([(
            "topology.kubernetes.io/zone".to_owned(),
            zone.to_owned(),
        )]));
    }
    Node {
        metadata,
        spec: Some(NodeSpec {
            taints: (!taints.is_empty()).then(|| {
                taints
                    .iter()
                    .map(|key| Taint {
                        key: (*key).to_owned(),
                        effect: "NoSchedule".into(),
                        ..Taint::default()
                    })
                    .collect()
            }),
            ..NodeSpec::default()
        }),
        ..Node::default()
    }
}

/// The ServiceCIDR `name` holding `cidrs` (at most one per family, as the API allows).
pub fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
    ServiceCIDR {
        metadata: meta(None, name, &[]),
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(cidrs.iter().map(|cidr| (*cidr).to_owned()).collect()),
        }),
        ..ServiceCIDR::default()
    }
}
