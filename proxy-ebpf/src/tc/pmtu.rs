//! Path MTU discovery through the translation: a translated packet larger than its route's
//! MTU cannot be redirected (the egress device would drop it), and the TC path cannot
//! fragment it. The sender is told the MTU instead, as a router does: ICMP "fragmentation
//! needed" for IPv4 with DF set (RFC 1191), ICMPv6 "packet too big" (RFC 8201). The answer
//! quotes the packet as the client sent it, so the client's stack matches it to its socket.
//! IPv4 without DF is dropped and counted: a router would fragment it, the TC path cannot,
//! and the stack cannot forward it either (a masqueraded packet's source is a node address,
//! a martian to the stack's input routing).
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use proxy_common::reason;

use super::{
    fib,
    inet::{Fragment, Inet, Parsed},
    reject::{group_traffic, take_token},
};
use crate::metrics;

/// Answers (or drops) a packet too big for its route's `mtu`. A stage of its own: the ICMP
/// message is built on the stack.
#[inline(never)]
pub fn too_big<I: Inet>(ctx: &TcContext, mtu: u16) -> i32 {
    let Ok(Parsed::Flow(packet)) = I::parse(ctx) else {
        metrics::count(reason::TC_MTU_EXCEEDED);
        return TC_ACT_SHOT;
    };
    // Only the first fragment quotes the transport header the sender's stack matches on.
    let answerable = packet.fragment != Fragment::Later
        && I::dont_fragment(ctx, packet.l3).unwrap_or(false)
        && !group_traffic::<I>(ctx, &packet);
    // The refusals' per-CPU token bucket limits these answers too (a flood of large packets
    // must not become a flood of ICMP).
    if !answerable || !take_token() {
        metrics::count(reason::TC_MTU_EXCEEDED);
        return TC_ACT_SHOT;
    }
    if I::write_too_big(ctx, &packet, mtu).is_err() {
        metrics::count(reason::TC_MTU_EXCEEDED);
        return TC_ACT_SHOT;
    }
    metrics::count(reason::TC_FRAG_NEEDED_SENT);
    fib::bounce(ctx)
}
