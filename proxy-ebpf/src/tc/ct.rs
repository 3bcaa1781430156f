//! Connection tracking of the TC path: lifetimes per protocol and TCP state, and which entries
//! are still alive. Every translated flow has a forward entry (client → frontend), which alone
//! carries the state and lifetime, and a reply entry (backend → node or client) that lives as
//! long as its forward entry and names it by its rewrite tuple.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{ct_flags, ct_lifetime, protocol};

use super::inet::{Flow, Inet, Packet, Tuple};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper call without arguments or memory access.
    unsafe { bpf_ktime_get_ns() }
}

/// How long a flow in this state lives without packets.
#[inline(always)]
pub fn lifetime_ns(proto: u8, flags: u16) -> u64 {
    let secs = if proto != protocol::TCP {
        if flags & ct_flags::SEEN_REPLY != 0 {
            ct_lifetime::UDP_SECS
        } else {
            ct_lifetime::UDP_UNREPLIED_SECS
        }
    } else if flags & ct_flags::RST != 0
        || flags & (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY)
            == (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY)
    {
        ct_lifetime::TCP_CLOSED_SECS
    } else if flags & (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY) != 0 {
        ct_lifetime::TCP_HALF_CLOSED_SECS
    } else if flags & ct_flags::SEEN_REPLY != 0 {
        ct_lifetime::TCP_ESTABLISHED_SECS
    } else {
        ct_lifetime::TCP_SYN_SECS
    };
    secs * NS_PER_SEC
}

/// The state bits a packet adds: `fin` is the FIN bit of its direction.
#[inline(always)]
pub fn tcp_bits<A>(packet: &Packet<A>, fin: u16) -> u16 {
    if packet.tuple.proto != protocol::TCP {
        return 0;
    }
    let mut bits = 0;
    if packet.tcp_flags & TCP_FIN != 0 {
        bits |= fin;
    }
    if packet.tcp_flags & TCP_RST != 0 {
        bits |= ct_flags::RST;
    }
    bits
}

/// A connection-opening SYN (not a SYN-ACK).
#[inline(always)]
pub fn is_syn<A>(packet: &Packet<A>) -> bool {
    packet.tuple.proto == protocol::TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A new SYN must never inherit a flow that was answered or is closing: only a retransmitted
/// SYN of a still unanswered flow keeps its backend.
#[inline(always)]
pub fn syn_restarts<A>(packet: &Packet<A>, forward: &Flow<A>) -> bool {
    is_syn(packet)
        && forward.flags
            & (ct_flags::SEEN_REPLY | ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY | ct_flags::RST)
            != 0
}

/// The live forward entry of a reply entry: it must exist, be unexpired and still rewrite to
/// exactly the tuple the reply entry is keyed by (else the reply entry is stale).
#[expect(
    clippy::type_complexity,
    reason = "a key and its entry, both generic over the family"
)]
#[inline(always)]
pub fn forward_of<I: Inet>(
    reply_key: &Tuple<I::Addr>,
    reply: &Flow<I::Addr>,
    now: u64,
) -> Option<(Tuple<I::Addr>, Flow<I::Addr>)> {
    let forward_key = reply.to.reversed();
    let forward = I::ct_get(&forward_key)?;
    let matches = forward.flags & ct_flags::REPLY == 0
        && forward.expires_ns > now
        && forward.to.reversed() == *reply_key;
    matches.then_some((forward_key, forward))
}

/// Removes both entries of the flow whose forward entry is given (the reply entry only if it
/// still belongs to this flow: its tuple may have been reused since).
#[inline(always)]
pub fn forget<I: Inet>(forward_key: &Tuple<I::Addr>, forward: &Flow<I::Addr>) {
    let reply_key = forward.to.reversed();
    if let Some(reply) = I::ct_get(&reply_key)
        && reply.flags & ct_flags::REPLY != 0
        && reply.to.reversed() == *forward_key
    {
        I::ct_delete(&reply_key);
    }
    I::ct_delete(forward_key);
}
