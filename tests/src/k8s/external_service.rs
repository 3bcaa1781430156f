//! A Service with external frontends (NodePort, externalIPs, LoadBalancer ingress IPs, source
//! ranges, traffic policy) and one EndpointSlice per address family, rendered as Kubernetes
//! YAML for a manifests file or the test API server.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::client::testkit::BACKEND_PORT;
use crate::k8s::manifests::Manifests;

/// `spec.type` of an [`ExternalService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    fn as_k8s(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// A Service with a TCP and a UDP port (same port, same nodePort) targeting
/// [`BACKEND_PORT`] (or [`ExternalService::backend_port`]), its external frontends and one
/// EndpointSlice per address family.
#[derive(Debug, Clone)]
pub struct ExternalService {
    pub name: String,
    pub kind: ServiceType,
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    /// The endpoints' port (targetPort and the EndpointSlice ports).
    pub backend_port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub ingress_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`, verbatim.
    pub source_ranges: Vec<String>,
    /// `externalTrafficPolicy: Local` (else Cluster).
    pub local_policy: bool,
    pub health_check_node_port: Option<u16>,
    /// (address, nodeName) of every ready endpoint.
    pub endpoints: Vec<(IpAddr, String)>,
}

pub const SERVICE_NAMESPACE: &str = "ns";

impl ExternalService {
    pub fn new(name: &str, kind: ServiceType, cluster_ips: &[IpAddr], port: u16) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            cluster_ips: cluster_ips.to_vec(),
            port,
            backend_port: BACKEND_PORT,
            node_port: None,
            external_ips: Vec::new(),
            ingress_ips: Vec::new(),
            source_ranges: Vec::new(),
            local_policy: false,
            health_check_node_port: None,
            endpoints: Vec::new(),
        }
    }

    /// Endpoints listening on `port` instead of [`BACKEND_PORT`] (e.g. one nothing serves).
    #[must_use]
    pub fn backend_port(mut self, port: u16) -> Self {
        self.backend_port = port;
        self
    }

    #[must_use]
    pub fn node_port(mut self, port: u16) -> Self {
        self.node_port = Some(port);
        self
    }

    #[must_use]
    pub fn external_ip(mut self, ip: IpAddr) -> Self {
        self.external_ips.push(ip);
        self
    }

    #[must_use]
    pub fn ingress_ip(mut self, ip: IpAddr) -> Self {
        self.ingress_ips.push(ip);
        self
    }

    #[must_use]
    pub fn source_range(mut self, range: &str) -> Self {
        self.source_ranges.push(range.to_owned());
        self
    }

    /// `externalTrafficPolicy: Local`, with a healthCheckNodePort for a LoadBalancer (as the
    /// API server would allocate).
    #[must_use]
    pub fn local(mut self, health_check_node_port: u16) -> Self {
        self.local_policy = true;
        if self.kind == ServiceType::LoadBalancer {
            self.health_check_node_port = Some(health_check_node_port);
        }
        self
    }

    #[must_use]
    pub fn endpoint(mut self, address: IpAddr, node: &str) -> Self {
        self.endpoints.push((address, node.to_owned()));
        self
    }

    #[must_use]
    pub fn without_endpoints(mut self) -> Self {
        self.endpoints.clear();
        self
    }

    /// Whether it has an IPv6 ClusterIP.
    pub fn has_ipv6(&self) -> bool {
        self.cluster_ips.iter().any(IpAddr::is_ipv6)
    }

    fn families(&self) -> Vec<&'static str> {
        let mut families: Vec<&'static str> = self
            .cluster_ips
            .iter()
            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
            .collect();
        families.dedup();
        families
    }

    fn service_yaml(&self) -> Value {
        let port = |name: &str, protocol: &str| {
            let mut port = json!({
                "name": name,
                "protocol": protocol,
                "port": self.port,
                "targetPort": self.backend_port,
            });
            if let Some(node_port) = self.node_port {
                port["nodePort"] = json!(node_port);
            }
            port
        };
        let strings = |ips: &[IpAddr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>();
        let families = self.families();
        let mut spec = json!({
            "type": self.kind.as_k8s(),
            "clusterIP": self.cluster_ips.first().map(ToString::to_string),
            "clusterIPs": strings(&self.cluster_ips),
            "ipFamilies": families,
            "ipFamilyPolicy": if families.len() > 1 { "RequireDualStack" } else { "SingleStack" },
            "ports": [port("tcp", "TCP"), port("udp", "UDP")],
            "selector": {"app": self.name},
        });
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(strings(&self.external_ips));
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if self.kind != ServiceType::ClusterIp || !self.external_ips.is_empty() {
            spec["externalTrafficPolicy"] = json!(if self.local_policy {
                "Local"
            } else {
                "Cluster"
            });
        }
        if let Some(port) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(port);
        }
        let mut service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": SERVICE_NAMESPACE},
            "spec": spec,
        });
        if !self.ingress_ips.is_empty() {
            let ingress: Vec<Value> = self
                .ingress_ips
                .iter()
                .map(|ip| json!({"ip": ip.to_string()}))
                .collect();
            service["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        service
    }

    fn slice_yaml(&self, family: &str) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .filter(|(ip, _)| (family == "IPv4") == ip.is_ipv4())
            .map(|(ip, node)| {
                json!({
                    "addresses": [ip.to_string()],
                    "nodeName": node,
                    "conditions": {"ready": true},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-{}", self.name, family.to_lowercase()),
                "namespace": SERVICE_NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.name},
            },
            "addressType": family,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": self.backend_port},
                {"name": "udp", "protocol": "UDP", "port": self.backend_port},
            ],
            "endpoints": endpoints,
        })
    }

    /// The Service and its EndpointSlices as YAML documents.
    pub fn documents(&self) -> Vec<String> {
        let mut documents = vec![to_yaml(&self.service_yaml())];
        for family in self.families() {
            documents.push(to_yaml(&self.slice_yaml(family)));
        }
        documents
    }
}

fn to_yaml(value: &Value) -> String {
    serde_yaml::to_string(value).expect("JSON values serialize as YAML")
}

/// A manifests file holding `services`.
pub fn manifests(services: &[&ExternalService]) -> Manifests {
    services
        .iter()
        .flat_map(|service| service.documents())
        .fold(Manifests::new(), |manifests, document| {
            manifests.raw(&document)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_external_frontends_policy_ranges_and_slices() {
        let service = ExternalService::new(
            "web",
            ServiceType::LoadBalancer,
            &[
                "10.96.50.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            80,
        )
        .node_port(30080)
        .external_ip("198.51.100.20".parse().unwrap())
        .ingress_ip("198.51.100.10".parse().unwrap())
        .source_range(" 203.0.113.0/28")
        .local(32080)
        .endpoint("10.240.1.2".parse().unwrap(), "node-a")
        .endpoint("fd00:240:1::2".parse().unwrap(), "node-a")
        .endpoint("10.241.1.2".parse().unwrap(), "node-b");
        let docs = service.documents();
        assert_eq!(docs.len(), 3);
        let svc: serde_yaml::Value = serde_yaml::from_str(&docs[0]).unwrap();
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], 30080);
        assert_eq!(svc["spec"]["externalIPs"][0], "198.51.100.20");
        assert_eq!(
            svc["spec"]["loadBalancerSourceRanges"][0],
            " 203.0.113.0/28"
        );
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(svc["spec"]["healthCheckNodePort"], 32080);
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(
            svc["status"]["loadBalancer"]["ingress"][0]["ip"],
            "198.51.100.10"
        );
        let v4: serde_yaml::Value = serde_yaml::from_str(&docs[1]).unwrap();
        assert_eq!(v4["addressType"], "IPv4");
        assert_eq!(v4["endpoints"][0]["addresses"][0], "10.240.1.2");
        assert_eq!(v4["endpoints"][1]["nodeName"], "node-b");
        let v6: serde_yaml::Value = serde_yaml::from_str(&docs[2]).unwrap();
        assert_eq!(v6["endpoints"][0]["addresses"][0], "fd00:240:1::2");
        let empty = service.clone().without_endpoints().documents();
        let v4: serde_yaml::Value = serde_yaml::from_str(&empty[1]).unwrap();
        assert_eq!(v4["endpoints"].as_sequence().map(Vec::len), Some(0));
    }
}
