//! Property test: arbitrary (often invalid) Services and EndpointSlices never make the model
//! panic or produce an inconsistent dataplane; whatever it skips, the rest is planned and
//! applied consistently and re-planning is a no-op.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proptest::prelude::*;
use proxy_userspace::{
    model::{self, ClusterSnapshot, ModelConfig},
    plan::plan,
    sync,
    writer::{self, FakeMaps},
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

fn service() -> impl Strategy<Value = Service> {
    let ports = prop::collection::vec((port_name(), protocol(), -5i32..70_000), 0..4);
    (
        0u8..3,
        prop::collection::vec(ip_text(), 0..3),
        ports,
        any::<bool>(),
        prop::option::of(0i32..5),
    )
        .prop_map(|(name, ips, ports, local, affinity)| Service {
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
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, protocol, port)| ServicePort {
                            name,
                            protocol,
                            port,
                            target_port: Some(IntOrString::Int(8080)),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
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
        let config = ModelConfig { node_name: Some("node-a".into()), ..ModelConfig::default() };
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
            }
            let ops = plan(&mirror, &output.desired);
            writer::apply(&mut fake, &mut mirror, &ops).unwrap();
            prop_assert_eq!(&sync::restore(&fake).unwrap(), &mirror);
            prop_assert!(plan(&mirror, &output.desired).is_empty());
        }
    }
}
