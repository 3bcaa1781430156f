//! Property test: arbitrary (often invalid) Services and EndpointSlices never make the model
//! panic or produce an inconsistent dataplane; whatever it skips, the rest is planned and
//! applied consistently and re-planning is a no-op.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proptest::prelude::*;
use proxy_common::service_flags;
use proxy_userspace::{
    maps::{self as writer, FakeMaps},
    model::{self, ClusterSnapshot, ModelConfig, Scope},
    plan::plan,
    runner as sync,
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
    )
        .prop_map(
            |(addresses, ready, serving, terminating, node_name)| Endpoint {
                addresses,
                conditions: Some(EndpointConditions {
                    ready,
                    serving,
                    terminating,
                }),
                node_name,
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
        let mut mirror = sync::restore(&fake).unwrap();
        for slices in [slices, later] {
            let snapshot = ClusterSnapshot {
                services: services.iter().cloned().map(Arc::new).collect(),
                endpoint_slices: slices.into_iter().map(Arc::new).collect(),
                nodes: Vec::new(),
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
            prop_assert_eq!(&sync::restore(&fake).unwrap(), &mirror);
            prop_assert!(plan(&mirror, &output.desired).is_empty());
        }
    }
}
