//! Backend selection: the slot layout of the services map gives an O(1) random choice; an
//! affinity LRU keeps ClientIP-affine clients on their backend until the timeout; a Maglev
//! frontend's new TC flows take the backend its table gives the flow's hash (one hash, one
//! array lookup).
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend4, Backend6, Service4Key, Service6Key,
    ServiceValue, reason, service_flags,
};

use crate::{
    maps::{
        AFF_MATCH_V1, AFFINITY_V1, BACKEND4_V1, BACKEND6_V1, MAGLEV_CFG_V1, MAGLEV_V1, SVC4_V1,
        SVC6_V1,
    },
    metrics,
};

/// What a service lookup decided for one connection or datagram.
pub enum Selection<B> {
    /// The destination is not a service: leave it alone.
    NotAService,
    /// The service has no usable endpoint anywhere: refuse (kube-proxy's REJECT).
    Refuse,
    /// The service has endpoints, but its traffic policy leaves none for this node (DROP).
    Drop,
    /// Translate to this backend.
    Backend {
        backend: B,
        backend_id: u32,
        rev_nat_id: u32,
    },
}

/// One address family's services and backends maps.
pub trait Family {
    type Key: Copy;
    type Backend: Copy;
    fn with_slot(key: Self::Key, slot: u16) -> Self::Key;
    fn service(key: &Self::Key) -> Option<ServiceValue>;
    fn backend(id: u32) -> Option<Self::Backend>;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Key = Service4Key;
    type Backend = Backend4;

    #[inline(always)]
    fn with_slot(key: Service4Key, slot: u16) -> Service4Key {
        Service4Key {
            backend_slot: slot,
            ..key
        }
    }

    #[inline(always)]
    fn service(key: &Service4Key) -> Option<ServiceValue> {
        // SAFETY: the map value is plain data and is copied out at once.
        unsafe { SVC4_V1.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend4> {
        // SAFETY: as above.
        unsafe { BACKEND4_V1.get(id) }.copied()
    }
}

impl Family for V6 {
    type Key = Service6Key;
    type Backend = Backend6;

    #[inline(always)]
    fn with_slot(key: Service6Key, slot: u16) -> Service6Key {
        Service6Key {
            backend_slot: slot,
            ..key
        }
    }

    #[inline(always)]
    fn service(key: &Service6Key) -> Option<ServiceValue> {
        // SAFETY: the map value is plain data and is copied out at once.
        unsafe { SVC6_V1.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        // SAFETY: as above.
        unsafe { BACKEND6_V1.get(id) }.copied()
    }
}

#[inline(always)]
fn random_slot(count: u16) -> u16 {
    // SAFETY: a helper call without arguments or memory access.
    let random = unsafe { bpf_get_prandom_u32() };
    // `count` is non-zero here; the modulo is why the verifier accepts the bounded slot.
    (random % u32::from(count)) as u16 + 1
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper call without arguments or memory access.
    unsafe { bpf_ktime_get_ns() }
}

/// A random backend of the frontend: its id and address.
#[inline(always)]
fn pick_random<F: Family>(key: F::Key, count: u16) -> Option<(u32, F::Backend)> {
    let slot = F::service(&F::with_slot(key, random_slot(count)))?;
    Some((slot.backend_id, F::backend(slot.backend_id)?))
}

/// The backend id the frontend's Maglev table (number `table`, 1-based) gives a flow of this
/// hash; 0 when the agent has not given the datapath the tables' settings, or the slot is
/// empty or out of the map.
#[inline(always)]
fn maglev_backend_id(table: u32, flow_hash: u32) -> u32 {
    let Some(config) = MAGLEV_CFG_V1.get(0).copied() else {
        return 0;
    };
    let size = config.table_size;
    if size == 0 || table == 0 {
        return 0;
    }
    let Some(index) = (table - 1)
        .checked_mul(size)
        .and_then(|base| base.checked_add(flow_hash % size))
    else {
        return 0;
    };
    MAGLEV_V1.get(index).copied().unwrap_or(0)
}

/// A new flow's backend: the Maglev table's choice for a Maglev frontend when the caller has a
/// flow to hash (the TC path), else a random slot.
#[inline(always)]
fn pick<F: Family>(
    key: F::Key,
    master: &ServiceValue,
    flow_hash: Option<u32>,
) -> Option<(u32, F::Backend)> {
    if master.flags & service_flags::MAGLEV != 0
        && let Some(flow_hash) = flow_hash
    {
        let backend_id = maglev_backend_id(master.backend_id, flow_hash);
        if backend_id != 0
            && let Some(backend) = F::backend(backend_id)
        {
            metrics::count(reason::TC_MAGLEV_PICKED);
            return Some((backend_id, backend));
        }
        metrics::count(reason::TC_MAGLEV_UNAVAILABLE);
    }
    pick_random::<F>(key, master.count)
}

/// The backend this client's affinity entry names, if it is still fresh and still serves the
/// Service: the (backend, rev-NAT id) pair must be in the match map the agent keeps, so an
/// entry left behind (the agent prunes them only at its full syncs) never sends a client to a
/// backend that left the Service, or to an id that names another backend by then.
#[inline(always)]
fn affine_backend<F: Family>(
    affinity: &AffinityKey,
    timeout_secs: u32,
    now: u64,
) -> Option<(u32, F::Backend)> {
    // SAFETY: plain data, copied out at once.
    let entry = unsafe { AFFINITY_V1.get(affinity) }.copied()?;
    if now.saturating_sub(entry.last_used_ns) >= u64::from(timeout_secs) * 1_000_000_000 {
        return None;
    }
    let member = AffinityMatchKey {
        backend_id: entry.backend_id,
        rev_nat_id: affinity.rev_nat_id,
    };
    // SAFETY: only the presence of the key is read.
    unsafe { AFF_MATCH_V1.get(member) }?;
    Some((entry.backend_id, F::backend(entry.backend_id)?))
}

/// The master entry (slot 0) of the frontend `key`, if it is a service.
#[inline(always)]
pub fn master<F: Family>(key: F::Key) -> Option<ServiceValue> {
    F::service(&F::with_slot(key, 0))
}

/// Chooses the backend of the frontend `key` whose master entry the caller already read.
/// `flow_hash` is the new flow's Maglev hash (the TC path; the socket hooks have no tuple yet
/// and pass `None`).
#[inline(always)]
pub fn select_from<F: Family>(
    key: F::Key,
    master: &ServiceValue,
    client_cookie: impl FnOnce() -> u64,
    flow_hash: Option<u32>,
) -> Selection<F::Backend> {
    if master.count == 0 {
        return if master.flags & service_flags::NO_LOCAL_ENDPOINTS != 0 {
            Selection::Drop
        } else {
            Selection::Refuse
        };
    }
    let rev_nat_id = master.rev_nat_id;
    if master.affinity_timeout_secs == 0 {
        return match pick::<F>(key, master, flow_hash) {
            Some((backend_id, backend)) => Selection::Backend {
                backend,
                backend_id,
                rev_nat_id,
            },
            None => {
                metrics::count(reason::BACKEND_LOOKUP_FAILED);
                Selection::NotAService
            }
        };
    }
    let affinity = AffinityKey {
        client_cookie: client_cookie(),
        rev_nat_id,
        pad: 0,
    };
    let now = now_ns();
    let chosen = match affine_backend::<F>(&affinity, master.affinity_timeout_secs, now) {
        Some(found) => {
            metrics::count(reason::AFFINITY_HIT);
            Some(found)
        }
        None => pick::<F>(key, master, flow_hash),
    };
    let Some((backend_id, backend)) = chosen else {
        metrics::count(reason::BACKEND_LOOKUP_FAILED);
        return Selection::NotAService;
    };
    // Each use renews the entry: the timeout counts from the client's last connection, like
    // kube-proxy's `recent` match.
    let renewed = AffinityValue {
        last_used_ns: now,
        backend_id,
        pad: 0,
    };
    if AFFINITY_V1.insert(affinity, renewed, 0).is_err() {
        metrics::count(reason::AFFINITY_STORE_FAILED);
    }
    Selection::Backend {
        backend,
        backend_id,
        rev_nat_id,
    }
}
