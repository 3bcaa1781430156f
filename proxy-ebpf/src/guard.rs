//! The service-CIDR guard, nftables mode's rules for destinations that are no frontend: an
//! active ClusterIP on a port none of its Services serves is refused, an address of a
//! ServiceCIDR that no Service holds is dropped, anything else passes. Asked only after the
//! services map had no entry for the destination.
use proxy_common::guard_flags;

use crate::addr::ServiceAddr;

/// What the guard decides for a destination that is no frontend.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Reject,
    Drop,
}

#[inline(always)]
pub fn check<A: ServiceAddr>(daddr: &A) -> Verdict {
    let Some(flags) = daddr.guard_flags() else {
        return Verdict::Pass;
    };
    if flags & guard_flags::CLUSTER_IP != 0 {
        Verdict::Reject
    } else if flags & guard_flags::OTHER_PROXY != 0 {
        Verdict::Pass
    } else if flags & guard_flags::SERVICE_CIDR != 0 {
        Verdict::Drop
    } else {
        Verdict::Pass
    }
}
