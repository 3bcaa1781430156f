//! The TC path's events for `switchyard monitor` (written only while it is on).
use proxy_common::{monitor_hook, monitor_kind, reason};

use super::inet::{Inet, Tuple};
use crate::monitor;

/// Tells the monitor what happened to a packet of `tuple` that was not
/// translated.
#[inline(always)]
pub fn untranslated<I: Inet>(kind: u8, why: u32, tuple: &Tuple<I::Addr>, rev_nat_id: u32) {
    if let Some(mut event) = monitor::start(kind, why, monitor_hook::TC_INGRESS, tuple.proto) {
        event.source(&tuple.saddr, tuple.sport);
        event.destination(&tuple.daddr, tuple.dport);
        event.frontend(rev_nat_id);
        event.submit();
    }
}

/// Tells the monitor (when it is on) about a new tracked flow: client → frontend, translated
/// to `to` (the source the backend sees → the backend).
#[inline(always)]
pub fn new_flow<I: Inet>(
    tuple: &Tuple<I::Addr>,
    to: &Tuple<I::Addr>,
    rev_nat_id: u32,
    backend_id: u32,
) {
    if let Some(mut event) = monitor::start(
        monitor_kind::TC_NEW_FLOW,
        reason::TC_NEW_FLOW,
        monitor_hook::TC_INGRESS,
        tuple.proto,
    ) {
        event.source(&tuple.saddr, tuple.sport);
        event.destination(&tuple.daddr, tuple.dport);
        event.translated_source(&to.saddr, to.sport);
        event.backend(&to.daddr, to.dport, backend_id);
        event.frontend(rev_nat_id);
        event.submit();
    }
}
