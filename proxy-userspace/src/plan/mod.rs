//! The plan: the ordered operations that turn what is programmed into what is desired.
//!
//! Make-before-break, so the datapath never sees a half-built service: new backends first,
//! then reverse-NAT entries and new source ranges, then each frontend's slots, then its master
//! entry (which publishes the new count and flags), then surplus slots, then removed frontends,
//! and last the orphans (source ranges no master needs any more among them). Re-planning after
//! the plan was applied yields nothing (idempotent).
//!
//! A frontend's rev-NAT id is its identity (VIP, port, protocol): the two entries of an
//! externalTrafficPolicy Local frontend (scopes Cluster and Local) share it, so replies,
//! session affinity and source ranges are the same whichever entry a flow went through.
use std::collections::{BTreeMap, BTreeSet};

pub mod mirror;
pub mod op;

use crate::model::{BackendAddr, Cidr, DesiredState, FrontendKey, Protocol, Scope};
use mirror::Programmed;
use op::{Master, Op, RevNatTarget};

/// What a rev-NAT id stands for: a frontend address whatever its scope.
type Identity = (std::net::IpAddr, u16, Protocol);

fn identity(key: &FrontendKey) -> Identity {
    (key.ip, key.port, key.protocol)
}

/// Hands out the lowest ids not used in the maps. Id 0 is never used (it means "none").
struct IdCursor<'a> {
    next: u32,
    used: &'a dyn Fn(u32) -> bool,
}

impl IdCursor<'_> {
    fn allocate(&mut self) -> u32 {
        while (self.used)(self.next) {
            self.next += 1;
        }
        let id = self.next;
        self.next += 1;
        id
    }
}

/// Computes the operations that make the maps hold `desired`.
pub fn plan(programmed: &Programmed, desired: &DesiredState) -> Vec<Op> {
    let mut ops = Vec::new();
    let backend_ids = assign_backend_ids(programmed, desired, &mut ops);
    let rev_nat_ids = assign_rev_nat_ids(programmed, desired, &mut ops);
    let source_ranges = add_source_ranges(programmed, desired, &rev_nat_ids, &mut ops);
    publish_frontends(programmed, desired, &backend_ids, &rev_nat_ids, &mut ops);
    remove_frontends(programmed, desired, &mut ops);
    remove_orphans(
        programmed,
        &backend_ids,
        &rev_nat_ids,
        &source_ranges,
        &mut ops,
    );
    ops
}

/// Backends: reuse programmed ids, allocate (and write) the rest.
fn assign_backend_ids(
    programmed: &Programmed,
    desired: &DesiredState,
    ops: &mut Vec<Op>,
) -> BTreeMap<BackendAddr, u32> {
    let mut backend_ids = BTreeMap::new();
    let used = |id| programmed.backends.contains_key(&id);
    let mut cursor = IdCursor {
        next: 1,
        used: &used,
    };
    for backend in desired.frontends.values().flat_map(|f| &f.backends) {
        if backend_ids.contains_key(backend) {
            continue;
        }
        let id = programmed.backend_id(backend).unwrap_or_else(|| {
            let id = cursor.allocate();
            ops.push(Op::UpsertBackend {
                id,
                backend: *backend,
            });
            id
        });
        backend_ids.insert(*backend, id);
    }
    backend_ids
}

/// Reverse NAT: a frontend keeps the id its master entry carries (the first scope's, in key
/// order, should its entries disagree); new ones get fresh ids. An id that still has source
/// ranges is not handed out again before they are gone.
fn assign_rev_nat_ids(
    programmed: &Programmed,
    desired: &DesiredState,
    ops: &mut Vec<Op>,
) -> BTreeMap<FrontendKey, u32> {
    let masters: BTreeSet<u32> = programmed
        .frontends
        .values()
        .filter_map(|f| f.master.map(|m| m.rev_nat_id))
        .collect();
    let ranged: BTreeSet<u32> = programmed.source_ranges.iter().map(|(id, _)| *id).collect();
    let used =
        |id| programmed.rev_nats.contains_key(&id) || masters.contains(&id) || ranged.contains(&id);
    let mut cursor = IdCursor {
        next: 1,
        used: &used,
    };
    let mut by_identity: BTreeMap<Identity, u32> = BTreeMap::new();
    for key in desired.frontends.keys() {
        if let Some(master) = programmed.frontends.get(key).and_then(|f| f.master) {
            by_identity
                .entry(identity(key))
                .or_insert(master.rev_nat_id);
        }
    }
    let mut rev_nat_ids = BTreeMap::new();
    let mut written = BTreeSet::new();
    for (key, frontend) in &desired.frontends {
        let id = *by_identity
            .entry(identity(key))
            .or_insert_with(|| cursor.allocate());
        rev_nat_ids.insert(*key, id);
        if !written.insert(id) {
            continue;
        }
        let target = RevNatTarget {
            ip: key.ip,
            port: key.port,
        };
        if programmed.rev_nats.get(&id) != Some(&target) {
            ops.push(Op::UpsertRevNat { id, target });
        }
        let name = frontend.service.to_string();
        if programmed.names.get(&id) != Some(&name) {
            ops.push(Op::UpsertName { id, name });
        }
    }
    rev_nat_ids
}

/// Source ranges the desired masters rely on, written before any master that sets
/// `SOURCE_RANGES` (so a frontend never drops a source it should admit). Returns every
/// (rev-NAT id, range) wanted.
fn add_source_ranges(
    programmed: &Programmed,
    desired: &DesiredState,
    rev_nat_ids: &BTreeMap<FrontendKey, u32>,
    ops: &mut Vec<Op>,
) -> BTreeSet<(u32, Cidr)> {
    let wanted: BTreeSet<(u32, Cidr)> = desired
        .frontends
        .iter()
        .flat_map(|(key, frontend)| {
            let id = rev_nat_ids[key];
            frontend.source_ranges.iter().map(move |range| (id, *range))
        })
        .collect();
    ops.extend(
        wanted
            .difference(&programmed.source_ranges)
            .map(|(rev_nat_id, range)| Op::UpsertSourceRange {
                rev_nat_id: *rev_nat_id,
                range: *range,
            }),
    );
    wanted
}

/// Slots first, then the master that publishes them, then (after every frontend) the slots
/// beyond the new counts. Node-local (scope Local) entries go before every cluster-scope one:
/// a cluster entry's `EXTERNAL_LOCAL` flag sends outside traffic to its Local twin, which must
/// exist by then.
fn publish_frontends(
    programmed: &Programmed,
    desired: &DesiredState,
    backend_ids: &BTreeMap<BackendAddr, u32>,
    rev_nat_ids: &BTreeMap<FrontendKey, u32>,
    ops: &mut Vec<Op>,
) {
    let mut surplus = Vec::new();
    let (local, cluster): (Vec<_>, Vec<_>) = desired
        .frontends
        .iter()
        .partition(|(key, _)| key.scope == Scope::Local);
    for (key, frontend) in local.into_iter().chain(cluster) {
        let rev_nat_id = rev_nat_ids[key];
        let current = programmed.frontends.get(key);
        for (index, backend) in frontend.backends.iter().enumerate() {
            let slot = u16::try_from(index + 1).expect("backend count checked by the model");
            let backend_id = backend_ids[backend];
            if current.and_then(|f| f.slots.get(&slot)) != Some(&backend_id) {
                ops.push(Op::UpsertSlot {
                    frontend: *key,
                    slot,
                    backend_id,
                    rev_nat_id,
                });
            }
        }
        let master = Master {
            count: u16::try_from(frontend.backends.len())
                .expect("backend count checked by the model"),
            rev_nat_id,
            flags: frontend.flags,
            affinity_timeout_secs: frontend.affinity_timeout_secs,
        };
        if current.and_then(|f| f.master) != Some(master) {
            ops.push(Op::UpsertMaster {
                frontend: *key,
                master,
            });
        }
        if let Some(current) = current {
            surplus.extend(
                current
                    .slots
                    .keys()
                    .filter(|slot| usize::from(**slot) > frontend.backends.len())
                    .map(|slot| Op::DeleteSlot {
                        frontend: *key,
                        slot: *slot,
                    }),
            );
        }
    }
    ops.extend(surplus);
}

/// Frontends that are no longer desired: master first, so nothing picks a slot any more.
fn remove_frontends(programmed: &Programmed, desired: &DesiredState, ops: &mut Vec<Op>) {
    for (key, current) in &programmed.frontends {
        if desired.frontends.contains_key(key) {
            continue;
        }
        if current.master.is_some() {
            ops.push(Op::DeleteMaster { frontend: *key });
        }
        ops.extend(current.slots.keys().map(|slot| Op::DeleteSlot {
            frontend: *key,
            slot: *slot,
        }));
    }
}

/// Source ranges, reverse-NAT entries and backends nothing refers to any more. Ranges go
/// before their rev-NAT entry, so an id is free again only once its ranges are gone.
fn remove_orphans(
    programmed: &Programmed,
    backend_ids: &BTreeMap<BackendAddr, u32>,
    rev_nat_ids: &BTreeMap<FrontendKey, u32>,
    source_ranges: &BTreeSet<(u32, Cidr)>,
    ops: &mut Vec<Op>,
) {
    ops.extend(
        programmed
            .source_ranges
            .difference(source_ranges)
            .map(|(rev_nat_id, range)| Op::DeleteSourceRange {
                rev_nat_id: *rev_nat_id,
                range: *range,
            }),
    );
    let wanted_rev_nat: BTreeSet<u32> = rev_nat_ids.values().copied().collect();
    for (id, target) in &programmed.rev_nats {
        if !wanted_rev_nat.contains(id) {
            ops.push(Op::DeleteRevNat {
                id: *id,
                target: *target,
            });
        }
    }
    for id in programmed.names.keys() {
        if !wanted_rev_nat.contains(id) {
            ops.push(Op::DeleteName { id: *id });
        }
    }
    let wanted_backends: BTreeSet<u32> = backend_ids.values().copied().collect();
    for (id, backend) in &programmed.backends {
        if !wanted_backends.contains(id) {
            ops.push(Op::DeleteBackend {
                id: *id,
                backend: *backend,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, ServicePortName};

    fn key(ip: &str, port: u16) -> FrontendKey {
        FrontendKey {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            scope: Scope::Cluster,
        }
    }

    fn backend(ip: &str) -> BackendAddr {
        BackendAddr {
            ip: ip.parse().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    fn desired(frontends: &[(FrontendKey, &[&str])]) -> DesiredState {
        DesiredState {
            frontends: frontends
                .iter()
                .map(|(key, backends)| {
                    let frontend = Frontend {
                        service: ServicePortName {
                            namespace: "default".into(),
                            name: "web".into(),
                            port_name: String::new(),
                        },
                        backends: backends.iter().map(|ip| backend(ip)).collect(),
                        flags: 1,
                        affinity_timeout_secs: 0,
                        source_ranges: std::collections::BTreeSet::new(),
                    };
                    (*key, frontend)
                })
                .collect(),
            health_checks: std::collections::BTreeMap::new(),
        }
    }

    fn applied(programmed: &Programmed, ops: &[Op]) -> Programmed {
        let mut next = programmed.clone();
        for op in ops {
            next.apply(op);
        }
        next
    }

    #[test]
    fn a_new_service_is_built_backends_first_and_published_by_its_master_last() {
        let want = desired(&[(key("10.96.0.1", 80), &["10.0.0.1", "10.0.0.2"])]);
        let ops = plan(&Programmed::default(), &want);
        let kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                Op::UpsertBackend { .. } => "backend",
                Op::UpsertRevNat { .. } => "rev_nat",
                Op::UpsertSlot { .. } => "slot",
                Op::UpsertMaster { .. } => "master",
                Op::UpsertName { .. } => "name",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "backend", "backend", "rev_nat", "name", "slot", "slot", "master"
            ]
        );
    }

    #[test]
    fn replanning_after_apply_is_a_no_op() {
        let want = desired(&[
            (key("10.96.0.1", 80), &["10.0.0.1", "10.0.0.2"]),
            (key("fd00::1", 80), &["fd00::5"]),
        ]);
        let after = applied(&Programmed::default(), &plan(&Programmed::default(), &want));
        assert!(plan(&after, &want).is_empty());
    }

    #[test]
    fn scaling_down_publishes_the_smaller_count_before_deleting_slots_and_backends() {
        let big = desired(&[(key("10.96.0.1", 80), &["10.0.0.1", "10.0.0.2", "10.0.0.3"])]);
        let programmed = applied(&Programmed::default(), &plan(&Programmed::default(), &big));
        let small = desired(&[(key("10.96.0.1", 80), &["10.0.0.1"])]);
        let ops = plan(&programmed, &small);
        let master = ops
            .iter()
            .position(|op| matches!(op, Op::UpsertMaster { master, .. } if master.count == 1));
        let first_delete = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteSlot { .. } | Op::DeleteBackend { .. }));
        assert!(master.unwrap() < first_delete.unwrap(), "{ops:#?}");
        assert_eq!(
            ops.iter()
                .filter(|op| matches!(op, Op::DeleteBackend { .. }))
                .count(),
            2
        );
        assert!(plan(&applied(&programmed, &ops), &small).is_empty());
    }

    #[test]
    fn a_removed_service_loses_its_master_before_its_slots() {
        let want = desired(&[(key("10.96.0.1", 80), &["10.0.0.1"])]);
        let programmed = applied(&Programmed::default(), &plan(&Programmed::default(), &want));
        let ops = plan(&programmed, &DesiredState::default());
        assert!(matches!(ops[0], Op::DeleteMaster { .. }), "{ops:#?}");
        let after = applied(&programmed, &ops);
        assert_eq!(after, Programmed::default());
    }

    #[test]
    fn backends_shared_by_two_services_get_one_id() {
        let want = desired(&[
            (key("10.96.0.1", 80), &["10.0.0.1"]),
            (key("10.96.0.2", 80), &["10.0.0.1"]),
        ]);
        let ops = plan(&Programmed::default(), &want);
        assert_eq!(
            ops.iter()
                .filter(|op| matches!(op, Op::UpsertBackend { .. }))
                .count(),
            1
        );
    }

    #[test]
    fn ids_fill_gaps_and_never_collide_with_programmed_ones() {
        let want = desired(&[(key("10.96.0.1", 80), &["10.0.0.1", "10.0.0.2", "10.0.0.3"])]);
        let programmed = applied(&Programmed::default(), &plan(&Programmed::default(), &want));
        // Drop the middle backend, then add two new ones: one reuses the freed id.
        let fewer = desired(&[(key("10.96.0.1", 80), &["10.0.0.1", "10.0.0.3"])]);
        let programmed = applied(&programmed, &plan(&programmed, &fewer));
        let more = desired(&[(
            key("10.96.0.1", 80),
            &["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
        )]);
        let ops = plan(&programmed, &more);
        let new_ids: Vec<u32> = ops
            .iter()
            .filter_map(|op| match op {
                Op::UpsertBackend { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(new_ids, [2, 4]);
    }

    #[test]
    fn a_service_with_no_backends_keeps_a_master_with_count_zero() {
        let want = desired(&[(key("10.96.0.1", 80), &[])]);
        let ops = plan(&Programmed::default(), &want);
        assert!(
            ops.iter()
                .any(|op| matches!(op, Op::UpsertMaster { master, .. } if master.count == 0))
        );
    }

    fn with(
        mut state: DesiredState,
        key: FrontendKey,
        flags: u16,
        ranges: &[&str],
    ) -> DesiredState {
        let frontend = state
            .frontends
            .get_mut(&key)
            .expect("frontend in the state");
        frontend.flags = flags;
        frontend.source_ranges = ranges
            .iter()
            .map(|text| crate::model::parse_cidr_lenient(text).unwrap())
            .collect();
        state
    }

    #[test]
    fn the_two_scopes_of_a_frontend_share_its_rev_nat_id() {
        let cluster = key("1.2.3.4", 80);
        let local = FrontendKey {
            scope: Scope::Local,
            ..cluster
        };
        let want = desired(&[(cluster, &["10.0.0.1", "10.0.0.2"]), (local, &["10.0.0.1"])]);
        let after = applied(&Programmed::default(), &plan(&Programmed::default(), &want));
        let ids: Vec<u32> = after
            .frontends
            .values()
            .map(|f| f.master.unwrap().rev_nat_id)
            .collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], ids[1]);
        assert_eq!(after.rev_nats.len(), 1);
        // The Local twin is published before the cluster entry that points outside traffic
        // to it.
        let masters: Vec<Scope> = plan(&Programmed::default(), &want)
            .iter()
            .filter_map(|op| match op {
                Op::UpsertMaster { frontend, .. } => Some(frontend.scope),
                _ => None,
            })
            .collect();
        assert_eq!(masters, [Scope::Local, Scope::Cluster]);
        // Switching the policy back to Cluster removes the twin and keeps the shared entry.
        let cluster_only = desired(&[(cluster, &["10.0.0.1", "10.0.0.2"])]);
        let ops = plan(&after, &cluster_only);
        assert!(
            !ops.iter().any(|op| matches!(op, Op::DeleteRevNat { .. })),
            "{ops:#?}"
        );
        assert!(plan(&applied(&after, &ops), &cluster_only).is_empty());
    }

    #[test]
    fn source_ranges_are_written_before_the_master_enforcing_them_and_removed_after_it_stops() {
        use proxy_common::service_flags::{LOAD_BALANCER, SOURCE_RANGES};
        let lb = key("1.2.3.4", 80);
        let guarded = with(
            desired(&[(lb, &["10.0.0.1"])]),
            lb,
            LOAD_BALANCER | SOURCE_RANGES,
            &["203.0.113.0/25", "198.51.100.0/24"],
        );
        let ops = plan(&Programmed::default(), &guarded);
        let master = ops
            .iter()
            .position(|op| matches!(op, Op::UpsertMaster { .. }))
            .unwrap();
        let ranges: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, op)| matches!(op, Op::UpsertSourceRange { .. }))
            .map(|(index, _)| index)
            .collect();
        assert_eq!(ranges.len(), 2);
        assert!(ranges.iter().all(|index| *index < master), "{ops:#?}");
        let programmed = applied(&Programmed::default(), &ops);
        assert!(plan(&programmed, &guarded).is_empty(), "idempotent");

        // Narrowing: the new range set is complete before the old range goes.
        let narrower = with(
            desired(&[(lb, &["10.0.0.1"])]),
            lb,
            LOAD_BALANCER | SOURCE_RANGES,
            &["203.0.113.0/25"],
        );
        let ops = plan(&programmed, &narrower);
        assert!(
            matches!(ops.as_slice(), [Op::DeleteSourceRange { .. }]),
            "{ops:#?}"
        );

        // Opening up: the master stops enforcing before any range is deleted.
        let open = with(desired(&[(lb, &["10.0.0.1"])]), lb, LOAD_BALANCER, &[]);
        let ops = plan(&programmed, &open);
        let master = ops
            .iter()
            .position(|op| matches!(op, Op::UpsertMaster { .. }))
            .unwrap();
        let first_delete = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteSourceRange { .. }))
            .unwrap();
        assert!(master < first_delete, "{ops:#?}");
        let after = applied(&programmed, &ops);
        assert!(after.source_ranges.is_empty());

        // Removing the frontend: ranges go before the rev-NAT id is freed.
        let ops = plan(&programmed, &DesiredState::default());
        let ranges_gone = ops
            .iter()
            .rposition(|op| matches!(op, Op::DeleteSourceRange { .. }))
            .unwrap();
        let rev_nat_gone = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteRevNat { .. }))
            .unwrap();
        assert!(ranges_gone < rev_nat_gone, "{ops:#?}");
        assert_eq!(applied(&programmed, &ops), Programmed::default());
    }

    #[test]
    fn a_rev_nat_id_with_leftover_source_ranges_is_not_handed_out_again() {
        let mut programmed = Programmed::default();
        programmed.apply(&Op::UpsertSourceRange {
            rev_nat_id: 1,
            range: crate::model::parse_cidr_lenient("10.0.0.0/8").unwrap(),
        });
        let want = desired(&[(key("10.96.0.1", 80), &[])]);
        let ops = plan(&programmed, &want);
        assert!(
            ops.iter()
                .any(|op| matches!(op, Op::UpsertRevNat { id: 2, .. })),
            "{ops:#?}"
        );
        assert!(
            ops.iter()
                .any(|op| matches!(op, Op::DeleteSourceRange { rev_nat_id: 1, .. })),
            "{ops:#?}"
        );
    }
}
