//! Make-before-break for external frontends: through every change of externalTrafficPolicy
//! and loadBalancerSourceRanges, and after a failure at any single write, the maps never show
//! the datapath a state it could misread:
//!
//! - a master's slots and their backends exist (as for ClusterIPs);
//! - a cluster entry with `EXTERNAL_LOCAL` has its node-local twin;
//! - a master enforcing source ranges has at least the ranges of the state it belongs to (the
//!   old master with the old ranges, the new master with the new ones), so no allowed source
//!   is ever dropped.
//!
//! A failed write undoes the Service's change (its plan is applied as a unit): every write of
//! the undo is checked the same way, and the retry converges.
use std::{collections::BTreeSet, net::IpAddr};

use proxy_common::service_flags;
use proxy_userspace::{
    maps::{
        FakeMaps, FaultyWriter, Shared,
        encode::{MapImage, MapWrite, programmed_from_image},
    },
    model::{Cidr, ClusterSnapshot, FrontendKey, ModelConfig, Scope},
    plan::mirror::Programmed,
    reconcile::Reconciler,
    render::dump,
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

/// Replays the writes a sync made on top of `start`, checking every intermediate image.
fn replay_checking(
    start: &MapImage,
    journal: &[proxy_userspace::maps::encode::MapWrite],
    before: &Programmed,
    after: &Programmed,
    context: &str,
) {
    let mut image = start.clone();
    for (write_index, write) in journal.iter().enumerate() {
        image.apply(write.clone());
        assert_safe(
            &image,
            before,
            after,
            &format!("{context}, write {write_index}"),
        );
    }
}

#[test]
fn every_intermediate_state_of_an_external_transition_is_safe() {
    let maps = Shared::new(FakeMaps::default());
    let mut agent = Reconciler::new(Box::new(maps.clone())).expect("fake maps read");
    for (index, step) in steps().iter().enumerate() {
        let start = maps.lock().image.clone();
        let before = agent.mirror().clone();
        maps.lock().journal.clear();
        agent.sync_snapshot(step, &config());
        assert!(agent.not_programmed().is_empty());
        let journal = maps.lock().journal.clone();
        replay_checking(
            &start,
            &journal,
            &before,
            agent.mirror(),
            &format!("step {index}"),
        );
        assert_eq!(&programmed_from_image(&maps.lock().image).0, agent.mirror());
    }
    assert_eq!(
        maps.lock().image,
        MapImage::default(),
        "nothing is left behind"
    );
}

#[test]
fn a_failure_at_any_write_of_an_external_transition_is_undone_safely_and_the_retry_converges() {
    let steps = steps();
    for (index, pair) in steps.windows(2).enumerate() {
        let (from, to) = (&pair[0], &pair[1]);
        let clean = Shared::new(FakeMaps::default());
        let mut agent = Reconciler::new(Box::new(clean.clone())).expect("fake maps read");
        agent.sync_snapshot(from, &config());
        let start = clean.lock().clone();
        let start_mirror = agent.mirror().clone();
        clean.lock().journal.clear();
        agent.sync_snapshot(to, &config());
        let clean_image = clean.lock().image.clone();
        let clean_mirror = agent.mirror().clone();
        let journal = clean.lock().journal.clone();
        for (fail_at, write) in journal.iter().enumerate() {
            let context = format!("step {index}, failure at write {fail_at}");
            if matches!(write, MapWrite::Guard4(..) | MapWrite::Guard6(..)) {
                guard_write_fails_alone(from, to, &start, &clean_image, fail_at, &context);
                continue;
            }
            let faulty = Shared::new(FaultyWriter::new(start.clone(), [fail_at]));
            let mut agent = Reconciler::new(Box::new(faulty.clone())).expect("fake maps read");
            agent.sync_snapshot(from, &config());
            assert!(
                agent.not_programmed().is_empty(),
                "{context}: adopting writes nothing"
            );
            faulty.lock().inner.journal.clear();
            agent.sync_snapshot(to, &config());
            let journal = faulty.lock().inner.journal.clone();
            replay_checking(
                &start.image,
                &journal,
                &start_mirror,
                &clean_mirror,
                &context,
            );
            // The maps are as before, but for the status entry `inspect` reads and the
            // service-CIDR guard, which follows the desired state (the datapath consults it
            // only where no service entry matches, so it never overrides what stays).
            let mut undone = faulty.lock().inner.image.clone();
            undone.service_status.clear();
            undone.guard4.clear();
            undone.guard6.clear();
            let mut expected = start.image.clone();
            expected.guard4.clear();
            expected.guard6.clear();
            assert_eq!(
                undone, expected,
                "{context}: the Service's change is undone whole"
            );
            assert_eq!(
                &programmed_from_image(&faulty.lock().inner.image).0,
                agent.mirror()
            );
            // A Service that is gone cannot be "not programmed"; its leftovers are retried.
            let reported = usize::from(!to.services.is_empty());
            assert_eq!(
                agent.not_programmed().len(),
                reported,
                "{context}: reported"
            );
            assert!(agent.has_failures(), "{context}: a retry is due");
            agent.sync(&config());
            assert!(
                agent.not_programmed().is_empty(),
                "{context}: the retry works"
            );
            // Ids may differ (the undone attempt used some, and ids only move forward); the
            // dump numbers them in order of appearance.
            assert_eq!(
                dump::render(&programmed_from_image(&faulty.lock().inner.image).0),
                dump::render(&programmed_from_image(&clean_image).0),
                "{context}: the retry converges"
            );
            assert_eq!(
                faulty.lock().inner.image.guard4,
                clean_image.guard4,
                "{context}: the guard converges too"
            );
        }
    }
}

/// A failed write of the service-CIDR guard (the last writes of a sync) leaves every
/// Service programmed, is retried, and converges.
fn guard_write_fails_alone(
    from: &ClusterSnapshot,
    to: &ClusterSnapshot,
    start: &FakeMaps,
    clean_image: &MapImage,
    fail_at: usize,
    context: &str,
) {
    let faulty = Shared::new(FaultyWriter::new(start.clone(), [fail_at]));
    let mut agent = Reconciler::new(Box::new(faulty.clone())).expect("fake maps read");
    agent.sync_snapshot(from, &config());
    agent.sync_snapshot(to, &config());
    assert!(
        agent.not_programmed().is_empty(),
        "{context}: Services are fine"
    );
    let mut written = faulty.lock().inner.image.clone();
    written.guard4.clone_from(&clean_image.guard4);
    written.guard6.clone_from(&clean_image.guard6);
    assert_eq!(
        &written, clean_image,
        "{context}: every Service entry written"
    );
    assert!(agent.has_failures(), "{context}: the guard is retried");
    agent.sync(&config());
    assert_eq!(
        &faulty.lock().inner.image,
        clean_image,
        "{context}: the guard converges"
    );
}
