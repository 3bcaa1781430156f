//! What the cluster's API server holds about the workload: Services (rendered by
//! [`ExternalService`]) and the EndpointSlices the EndpointSlice controller would write for the
//! pods backing them, with their conditions (a Deployment's rolling update), zones and hints.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, EndpointSlice, ForZone};

use crate::k8s::external_service::ExternalService;

/// Where a pod is in its life, as its endpoint's conditions say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Created, not yet ready: not listed (the controller lists it unready; nobody uses it).
    Starting,
    /// `ready: true`.
    Ready,
    /// Being deleted but still serving: `ready: false, serving: true, terminating: true`.
    Terminating,
    /// Gone from the slices (its process may still run, as after a grace period elsewhere).
    Removed,
}

/// One pod as the API knows it.
#[derive(Debug, Clone)]
pub struct PodRecord {
    /// What its server answers with.
    pub name: String,
    pub node: usize,
    pub address: Ipv4Addr,
    pub address6: Ipv6Addr,
    pub phase: PodPhase,
}

/// A Service of the cluster, backed by the pods of the chosen nodes.
#[derive(Debug, Clone)]
pub struct ClusterService {
    /// Name, type, addresses, ports and externalTrafficPolicy; its endpoints are ignored.
    pub template: ExternalService,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `trafficDistribution: PreferClose`, with the zone hints the controller then writes.
    pub prefer_close: bool,
    /// Only the pods on these nodes back it (all pods when `None`).
    pub nodes: Option<Vec<usize>>,
    /// Annotations of the Service object (e.g. `switchyard.dev/forwarding-mode`).
    pub annotations: BTreeMap<String, String>,
}

impl ClusterService {
    pub fn new(template: ExternalService) -> Self {
        Self {
            template: template.without_endpoints(),
            internal_local: false,
            prefer_close: false,
            nodes: None,
            annotations: BTreeMap::new(),
        }
    }

    #[must_use]
    pub fn internal_local(mut self) -> Self {
        self.internal_local = true;
        self
    }

    #[must_use]
    pub fn prefer_close(mut self) -> Self {
        self.prefer_close = true;
        self
    }

    #[must_use]
    pub fn on_nodes(mut self, nodes: &[usize]) -> Self {
        self.nodes = Some(nodes.to_vec());
        self
    }

    /// Sets an annotation of the Service object.
    #[must_use]
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn name(&self) -> &str {
        &self.template.name
    }

    fn backs(&self, pod: &PodRecord) -> bool {
        self.nodes
            .as_ref()
            .is_none_or(|nodes| nodes.contains(&pod.node))
    }

    /// The Service and its EndpointSlices (one per family of its ClusterIPs) for `pods`
    /// (`zone_of(node)` names each node's zone).
    pub fn objects(
        &self,
        pods: &[PodRecord],
        node_name: impl Fn(usize) -> String,
        zone_of: impl Fn(usize) -> String,
    ) -> Result<(Service, Vec<EndpointSlice>)> {
        let listed: Vec<&PodRecord> = pods
            .iter()
            .filter(|pod| self.backs(pod))
            .filter(|pod| matches!(pod.phase, PodPhase::Ready | PodPhase::Terminating))
            .collect();
        let mut template = self.template.clone();
        for pod in &listed {
            template = template
                .endpoint(IpAddr::V4(pod.address), &node_name(pod.node))
                .endpoint(IpAddr::V6(pod.address6), &node_name(pod.node));
        }
        let documents = template.documents();
        let (service_document, slice_documents) = documents
            .split_first()
            .with_context(|| format!("{}: nothing rendered", self.name()))?;
        let mut service: Service = serde_yaml::from_str(service_document)
            .with_context(|| format!("{}: the rendered Service", self.name()))?;
        if !self.annotations.is_empty() {
            service
                .metadata
                .annotations
                .get_or_insert_default()
                .extend(self.annotations.clone());
        }
        let spec = service.spec.get_or_insert_default();
        if self.internal_local {
            spec.internal_traffic_policy = Some("Local".into());
        }
        if self.prefer_close {
            spec.traffic_distribution = Some("PreferClose".into());
        }
        let mut slices = Vec::with_capacity(slice_documents.len());
        for document in slice_documents {
            let mut slice: EndpointSlice = serde_yaml::from_str(document)
                .with_context(|| format!("{}: a rendered EndpointSlice", self.name()))?;
            for endpoint in &mut slice.endpoints {
                let pod = listed
                    .iter()
                    .find(|pod| {
                        endpoint.addresses == [pod.address.to_string()]
                            || endpoint.addresses == [pod.address6.to_string()]
                    })
                    .with_context(|| {
                        format!(
                            "{}: endpoint {:?} of no pod",
                            self.name(),
                            endpoint.addresses
                        )
                    })?;
                ensure!(
                    endpoint.node_name.as_deref() == Some(node_name(pod.node).as_str()),
                    "{}: endpoint {} on the wrong node",
                    self.name(),
                    pod.name
                );
                let zone = zone_of(pod.node);
                if pod.phase == PodPhase::Terminating {
                    endpoint.conditions = Some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    });
                }
                if self.prefer_close {
                    endpoint.hints = Some(EndpointHints {
                        for_zones: Some(vec![ForZone { name: zone.clone() }]),
                        ..EndpointHints::default()
                    });
                }
                endpoint.zone = Some(zone);
            }
            slices.push(slice);
        }
        Ok((service, slices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::external_service::ServiceType;

    fn pod(name: &str, node: usize, host: u8, phase: PodPhase) -> PodRecord {
        PodRecord {
            name: name.into(),
            node,
            address: Ipv4Addr::new(10, 240, u8::try_from(node).unwrap(), host),
            address6: Ipv6Addr::new(
                0xfd00,
                0x240,
                0,
                u16::try_from(node).unwrap(),
                0,
                0,
                0,
                host.into(),
            ),
            phase,
        }
    }

    #[test]
    fn slices_carry_conditions_zones_hints_and_only_the_chosen_nodes() {
        let service = ClusterService::new(
            ExternalService::new(
                "web",
                ServiceType::LoadBalancer,
                &["10.96.0.10".parse().unwrap()],
                80,
            )
            .node_port(30080)
            .local(32080),
        )
        .internal_local()
        .prefer_close()
        .on_nodes(&[0, 1]);
        let pods = [
            pod("a", 0, 10, PodPhase::Ready),
            pod("b", 1, 10, PodPhase::Terminating),
            pod("c", 1, 11, PodPhase::Starting),
            pod("d", 0, 11, PodPhase::Removed),
            pod("e", 2, 10, PodPhase::Ready),
        ];
        let (svc, slices) = service
            .objects(&pods, |n| format!("node-{n}"), |n| format!("zone-{n}"))
            .unwrap();
        assert_eq!(slices.len(), 1, "an IPv4-only Service has one slice");
        let slice = &slices[0];
        let spec = svc.spec.unwrap();
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.traffic_distribution.as_deref(), Some("PreferClose"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, Some(32080));
        let addresses: Vec<&str> = slice
            .endpoints
            .iter()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(addresses, ["10.240.0.10", "10.240.1.10"]);
        let terminating = slice.endpoints[1].conditions.clone().unwrap();
        assert_eq!(
            (
                terminating.ready,
                terminating.serving,
                terminating.terminating
            ),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(slice.endpoints[1].node_name.as_deref(), Some("node-1"));
        assert_eq!(slice.endpoints[0].zone.as_deref(), Some("zone-0"));
        let hints = slice.endpoints[0].hints.clone().unwrap();
        assert_eq!(hints.for_zones.unwrap()[0].name, "zone-0");

        // Dual-stack: one slice per family, each pod in both.
        let dual = ClusterService::new(ExternalService::new(
            "dual",
            ServiceType::ClusterIp,
            &[
                "10.96.0.12".parse().unwrap(),
                "fd00:96::12".parse().unwrap(),
            ],
            80,
        ));
        let (_, slices) = dual
            .objects(&pods, |n| format!("node-{n}"), |n| format!("zone-{n}"))
            .unwrap();
        let families: Vec<&str> = slices.iter().map(|s| s.address_type.as_str()).collect();
        assert_eq!(families, ["IPv4", "IPv6"]);
        assert_eq!(slices[1].endpoints[0].addresses, ["fd00:240::a"]);
        assert_eq!(slices[1].endpoints.len(), 3);
    }
}
