//! Backend selection: the slot layout of the services map gives an O(1) random choice.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Backend4, Backend6, Service4Key, Service6Key, reason};

use crate::{
    maps::{BACKEND4_V1, BACKEND6_V1, SVC4_V1, SVC6_V1},
    metrics,
};

/// What a service lookup decided for one connection or datagram.
pub enum Selection<B> {
    /// The destination is not a service: leave it alone.
    NotAService,
    /// The destination is a service without backends: refuse.
    NoBackend,
    /// Translate to this backend.
    Backend { backend: B, rev_nat_id: u32 },
}

#[inline(always)]
fn random_slot(count: u16) -> u16 {
    // SAFETY: a helper call without arguments or memory access.
    let random = unsafe { bpf_get_prandom_u32() };
    // `count` is non-zero here; the modulo is why the verifier accepts the bounded slot.
    (random % u32::from(count)) as u16 + 1
}

#[inline(always)]
pub fn select4(mut key: Service4Key) -> Selection<Backend4> {
    key.backend_slot = 0;
    // SAFETY: the map value is plain data and we copy it out at once.
    let Some(master) = (unsafe { SVC4_V1.get(key) }).copied() else {
        return Selection::NotAService;
    };
    if master.count == 0 {
        return Selection::NoBackend;
    }
    key.backend_slot = random_slot(master.count);
    // SAFETY: as above, copied out immediately.
    let Some(slot) = (unsafe { SVC4_V1.get(key) }).copied() else {
        metrics::count(reason::BACKEND_LOOKUP_FAILED);
        return Selection::NotAService;
    };
    // SAFETY: as above.
    match unsafe { BACKEND4_V1.get(slot.backend_id) }.copied() {
        Some(backend) => Selection::Backend {
            backend,
            rev_nat_id: master.rev_nat_id,
        },
        None => {
            metrics::count(reason::BACKEND_LOOKUP_FAILED);
            Selection::NotAService
        }
    }
}

#[inline(always)]
pub fn select6(mut key: Service6Key) -> Selection<Backend6> {
    key.backend_slot = 0;
    // SAFETY: the map value is plain data and we copy it out at once.
    let Some(master) = (unsafe { SVC6_V1.get(key) }).copied() else {
        return Selection::NotAService;
    };
    if master.count == 0 {
        return Selection::NoBackend;
    }
    key.backend_slot = random_slot(master.count);
    // SAFETY: as above.
    let Some(slot) = (unsafe { SVC6_V1.get(key) }).copied() else {
        metrics::count(reason::BACKEND_LOOKUP_FAILED);
        return Selection::NotAService;
    };
    // SAFETY: as above.
    match unsafe { BACKEND6_V1.get(slot.backend_id) }.copied() {
        Some(backend) => Selection::Backend {
            backend,
            rev_nat_id: master.rev_nat_id,
        },
        None => {
            metrics::count(reason::BACKEND_LOOKUP_FAILED);
            Selection::NotAService
        }
    }
}
