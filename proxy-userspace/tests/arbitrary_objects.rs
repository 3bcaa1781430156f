//! Property tests over arbitrary (often invalid) Services, EndpointSlices and node facts:
//!
//! - they never make the model panic or produce an inconsistent dataplane; whatever it skips,
//!   the rest is planned and applied consistently and re-planning is a no-op;
//! - after every step of a random sequence of adds, updates and deletes (Services, their
//!   EndpointSlices with zone and node hints, Services of another proxy, this Node's labels,
//!   taints and addresses, ServiceCIDRs), the incremental control plane (what the agent runs)
//!   equals the full recomputation, in the model (state, problems, health checks) and in the
//!   written maps, the service-CIDR guard included.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proptest::prelude::*;
use proxy_common::service_flags;
use proxy_userspace::{
    maps::{
        self as writer, FakeMaps, Shared,
        encode::{guard_from_image, programmed_from_image},
    },
    model::{self, ClusterSnapshot, ModelConfig, Scope, cluster::Change, input::ObjectKey},
    plan::plan,
    reconcile::{self, Reconciler},
    render::dump,
    source::{Delta, Relist},
};

fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..4, 0u8..4).prop_map(|(a, b)| format!("10.96.{a}.{b}")),
        (0u8..4).prop_map(|a| format!("010.096.000.{a:03}")),
        (0u8..4).prop_map(|a| format!("fd00::{a}")),
        Just("None".to_owned()),
        Just(String::new()),
        "[a-z0-9.:]{0,12}",
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("TCP".into())),
        Just(Some("UDP".into())),
        Just(Some("SCTP".into())),
        "[A-Z]{0,5}".prop_map(Some)
    ]
}

fn port_name() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("http".into())),
        Just(Some("dns".into()))
    ]
}

fn external_ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..3).prop_map(|a| format!("203.0.113.{a}")),
        (0u8..3).prop_map(|a| format!("203.0.113.00{a}")),
        (0u8..3).prop_map(|a| format!("2001:db8::{a}")),
        // Another Service's ClusterIP, or this node's address.
        (0u8..2).prop_map(|a| format!("10.96.0.{a}")),
        Just("192.168.0.2".to_owned()),
        "[a-z0-9.:]{0,8}",
    ]
}

fn range_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..33).prop_map(|p| format!("203.0.113.0/{p}")),
        (0u8..40).prop_map(|p| format!(" 192.168.000.0/0{p}")),
        (0u8..130).prop_map(|p| format!("2001:db8::/{p}")),
        "[a-z0-9./:]{0,10}",
    ]
}

fn service_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("ClusterIP".into())),
        Just(Some("NodePort".into())),
        Just(Some("LoadBalancer".into())),
        Just(Some("ExternalName".into())),
    ]
}

fn ingress() -> impl Strategy<Value = LoadBalancerIngress> {
    (
        prop::option::of(external_ip_text()),
        prop::option::of(prop_oneof![
            Just("VIP".to_owned()),
            Just("Proxy".to_owned()),
            "[A-Za-z]{0,4}"
        ]),
    )
        .prop_map(|(ip, ip_mode)| LoadBalancerIngress {
            ip,
            ip_mode,
            ..Default::default()
        })
}

/// The parts of a Service that make it reachable from outside.
#[derive(Clone, Debug)]
struct Exposure {
    type_: Option<String>,
    external_ips: Vec<String>,
    ingress: Vec<LoadBalancerIngress>,
    ranges: Option<Vec<String>>,
    external_local: bool,
    health_check_node_port: Option<i32>,
}

fn exposure() -> impl Strategy<Value = Exposure> {
    (
        service_type(),
        prop::collection::vec(external_ip_text(), 0..3),
        prop::collection::vec(ingress(), 0..3),
        prop::option::of(prop::collection::vec(range_text(), 0..3)),
        any::<bool>(),
        prop::option::of(prop_oneof![Just(32_000i32), Just(32_001), -1i32..70_000]),
    )
        .prop_map(
            |(type_, external_ips, ingress, ranges, external_local, health_check_node_port)| {
                Exposure {
                    type_,
                    external_ips,
                    ingress,
                    ranges,
                    external_local,
                    health_check_node_port,
                }
            },
        )
}

fn service() -> impl Strategy<Value = Service> {
    let ports = prop::collection::vec(
        (
            port_name(),
            protocol(),
            -5i32..70_000,
            prop::option::of(prop_oneof![30_000i32..30_003, -1i32..70_000]),
        ),
        0..4,
    );
    (
        0u8..3,
        prop::collection::vec(ip_text(), 0..3),
        ports,
        any::<bool>(),
        prop::option::of(0i32..5),
        exposure(),
    )
        .prop_map(|(name, ips, ports, local, affinity, exposure)| Service {
            metadata: ObjectMeta {
                name: Some(format!("svc{name}")),
                namespace: Some("p".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().cloned(),
                cluster_ips: Some(ips),
                internal_traffic_policy: local.then(|| "Local".into()),
                session_affinity: affinity.map(|_| "ClientIP".into()),
                type_: exposure.type_,
                external_ips: Some(exposure.external_ips),
                load_balancer_source_ranges: exposure.ranges,
                external_traffic_policy: exposure.external_local.then(|| "Local".into()),
                health_check_node_port: exposure.health_check_node_port,
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, protocol, port, node_port)| ServicePort {
                            name,
                            protocol,
                            port,
                            node_port,
                            target_port: Some(IntOrString::Int(8080)),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(exposure.ingress),
                }),
                ..Default::default()
            }),
        })
}

fn slice() -> impl Strategy<Value = EndpointSlice> {
    let endpoint = (
        prop::collection::vec(
            prop_oneof![
                (0u8..6).prop_map(|a| format!("10.244.0.{a}")),
                (0u8..6).prop_map(|a| format!("fd00:244::{a}")),
                "[a-z0-9.:]{0,8}"
            ],
            0..3,
        ),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(prop_oneof![
            Just("node-a".to_owned()),
            Just("node-b".to_owned())
        ]),
        prop::option::of(prop_oneof![Just("zone-a"), Just("zone-b")]),
    )
        .prop_map(
            |(addresses, ready, serving, terminating, node_name, zone)| Endpoint {
                addresses,
                conditions: Some(EndpointConditions {
                    ready,
                    serving,
                    terminating,
                }),
                node_name,
                hints: zone.map(|zone| EndpointHints {
                    for_zones: Some(vec![ForZone { name: zone.into() }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
    let ports = prop::collection::vec(
        (port_name(), protocol(), prop::option::of(-5i32..70_000)),
        0..3,
    );
    (
        0u8..3,
        0u8..4,
        prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN")],
        prop::collection::vec(endpoint, 0..5),
        ports,
        any::<bool>(),
    )
        .prop_map(
            |(service, index, family, endpoints, ports, labelled)| EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("svc{service}-{index}")),
                    namespace: Some("p".into()),
                    labels: labelled.then(|| {
                        BTreeMap::from([(
                            "kubernetes.io/service-name".to_owned(),
                            format!("svc{service}"),
                        )])
                    }),
                    ..Default::default()
                },
                address_type: family.to_owned(),
                endpoints,
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, protocol, port)| EndpointPort {
                            name,
                            protocol,
                            port,
                            ..Default::default()
                        })
                        .collect(),
                ),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_objects_never_break_the_pipeline(
        services in prop::collection::vec(service(), 0..5),
        slices in prop::collection::vec(slice(), 0..6),
        later in prop::collection::vec(slice(), 0..6),
    ) {
        let node: Vec<std::net::IpAddr> = ["192.168.0.2", "2001:db8::2"].iter().map(|ip| ip.parse().unwrap()).collect();
        let config = ModelConfig {
            node_name: Some("node-a".into()),
            nodeport_addresses: node.clone(),
            node_addresses: node,
            ..ModelConfig::default()
        };
        let mut fake = FakeMaps::default();
        let mut mirror = reconcile::restore(&fake).unwrap();
        for slices in [slices, later] {
            let snapshot = ClusterSnapshot {
                services: services.iter().cloned().map(Arc::new).collect(),
                endpoint_slices: slices.into_iter().map(Arc::new).collect(),
                nodes: Vec::new(),
                service_cidrs: Vec::new(),
            };
            let output = model::build(&snapshot, &config);
            for (key, frontend) in &output.desired.frontends {
                prop_assert!(key.port != 0);
                prop_assert!(frontend.backends.iter().all(|b| b.ip.is_ipv4() == key.ip.is_ipv4() && b.port != 0 && b.protocol == key.protocol));
                prop_assert!(frontend.source_ranges.iter().all(|r| r.ip().is_ipv4() == key.ip.is_ipv4()));
                if frontend.flags & service_flags::SOURCE_RANGES != 0 {
                    prop_assert!(frontend.flags & service_flags::LOAD_BALANCER != 0);
                } else {
                    prop_assert!(frontend.source_ranges.is_empty());
                }
                if key.scope == Scope::Local {
                    // A node-local twin always stands beside its cluster entry, which sends
                    // outside traffic to it, and belongs to the same Service port.
                    let cluster = output.desired.frontends.get(&model::FrontendKey { scope: Scope::Cluster, ..*key });
                    prop_assert!(cluster.is_some_and(|c| c.flags & service_flags::EXTERNAL_LOCAL != 0 && c.service == frontend.service));
                }
            }
            let ops = plan(&mirror, &output.desired);
            writer::apply(&mut fake, &mut mirror, &ops).unwrap();
            prop_assert_eq!(&reconcile::restore(&fake).unwrap(), &mirror);
            prop_assert!(plan(&mirror, &output.desired).is_empty());
        }
    }
}

/// One step of a cluster's life.
#[derive(Clone, Debug)]
enum Step {
    Apply(Box<Service>),
    DeleteService(u8),
    ApplySlice(Box<EndpointSlice>),
    DeleteSlice(u8, u8),
    /// This node's zone label, which of its addresses it has, and whether it carries the
    /// cluster autoscaler's taint.
    Node(Option<&'static str>, u8, bool),
    /// The ServiceCIDRs now (as a relist).
    ServiceCidrs(Vec<&'static str>),
}

/// A Service the API server would accept: valid addresses, ports and policies, so that most
/// steps reach every rule (claims, topology, health checks, source ranges).
fn valid_service() -> impl Strategy<Value = Service> {
    (
        0u8..3,
        0u8..3,
        prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("LoadBalancer")],
        prop::option::of(30_000i32..30_002),
        prop::collection::vec(
            prop_oneof![
                (0u8..3).prop_map(|a| format!("10.96.0.{a}")),
                // This node's address or the API server's (CVE-2020-8554).
                Just("192.168.0.2".to_owned()),
                Just("192.168.0.100".to_owned()),
            ],
            0..2,
        ),
        any::<bool>(),
        prop::option::of(prop_oneof![Just("192.168.0.0/24"), Just("203.0.113.0/25")]),
        prop::option::of(32_000i32..32_002),
        (
            prop::option::of(prop_oneof![Just("PreferSameZone"), Just("PreferSameNode")]),
            prop_oneof![4 => Just(None), 1 => Just(Some("other-proxy"))],
        ),
    )
        .prop_map(
            |(
                name,
                ip,
                type_,
                node_port,
                external_ips,
                local,
                range,
                health_check,
                (distribution, proxy),
            )| {
                let load_balancer = type_ == "LoadBalancer";
                Service {
                    metadata: ObjectMeta {
                        name: Some(format!("svc{name}")),
                        namespace: Some("p".into()),
                        labels: proxy.map(|proxy| {
                            BTreeMap::from([(
                                "service.kubernetes.io/service-proxy-name".to_owned(),
                                proxy.to_owned(),
                            )])
                        }),
                        ..Default::default()
                    },
                    spec: Some(ServiceSpec {
                        traffic_distribution: distribution.map(str::to_owned),
                        cluster_ip: Some(format!("10.96.0.{ip}")),
                        type_: Some(type_.into()),
                        external_ips: Some(external_ips),
                        external_traffic_policy: local.then(|| "Local".into()),
                        load_balancer_source_ranges: range.map(|range| vec![range.to_owned()]),
                        health_check_node_port: health_check.filter(|_| load_balancer && local),
                        ports: Some(vec![ServicePort {
                            name: Some("http".into()),
                            port: 80,
                            node_port: node_port.filter(|_| type_ != "ClusterIP"),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    status: Some(ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: load_balancer.then(|| {
                                vec![LoadBalancerIngress {
                                    ip: Some(format!("203.0.113.{name}")),
                                    ..Default::default()
                                }]
                            }),
                        }),
                        ..Default::default()
                    }),
                }
            },
        )
}

/// An EndpointSlice the API server would accept, hinted or not.
fn valid_slice() -> impl Strategy<Value = EndpointSlice> {
    let endpoint = (
        0u8..6,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just("node-a"), Just("node-b")],
        prop::option::of(prop_oneof![Just("zone-a"), Just("zone-b")]),
        prop::option::of(prop_oneof![Just("node-a"), Just("node-b")]),
    )
        .prop_map(
            |(address, ready, terminating, node, zone, node_hint)| Endpoint {
                addresses: vec![format!("10.244.0.{address}")],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready || terminating),
                    terminating: Some(terminating),
                }),
                node_name: Some(node.into()),
                hints: (zone.is_some() || node_hint.is_some()).then(|| EndpointHints {
                    for_zones: zone.map(|zone| vec![ForZone { name: zone.into() }]),
                    for_nodes: node_hint.map(|node| vec![ForNode { name: node.into() }]),
                }),
                ..Default::default()
            },
        );
    (0u8..3, 0u8..4, prop::collection::vec(endpoint, 0..4)).prop_map(
        |(service, index, endpoints)| EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("svc{service}-{index}")),
                namespace: Some("p".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_owned(),
                    format!("svc{service}"),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
        },
    )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => service().prop_map(|s| Step::Apply(Box::new(s))),
        3 => valid_service().prop_map(|s| Step::Apply(Box::new(s))),
        1 => (0u8..3).prop_map(Step::DeleteService),
        1 => slice().prop_map(|s| Step::ApplySlice(Box::new(s))),
        4 => valid_slice().prop_map(|s| Step::ApplySlice(Box::new(s))),
        1 => (0u8..3, 0u8..4).prop_map(|(s, i)| Step::DeleteSlice(s, i)),
        1 => (prop::option::of(prop_oneof![Just("zone-a"), Just("zone-b")]), 0u8..4, any::<bool>())
            .prop_map(|(zone, addresses, tainted)| Step::Node(zone, addresses, tainted)),
        1 => prop::collection::vec(
                prop_oneof![Just("10.96.0.0/16"), Just("10.96.0.0/24"), Just("fd00::/108"), Just("not-a-cidr")],
                0..3,
            )
            .prop_map(Step::ServiceCidrs),
    ]
}

fn node_object(zone: Option<&str>, tainted: bool) -> k8s_openapi::api::core::v1::Node {
    k8s_openapi::api::core::v1::Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            labels: zone.map(|zone| {
                BTreeMap::from([("topology.kubernetes.io/zone".to_owned(), zone.to_owned())])
            }),
            ..Default::default()
        },
        spec: tainted.then(|| k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                key: "ToBeDeletedByClusterAutoscaler".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_cidr_objects(cidrs: &[&str]) -> Vec<k8s_openapi::api::networking::v1::ServiceCIDR> {
    cidrs
        .iter()
        .enumerate()
        .map(
            |(index, cidr)| k8s_openapi::api::networking::v1::ServiceCIDR {
                metadata: ObjectMeta {
                    name: Some(format!("cidr-{index}")),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::networking::v1::ServiceCIDRSpec {
                    cidrs: Some(vec![(*cidr).to_owned()]),
                }),
                ..Default::default()
            },
        )
        .collect()
}

/// This node's settings with a subset of its addresses (bit 0: IPv4, bit 1: IPv6).
fn node_config(addresses: u8, zone: Option<&str>) -> ModelConfig {
    let all: [IpAddr; 2] = [
        "192.168.0.2".parse().unwrap(),
        "2001:db8::2".parse().unwrap(),
    ];
    let node: Vec<IpAddr> = all
        .iter()
        .enumerate()
        .filter(|(bit, _)| addresses & (1 << bit) != 0)
        .map(|(_, ip)| *ip)
        .collect();
    ModelConfig {
        node_name: Some("node-a".into()),
        zone: zone.map(str::to_owned),
        nodeport_addresses: node.clone(),
        node_addresses: node,
        api_server_addresses: vec!["192.168.0.100".parse().unwrap()],
        ..ModelConfig::default()
    }
}

fn key_of(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        namespace: meta.namespace.as_deref().unwrap_or("default").into(),
        name: meta.name.as_deref().unwrap_or("<unnamed>").into(),
    }
}

fn dump_of(maps: &Shared<FakeMaps>) -> String {
    let image = &maps.lock().image;
    let mut text = dump::render(&programmed_from_image(image).0);
    text.push_str(&dump::render_guard(&guard_from_image(image)));
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_incremental_control_plane_equals_the_full_recomputation(
        steps in prop::collection::vec(step(), 1..30),
    ) {
        let maps = Shared::new(FakeMaps::default());
        let mut agent = Reconciler::new(Box::new(maps.clone())).unwrap();
        let mut services: BTreeMap<ObjectKey, Service> = BTreeMap::new();
        let mut slices: BTreeMap<ObjectKey, EndpointSlice> = BTreeMap::new();
        let (mut zone, mut addresses, mut tainted) = (None, 3u8, false);
        let mut cidrs: Vec<&str> = Vec::new();
        for step in steps {
            let delta = match step {
                Step::Apply(service) => {
                    let key = key_of(&service.metadata);
                    let input = model::input::ServiceInput::from(&*service);
                    services.insert(key, *service);
                    Delta::Change(Change::Service(input.id.clone(), Some(Arc::new(input))))
                }
                Step::DeleteService(index) => {
                    let id = model::ServiceId::new("p", &format!("svc{index}"));
                    services.remove(&ObjectKey { namespace: id.namespace.clone(), name: id.name.clone() });
                    Delta::Change(Change::Service(id, None))
                }
                Step::ApplySlice(slice) => {
                    let key = key_of(&slice.metadata);
                    let input = model::input::SliceInput::from(&*slice);
                    slices.insert(key.clone(), *slice);
                    Delta::Change(Change::Slice(key, Some(Arc::new(input))))
                }
                Step::DeleteSlice(service, index) => {
                    let key = ObjectKey { namespace: "p".into(), name: format!("svc{service}-{index}").into() };
                    slices.remove(&key);
                    Delta::Change(Change::Slice(key, None))
                }
                Step::Node(new_zone, new_addresses, new_taint) => {
                    zone = new_zone;
                    addresses = new_addresses;
                    tainted = new_taint;
                    let node = model::input::NodeInput::from(&node_object(zone, tainted));
                    Delta::Change(Change::Node(node.name.clone(), Some(Arc::new(node))))
                }
                Step::ServiceCidrs(now) => {
                    cidrs = now;
                    Delta::Relisted(Relist::ServiceCidrs(
                        service_cidr_objects(&cidrs)
                            .iter()
                            .map(|object| Arc::new(model::input::ServiceCidrInput::from(object)))
                            .collect(),
                    ))
                }
            };
            agent.absorb(delta);
            let config = node_config(addresses, zone);
            agent.sync(&config);

            // The model: incremental equals a model built from scratch over the same objects.
            let fresh = model::desired_of(agent.cluster(), &config);
            prop_assert_eq!(agent.desired().state(), fresh.state());
            prop_assert_eq!(agent.desired().problems(), fresh.problems());
            prop_assert_eq!(agent.desired().health_checks(), fresh.health_checks());

            // The maps: what a fresh agent writes for the whole cluster at once, nothing left
            // to do for a full plan, and a mirror that is exactly the maps.
            let snapshot = ClusterSnapshot {
                services: services.values().cloned().map(Arc::new).collect(),
                endpoint_slices: slices.values().cloned().map(Arc::new).collect(),
                nodes: vec![Arc::new(node_object(zone, tainted))],
                service_cidrs: service_cidr_objects(&cidrs).into_iter().map(Arc::new).collect(),
            };
            let reference = Shared::new(FakeMaps::default());
            let mut fresh_agent = Reconciler::new(Box::new(reference.clone())).unwrap();
            fresh_agent.sync_snapshot(&snapshot, &config);
            prop_assert_eq!(dump_of(&maps), dump_of(&reference));
            prop_assert_eq!(agent.guard(), fresh_agent.guard());
            let (mirror, _) = programmed_from_image(&maps.lock().image);
            prop_assert!(plan(&mirror, &fresh.state()).is_empty());
            prop_assert_eq!(&mirror, agent.mirror());
        }
    }
}
