//! kube-proxy's REJECT for a service without any usable endpoint: the client is answered at
//! once (TCP RST, ICMP port unreachable) instead of waiting for a timeout.
use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_skb_change_tail, programs::TcContext};
use proxy_common::{reason, reject_limit};

use super::{
    csum::Words,
    ct::{self, TCP_RST},
    fib,
    inet::{Inet, Packet, Parsed},
};
use crate::{maps::REJECT_BUCKET, metrics};

/// Answers a TCP segment to a service without endpoints with a RST, sent back where it came
/// from. (TCP and UDP refusals are separate BPF functions: each needs much of the stack.)
#[inline(never)]
pub fn refuse_tcp<I: Inet>(ctx: &TcContext) -> i32 {
    let written = match I::parse(ctx) {
        Ok(Parsed::Flow(packet)) => {
            if let Some(verdict) = withheld::<I>(ctx, &packet) {
                return verdict;
            }
            I::write_tcp_reset(ctx, &packet)
        }
        _ => Err(0),
    };
    bounce_or_drop(ctx, written)
}

/// Answers a UDP datagram to a service without endpoints with an ICMP port unreachable.
#[inline(never)]
pub fn refuse_udp<I: Inet>(ctx: &TcContext) -> i32 {
    let written = match I::parse(ctx) {
        Ok(Parsed::Flow(packet)) => {
            if let Some(verdict) = withheld::<I>(ctx, &packet) {
                return verdict;
            }
            I::write_port_unreachable(ctx, &packet)
        }
        _ => Err(0),
    };
    bounce_or_drop(ctx, written)
}

/// Whether the refusal must not be sent (the packet is then dropped): a RST is never
/// answered (two nodes would bounce RSTs at each other forever), nor is traffic to or from
/// a broadcast or multicast address (RFC 1122 §4.2.3.10, RFC 1812 §4.3.2.7); and each CPU
/// sends at most `reject_limit::BURST` refusals at once, `reject_limit::PER_SEC` a second.
#[inline(always)]
fn withheld<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>) -> Option<i32> {
    if packet.tcp_flags & TCP_RST != 0 || group_traffic::<I>(ctx, packet) {
        metrics::count(reason::TC_REJECT_SUPPRESSED);
        return Some(TC_ACT_SHOT);
    }
    if !take_token() {
        metrics::count(reason::TC_REJECT_RATE_LIMITED);
        return Some(TC_ACT_SHOT);
    }
    None
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// Takes a token from this CPU's bucket, refilled at `reject_limit::PER_SEC` tokens a
/// second up to `reject_limit::BURST`.
#[inline(always)]
pub fn take_token() -> bool {
    let Some(bucket) = REJECT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    let now = ct::now_ns();
    // SAFETY: the pointer comes from a successful per-CPU array lookup; only this CPU uses it
    // and no BPF program is preempted, so nothing else touches it until we return.
    let bucket = unsafe { &mut *bucket };
    let elapsed = now.saturating_sub(bucket.refilled_ns).min(NS_PER_SEC);
    let added = elapsed * reject_limit::PER_SEC / NS_PER_SEC;
    if added > 0 {
        bucket.tokens = (bucket.tokens + added).min(reject_limit::BURST);
        bucket.refilled_ns = if elapsed >= NS_PER_SEC {
            now
        } else {
            bucket.refilled_ns + added * NS_PER_SEC / reject_limit::PER_SEC
        };
    }
    if bucket.tokens == 0 {
        return false;
    }
    bucket.tokens -= 1;
    true
}

/// Whether the frame or either address is broadcast or multicast: never answered.
#[inline(always)]
pub fn group_traffic<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>) -> bool {
    let group_frame = ctx.load::<u8>(0).map_or(true, |first| first & 1 != 0);
    group_frame || I::is_group(&packet.tuple.saddr) || I::is_group(&packet.tuple.daddr)
}

#[inline(always)]
fn bounce_or_drop(ctx: &TcContext, written: Result<(), i64>) -> i32 {
    if written.is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    metrics::count(reason::TC_REJECTED);
    fib::bounce(ctx)
}

/// Swaps the Ethernet addresses so the frame goes back to the previous hop.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        swapped[i] = macs[i + 6];
        swapped[i + 6] = macs[i];
        i += 1;
    }
    ctx.store(0, &swapped, 0)
}

/// The sequence numbers of a RST answering a TCP segment (RFC 9293 §3.10.7.1): with an ACK
/// the RST takes its sequence number from it; otherwise it acknowledges the segment.
/// Returns (seq, ack, flags) in host order.
#[inline(always)]
pub fn reset_numbers(seq: u32, ack: u32, flags: u8, payload_len: u32) -> (u32, u32, u8) {
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    const SYN: u8 = 0x02;
    const FIN: u8 = 0x01;
    if flags & ACK != 0 {
        return (ack, 0, RST);
    }
    let consumed = payload_len + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
    (0, seq.wrapping_add(consumed), RST | ACK)
}

/// The TCP header of a RST answering `packet` (checksum still zero): ports swapped, numbers
/// per [`reset_numbers`], no options, window 0.
#[inline(always)]
pub fn reset_header<A>(
    ctx: &TcContext,
    packet: &Packet<A>,
    payload_len: u32,
) -> Result<Words<20>, i64> {
    let seq = u32::from_be(ctx.load::<u32>(packet.l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(packet.l4 + 8)?);
    let (seq, ack, flags) = reset_numbers(seq, ack, packet.tcp_flags, payload_len);
    let mut header = Words::<20>::zeroed();
    header.put(0, &packet.tuple.dport.to_ne_bytes());
    header.put(2, &packet.tuple.sport.to_ne_bytes());
    header.put(4, &seq.to_be_bytes());
    header.put(8, &ack.to_be_bytes());
    header.put(12, &[0x50, flags]);
    Ok(header)
}

/// The length of the TCP payload given the IP payload length (transport header included).
#[inline(always)]
pub fn tcp_payload_len<A>(
    ctx: &TcContext,
    packet: &Packet<A>,
    ip_payload: u32,
) -> Result<u32, i64> {
    let data_offset = u32::from(ctx.load::<u8>(packet.l4 + 12)? >> 4) * 4;
    Ok(ip_payload.saturating_sub(data_offset))
}

/// Grows or shrinks the frame to `len` bytes (new bytes are zero).
#[inline(always)]
pub fn resize(ctx: &TcContext, len: u32) -> Result<(), i64> {
    // SAFETY: `skb` is this program's context; the helper is valid for TC programs.
    let result = unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) };
    if result < 0 { Err(result) } else { Ok(()) }
}
