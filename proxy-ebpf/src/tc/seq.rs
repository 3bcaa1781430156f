//! The sequence space of tracked TCP flows, so that a spoofed RST cannot close a live flow:
//! each side's highest sequence end is kept on the flow's reply entry (see
//! `proxy_common::ct_seq`), moved forward by the packets that fit, and a RST changes the
//! flow's state only when its sequence number lies in the space its sender has used.
use aya_ebpf::programs::TcContext;
use proxy_common::{ct_flags, ct_seq, protocol};

use super::{
    ct::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    inet::{Inet, Packet, Tuple},
    reject::tcp_payload_len,
};

/// Which side of the flow sent the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (client → frontend).
    Forward,
    /// The backend (backend → node or client).
    Reply,
}

/// The sequence end of a TCP segment: its sequence number plus its length (SYN and FIN
/// count one each), and its sequence and acknowledgment numbers, host order.
#[inline(always)]
fn numbers<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>) -> Option<(u32, u32, u32)> {
    let seq = u32::from_be(ctx.load::<u32>(packet.l4 + 4).ok()?);
    let ack = u32::from_be(ctx.load::<u32>(packet.l4 + 8).ok()?);
    let payload = tcp_payload_len(ctx, packet, I::l4_len(ctx, packet).ok()?).ok()?;
    let flags = packet.tcp_flags;
    let len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
    Some((seq, ack, seq.wrapping_add(len)))
}

/// The sequence word of the reply entry of a new flow whose first packet is `packet`, and
/// the flag saying it is set (none for UDP or an unreadable header).
#[inline(always)]
pub fn first<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>) -> (u64, u16) {
    if packet.tuple.proto != protocol::TCP {
        return (0, 0);
    }
    match numbers::<I>(ctx, packet) {
        Some((_, _, end)) => (ct_seq::join(end, 0), ct_flags::SEQ_FORWARD),
        None => (0, 0),
    }
}

/// Follows a TCP packet of a tracked flow: returns `false` for a RST outside its sender's
/// sequence space (the caller drops it and keeps the flow's state); otherwise moves the
/// sender's sequence end forward when the packet extends it by less than a window.
/// `reply_key` is the flow's reply entry; `owner` the tuple that entry rewrites to.
#[inline(always)]
pub fn follow<I: Inet>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    reply_key: &Tuple<I::Addr>,
    owner: &Tuple<I::Addr>,
    side: Side,
) -> bool {
    follow_with::<I>(packet, reply_key, owner, side, || numbers::<I>(ctx, packet))
}

/// [`follow`] for any packet access: `numbers` reads the segment's sequence numbers (as
/// `numbers` does for TC), only when the flow's reply entry has something to judge by.
#[inline(always)]
pub fn follow_with<I: Inet>(
    packet: &Packet<I::Addr>,
    reply_key: &Tuple<I::Addr>,
    owner: &Tuple<I::Addr>,
    side: Side,
    numbers: impl FnOnce() -> Option<(u32, u32, u32)>,
) -> bool {
    if packet.tuple.proto != protocol::TCP {
        return true;
    }
    let Some((word, flags, unreplied)) = I::ct_seq(reply_key, owner) else {
        // No reply entry of this flow to judge by (it cannot happen for a flow this program
        // created): the packet is not judged.
        return true;
    };
    let Some((seq, ack, end)) = numbers() else {
        return packet.tcp_flags & TCP_RST == 0;
    };
    let (forward_end, reply_end) = ct_seq::split(word);
    let (mine, known) = match side {
        Side::Forward => (forward_end, flags & ct_flags::SEQ_FORWARD != 0),
        Side::Reply => (reply_end, flags & ct_flags::SEQ_REPLY != 0),
    };
    if packet.tcp_flags & TCP_RST != 0 {
        return if known {
            ct_seq::rst_in_window(seq, mine)
        } else if side == Side::Reply && flags & ct_flags::SEQ_FORWARD != 0 {
            // The backend has sent nothing yet: a RST refusing the SYN acknowledges exactly
            // what the client sent (RFC 9293 §3.10.7.1).
            packet.tcp_flags & TCP_ACK != 0 && ack == forward_end
        } else {
            // A flow tracked before sequence ends were kept: nothing to judge by.
            true
        };
    }
    let moves = !known || (ct_seq::after(end, mine) && ct_seq::rst_in_window(mine, end));
    if moves {
        let (word, bit) = match side {
            Side::Forward => (ct_seq::join(end, reply_end), ct_flags::SEQ_FORWARD),
            Side::Reply => (ct_seq::join(forward_end, end), ct_flags::SEQ_REPLY),
        };
        I::ct_set_seq(reply_key, word, flags | bit, unreplied);
    }
    true
}

/// Whether a client packet completes the handshake: it acknowledges exactly the backend's
/// SYN-ACK (whose sequence end the reply entry holds). A blind attacker cannot know it, so a
/// SYN flood cannot promote its flows (see `ct::promote`).
#[inline(always)]
pub fn acknowledges_reply<I: Inet>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    reply_key: &Tuple<I::Addr>,
    owner: &Tuple<I::Addr>,
) -> bool {
    if packet.tcp_flags & (TCP_ACK | TCP_SYN | TCP_RST) != TCP_ACK {
        return false;
    }
    let Some((word, flags, _)) = I::ct_seq(reply_key, owner) else {
        return false;
    };
    let Ok(ack) = ctx.load::<u32>(packet.l4 + 8) else {
        return false;
    };
    flags & ct_flags::SEQ_REPLY != 0 && u32::from_be(ack) == ct_seq::split(word).1
}
