//! `switchyard monitor`: the datapath's decisions as events in a ring buffer, written only
//! while someone is monitoring (a lease the monitor renews in `MONITOR_CFG_V1` and clears when
//! it stops), so an unwatched datapath pays one array lookup per decision and nothing else.
//!
//! Events are reserved in the ring buffer and filled in place (no copy on the stack, which
//! the TC path cannot spare); a full buffer loses the event and counts it.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_current_comm},
    maps::ring_buf::RingBufEntry,
};
use proxy_common::{MonitorEvent, reason};

use crate::{
    addr::ServiceAddr,
    maps::{MONITOR_CFG_V1, MONITOR_EVT_V1},
    metrics,
};

/// Whether someone is monitoring: the lease is set and not expired.
#[inline(always)]
pub fn on() -> bool {
    let until = MONITOR_CFG_V1.get(0).copied().unwrap_or(0);
    // SAFETY: a helper call without arguments or memory access.
    until != 0 && until > unsafe { bpf_ktime_get_ns() }
}

/// An event being written into the ring buffer.
pub struct Event(RingBufEntry<MonitorEvent>);

/// Starts an event when someone is monitoring: reserved, zeroed, stamped.
#[inline(always)]
pub fn start(kind: u8, why: u32, hook: u8, protocol: u8) -> Option<Event> {
    if !on() {
        return None;
    }
    let Some(mut entry) = MONITOR_EVT_V1.reserve::<MonitorEvent>(0) else {
        metrics::count(reason::MONITOR_EVENTS_LOST);
        return None;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at the reserved, writable ring-buffer slot of exactly one
    // `MonitorEvent`; zeroing it makes every field (plain integers) initialised.
    unsafe {
        core::ptr::write_bytes(event, 0, 1);
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).kind = kind;
        (*event).reason = why as u8;
        (*event).hook = hook;
        (*event).protocol = protocol;
    }
    Some(Event(entry))
}

impl Event {
    #[inline(always)]
    fn get(&mut self) -> &mut MonitorEvent {
        // SAFETY: `start` zeroed the slot, so it holds a valid `MonitorEvent`.
        unsafe { self.0.assume_init_mut() }
    }

    /// The destination the client addressed.
    #[inline(always)]
    pub fn destination<A: ServiceAddr>(&mut self, addr: &A, port_be: u16) {
        let event = self.get();
        event.family = A::FAMILY;
        event.dst = addr.words();
        event.dst_port_be = port_be;
    }

    /// The client, as a packet carried it (TC).
    #[inline(always)]
    pub fn source<A: ServiceAddr>(&mut self, addr: &A, port_be: u16) {
        let event = self.get();
        event.src = addr.words();
        event.src_port_be = port_be;
    }

    /// The source the backend sees (TC).
    #[inline(always)]
    pub fn translated_source<A: ServiceAddr>(&mut self, addr: &A, port_be: u16) {
        let event = self.get();
        event.nat_src = addr.words();
        event.nat_src_port_be = port_be;
    }

    #[inline(always)]
    pub fn backend<A: ServiceAddr>(&mut self, addr: &A, port_be: u16, backend_id: u32) {
        let event = self.get();
        event.backend = addr.words();
        event.backend_port_be = port_be;
        event.backend_id = backend_id;
    }

    #[inline(always)]
    pub fn frontend(&mut self, rev_nat_id: u32) {
        self.get().rev_nat_id = rev_nat_id;
    }

    /// The calling socket and task (socket hooks).
    #[inline(always)]
    pub fn caller(&mut self, socket_cookie: u64, netns_cookie: u64) {
        let event = self.get();
        event.socket_cookie = socket_cookie;
        event.netns_cookie = netns_cookie;
        event.pid_tgid = bpf_get_current_pid_tgid();
        let comm = event.comm.as_mut_ptr();
        // SAFETY: `comm` points at the event's 16-byte name field in the reserved slot; the
        // helper writes at most that many bytes. A failure leaves the zeroed name.
        unsafe { bpf_get_current_comm(comm.cast(), 16) };
    }

    #[inline(always)]
    pub fn submit(self) {
        self.0.submit(0);
    }
}
