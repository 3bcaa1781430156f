//! The agent's mirror of the maps: what is programmed, as the kernel accepted it. It changes
//! only through [`Programmed::apply`], after a write succeeded, and keeps the indexes the plan
//! needs to stay proportional to a change: backend ids by address, how many slots use each
//! backend and how many masters use each rev-NAT id (so orphans are known without a scan),
//! entry counts per map, and the id cursors.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::maglev_tables::MaglevTables;
use super::op::{Master, Op, RevNatTarget};
use crate::model::{BackendAddr, Cidr, FrontendKey, Protocol};

/// A frontend as programmed. `master` is `None` only after an interrupted write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub master: Option<Master>,
    /// Slot number (1-based) → backend id.
    pub slots: Slots,
    /// The rev-NAT id the slots carry (the datapath reads the master's; the slots repeat it).
    pub slot_rev_nat_id: u32,
}

/// A frontend's slots: slot number → backend id, in slot order. A sorted vector, because a
/// frontend has a handful of slots and 100 000 frontends hold one tree node each otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots(Vec<(u16, u32)>);

impl Slots {
    pub fn get(&self, slot: &u16) -> Option<&u32> {
        let at = self.0.binary_search_by_key(slot, |(s, _)| *s).ok()?;
        Some(&self.0[at].1)
    }

    pub fn contains_key(&self, slot: &u16) -> bool {
        self.get(slot).is_some()
    }

    /// Sets a slot; returns the backend id it held.
    pub fn insert(&mut self, slot: u16, backend_id: u32) -> Option<u32> {
        match self.0.binary_search_by_key(&slot, |(s, _)| *s) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, backend_id)),
            Err(at) => {
                self.0.insert(at, (slot, backend_id));
                None
            }
        }
    }

    /// Clears a slot; returns the backend id it held.
    pub fn remove(&mut self, slot: &u16) -> Option<u32> {
        let at = self.0.binary_search_by_key(slot, |(s, _)| *s).ok()?;
        Some(self.0.remove(at).1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (slot, backend id) in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&u16, &u32)> {
        self.0.iter().map(|(slot, id)| (slot, id))
    }

    pub fn keys(&self) -> impl Iterator<Item = &u16> {
        self.0.iter().map(|(slot, _)| slot)
    }

    pub fn values(&self) -> impl Iterator<Item = &u32> {
        self.0.iter().map(|(_, id)| id)
    }
}

impl<'a> IntoIterator for &'a Slots {
    type Item = (&'a u16, &'a u32);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (u16, u32)>, fn(&'a (u16, u32)) -> (&'a u16, &'a u32)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(slot, id)| (slot, id))
    }
}

impl FromIterator<(u16, u32)> for Slots {
    fn from_iter<I: IntoIterator<Item = (u16, u32)>>(pairs: I) -> Self {
        let mut slots = Self::default();
        for (slot, id) in pairs {
            slots.insert(slot, id);
        }
        slots
    }
}

/// Entries the agent holds in each of its maps, per family where the maps are per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    /// Pairs in the affinity match map (counted by the follow-up work, not the mirror).
    pub affinity_matches: u64,
    pub services: [u64; 2],
    pub backends: [u64; 2],
    pub rev_nats: [u64; 2],
    pub names: u64,
    pub source_ranges: [u64; 2],
}

fn family(ip: IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

/// The agent's mirror of the maps.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    pub frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    pub backends: BTreeMap<u32, BackendAddr>,
    pub rev_nats: BTreeMap<u32, RevNatTarget>,
    /// Rev-NAT id → `namespace/name:port` of the Service port it stands for.
    pub names: BTreeMap<u32, String>,
    /// (rev-NAT id, range): the loadBalancerSourceRanges of the frontends with that id.
    pub source_ranges: BTreeSet<(u32, Cidr)>,
    /// The Maglev tables and the masters pointing at them.
    pub maglev: MaglevTables,
    backend_ids: HashMap<BackendAddr, u32>,
    /// Slots pointing at each backend id.
    backend_refs: HashMap<u32, u32>,
    /// Masters carrying each rev-NAT id.
    master_refs: HashMap<u32, u32>,
    /// Backends no slot points at.
    orphan_backends: BTreeSet<u32>,
    /// Rev-NAT ids with entries (reverse NAT, name or source ranges) but no master.
    orphan_rev_nats: BTreeSet<u32>,
    fill: Fill,
    next_backend_id: u32,
    next_rev_nat_id: u32,
    /// Frontends whose entries changed since [`Programmed::take_touched`] (for the follow-up
    /// work that depends on a frontend's programmed backends).
    touched: std::collections::HashSet<FrontendKey>,
}

/// Two mirrors are equal when they describe the same maps (indexes and cursors are derived).
impl PartialEq for Programmed {
    fn eq(&self, other: &Self) -> bool {
        self.frontends == other.frontends
            && self.backends == other.backends
            && self.rev_nats == other.rev_nats
            && self.names == other.names
            && self.source_ranges == other.source_ranges
            && self.maglev == other.maglev
    }
}

impl Eq for Programmed {}

/// Ids are handed out from a cursor that only moves forward (wrapping past `u32::MAX`), so a
/// freed id is not given to another backend or frontend while the datapath may still hold it
/// in a conntrack or affinity entry. Id 0 means "none" and is never used.
fn next_free(cursor: u32, used: impl Fn(u32) -> bool) -> u32 {
    let mut id = cursor.max(1);
    while used(id) {
        id = id.checked_add(1).unwrap_or(1);
    }
    id
}

fn bump(counter: &mut HashMap<u32, u32>, id: u32, up: bool) -> u32 {
    let count = counter.entry(id).or_default();
    if up {
        *count += 1;
    } else {
        *count = count.saturating_sub(1);
    }
    let now = *count;
    if now == 0 {
        counter.remove(&id);
    }
    now
}

impl Programmed {
    /// The id of the backend with this address, if programmed.
    pub fn backend_id(&self, backend: &BackendAddr) -> Option<u32> {
        self.backend_ids.get(backend).copied()
    }

    /// How many slots point at a backend.
    pub fn backend_refs(&self, id: u32) -> u32 {
        self.backend_refs.get(&id).copied().unwrap_or(0)
    }

    /// How many masters carry a rev-NAT id.
    pub fn master_refs(&self, id: u32) -> u32 {
        self.master_refs.get(&id).copied().unwrap_or(0)
    }

    /// Backends no slot points at any more.
    pub fn orphan_backends(&self) -> &BTreeSet<u32> {
        &self.orphan_backends
    }

    /// Rev-NAT ids whose entries no master uses any more.
    pub fn orphan_rev_nats(&self) -> &BTreeSet<u32> {
        &self.orphan_rev_nats
    }

    /// Entry counts per map.
    pub fn fill(&self) -> Fill {
        self.fill
    }

    /// The source ranges recorded for a rev-NAT id.
    pub fn ranges_of(&self, rev_nat_id: u32) -> impl Iterator<Item = Cidr> + '_ {
        self.source_ranges
            .range((rev_nat_id, Cidr::FIRST)..)
            .take_while(move |(id, _)| *id == rev_nat_id)
            .map(|(_, range)| *range)
    }

    /// The first backend id a plan may allocate (unused, at or after the cursor).
    pub fn backend_cursor(&self) -> u32 {
        next_free(self.next_backend_id, |id| self.backends.contains_key(&id))
    }

    /// The first rev-NAT id a plan may allocate.
    pub fn rev_nat_cursor(&self) -> u32 {
        next_free(self.next_rev_nat_id, |id| self.rev_nat_in_use(id))
    }

    /// Whether anything in the maps refers to a rev-NAT id.
    pub fn rev_nat_in_use(&self, id: u32) -> bool {
        self.rev_nats.contains_key(&id)
            || self.master_refs.contains_key(&id)
            || self.names.contains_key(&id)
            || self.ranges_of(id).next().is_some()
    }

    /// Whether a backend id is taken.
    pub fn backend_in_use(&self, id: u32) -> bool {
        self.backends.contains_key(&id)
    }

    /// The rev-NAT id programmed for a frontend address (whichever scope has a master; the
    /// cluster scope's first should they disagree).
    pub fn rev_nat_of(&self, key: &FrontendKey) -> Option<u32> {
        crate::model::Scope::ALL.iter().find_map(|scope| {
            let twin = FrontendKey {
                scope: *scope,
                ..*key
            };
            self.frontends
                .get(&twin)
                .and_then(|frontend| frontend.master)
                .map(|master| master.rev_nat_id)
        })
    }

    /// Every (frontend, backend) pair of the UDP frontends among `keys`: the backends a
    /// connected UDP socket of that frontend may be aimed at.
    pub fn udp_pairs<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a FrontendKey>,
    ) -> BTreeSet<UdpPair> {
        let mut pairs = BTreeSet::new();
        for key in keys {
            let Some(frontend) = self.frontends.get(key) else {
                continue;
            };
            let Some(master) = frontend.master.filter(|_| key.protocol == Protocol::Udp) else {
                continue;
            };
            for (_, id) in frontend
                .slots
                .iter()
                .filter(|(slot, _)| **slot <= master.count)
            {
                if let Some(backend) = self.backends.get(id) {
                    pairs.insert((
                        master.rev_nat_id,
                        std::net::SocketAddr::new(backend.ip, backend.port),
                    ));
                }
            }
        }
        pairs
    }

    /// Every (frontend, backend) pair the UDP frontends serve now: a connected UDP socket or
    /// a tracked UDP flow aimed at any other pair is stale.
    pub fn served_udp(&self) -> std::collections::HashSet<UdpPair> {
        self.udp_pairs(
            self.frontends
                .keys()
                .filter(|key| key.protocol == Protocol::Udp),
        )
        .into_iter()
        .collect()
    }

    /// The operation that undoes `op` on this mirror (computed before `op` is applied).
    pub fn inverse(&self, op: &Op) -> Option<Op> {
        Some(match op {
            Op::UpsertBackend { id, backend } => match self.backends.get(id) {
                Some(old) if old == backend => return None,
                Some(old) => Op::UpsertBackend {
                    id: *id,
                    backend: *old,
                },
                None => Op::DeleteBackend {
                    id: *id,
                    backend: *backend,
                },
            },
            Op::DeleteBackend { id, .. } => Op::UpsertBackend {
                id: *id,
                backend: *self.backends.get(id)?,
            },
            Op::UpsertRevNat { id, target } => match self.rev_nats.get(id) {
                Some(old) if old == target => return None,
                Some(old) => Op::UpsertRevNat {
                    id: *id,
                    target: *old,
                },
                None => Op::DeleteRevNat {
                    id: *id,
                    target: *target,
                },
            },
            Op::DeleteRevNat { id, .. } => Op::UpsertRevNat {
                id: *id,
                target: *self.rev_nats.get(id)?,
            },
            Op::UpsertName { id, .. } => match self.names.get(id) {
                Some(old) => Op::UpsertName {
                    id: *id,
                    name: old.clone(),
                },
                None => Op::DeleteName { id: *id },
            },
            Op::DeleteName { id } => Op::UpsertName {
                id: *id,
                name: self.names.get(id)?.clone(),
            },
            Op::UpsertSourceRange { rev_nat_id, range } => {
                if self.source_ranges.contains(&(*rev_nat_id, *range)) {
                    return None;
                }
                Op::DeleteSourceRange {
                    rev_nat_id: *rev_nat_id,
                    range: *range,
                }
            }
            Op::DeleteSourceRange { rev_nat_id, range } => {
                if !self.source_ranges.contains(&(*rev_nat_id, *range)) {
                    return None;
                }
                Op::UpsertSourceRange {
                    rev_nat_id: *rev_nat_id,
                    range: *range,
                }
            }
            Op::UpsertMaglevTable { table, .. } | Op::DeleteMaglevTable { table } => {
                match self.maglev.tables.get(table) {
                    Some(content) => Op::UpsertMaglevTable {
                        table: *table,
                        backend_ids: content.clone(),
                    },
                    None => Op::DeleteMaglevTable { table: *table },
                }
            }
            Op::UpsertSlot { frontend, slot, .. } | Op::DeleteSlot { frontend, slot } => {
                let current = self.frontends.get(frontend);
                match current.and_then(|f| f.slots.get(slot)) {
                    Some(backend_id) => Op::UpsertSlot {
                        frontend: *frontend,
                        slot: *slot,
                        backend_id: *backend_id,
                        rev_nat_id: current.map_or(0, |f| f.slot_rev_nat_id),
                    },
                    None => Op::DeleteSlot {
                        frontend: *frontend,
                        slot: *slot,
                    },
                }
            }
            Op::UpsertMaster { frontend, .. } | Op::DeleteMaster { frontend } => {
                match self.frontends.get(frontend).and_then(|f| f.master) {
                    Some(master) => Op::UpsertMaster {
                        frontend: *frontend,
                        master,
                    },
                    None => Op::DeleteMaster {
                        frontend: *frontend,
                    },
                }
            }
        })
    }

    /// Records an operation the kernel accepted.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::UpsertSlot { .. }
            | Op::DeleteSlot { .. }
            | Op::UpsertMaster { .. }
            | Op::DeleteMaster { .. } => self.apply_service_entry(op),
            _ => self.apply_shared_entry(op),
        }
    }

    /// Backends, reverse NAT, names and source ranges.
    fn apply_shared_entry(&mut self, op: &Op) {
        match op {
            Op::UpsertBackend { id, backend } => {
                if let Some(old) = self.backends.insert(*id, *backend) {
                    if self.backend_ids.get(&old) == Some(id) {
                        self.backend_ids.remove(&old);
                    }
                } else {
                    self.fill.backends[family(backend.ip)] += 1;
                }
                self.backend_ids.insert(*backend, *id);
                self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1));
                self.recheck_backend(*id);
            }
            Op::DeleteBackend { id, .. } => {
                if let Some(old) = self.backends.remove(id) {
                    self.fill.backends[family(old.ip)] -= 1;
                    if self.backend_ids.get(&old) == Some(id) {
                        self.backend_ids.remove(&old);
                    }
                }
                self.recheck_backend(*id);
            }
            Op::UpsertRevNat { id, target } => {
                if self.rev_nats.insert(*id, *target).is_none() {
                    self.fill.rev_nats[family(target.ip)] += 1;
                }
                self.next_rev_nat_id = self.next_rev_nat_id.max(id.wrapping_add(1));
                self.recheck_rev_nat(*id);
            }
            Op::DeleteRevNat { id, .. } => {
                if let Some(old) = self.rev_nats.remove(id) {
                    self.fill.rev_nats[family(old.ip)] -= 1;
                }
                self.recheck_rev_nat(*id);
            }
            Op::UpsertName { id, name } => {
                if self.names.insert(*id, name.clone()).is_none() {
                    self.fill.names += 1;
                }
                self.recheck_rev_nat(*id);
            }
            Op::DeleteName { id } => {
                if self.names.remove(id).is_some() {
                    self.fill.names -= 1;
                }
                self.recheck_rev_nat(*id);
            }
            Op::UpsertSourceRange { rev_nat_id, range } => {
                if self.source_ranges.insert((*rev_nat_id, *range)) {
                    self.fill.source_ranges[family(range.ip())] += 1;
                }
                self.recheck_rev_nat(*rev_nat_id);
            }
            Op::DeleteSourceRange { rev_nat_id, range } => {
                if self.source_ranges.remove(&(*rev_nat_id, *range)) {
                    self.fill.source_ranges[family(range.ip())] -= 1;
                }
                self.recheck_rev_nat(*rev_nat_id);
            }
            Op::UpsertMaglevTable { table, backend_ids } => self.maglev.upsert(*table, backend_ids),
            Op::DeleteMaglevTable { table } => self.maglev.delete(*table),
            _ => {}
        }
    }

    /// Slots and masters of the services maps.
    /// The frontends whose entries changed since the last call.
    pub fn take_touched(&mut self) -> std::collections::HashSet<FrontendKey> {
        std::mem::take(&mut self.touched)
    }

    fn apply_service_entry(&mut self, op: &Op) {
        if let Op::UpsertSlot { frontend, .. }
        | Op::DeleteSlot { frontend, .. }
        | Op::UpsertMaster { frontend, .. }
        | Op::DeleteMaster { frontend } = op
        {
            self.touched.insert(*frontend);
        }
        match op {
            Op::UpsertSlot {
                frontend,
                slot,
                backend_id,
                rev_nat_id,
            } => {
                let programmed = self.frontends.entry(*frontend).or_default();
                programmed.slot_rev_nat_id = *rev_nat_id;
                let old = programmed.slots.insert(*slot, *backend_id);
                if old != Some(*backend_id) {
                    match old {
                        Some(old) => self.unref_backend(old),
                        None => self.fill.services[family(frontend.ip)] += 1,
                    }
                    bump(&mut self.backend_refs, *backend_id, true);
                    self.recheck_backend(*backend_id);
                }
            }
            Op::DeleteSlot { frontend, slot } => {
                let old = self
                    .frontends
                    .get_mut(frontend)
                    .and_then(|programmed| programmed.slots.remove(slot));
                if let Some(old) = old {
                    self.fill.services[family(frontend.ip)] -= 1;
                    self.unref_backend(old);
                }
                if let Some(programmed) = self.frontends.get_mut(frontend)
                    && programmed.slots.is_empty()
                {
                    programmed.slot_rev_nat_id = 0;
                }
                self.drop_if_empty(frontend);
            }
            Op::UpsertMaster { frontend, master } => {
                let old = self.frontends.entry(*frontend).or_default().master;
                self.frontends.entry(*frontend).or_default().master = Some(*master);
                if old.is_none() {
                    self.fill.services[family(frontend.ip)] += 1;
                }
                if old.map(|m| m.rev_nat_id) != Some(master.rev_nat_id) {
                    if let Some(old) = old {
                        bump(&mut self.master_refs, old.rev_nat_id, false);
                        self.recheck_rev_nat(old.rev_nat_id);
                    }
                    bump(&mut self.master_refs, master.rev_nat_id, true);
                    self.recheck_rev_nat(master.rev_nat_id);
                }
                self.next_rev_nat_id = self.next_rev_nat_id.max(master.rev_nat_id.wrapping_add(1));
                self.maglev
                    .repoint(old.map_or(0, |m| m.maglev_table), master.maglev_table);
            }
            Op::DeleteMaster { frontend } => {
                let old = self
                    .frontends
                    .get_mut(frontend)
                    .and_then(|programmed| programmed.master.take());
                if let Some(old) = old {
                    self.fill.services[family(frontend.ip)] -= 1;
                    bump(&mut self.master_refs, old.rev_nat_id, false);
                    self.recheck_rev_nat(old.rev_nat_id);
                    self.maglev.repoint(old.maglev_table, 0);
                }
                self.drop_if_empty(frontend);
            }
            _ => {}
        }
    }

    fn unref_backend(&mut self, id: u32) {
        bump(&mut self.backend_refs, id, false);
        self.recheck_backend(id);
    }

    fn recheck_backend(&mut self, id: u32) {
        if self.backends.contains_key(&id) && !self.backend_refs.contains_key(&id) {
            self.orphan_backends.insert(id);
        } else {
            self.orphan_backends.remove(&id);
        }
    }

    fn recheck_rev_nat(&mut self, id: u32) {
        let has_entries = self.rev_nats.contains_key(&id)
            || self.names.contains_key(&id)
            || self.ranges_of(id).next().is_some();
        if has_entries && !self.master_refs.contains_key(&id) {
            self.orphan_rev_nats.insert(id);
        } else {
            self.orphan_rev_nats.remove(&id);
        }
    }

    fn drop_if_empty(&mut self, frontend: &FrontendKey) {
        if self
            .frontends
            .get(frontend)
            .is_some_and(|f| f.master.is_none() && f.slots.is_empty())
        {
            self.frontends.remove(frontend);
        }
    }

    /// Builds a mirror from operations that recreate the maps' content (restore).
    pub fn from_ops<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Self {
        let mut programmed = Self::default();
        for op in ops {
            programmed.apply(op);
        }
        programmed
    }
}

/// Applying operations one by one (restore decodes the maps straight into a mirror).
impl Extend<Op> for Programmed {
    fn extend<T: IntoIterator<Item = Op>>(&mut self, ops: T) {
        for op in ops {
            self.apply(&op);
        }
    }
}

/// A backend of a UDP frontend: (rev-NAT id of the frontend, backend address).
pub type UdpPair = (u32, std::net::SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scope;

    #[test]
    fn slots_stay_in_slot_order_and_report_what_they_held() {
        let mut slots: Slots = [(3, 30), (1, 10)].into_iter().collect();
        assert_eq!(slots.insert(2, 20), None);
        assert_eq!(slots.insert(3, 33), Some(30));
        assert_eq!(slots.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(slots.get(&3), Some(&33));
        assert_eq!(slots.remove(&1), Some(10));
        assert_eq!(slots.remove(&1), None);
        assert!(!slots.contains_key(&1));
        assert_eq!(
            (&slots).into_iter().collect::<Vec<_>>(),
            [(&2, &20), (&3, &33)]
        );
        assert_eq!(slots.values().copied().collect::<Vec<_>>(), [20, 33]);
        assert_eq!(slots.remove(&2), Some(20));
        assert_eq!(slots.remove(&3), Some(33));
        assert!(slots.is_empty());
    }

    fn key(ip: &str) -> FrontendKey {
        FrontendKey {
            ip: ip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Udp,
            scope: Scope::Cluster,
        }
    }

    fn backend(ip: &str) -> BackendAddr {
        BackendAddr {
            ip: ip.parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        }
    }

    #[test]
    fn references_orphans_and_fill_follow_every_operation() {
        let mut mirror = Programmed::default();
        let ops = [
            Op::UpsertBackend {
                id: 1,
                backend: backend("10.0.0.1"),
            },
            Op::UpsertRevNat {
                id: 7,
                target: RevNatTarget {
                    ip: "10.96.0.1".parse().unwrap(),
                    port: 80,
                },
            },
        ];
        for op in &ops {
            mirror.apply(op);
        }
        assert_eq!(
            mirror.orphan_backends().iter().copied().collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(
            mirror.orphan_rev_nats().iter().copied().collect::<Vec<_>>(),
            [7]
        );
        mirror.apply(&Op::UpsertSlot {
            frontend: key("10.96.0.1"),
            slot: 1,
            backend_id: 1,
            rev_nat_id: 7,
        });
        mirror.apply(&Op::UpsertMaster {
            frontend: key("10.96.0.1"),
            master: Master {
                count: 1,
                rev_nat_id: 7,
                flags: 0,
                affinity_timeout_secs: 0,
                maglev_table: 0,
            },
        });
        assert!(mirror.orphan_backends().is_empty());
        assert!(mirror.orphan_rev_nats().is_empty());
        assert_eq!(mirror.fill().services, [2, 0]);
        assert_eq!(mirror.fill().backends, [1, 0]);
        assert_eq!(
            mirror.udp_pairs([&key("10.96.0.1")]),
            BTreeSet::from([(7, "10.0.0.1:53".parse().unwrap())])
        );
        mirror.apply(&Op::DeleteMaster {
            frontend: key("10.96.0.1"),
        });
        mirror.apply(&Op::DeleteSlot {
            frontend: key("10.96.0.1"),
            slot: 1,
        });
        assert_eq!(mirror.orphan_backends().len(), 1);
        assert_eq!(mirror.orphan_rev_nats().len(), 1);
        assert_eq!(mirror.fill().services, [0, 0]);
        assert!(mirror.frontends.is_empty());
    }

    #[test]
    fn the_inverse_of_an_operation_restores_the_mirror() {
        let mut mirror = Programmed::default();
        let setup = [
            Op::UpsertBackend {
                id: 1,
                backend: backend("10.0.0.1"),
            },
            Op::UpsertBackend {
                id: 2,
                backend: backend("10.0.0.2"),
            },
            Op::UpsertSlot {
                frontend: key("10.96.0.1"),
                slot: 1,
                backend_id: 1,
                rev_nat_id: 3,
            },
            Op::UpsertMaster {
                frontend: key("10.96.0.1"),
                master: Master {
                    count: 1,
                    rev_nat_id: 3,
                    flags: 0,
                    affinity_timeout_secs: 0,
                    maglev_table: 0,
                },
            },
        ];
        for op in &setup {
            mirror.apply(op);
        }
        let changes = [
            Op::UpsertSlot {
                frontend: key("10.96.0.1"),
                slot: 1,
                backend_id: 2,
                rev_nat_id: 3,
            },
            Op::UpsertSlot {
                frontend: key("10.96.0.1"),
                slot: 2,
                backend_id: 1,
                rev_nat_id: 3,
            },
            Op::DeleteMaster {
                frontend: key("10.96.0.1"),
            },
            Op::UpsertBackend {
                id: 9,
                backend: backend("10.0.0.9"),
            },
            Op::UpsertSourceRange {
                rev_nat_id: 3,
                range: Cidr::host("10.1.1.1".parse().unwrap()),
            },
        ];
        for change in &changes {
            let before = mirror.clone();
            let inverse = mirror
                .inverse(change)
                .expect("every change here has an inverse");
            mirror.apply(change);
            mirror.apply(&inverse);
            assert_eq!(mirror, before, "{change:?} then {inverse:?}");
        }
    }

    #[test]
    fn freed_ids_are_not_handed_out_again_at_once() {
        let mut mirror = Programmed::default();
        assert_eq!(mirror.backend_cursor(), 1);
        mirror.apply(&Op::UpsertBackend {
            id: 1,
            backend: backend("10.0.0.1"),
        });
        mirror.apply(&Op::DeleteBackend {
            id: 1,
            backend: backend("10.0.0.1"),
        });
        assert_eq!(mirror.backend_cursor(), 2);
        assert_eq!(
            next_free(u32::MAX, |id| id == u32::MAX),
            1,
            "wraps past the end"
        );
    }
}
