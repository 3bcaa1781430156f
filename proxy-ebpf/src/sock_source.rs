//! loadBalancerSourceRanges on the socket path. A connect or sendmsg has no source address
//! yet unless the socket is bound: the kernel picks one after the hook, from the route to
//! the translated destination. So a restricted LoadBalancer IP is translated here only for
//! a bound socket whose address is inside the ranges; a bound socket outside them fails with
//! EPERM; an unbound one is left untranslated, and its packets meet the TC program where
//! they enter the node's stack (a pod's host-side interface carries it, see the agent's
//! interface choice), which checks the real source as kube-proxy's PREROUTING rules do.
use aya_ebpf::{maps::lpm_trie::Key, programs::SockAddrContext};
use proxy_common::{SourceRange4, SourceRange6};

use crate::{
    lb::{V4, V6},
    maps::{SRC_RANGE4_V1, SRC_RANGE6_V1},
};

/// What the ranges say about this socket.
pub enum Verdict {
    Allowed,
    Outside,
    /// Not bound: the packet path decides.
    Unknown,
}

/// A family's bound source and range lookup.
pub trait SourceCheck {
    fn check(ctx: &SockAddrContext, rev_nat_id: u32) -> Verdict;
}

impl SourceCheck for V4 {
    #[inline(always)]
    fn check(ctx: &SockAddrContext, rev_nat_id: u32) -> Verdict {
        // SAFETY: `sk` of a sock_addr context is a verifier-checked, non-null socket;
        // `src_ip4` is one of its readable fields (the bound address, 0 when unbound).
        let source = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_ip4 };
        if source == 0 {
            return Verdict::Unknown;
        }
        let key = Key::new(
            64,
            SourceRange4 {
                rev_nat_id_be: rev_nat_id.to_be(),
                address: source,
            },
        );
        if SRC_RANGE4_V1.get(&key).is_some() {
            Verdict::Allowed
        } else {
            Verdict::Outside
        }
    }
}

impl SourceCheck for V6 {
    #[inline(always)]
    fn check(ctx: &SockAddrContext, rev_nat_id: u32) -> Verdict {
        // SAFETY: as above; the IPv6 address is read word by word as the kernel requires.
        let source = unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            [
                (*sk).src_ip6[0],
                (*sk).src_ip6[1],
                (*sk).src_ip6[2],
                (*sk).src_ip6[3],
            ]
        };
        if source == [0; 4] {
            return Verdict::Unknown;
        }
        let key = Key::new(
            32 + 128,
            SourceRange6 {
                rev_nat_id_be: rev_nat_id.to_be(),
                address: source,
            },
        );
        if SRC_RANGE6_V1.get(&key).is_some() {
            Verdict::Allowed
        } else {
            Verdict::Outside
        }
    }
}
