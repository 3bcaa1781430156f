//! Session-affinity upkeep: entries whose backend left their service are forgotten, so a
//! client never sticks to a backend that is gone; and the match map the datapath checks every
//! affinity entry against is kept equal to the backends each affine Service has.
use std::collections::{BTreeMap, HashMap, HashSet};

use aya::maps::{HashMap as AyaHashMap, Map, MapData, MapError};
use proxy_common::{AffinityKey, AffinityMatchKey, AffinityValue, map_names};

use crate::{
    bpf::pins::{OpenPinError, PinLayout},
    model::FrontendKey,
    plan::mirror::{Programmed, ProgrammedFrontend},
};

/// Affinity entries that name a backend their service no longer has (or a service that is
/// gone).
pub fn stale_affinity(
    mirror: &Programmed,
    affinity: &BTreeMap<AffinityKey, AffinityValue>,
) -> Vec<AffinityKey> {
    let mut members: HashMap<u32, Vec<u32>> = HashMap::new();
    for frontend in mirror.frontends.values() {
        if let Some(master) = frontend.master {
            let live = frontend
                .slots
                .iter()
                .filter(|(slot, _)| **slot <= master.count)
                .map(|(_, id)| *id);
            members.entry(master.rev_nat_id).or_default().extend(live);
        }
    }
    affinity
        .iter()
        .filter(|(key, value)| {
            !members
                .get(&key.rev_nat_id)
                .is_some_and(|ids| ids.contains(&value.backend_id))
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Where the affinity match pairs are stored (the pinned map; in memory in tests).
pub trait MatchStore: Send {
    fn insert(&mut self, pair: AffinityMatchKey) -> Result<(), MapError>;
    fn remove(&mut self, pair: &AffinityMatchKey) -> Result<(), MapError>;
    /// Every pair stored now.
    fn pairs(&self) -> Result<HashSet<AffinityMatchKey>, MapError>;
}

/// The pinned match map.
pub struct PinnedMatches(AyaHashMap<MapData, AffinityMatchKey, u32>);

impl PinnedMatches {
    pub fn open(pins: &PinLayout) -> Result<Self, OpenPinError> {
        let map = map_names::AFFINITY_MATCH;
        AyaHashMap::try_from(Map::HashMap(pins.open_map(map)?))
            .map(Self)
            .map_err(|source| OpenPinError { map, source })
    }
}

impl MatchStore for PinnedMatches {
    fn insert(&mut self, pair: AffinityMatchKey) -> Result<(), MapError> {
        self.0.insert(pair, 0, 0)
    }

    fn remove(&mut self, pair: &AffinityMatchKey) -> Result<(), MapError> {
        match self.0.remove(pair) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn pairs(&self) -> Result<HashSet<AffinityMatchKey>, MapError> {
        self.0.keys().collect()
    }
}

/// An in-memory store (tests).
#[derive(Default)]
pub struct MemoryMatches(pub HashSet<AffinityMatchKey>);

impl MatchStore for MemoryMatches {
    fn insert(&mut self, pair: AffinityMatchKey) -> Result<(), MapError> {
        self.0.insert(pair);
        Ok(())
    }

    fn remove(&mut self, pair: &AffinityMatchKey) -> Result<(), MapError> {
        self.0.remove(pair);
        Ok(())
    }

    fn pairs(&self) -> Result<HashSet<AffinityMatchKey>, MapError> {
        Ok(self.0.clone())
    }
}

/// Keeps the match map equal to the (backend, Service port) pairs of the frontends with
/// ClientIP affinity, as programmed: incrementally for the frontends a sync touched, and
/// level-triggered at every full sync (the pinned map is read and compared, so whatever a
/// killed agent left is repaired by the next one).
pub struct AffinityMatches {
    store: Box<dyn MatchStore>,
    /// Each affinity frontend's pairs, as last counted.
    of_frontend: HashMap<FrontendKey, Vec<AffinityMatchKey>>,
    /// How many frontends contribute each pair (a Service's ClusterIPs and NodePorts share it).
    refs: HashMap<AffinityMatchKey, u32>,
}

/// The pairs a programmed frontend contributes: its live slots if it has affinity.
fn contribution(frontend: &ProgrammedFrontend) -> Vec<AffinityMatchKey> {
    let Some(master) = frontend
        .master
        .filter(|master| master.affinity_timeout_secs > 0)
    else {
        return Vec::new();
    };
    let mut pairs: Vec<AffinityMatchKey> = frontend
        .slots
        .iter()
        .filter(|(slot, _)| **slot <= master.count)
        .map(|(_, backend_id)| AffinityMatchKey {
            backend_id: *backend_id,
            rev_nat_id: master.rev_nat_id,
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

impl AffinityMatches {
    pub fn new(store: Box<dyn MatchStore>) -> Self {
        Self {
            store,
            of_frontend: HashMap::new(),
            refs: HashMap::new(),
        }
    }

    /// Pairs in the map.
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Recounts every frontend and makes the stored pairs exactly the wanted ones.
    pub fn reconcile_all(&mut self, mirror: &Programmed) -> Result<usize, MapError> {
        self.of_frontend.clear();
        self.refs.clear();
        for (key, frontend) in &mirror.frontends {
            let pairs = contribution(frontend);
            if pairs.is_empty() {
                continue;
            }
            for pair in &pairs {
                *self.refs.entry(*pair).or_default() += 1;
            }
            self.of_frontend.insert(*key, pairs);
        }
        let stored = self.store.pairs()?;
        let mut changed = 0;
        for pair in self.refs.keys().filter(|pair| !stored.contains(pair)) {
            self.store.insert(*pair)?;
            changed += 1;
        }
        for pair in stored.iter().filter(|pair| !self.refs.contains_key(pair)) {
            self.store.remove(pair)?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Recounts the frontends in `touched` and writes the pairs that appeared or went.
    pub fn update(
        &mut self,
        mirror: &Programmed,
        touched: impl IntoIterator<Item = FrontendKey>,
    ) -> Result<usize, MapError> {
        let mut changed = 0;
        for key in touched {
            let new = mirror
                .frontends
                .get(&key)
                .map(contribution)
                .unwrap_or_default();
            let old = self.of_frontend.remove(&key).unwrap_or_default();
            if new == old {
                if !new.is_empty() {
                    self.of_frontend.insert(key, new);
                }
                continue;
            }
            // Added first, removed after: a pair shared with another frontend never blinks.
            for pair in new.iter().filter(|pair| !old.contains(pair)) {
                let count = self.refs.entry(*pair).or_default();
                *count += 1;
                if *count == 1 {
                    self.store.insert(*pair)?;
                    changed += 1;
                }
            }
            for pair in old.iter().filter(|pair| !new.contains(pair)) {
                if let Some(count) = self.refs.get_mut(pair) {
                    *count -= 1;
                    if *count == 0 {
                        self.refs.remove(pair);
                        self.store.remove(pair)?;
                        changed += 1;
                    }
                }
            }
            if !new.is_empty() {
                self.of_frontend.insert(key, new);
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Protocol, Scope},
        plan::op::{Master, Op},
    };

    fn key(port: u16) -> FrontendKey {
        FrontendKey {
            ip: "10.96.0.10".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            scope: Scope::Cluster,
        }
    }

    fn program(mirror: &mut Programmed, port: u16, rev_nat_id: u32, affinity: u32, ids: &[u32]) {
        for (slot, id) in ids.iter().enumerate() {
            mirror.apply(&Op::UpsertSlot {
                frontend: key(port),
                slot: u16::try_from(slot + 1).unwrap(),
                backend_id: *id,
                rev_nat_id,
            });
        }
        mirror.apply(&Op::UpsertMaster {
            frontend: key(port),
            master: Master {
                count: u16::try_from(ids.len()).unwrap(),
                rev_nat_id,
                flags: 0,
                affinity_timeout_secs: affinity,
                maglev_table: 0,
            },
        });
    }

    fn pair(backend_id: u32, rev_nat_id: u32) -> AffinityMatchKey {
        AffinityMatchKey {
            backend_id,
            rev_nat_id,
        }
    }

    struct Stored(std::sync::Arc<std::sync::Mutex<HashSet<AffinityMatchKey>>>);

    impl MatchStore for Stored {
        fn insert(&mut self, pair: AffinityMatchKey) -> Result<(), MapError> {
            self.0.lock().unwrap().insert(pair);
            Ok(())
        }
        fn remove(&mut self, pair: &AffinityMatchKey) -> Result<(), MapError> {
            self.0.lock().unwrap().remove(pair);
            Ok(())
        }
        fn pairs(&self) -> Result<HashSet<AffinityMatchKey>, MapError> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    #[test]
    fn the_match_map_holds_exactly_the_backends_of_affine_services() {
        let stored = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
        // Left by a killed agent: a pair no Service has any more.
        stored.lock().unwrap().insert(pair(99, 7));
        let mut matches = AffinityMatches::new(Box::new(Stored(stored.clone())));
        let mut mirror = Programmed::default();
        program(&mut mirror, 80, 7, 60, &[1, 2]);
        program(&mut mirror, 81, 8, 0, &[3]);
        mirror.take_touched();
        matches.reconcile_all(&mirror).unwrap();
        assert_eq!(
            *stored.lock().unwrap(),
            HashSet::from([pair(1, 7), pair(2, 7)]),
            "the stale pair goes; a Service without affinity has none"
        );
        // Backend 1 leaves (the count shrinks first, the slot goes later), 4 arrives.
        program(&mut mirror, 80, 7, 60, &[2, 4]);
        let touched = mirror.take_touched();
        assert!(touched.contains(&key(80)) && !touched.contains(&key(81)));
        assert_eq!(matches.update(&mirror, touched).unwrap(), 2);
        assert_eq!(
            *stored.lock().unwrap(),
            HashSet::from([pair(2, 7), pair(4, 7)])
        );
        // Affinity switched off: its pairs go.
        program(&mut mirror, 80, 7, 0, &[2, 4]);
        let touched = mirror.take_touched();
        matches.update(&mirror, touched).unwrap();
        assert!(stored.lock().unwrap().is_empty());
        assert!(matches.is_empty());
    }
}
