//! Connection tracking of the TC path: lifetimes per protocol and TCP state, and which entries
//! are still alive. Every translated flow has a forward entry (client → frontend), which alone
//! carries the state and lifetime, and a reply entry (backend → node or client) that lives as
//! long as its forward entry and names it by its rewrite tuple.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
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

/// What a connection-opening SYN does to the tracked flow it matches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SynOnFlow {
    /// The flow is still unanswered: a retransmitted SYN keeps its backend and port.
    Retransmit,
    /// The flow is established or half-closed: the SYN goes to the flow's backend and
    /// changes nothing (a spoofed SYN must not restart a live flow; a client that lost its
    /// connection gets the backend's challenge ACK, answers it with a RST in the window, and
    /// its next SYN starts afresh).
    Ignore,
    /// The flow is closed (both FINs or a RST): the SYN starts a new flow.
    Restart,
}

#[inline(always)]
pub fn syn_on_flow(forward_flags: u16) -> SynOnFlow {
    if closed(forward_flags) {
        SynOnFlow::Restart
    } else if forward_flags & (ct_flags::SEEN_REPLY | ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY)
        != 0
    {
        SynOnFlow::Ignore
    } else {
        SynOnFlow::Retransmit
    }
}

/// Whether the flow's backend is still a backend at the address and port the flow goes to: it
/// leaves the backends map when no Service uses the endpoint any more, and a freed id may be
/// given to another endpoint later.
#[inline(always)]
pub fn backend_current<I: Inet>(forward: &Flow<I::Addr>) -> bool {
    I::backend(forward.backend_id)
        .is_some_and(|backend| I::backend_target(&backend) == (forward.to.daddr, forward.to.dport))
}

/// A TCP flow that ended: reset, or closed from both sides.
#[inline(always)]
pub fn closed(forward_flags: u16) -> bool {
    forward_flags & ct_flags::RST != 0
        || forward_flags & (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY)
            == (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY)
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

/// Moves a confirmed flow (its forward entry as given, and its reply entry) from the map of
/// unreplied flows to the main conntrack map, where a flood of new flows cannot evict it.
/// The reply entry goes in with BPF_NOEXIST: `false` when another flow owns that reply tuple
/// in the main map (never overwritten; the caller drops the packet).
#[inline(always)]
pub fn promote<I: Inet>(
    forward_key: &Tuple<I::Addr>,
    forward: &Flow<I::Addr>,
    reply_key: &Tuple<I::Addr>,
) -> bool {
    let Some(mut reply) = I::ct_get(reply_key) else {
        return false;
    };
    if reply.unreplied {
        reply.unreplied = false;
        if I::ct_put(reply_key, &reply, u64::from(BPF_NOEXIST)).is_err() {
            // Another CPU may have promoted this very flow meanwhile.
            let ours =
                I::ct_get(reply_key).is_some_and(|main| !main.unreplied && main.to == reply.to);
            if !ours {
                return false;
            }
        }
    }
    let confirmed = Flow {
        unreplied: false,
        ..*forward
    };
    if I::ct_put(forward_key, &confirmed, u64::from(BPF_ANY)).is_err() {
        I::ct_delete_in(reply_key, false);
        return false;
    }
    I::ct_delete_in(forward_key, true);
    I::ct_delete_in(reply_key, true);
    true
}
