//! Session-affinity upkeep: entries whose backend left their service are forgotten, so a
//! client never sticks to a backend that is gone.
use std::collections::{BTreeMap, HashMap};

use proxy_common::{AffinityKey, AffinityValue};

use crate::plan::mirror::Programmed;

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
