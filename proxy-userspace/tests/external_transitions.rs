//! Make-before-break for external frontends: through every change of externalTrafficPolicy
//! and loadBalancerSourceRanges, and after a failure at any single write, the maps never show
//! the datapath a state it could misread:
//!
//! - a master's slots and their backends exist (as for ClusterIPs);
//! - a cluster entry with `EXTERNAL_LOCAL` has its node-local twin;
//! - a master enforcing source ranges has at least the ranges of the state it belongs to (the
//!   old master with the old ranges, the new master with the new ones), so no allowed source
//!   is ever dropped.
use std::{collections::BTreeSet, net::IpAddr};

use proxy_common::service_flags;
use proxy_userspace::{
    maps::{
        FakeMaps, FaultyWriter,
        encode::{MapImage, programmed_from_image},
    },
    model::{Cidr, ClusterSnapshot, FrontendKey, ModelConfig, Scope},
    plan::mirror::Programmed,
    runner::sync_once,
    source::manifest,
};

fn config() -> ModelConfig {
    let node: Vec<IpAddr> = vec!["198.51.100.2".parse().unwrap()];
    ModelConfig {
        node_name: Some("node-a".into()),
        nodeport_addresses: node.clone(),
        node_addresses: node,
        ..ModelConfig::default()
    }
}

/// A LoadBalancer Service with the given policy, ranges and endpoints (`here` on node-a).
fn state(local: bool, ranges: &[&str], here: &[&str], there: &[&str]) -> ClusterSnapshot {
    let policy = if local { "Local" } else { "Cluster" };
    let ranges: Vec<String> = ranges.iter().map(|r| format!("'{r}'")).collect();
    let endpoints: Vec<String> = here
        .iter()
        .map(|ip| format!("{{addresses: [{ip}], nodeName: node-a}}"))
        .chain(
            there
                .iter()
                .map(|ip| format!("{{addresses: [{ip}], nodeName: node-b}}")),
        )
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: t}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.1, externalTrafficPolicy: {policy}, healthCheckNodePort: 32000, loadBalancerSourceRanges: [{}], ports: [{{name: http, port: 80, nodePort: 30080}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 1.2.3.4}}, {{ip: 1.2.3.5}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: lb-1, namespace: t, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        ranges.join(", "),
        endpoints.join(", ")
    );
    let parsed = manifest::parse(&yaml);
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    parsed.snapshot
}

fn steps() -> Vec<ClusterSnapshot> {
    vec![
        state(false, &["203.0.113.0/25"], &["10.0.0.1"], &["10.0.1.1"]),
        // Local policy; a range covering the node address admits the LB IPs too.
        state(
            true,
            &["203.0.113.0/25", "198.51.100.0/24"],
            &["10.0.0.1"],
            &["10.0.1.1"],
        ),
        // Narrower ranges; the local endpoint leaves (the twin drops).
        state(true, &["198.51.100.0/24"], &[], &["10.0.1.1", "10.0.1.2"]),
        // Back to Cluster, no ranges at all.
        state(false, &[], &["10.0.0.3"], &["10.0.1.2"]),
        ClusterSnapshot::default(),
    ]
}

fn ranges_of(programmed: &Programmed, rev_nat_id: u32) -> BTreeSet<Cidr> {
    programmed
        .source_ranges
        .iter()
        .filter(|(id, _)| *id == rev_nat_id)
        .map(|(_, range)| *range)
        .collect()
}

/// Checks one intermediate image against the states before and after the transition.
fn assert_safe(image: &MapImage, before: &Programmed, after: &Programmed, context: &str) {
    let (now, unreadable) = programmed_from_image(image);
    assert!(unreadable.0.is_empty(), "{context}: {unreadable:?}");
    for (key, frontend) in &now.frontends {
        let Some(master) = frontend.master else {
            continue;
        };
        for slot in 1..=master.count {
            let id = frontend
                .slots
                .get(&slot)
                .unwrap_or_else(|| panic!("{context}: {key} slot {slot} missing"));
            assert!(
                now.backends.contains_key(id),
                "{context}: {key} backend {id} missing"
            );
        }
        if master.flags & service_flags::EXTERNAL_LOCAL != 0 {
            let twin = FrontendKey {
                scope: Scope::Local,
                ..*key
            };
            assert!(
                now.frontends.get(&twin).is_some_and(|f| f.master.is_some()),
                "{context}: {key} points outside traffic at a missing local entry"
            );
        }
        if master.flags & service_flags::SOURCE_RANGES != 0 {
            // The master belongs to the old state, the new one, or both (unchanged): the
            // ranges of one of them must all be there.
            let present = ranges_of(&now, master.rev_nat_id);
            let states: Vec<BTreeSet<Cidr>> = [before, after]
                .into_iter()
                .filter(|reference| {
                    reference.frontends.get(key).and_then(|f| f.master) == Some(master)
                })
                .map(|reference| ranges_of(reference, master.rev_nat_id))
                .collect();
            assert!(
                states.iter().any(|wanted| present.is_superset(wanted)),
                "{context}: {key} enforces {present:?}, its state wants one of {states:?}"
            );
        }
    }
}

#[test]
fn every_intermediate_state_of_an_external_transition_is_safe() {
    let mut fake = FakeMaps::default();
    let mut mirror = Programmed::default();
    for (index, step) in steps().iter().enumerate() {
        let start = fake.image.clone();
        let before = mirror.clone();
        fake.journal.clear();
        sync_once(step, &config(), &mut fake, &mut mirror, &mut Vec::new())
            .expect("fake writes succeed");
        let mut image = start;
        for (write_index, write) in fake.journal.iter().enumerate() {
            image.apply(*write);
            assert_safe(
                &image,
                &before,
                &mirror,
                &format!("step {index}, write {write_index}"),
            );
        }
        assert_eq!(programmed_from_image(&fake.image).0, mirror);
    }
    assert_eq!(fake.image, MapImage::default(), "nothing is left behind");
}

#[test]
fn a_failure_at_any_write_of_an_external_transition_is_safe_and_the_retry_converges() {
    let steps = steps();
    for pair in steps.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        let mut start = FakeMaps::default();
        let mut start_mirror = Programmed::default();
        sync_once(
            from,
            &config(),
            &mut start,
            &mut start_mirror,
            &mut Vec::new(),
        )
        .expect("fake writes succeed");
        let mut clean = start.clone();
        let mut clean_mirror = start_mirror.clone();
        clean.journal.clear();
        sync_once(
            to,
            &config(),
            &mut clean,
            &mut clean_mirror,
            &mut Vec::new(),
        )
        .expect("fake writes succeed");
        for fail_at in 0..clean.journal.len() {
            let mut faulty = FaultyWriter::new(start.clone(), [fail_at]);
            let mut mirror = start_mirror.clone();
            let error = sync_once(to, &config(), &mut faulty, &mut mirror, &mut Vec::new())
                .expect_err("the injected fault surfaces");
            assert_eq!(error.applied, fail_at);
            assert_safe(
                &faulty.inner.image,
                &start_mirror,
                &clean_mirror,
                &format!("failure at write {fail_at}"),
            );
            assert_eq!(programmed_from_image(&faulty.inner.image).0, mirror);
            sync_once(to, &config(), &mut faulty, &mut mirror, &mut Vec::new())
                .expect("retry succeeds");
            assert_eq!(
                faulty.inner.image, clean.image,
                "retry after write {fail_at}"
            );
        }
    }
}
