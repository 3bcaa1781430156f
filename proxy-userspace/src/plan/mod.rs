//! The plan: the ordered operations that turn what is programmed into what is desired, for a
//! set of frontend addresses (one Service's, in the incremental control plane; all of them in
//! a full recomputation).
//!
//! Make-before-break, so the datapath never sees a half-built service: new backends first,
//! then reverse-NAT entries and new source ranges, then each frontend's slots, then its master
//! entry (which publishes the new count and flags), then surplus slots, then removed frontends,
//! and last what nothing uses any more (source ranges before their rev-NAT entry, backends no
//! slot points at). Re-planning after the plan was applied yields nothing (idempotent).
//!
//! A frontend's rev-NAT id is its identity (VIP, port, protocol): the two entries of an
//! externalTrafficPolicy Local frontend (scopes Cluster and Local) share it, so replies,
//! session affinity and source ranges are the same whichever entry a flow went through.
pub mod maglev_tables;
pub mod mirror;
pub mod op;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use proxy_common::service_flags;

use crate::{
    maglev,
    model::{BackendAddr, Cidr, DesiredState, Frontend, FrontendKey, Scope, desired::Desired},
};
use mirror::Programmed;
use op::{Master, Op, RevNatTarget};

/// Where the plan asks what a frontend should look like.
pub trait DesiredFrontends {
    fn frontend(&self, key: &FrontendKey) -> Option<&Frontend>;

    /// The shape of the Maglev tables of frontends with flag `MAGLEV`.
    fn maglev_settings(&self) -> maglev::Settings {
        maglev::Settings::default()
    }
}

/// Desired frontends with the agent's Maglev settings.
pub struct WithMaglev<'a, D> {
    pub desired: &'a D,
    pub settings: maglev::Settings,
}

impl<D: DesiredFrontends> DesiredFrontends for WithMaglev<'_, D> {
    fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.desired.frontend(key)
    }

    fn maglev_settings(&self) -> maglev::Settings {
        self.settings
    }
}

impl DesiredFrontends for DesiredState {
    fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        self.frontends.get(key)
    }
}

impl DesiredFrontends for Desired {
    fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        Desired::frontend(self, key)
    }
}

/// The cluster-scope key of a frontend address (its identity, whatever the scope).
pub fn identity(key: &FrontendKey) -> FrontendKey {
    FrontendKey {
        scope: Scope::Cluster,
        ..*key
    }
}

/// Hands out ids after a cursor, skipping those in use; it only moves forward, so ids freed
/// a moment ago are not reused while the datapath may still remember them.
struct IdCursor {
    next: u32,
}

impl IdCursor {
    fn allocate(&mut self, in_use: impl Fn(u32) -> bool) -> u32 {
        let mut id = self.next.max(1);
        while in_use(id) {
            id = id.checked_add(1).unwrap_or(1);
        }
        self.next = id.checked_add(1).unwrap_or(1);
        id
    }
}

/// One frontend address of the plan: the desired entries of both scopes.
struct Address<'a> {
    identity: FrontendKey,
    cluster: Option<&'a Frontend>,
    local: Option<&'a Frontend>,
}

impl<'a> Address<'a> {
    fn wanted(&self) -> impl Iterator<Item = (FrontendKey, &'a Frontend)> {
        let local = FrontendKey {
            scope: Scope::Local,
            ..self.identity
        };
        self.cluster
            .map(|frontend| (self.identity, frontend))
            .into_iter()
            .chain(self.local.map(|frontend| (local, frontend)))
    }
}

/// Computes the operations that make the frontend addresses `keys` (any scope; both scopes
/// of each address are planned) hold what `desired` says.
pub fn plan_keys<'k>(
    programmed: &Programmed,
    keys: impl IntoIterator<Item = &'k FrontendKey>,
    desired: &impl DesiredFrontends,
) -> Vec<Op> {
    let identities: BTreeSet<FrontendKey> = keys.into_iter().map(identity).collect();
    let addresses: Vec<Address<'_>> = identities
        .iter()
        .map(|identity| Address {
            identity: *identity,
            cluster: desired.frontend(identity),
            local: desired.frontend(&FrontendKey {
                scope: Scope::Local,
                ..*identity
            }),
        })
        .collect();
    let mut ops = Vec::new();
    let backend_ids = assign_backend_ids(programmed, &addresses, &mut ops);
    let rev_nat_ids = assign_rev_nat_ids(programmed, &addresses, &mut ops);
    let source_ranges = add_source_ranges(programmed, &addresses, &rev_nat_ids, &mut ops);
    let tables = assign_maglev_tables(
        programmed,
        &addresses,
        &backend_ids,
        desired.maglev_settings(),
        &mut ops,
    );
    let ids = Ids {
        backends: &backend_ids,
        rev_nats: &rev_nat_ids,
        tables: &tables,
    };
    publish_frontends(programmed, &addresses, &ids, &mut ops);
    remove_frontends(programmed, &addresses, &mut ops);
    remove_unused_tables(programmed, &addresses, &tables, &mut ops);
    remove_unused(
        programmed,
        &addresses,
        &backend_ids,
        &rev_nat_ids,
        &source_ranges,
        &mut ops,
    );
    ops
}

/// Computes the operations that make the maps hold `desired` entirely (every address either
/// of them knows), then removes whatever nothing uses.
pub fn plan(programmed: &Programmed, desired: &DesiredState) -> Vec<Op> {
    let keys: BTreeSet<FrontendKey> = programmed
        .frontends
        .keys()
        .chain(desired.frontends.keys())
        .map(identity)
        .collect();
    let mut ops = plan_keys(programmed, &keys, desired);
    let mut after = programmed.clone();
    for op in &ops {
        after.apply(op);
    }
    ops.extend(sweep(&after));
    ops
}

/// Removes entries nothing uses any more: rev-NAT ids without a master (their source ranges,
/// reverse-NAT entry and name) and backends without a slot. These are left by interrupted
/// writes or found after a restart; a plan never creates them.
pub fn sweep(programmed: &Programmed) -> Vec<Op> {
    let mut ops = Vec::new();
    for id in programmed.orphan_rev_nats() {
        ops.extend(
            programmed
                .ranges_of(*id)
                .map(|range| Op::DeleteSourceRange {
                    rev_nat_id: *id,
                    range,
                }),
        );
        if let Some(target) = programmed.rev_nats.get(id) {
            ops.push(Op::DeleteRevNat {
                id: *id,
                target: *target,
            });
        }
        if programmed.names.contains_key(id) {
            ops.push(Op::DeleteName { id: *id });
        }
    }
    ops.extend(
        programmed
            .maglev
            .orphans()
            .iter()
            .map(|table| Op::DeleteMaglevTable { table: *table }),
    );
    for id in programmed.orphan_backends() {
        if let Some(backend) = programmed.backends.get(id) {
            ops.push(Op::DeleteBackend {
                id: *id,
                backend: *backend,
            });
        }
    }
    ops
}

/// Backends: reuse programmed ids, allocate (and write) the rest.
fn assign_backend_ids(
    programmed: &Programmed,
    addresses: &[Address<'_>],
    ops: &mut Vec<Op>,
) -> HashMap<BackendAddr, u32> {
    let mut backend_ids = HashMap::new();
    let mut cursor = IdCursor {
        next: programmed.backend_cursor(),
    };
    for (_, frontend) in addresses.iter().flat_map(Address::wanted) {
        for backend in &frontend.backends {
            if backend_ids.contains_key(backend) {
                continue;
            }
            let id = programmed.backend_id(backend).unwrap_or_else(|| {
                let id = cursor.allocate(|id| programmed.backend_in_use(id));
                ops.push(Op::UpsertBackend {
                    id,
                    backend: *backend,
                });
                id
            });
            backend_ids.insert(*backend, id);
        }
    }
    backend_ids
}

/// Maglev tables: each Maglev frontend's table is found by its content among the programmed
/// ones, or written under a fresh number before any master points at it (make-before-break).
/// Frontends with the same backends share a table; a table is computed once per backend set.
fn assign_maglev_tables(
    programmed: &Programmed,
    addresses: &[Address<'_>],
    backend_ids: &HashMap<BackendAddr, u32>,
    settings: maglev::Settings,
    ops: &mut Vec<Op>,
) -> HashMap<FrontendKey, u32> {
    let mut tables = HashMap::new();
    let mut by_set: HashMap<Vec<BackendAddr>, u32> = HashMap::new();
    let mut next = programmed.maglev.cursor();
    for (key, frontend) in addresses.iter().flat_map(Address::wanted) {
        if frontend.flags & service_flags::MAGLEV == 0 {
            continue;
        }
        let mut set = frontend.backends.clone();
        set.sort_unstable();
        set.dedup();
        if let Some(table) = by_set.get(&set) {
            tables.insert(key, *table);
            continue;
        }
        let Some(slots) = maglev::table(&set, settings) else {
            continue;
        };
        let content: Arc<[u32]> = slots.iter().map(|backend| backend_ids[backend]).collect();
        let table = programmed.maglev.with_content(&content).unwrap_or_else(|| {
            let table = next;
            next = next.checked_add(1).unwrap_or(1);
            while programmed.maglev.in_use(next) {
                next = next.checked_add(1).unwrap_or(1);
            }
            ops.push(Op::UpsertMaglevTable {
                table,
                backend_ids: content,
            });
            table
        });
        by_set.insert(set, table);
        tables.insert(key, table);
    }
    tables
}

/// Tables no master will point at once the plan's masters are written (after them).
fn remove_unused_tables(
    programmed: &Programmed,
    addresses: &[Address<'_>],
    tables: &HashMap<FrontendKey, u32>,
    ops: &mut Vec<Op>,
) {
    let mut delta: BTreeMap<u32, i64> = BTreeMap::new();
    for address in addresses {
        for scope in Scope::ALL {
            let key = FrontendKey {
                scope,
                ..address.identity
            };
            let old = programmed
                .frontends
                .get(&key)
                .and_then(|frontend| frontend.master)
                .map_or(0, |master| master.maglev_table);
            if old != 0 {
                *delta.entry(old).or_default() -= 1;
            }
        }
    }
    for table in tables.values() {
        *delta.entry(*table).or_default() += 1;
    }
    ops.extend(
        delta
            .into_iter()
            .filter(|(table, change)| {
                i64::from(programmed.maglev.refs(*table)) + change <= 0
                    && programmed.maglev.tables.contains_key(table)
            })
            .map(|(table, _)| Op::DeleteMaglevTable { table }),
    );
}

/// The ids a plan gave its backends, addresses and Maglev frontends.
struct Ids<'a> {
    backends: &'a HashMap<BackendAddr, u32>,
    rev_nats: &'a BTreeMap<FrontendKey, u32>,
    tables: &'a HashMap<FrontendKey, u32>,
}

/// Reverse NAT: an address keeps the id its master entries carry (the cluster scope's,
/// should they disagree); new addresses get fresh ids. The name records which Service port
/// the id stands for.
fn assign_rev_nat_ids(
    programmed: &Programmed,
    addresses: &[Address<'_>],
    ops: &mut Vec<Op>,
) -> BTreeMap<FrontendKey, u32> {
    let mut cursor = IdCursor {
        next: programmed.rev_nat_cursor(),
    };
    let mut rev_nat_ids = BTreeMap::new();
    for address in addresses {
        let Some(frontend) = address.cluster.or(address.local) else {
            continue;
        };
        let identity = address.identity;
        let id = programmed
            .rev_nat_of(&identity)
            .unwrap_or_else(|| cursor.allocate(|id| programmed.rev_nat_in_use(id)));
        rev_nat_ids.insert(identity, id);
        let target = RevNatTarget {
            ip: identity.ip,
            port: identity.port,
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
    addresses: &[Address<'_>],
    rev_nat_ids: &BTreeMap<FrontendKey, u32>,
    ops: &mut Vec<Op>,
) -> BTreeSet<(u32, Cidr)> {
    let wanted: BTreeSet<(u32, Cidr)> = addresses
        .iter()
        .flat_map(|address| {
            address.wanted().flat_map(|(key, frontend)| {
                let id = rev_nat_ids[&identity(&key)];
                frontend.source_ranges.iter().map(move |range| (id, *range))
            })
        })
        .collect();
    ops.extend(
        wanted
            .iter()
            .filter(|entry| !programmed.source_ranges.contains(entry))
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
    addresses: &[Address<'_>],
    ids: &Ids<'_>,
    ops: &mut Vec<Op>,
) {
    let (backend_ids, rev_nat_ids) = (ids.backends, ids.rev_nats);
    let mut surplus = Vec::new();
    let mut wanted: Vec<(FrontendKey, &Frontend)> =
        addresses.iter().flat_map(Address::wanted).collect();
    wanted.sort_by_key(|(key, _)| (key.scope != Scope::Local, *key));
    for (key, frontend) in wanted {
        let rev_nat_id = rev_nat_ids[&identity(&key)];
        let current = programmed.frontends.get(&key);
        // Slots that carry another rev-NAT id (left by an interrupted write) are rewritten.
        let stale_id =
            current.is_some_and(|f| !f.slots.is_empty() && f.slot_rev_nat_id != rev_nat_id);
        for (index, backend) in frontend.backends.iter().enumerate() {
            let slot = u16::try_from(index + 1).expect("backend count checked by the model");
            let backend_id = backend_ids[backend];
            if stale_id || current.and_then(|f| f.slots.get(&slot)) != Some(&backend_id) {
                ops.push(Op::UpsertSlot {
                    frontend: key,
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
            maglev_table: ids.tables.get(&key).copied().unwrap_or(0),
        };
        if current.and_then(|f| f.master) != Some(master) {
            ops.push(Op::UpsertMaster {
                frontend: key,
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
                        frontend: key,
                        slot: *slot,
                    }),
            );
        }
    }
    ops.extend(surplus);
}

/// Frontends that are no longer desired: master first, so nothing picks a slot any more.
fn remove_frontends(programmed: &Programmed, addresses: &[Address<'_>], ops: &mut Vec<Op>) {
    for address in addresses {
        let desired = [address.cluster.is_some(), address.local.is_some()];
        for (scope, wanted) in Scope::ALL.into_iter().zip(desired) {
            let key = FrontendKey {
                scope,
                ..address.identity
            };
            let Some(current) = programmed.frontends.get(&key).filter(|_| !wanted) else {
                continue;
            };
            if current.master.is_some() {
                ops.push(Op::DeleteMaster { frontend: key });
            }
            ops.extend(current.slots.keys().map(|slot| Op::DeleteSlot {
                frontend: key,
                slot: *slot,
            }));
        }
    }
}

/// What the planned addresses no longer use: source ranges of their rev-NAT ids that no
/// desired frontend lists, the rev-NAT entries (and names) of addresses no longer desired
/// (ranges first, so an id is free again only once its ranges are gone), and backends no slot
/// will point at once the plan is applied.
fn remove_unused(
    programmed: &Programmed,
    addresses: &[Address<'_>],
    backend_ids: &HashMap<BackendAddr, u32>,
    rev_nat_ids: &BTreeMap<FrontendKey, u32>,
    source_ranges: &BTreeSet<(u32, Cidr)>,
    ops: &mut Vec<Op>,
) {
    let mut retired = Vec::new();
    for address in addresses {
        let Some(id) = programmed.rev_nat_of(&address.identity) else {
            continue;
        };
        let kept = rev_nat_ids.get(&address.identity) == Some(&id);
        ops.extend(
            programmed
                .ranges_of(id)
                .filter(|range| !source_ranges.contains(&(id, *range)))
                .map(|range| Op::DeleteSourceRange {
                    rev_nat_id: id,
                    range,
                }),
        );
        if !kept && programmed.master_refs(id) <= planned_masters(programmed, address) {
            retired.push(id);
        }
    }
    for id in retired {
        if let Some(target) = programmed.rev_nats.get(&id) {
            ops.push(Op::DeleteRevNat {
                id,
                target: *target,
            });
        }
        if programmed.names.contains_key(&id) {
            ops.push(Op::DeleteName { id });
        }
    }
    // Slot references each backend loses and gains through this plan.
    let mut delta: HashMap<u32, i64> = HashMap::new();
    for address in addresses {
        for scope in Scope::ALL {
            let key = FrontendKey {
                scope,
                ..address.identity
            };
            if let Some(current) = programmed.frontends.get(&key) {
                for id in current.slots.values() {
                    *delta.entry(*id).or_default() -= 1;
                }
            }
        }
        for (_, frontend) in address.wanted() {
            for backend in &frontend.backends {
                *delta.entry(backend_ids[backend]).or_default() += 1;
            }
        }
    }
    let mut unused: Vec<u32> = delta
        .into_iter()
        .filter(|(id, change)| i64::from(programmed.backend_refs(*id)) + change <= 0)
        .map(|(id, _)| id)
        .collect();
    unused.sort_unstable();
    for id in unused {
        if let Some(backend) = programmed.backends.get(&id) {
            ops.push(Op::DeleteBackend {
                id,
                backend: *backend,
            });
        }
    }
}

/// How many of the masters carrying this address's rev-NAT id belong to the address itself
/// (its two scopes): if that is all of them, the id is free once the address is gone.
fn planned_masters(programmed: &Programmed, address: &Address<'_>) -> u32 {
    let ours = Scope::ALL
        .into_iter()
        .filter(|scope| {
            programmed
                .frontends
                .get(&FrontendKey {
                    scope: *scope,
                    ..address.identity
                })
                .is_some_and(|frontend| frontend.master.is_some())
        })
        .count();
    u32::try_from(ours).expect("two scopes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, Protocol, ServicePortName};

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
                            port_name: "".into(),
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

    /// `desired` with every frontend a Maglev NodePort.
    fn maglev(mut want: DesiredState) -> DesiredState {
        for frontend in want.frontends.values_mut() {
            frontend.flags = service_flags::NODE_PORT | service_flags::MAGLEV;
        }
        want
    }

    fn table_of(programmed: &Programmed, key: &FrontendKey) -> u32 {
        programmed.frontends[key].master.unwrap().maglev_table
    }

    #[test]
    fn a_maglev_table_is_complete_before_its_master_points_at_it() {
        let want = maglev(desired(&[(
            key("192.168.0.2", 30080),
            &["10.0.0.1", "10.0.0.2"],
        )]));
        let ops = plan(&Programmed::default(), &want);
        let table = ops
            .iter()
            .position(|op| matches!(op, Op::UpsertMaglevTable { .. }))
            .expect("a table is written");
        let master = ops
            .iter()
            .position(|op| matches!(op, Op::UpsertMaster { .. }))
            .unwrap();
        let last_backend = ops
            .iter()
            .rposition(|op| matches!(op, Op::UpsertBackend { .. }))
            .unwrap();
        assert!(last_backend < table && table < master, "{ops:#?}");
        let Op::UpsertMaglevTable { table, backend_ids } = &ops[table] else {
            unreachable!()
        };
        assert_eq!(
            backend_ids.len(),
            maglev::Settings::default().table_size as usize
        );
        let after = applied(&Programmed::default(), &ops);
        assert_eq!(table_of(&after, &key("192.168.0.2", 30080)), *table);
        let mut used: Vec<u32> = backend_ids.to_vec();
        used.sort_unstable();
        used.dedup();
        let mut ids: Vec<u32> = after.backends.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(used, ids, "every backend has slots, nothing else has");
        assert!(plan(&after, &want).is_empty(), "idempotent");
    }

    #[test]
    fn frontends_with_the_same_backends_share_a_table_and_random_ones_have_none() {
        let mut want = maglev(desired(&[
            (key("192.168.0.2", 30080), &["10.0.0.1", "10.0.0.2"]),
            (key("192.168.0.3", 30080), &["10.0.0.2", "10.0.0.1"]),
            (key("192.168.0.4", 30080), &["10.0.0.3"]),
        ]));
        want.frontends
            .get_mut(&key("192.168.0.4", 30080))
            .unwrap()
            .flags = service_flags::NODE_PORT;
        let after = applied(&Programmed::default(), &plan(&Programmed::default(), &want));
        assert_eq!(after.maglev.tables.len(), 1);
        assert_eq!(
            table_of(&after, &key("192.168.0.2", 30080)),
            table_of(&after, &key("192.168.0.3", 30080))
        );
        assert_eq!(table_of(&after, &key("192.168.0.4", 30080)), 0);
    }

    #[test]
    fn a_changed_backend_set_gets_a_new_table_and_the_old_one_is_freed_after_the_switch() {
        let frontend = key("192.168.0.2", 30080);
        let before = maglev(desired(&[(
            frontend,
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        )]));
        let programmed = applied(
            &Programmed::default(),
            &plan(&Programmed::default(), &before),
        );
        let old = table_of(&programmed, &frontend);
        let after_want = maglev(desired(&[(frontend, &["10.0.0.1", "10.0.0.3"])]));
        let ops = plan(&programmed, &after_want);
        let position = |wanted: fn(&Op) -> bool| ops.iter().position(wanted).unwrap();
        let new_table = position(|op| matches!(op, Op::UpsertMaglevTable { .. }));
        let master = position(|op| matches!(op, Op::UpsertMaster { .. }));
        let freed = position(|op| matches!(op, Op::DeleteMaglevTable { .. }));
        let backend_gone = position(|op| matches!(op, Op::DeleteBackend { .. }));
        assert!(
            new_table < master && master < freed && freed < backend_gone,
            "{ops:#?}"
        );
        assert!(matches!(ops[freed], Op::DeleteMaglevTable { table } if table == old));
        let after = applied(&programmed, &ops);
        let new = table_of(&after, &frontend);
        assert_ne!(
            new, old,
            "a new number, never the one the datapath may be reading"
        );
        assert_eq!(
            after.maglev.tables.keys().copied().collect::<Vec<_>>(),
            [new]
        );
        // Only the removed backend's slots moved.
        let (before_ids, after_ids) = (&programmed.maglev.tables[&old], &after.maglev.tables[&new]);
        let removed = programmed.backend_id(&backend("10.0.0.2")).unwrap();
        let moved = before_ids
            .iter()
            .zip(after_ids.iter())
            .filter(|(a, b)| a != b)
            .count();
        let owned = before_ids.iter().filter(|id| **id == removed).count();
        assert!(
            moved >= owned && moved <= owned + before_ids.len() / 100,
            "{moved} {owned}"
        );
        // Back to random: the table goes with the flag.
        let random = desired(&[(frontend, &["10.0.0.1", "10.0.0.3"])]);
        let back = applied(&after, &plan(&after, &random));
        assert!(back.maglev.tables.is_empty());
        assert_eq!(table_of(&back, &frontend), 0);
    }

    #[test]
    fn undoing_a_maglev_plan_restores_the_mirror() {
        let frontend = key("192.168.0.2", 30080);
        let before = maglev(desired(&[(frontend, &["10.0.0.1", "10.0.0.2"])]));
        let programmed = applied(
            &Programmed::default(),
            &plan(&Programmed::default(), &before),
        );
        let after_want = maglev(desired(&[(frontend, &["10.0.0.1", "10.0.0.5"])]));
        let mut mirror = programmed.clone();
        let mut undo = Vec::new();
        for op in plan(&programmed, &after_want) {
            undo.extend(mirror.inverse(&op));
            mirror.apply(&op);
        }
        for op in undo.iter().rev() {
            mirror.apply(op);
        }
        assert_eq!(mirror, programmed);
        assert_eq!(mirror.maglev, programmed.maglev);
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
    fn ids_move_forward_and_never_collide_with_programmed_ones() {
        let want = desired(&[(key("10.96.0.1", 80), &["10.0.0.1", "10.0.0.2", "10.0.0.3"])]);
        let programmed = applied(&Programmed::default(), &plan(&Programmed::default(), &want));
        // Drop the middle backend, then add two new ones: the freed id is not reused at once
        // (a conntrack or affinity entry may still name it).
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
        assert_eq!(new_ids, [4, 5]);
    }

    #[test]
    fn planning_one_address_leaves_the_others_alone_and_keeps_shared_backends() {
        let a = key("10.96.0.1", 80);
        let b = key("10.96.0.2", 80);
        let both = desired(&[(a, &["10.0.0.1", "10.0.0.2"]), (b, &["10.0.0.1"])]);
        let programmed = applied(&Programmed::default(), &plan(&Programmed::default(), &both));
        // `a` goes away; only its own entries may be touched, and 10.0.0.1 stays (b uses it).
        let only_b = desired(&[(b, &["10.0.0.1"])]);
        let ops = plan_keys(&programmed, [&a], &only_b);
        for op in &ops {
            match op {
                Op::DeleteMaster { frontend } | Op::DeleteSlot { frontend, .. } => {
                    assert_eq!(*frontend, a, "{ops:#?}");
                }
                Op::DeleteBackend { backend, .. } => {
                    assert_eq!(backend.ip.to_string(), "10.0.0.2", "{ops:#?}");
                }
                Op::DeleteRevNat { .. } | Op::DeleteName { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let after = applied(&programmed, &ops);
        assert!(
            plan(&after, &only_b).is_empty(),
            "the incremental plan is complete"
        );
        assert!(after.orphan_backends().is_empty() && after.orphan_rev_nats().is_empty());
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
