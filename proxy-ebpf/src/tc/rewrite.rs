//! In-place rewriting of addresses and ports with incremental checksum updates.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::protocol;

use super::inet::{Fragment, Inet, Packet, Tuple, addr_diff};

/// Where the transport checksum of a packet is and how to update it.
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub offset: usize,
    pub flags: u64,
}

/// The transport checksum of a TCP or UDP packet (UDP's may be zero: "no checksum").
#[inline(always)]
pub fn l4_csum<A>(packet: &Packet<A>) -> Option<L4Csum> {
    match packet.tuple.proto {
        protocol::TCP => Some(L4Csum {
            offset: packet.l4 + 16,
            flags: 0,
        }),
        protocol::UDP => Some(L4Csum {
            offset: packet.l4 + 6,
            flags: u64::from(BPF_F_MARK_MANGLED_0),
        }),
        _ => None,
    }
}

/// Replaces the address at `offset`, fixing the IP header checksum (`ip_csum`) and a
/// checksum covering it (`csum`, with `pseudo` when it covers it through a pseudo-header).
#[inline(always)]
pub fn replace_addr<I: Inet>(
    ctx: &TcContext,
    offset: usize,
    old: &I::Addr,
    new: &I::Addr,
    ip_csum: Option<usize>,
    csum: Option<L4Csum>,
    pseudo: bool,
) -> Result<(), i64> {
    let diff = addr_diff(old, new) as u64;
    if let Some(ip_csum) = ip_csum {
        ctx.l3_csum_replace(ip_csum, 0, diff, 0)?;
    }
    if let Some(csum) = csum {
        let pseudo = if pseudo {
            u64::from(BPF_F_PSEUDO_HDR)
        } else {
            0
        };
        ctx.l4_csum_replace(csum.offset, 0, diff, csum.flags | pseudo)?;
    }
    I::store_addr(ctx, offset, new)
}

/// Replaces the 16-bit port at `offset`, fixing the checksum that covers it.
#[inline(always)]
pub fn replace_port(
    ctx: &TcContext,
    offset: usize,
    old: u16,
    new: u16,
    csum: Option<L4Csum>,
) -> Result<(), i64> {
    if let Some(csum) = csum {
        ctx.l4_csum_replace(csum.offset, u64::from(old), u64::from(new), csum.flags | 2)?;
    }
    ctx.store(offset, &new, 0)
}

/// Rewrites a TCP/UDP packet from its tuple to `to` and decrements its TTL. A later fragment
/// has no transport header: only its addresses (and the IPv4 header checksum) change; the
/// datagram's transport checksum was fixed in its first fragment.
#[inline(always)]
pub fn rewrite<I: Inet>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    to: &Tuple<I::Addr>,
) -> Result<(), i64> {
    let from = &packet.tuple;
    let later = packet.fragment == Fragment::Later;
    let csum = if later { None } else { l4_csum(packet) };
    let ip_csum = I::ip_csum(packet.l3);
    if from.saddr != to.saddr {
        replace_addr::<I>(
            ctx,
            packet.l3 + I::SADDR,
            &from.saddr,
            &to.saddr,
            ip_csum,
            csum,
            true,
        )?;
    }
    if from.daddr != to.daddr {
        replace_addr::<I>(
            ctx,
            packet.l3 + I::DADDR,
            &from.daddr,
            &to.daddr,
            ip_csum,
            csum,
            true,
        )?;
    }
    if later {
        return I::decrement_ttl(ctx, packet.l3);
    }
    if from.sport != to.sport {
        replace_port(ctx, packet.l4, from.sport, to.sport, csum)?;
    }
    if from.dport != to.dport {
        replace_port(ctx, packet.l4 + 2, from.dport, to.dport, csum)?;
    }
    I::decrement_ttl(ctx, packet.l3)
}
