//! The TC path's side of the service-CIDR guard: what happens to a packet whose destination
//! is no frontend.
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use proxy_common::{monitor_kind, protocol, reason};

use super::{
    Step, events,
    inet::{Inet, Packet},
};
use crate::{guard, metrics};

/// A packet whose destination is no frontend: refused when it is an active ClusterIP (a port
/// its Services do not serve), dropped when it is an unallocated address of a ServiceCIDR,
/// passed otherwise.
#[inline(always)]
pub fn not_a_service<I: Inet>(packet: &Packet<I::Addr>) -> Step {
    let tuple = &packet.tuple;
    match guard::check(&tuple.daddr) {
        guard::Verdict::Pass => Step::Verdict(TC_ACT_OK),
        guard::Verdict::Reject => {
            metrics::count(reason::TC_GUARD_REJECTED);
            events::untranslated::<I>(
                monitor_kind::TC_REJECTED,
                reason::TC_GUARD_REJECTED,
                tuple,
                0,
            );
            if tuple.proto == protocol::TCP {
                Step::RefuseTcp
            } else {
                Step::RefuseUdp
            }
        }
        guard::Verdict::Drop => {
            metrics::count(reason::TC_GUARD_DROPPED);
            events::untranslated::<I>(monitor_kind::TC_DROPPED, reason::TC_GUARD_DROPPED, tuple, 0);
            Step::Verdict(TC_ACT_SHOT)
        }
    }
}
