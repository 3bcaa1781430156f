//! IPv4 for the TC path.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "conntrack keys go to the map helpers by reference: passed by value they are copied onto a stack the TC stages have little of"
)]
use aya_ebpf::{bindings::bpf_fib_lookup, maps::lpm_trie::Key, programs::TcContext};
use proxy_common::{
    Backend4, Ct4Entry, Ct4Key, DatapathConfig, Frag4Key, FragPorts, Service4Key, SourceRange4,
    config_flags, ct_flags, protocol,
};

use super::{
    csum::{Words, fold},
    ct,
    inet::{
        ETH_HLEN, Flow, Fragment, IcmpError, Inet, Owner, Packet, Parsed, Tuple,
        transport_header_len,
    },
    reject::{reset_header, resize, swap_macs, tcp_payload_len},
};
use crate::{
    lb::V4,
    maps::{CT4_NEW_V1, CT4_V1, FRAG4_V1, SRC_RANGE4_V1},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Flags and fragment offset: Don't Fragment, More Fragments, the offset's bits.
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const IP_HLEN: usize = 20;
const DEFAULT_TTL: u8 = 64;

/// Version/IHL check: the header length, or `None` if this is not a usable IPv4 header.
#[inline(always)]
fn header_len(ctx: &TcContext, l3: usize) -> Result<Option<usize>, i64> {
    let version_ihl: u8 = ctx.load(l3)?;
    let len = usize::from(version_ihl & 0x0f) * 4;
    Ok((version_ihl >> 4 == 4 && len >= IP_HLEN).then_some(len))
}

/// The header's flags and fragment offset word, host order.
#[inline(always)]
fn fragment_word(ctx: &TcContext, l3: usize) -> Result<u16, i64> {
    Ok(u16::from_be(ctx.load(l3 + 6)?))
}

/// Whether the header at `l3` is a fragment (MF set or a non-zero offset).
#[inline(always)]
fn is_fragment(ctx: &TcContext, l3: usize) -> Result<bool, i64> {
    Ok(fragment_word(ctx, l3)? & (IP_MF | IP_OFFSET) != 0)
}

/// The fragment map's key for the datagram of the header at `l3`.
#[inline(always)]
fn fragment_key(ctx: &TcContext, l3: usize, saddr: u32, daddr: u32) -> Result<Frag4Key, i64> {
    Ok(Frag4Key {
        saddr,
        daddr,
        id_be: ctx.load(l3 + 4)?,
        protocol: protocol::UDP,
        pad: 0,
    })
}

#[inline(always)]
fn ports(ctx: &TcContext, l4: usize) -> Result<(u16, u16), i64> {
    Ok((ctx.load(l4)?, ctx.load(l4 + 2)?))
}

/// A 20-byte IPv4 header (no options) from `src` to `dst` with its checksum.
#[inline(always)]
fn ip_header(src: u32, dst: u32, proto: u8, total_len: u16) -> Result<Words<20>, i64> {
    let mut header = Words::<20>::zeroed();
    header.put(0, &[0x45, 0]);
    header.put(2, &total_len.to_be_bytes());
    header.put(6, &[0x40, 0]);
    header.put(8, &[DEFAULT_TTL, proto]);
    header.put(12, &src.to_ne_bytes());
    header.put(16, &dst.to_ne_bytes());
    let csum = fold(header.sum(0)?);
    header.put(10, &csum.to_ne_bytes());
    Ok(header)
}

impl Inet for V4 {
    type Addr = u32;
    const AF: u8 = 2;
    const SADDR: usize = 12;
    const DADDR: usize = 16;
    const ICMP_PSEUDO: bool = false;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Parsed<u32>, i64> {
        let l3 = ETH_HLEN;
        let Some(ihl) = header_len(ctx, l3)? else {
            return Ok(Parsed::Pass);
        };
        let proto: u8 = ctx.load(l3 + 9)?;
        let saddr: u32 = ctx.load(l3 + Self::SADDR)?;
        let daddr: u32 = ctx.load(l3 + Self::DADDR)?;
        let l4 = l3 + ihl;
        let frag = fragment_word(ctx, l3)?;
        let mut fragment = Fragment::Whole;
        if frag & (IP_MF | IP_OFFSET) != 0 {
            if proto != protocol::UDP {
                return Ok(Parsed::Fragment);
            }
            if frag & IP_OFFSET == 0 {
                fragment = Fragment::First;
            } else {
                let key = fragment_key(ctx, l3, saddr, daddr)?;
                // SAFETY: plain data, copied out at once.
                let Some(ports) = unsafe { FRAG4_V1.get(&key) }.copied() else {
                    return Ok(Parsed::UntrackedFragment);
                };
                return Ok(Parsed::Flow(Packet {
                    l3,
                    l4,
                    tuple: Tuple {
                        saddr,
                        daddr,
                        sport: ports.sport_be,
                        dport: ports.dport_be,
                        proto,
                    },
                    tcp_flags: 0,
                    fragment: Fragment::Later,
                }));
            }
        }
        match proto {
            protocol::TCP | protocol::UDP => {
                let (sport, dport) = ports(ctx, l4)?;
                let tcp_flags = if proto == protocol::TCP {
                    ctx.load(l4 + 13)?
                } else {
                    0
                };
                Ok(Parsed::Flow(Packet {
                    l3,
                    l4,
                    tuple: Tuple {
                        saddr,
                        daddr,
                        sport,
                        dport,
                        proto,
                    },
                    tcp_flags,
                    fragment,
                }))
            }
            IPPROTO_ICMP => {
                let kind: u8 = ctx.load(l4)?;
                if !matches!(
                    kind,
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
                ) {
                    return Ok(Parsed::Pass);
                }
                let inner_l3 = l4 + 8;
                let Some(inner_ihl) = header_len(ctx, inner_l3)? else {
                    return Ok(Parsed::Pass);
                };
                let inner_proto: u8 = ctx.load(inner_l3 + 9)?;
                if !matches!(inner_proto, protocol::TCP | protocol::UDP)
                    || is_fragment(ctx, inner_l3)?
                {
                    return Ok(Parsed::Pass);
                }
                let inner_l4 = inner_l3 + inner_ihl;
                let (sport, dport) = ports(ctx, inner_l4)?;
                Ok(Parsed::IcmpError(IcmpError {
                    outer: Packet {
                        l3,
                        l4,
                        tuple: Tuple {
                            saddr,
                            daddr,
                            sport: 0,
                            dport: 0,
                            proto,
                        },
                        tcp_flags: 0,
                        fragment,
                    },
                    inner_l3,
                    inner_l4,
                    inner: Tuple {
                        saddr: ctx.load(inner_l3 + Self::SADDR)?,
                        daddr: ctx.load(inner_l3 + Self::DADDR)?,
                        sport,
                        dport,
                        proto: inner_proto,
                    },
                }))
            }
            _ => Ok(Parsed::Pass),
        }
    }

    #[inline(always)]
    fn store_addr(ctx: &TcContext, offset: usize, addr: &u32) -> Result<(), i64> {
        ctx.store(offset, addr, 0)
    }

    #[inline(always)]
    fn ip_csum(l3: usize) -> Option<usize> {
        Some(l3 + 10)
    }

    #[inline(always)]
    fn decrement_ttl(ctx: &TcContext, l3: usize) -> Result<(), i64> {
        let [ttl, proto]: [u8; 2] = ctx.load(l3 + 8)?;
        if ttl <= 1 {
            return Err(-1);
        }
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), 2)?;
        ctx.store(l3 + 8, &(ttl - 1), 0)
    }

    #[inline(always)]
    fn service_key(addr: u32, port: u16, proto: u8, scope: u8) -> Service4Key {
        Service4Key {
            address: addr,
            port_be: port,
            backend_slot: 0,
            protocol: proto,
            scope,
            pad: [0; 2],
        }
    }

    #[inline(always)]
    fn backend_target(backend: &Backend4) -> (u32, u16) {
        (backend.address, backend.port_be)
    }

    #[inline(always)]
    fn ct_get(key: &Tuple<u32>) -> Option<Flow<u32>> {
        let key_ = ct_key(key);
        // SAFETY: plain data, copied out at once.
        let (entry, unreplied) = match unsafe { CT4_V1.get(&key_) } {
            Some(entry) => (*entry, false),
            // SAFETY: as above.
            None => (*unsafe { CT4_NEW_V1.get(&key_) }?, true),
        };
        Some(Flow {
            to: Tuple {
                saddr: entry.saddr,
                daddr: entry.daddr,
                sport: entry.sport_be,
                dport: entry.dport_be,
                proto: key.proto,
            },
            expires_ns: entry.expires_ns,
            rev_nat_id: entry.rev_nat_id,
            backend_id: entry.backend_id,
            flags: entry.flags,
            unreplied,
        })
    }

    #[inline(always)]
    fn ct_put(key: &Tuple<u32>, flow: &Flow<u32>, flags: u64) -> Result<(), i64> {
        let entry = Ct4Entry {
            expires_ns: flow.expires_ns,
            saddr: flow.to.saddr,
            daddr: flow.to.daddr,
            sport_be: flow.to.sport,
            dport_be: flow.to.dport,
            rev_nat_id: flow.rev_nat_id,
            backend_id: flow.backend_id,
            flags: flow.flags,
            pad: 0,
        };
        let map = if flow.unreplied { &CT4_NEW_V1 } else { &CT4_V1 };
        map.insert(&ct_key(key), &entry, flags).map_err(i64::from)
    }

    #[inline(always)]
    fn ct_delete(key: &Tuple<u32>) {
        // A missing entry is fine: someone else removed it first.
        let key = ct_key(key);
        let _ = CT4_V1.remove(&key);
        let _ = CT4_NEW_V1.remove(&key);
    }

    #[inline(always)]
    fn ct_delete_in(key: &Tuple<u32>, unreplied: bool) {
        let map = if unreplied { &CT4_NEW_V1 } else { &CT4_V1 };
        let _ = map.remove(&ct_key(key));
    }

    #[inline(always)]
    fn ct_touch(key: &Tuple<u32>, expires_ns: u64, flags: u16, unreplied: bool) {
        let map = if unreplied { &CT4_NEW_V1 } else { &CT4_V1 };
        if let Some(entry) = map.get_ptr_mut(&ct_key(key)) {
            // SAFETY: the pointer comes from a successful lookup and points at a map value;
            // racing writers only ever store whole, valid field values.
            unsafe {
                (*entry).expires_ns = expires_ns;
                (*entry).flags = flags;
            }
        }
    }

    #[inline(always)]
    fn ct_owner(key: &Tuple<u32>, now: u64) -> Owner {
        let reply_key = ct_key(key);
        let Some(reply) = CT4_V1
            .get_ptr(&reply_key)
            .or_else(|| CT4_NEW_V1.get_ptr(&reply_key))
        else {
            return Owner::Free;
        };
        // SAFETY: the pointer comes from a successful lookup and points at a map value; the
        // fields are read one by one (a racing writer stores whole field values).
        let (flags, forward_key) = unsafe {
            (
                (*reply).flags,
                Ct4Key {
                    saddr: (*reply).daddr,
                    daddr: (*reply).saddr,
                    sport_be: (*reply).dport_be,
                    dport_be: (*reply).sport_be,
                    protocol: key.proto,
                    pad: [0; 3],
                },
            )
        };
        if flags & ct_flags::REPLY == 0 {
            return Owner::Live;
        }
        let Some(forward) = CT4_V1
            .get_ptr(&forward_key)
            .or_else(|| CT4_NEW_V1.get_ptr(&forward_key))
        else {
            return Owner::Ended;
        };
        // SAFETY: as above.
        let (flags, expires_ns, points_back) = unsafe {
            (
                (*forward).flags,
                (*forward).expires_ns,
                (*forward).saddr == key.daddr
                    && (*forward).daddr == key.saddr
                    && (*forward).sport_be == key.dport
                    && (*forward).dport_be == key.sport,
            )
        };
        let alive = flags & ct_flags::REPLY == 0 && expires_ns > now && points_back;
        if alive && !(key.proto == protocol::TCP && ct::closed(flags)) {
            Owner::Live
        } else {
            Owner::Ended
        }
    }

    #[inline(always)]
    fn ct_seq(key: &Tuple<u32>, owner: &Tuple<u32>) -> Option<(u64, u16, bool)> {
        let entry = Self::ct_get(key)?;
        let owned = entry.flags & ct_flags::REPLY != 0 && entry.to == *owner;
        owned.then_some((entry.expires_ns, entry.flags, entry.unreplied))
    }

    #[inline(always)]
    fn ct_set_seq(key: &Tuple<u32>, word: u64, flags: u16, unreplied: bool) {
        Self::ct_touch(key, word, flags, unreplied);
    }

    #[inline(always)]
    fn l4_len(ctx: &TcContext, packet: &Packet<u32>) -> Result<u32, i64> {
        let total: u16 = ctx.load(packet.l3 + 2)?;
        Ok(u32::from(u16::from_be(total)).saturating_sub((packet.l4 - packet.l3) as u32))
    }

    #[inline(always)]
    fn ip_len(ctx: &TcContext) -> Result<u16, i64> {
        Ok(u16::from_be(ctx.load(ETH_HLEN + 2)?))
    }

    #[inline(always)]
    fn headers_len(ctx: &TcContext) -> Result<u16, i64> {
        let Some(ihl) = header_len(ctx, ETH_HLEN)? else {
            return Err(-1);
        };
        let proto: u8 = ctx.load(ETH_HLEN + 9)?;
        Ok((ihl + transport_header_len(ctx, proto, ETH_HLEN + ihl)?) as u16)
    }

    #[inline(always)]
    fn dont_fragment(ctx: &TcContext, l3: usize) -> Result<bool, i64> {
        Ok(fragment_word(ctx, l3)? & IP_DF != 0)
    }

    #[inline(always)]
    fn fragment_seen(ctx: &TcContext, packet: &Packet<u32>) {
        let tuple = &packet.tuple;
        let Ok(key) = fragment_key(ctx, packet.l3, tuple.saddr, tuple.daddr) else {
            return;
        };
        let ports = FragPorts {
            sport_be: tuple.sport,
            dport_be: tuple.dport,
        };
        // A full map evicts its oldest datagram; a failed write only costs the later
        // fragments of this one (counted when they are dropped).
        let _ = FRAG4_V1.insert(&key, &ports, 0);
    }

    #[inline(always)]
    fn is_group(addr: &u32) -> bool {
        let host = u32::from_be(*addr);
        // 0.0.0.0, 224.0.0.0/4 (multicast), 240.0.0.0/4 and 255.255.255.255 (broadcast).
        host == 0 || host >> 28 >= 0xe
    }

    #[inline(always)]
    fn in_cluster_cidr(addr: &u32, config: &DatapathConfig) -> bool {
        if config.flags & config_flags::CLUSTER_CIDR4 == 0 {
            return false;
        }
        let prefix = u32::from(config.cluster_prefix4.min(32));
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        (u32::from_be(*addr) ^ u32::from_be(config.cluster_cidr4)) & mask == 0
    }

    #[inline(always)]
    fn has_cluster_cidr(config: &DatapathConfig) -> bool {
        config.flags & config_flags::CLUSTER_CIDR4 != 0
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, addr: &u32) -> bool {
        let key = Key::new(
            64,
            SourceRange4 {
                rev_nat_id_be: rev_nat_id.to_be(),
                address: *addr,
            },
        );
        SRC_RANGE4_V1.get(&key).is_some()
    }

    #[inline(always)]
    fn flow_hash(tuple: &Tuple<u32>, seed: u32) -> u32 {
        proxy_common::maglev::flow_hash4(
            seed,
            tuple.saddr,
            tuple.daddr,
            tuple.sport,
            tuple.dport,
            tuple.proto,
        )
    }

    #[inline(always)]
    fn client_cookie(addr: &u32) -> u64 {
        (1 << 63) | u64::from(u32::from_be(*addr))
    }

    #[inline(always)]
    fn fib_params(params: &mut bpf_fib_lookup, src: &u32, dst: &u32) {
        params.__bindgen_anon_3.ipv4_src = *src;
        params.__bindgen_anon_4.ipv4_dst = *dst;
    }

    #[inline(always)]
    fn fib_src(params: &bpf_fib_lookup) -> u32 {
        // SAFETY: the IPv4 member of the union is the one an AF_INET lookup fills.
        unsafe { params.__bindgen_anon_3.ipv4_src }
    }

    #[inline(always)]
    fn fib_dst(params: &bpf_fib_lookup) -> u32 {
        // SAFETY: as above.
        unsafe { params.__bindgen_anon_4.ipv4_dst }
    }

    #[inline(always)]
    fn write_tcp_reset(ctx: &TcContext, packet: &Packet<u32>) -> Result<(), i64> {
        let total: u16 = ctx.load(packet.l3 + 2)?;
        let ip_payload =
            u32::from(u16::from_be(total)).saturating_sub((packet.l4 - packet.l3) as u32);
        let payload_len = tcp_payload_len(ctx, packet, ip_payload)?;
        let mut tcp = reset_header(ctx, packet, payload_len)?;
        let (client, frontend) = (packet.tuple.saddr, packet.tuple.daddr);
        let ip = ip_header(frontend, client, protocol::TCP, (IP_HLEN + 20) as u16)?;
        let mut pseudo = Words::<12>::zeroed();
        pseudo.put(0, &frontend.to_ne_bytes());
        pseudo.put(4, &client.to_ne_bytes());
        pseudo.put(8, &[0, protocol::TCP, 0, 20]);
        let csum = fold(tcp.sum(pseudo.sum(0)?)?);
        tcp.put(16, &csum.to_ne_bytes());
        swap_macs(ctx)?;
        resize(ctx, (ETH_HLEN + IP_HLEN + 20) as u32)?;
        ctx.store(ETH_HLEN, &ip.0, 0)?;
        ctx.store(ETH_HLEN + IP_HLEN, &tcp.0, 0)
    }

    #[inline(always)]
    fn write_port_unreachable(ctx: &TcContext, packet: &Packet<u32>) -> Result<(), i64> {
        write_unreachable(ctx, packet, ICMP_PORT_UNREACH, [0; 4])
    }

    #[inline(always)]
    fn write_too_big(ctx: &TcContext, packet: &Packet<u32>, mtu: u16) -> Result<(), i64> {
        // RFC 1191 §4: the next-hop MTU in the low 16 bits of the second word.
        let [high, low] = mtu.to_be_bytes();
        write_unreachable(ctx, packet, ICMP_FRAG_NEEDED, [0, 0, high, low])
    }
}

/// Builds an ICMP destination unreachable with `code` answering the packet, in place: the
/// original IP header and the first 8 bytes of its payload quoted.
#[inline(always)]
fn write_unreachable(
    ctx: &TcContext,
    packet: &Packet<u32>,
    code: u8,
    rest: [u8; 4],
) -> Result<(), i64> {
    if packet.l4 - packet.l3 != IP_HLEN {
        // Quoting a header with options would need a variable-length copy.
        return Err(-1);
    }
    let mut icmp = Words::<36>::zeroed();
    icmp.put(0, &[ICMP_DEST_UNREACH, code]);
    icmp.put(4, &rest);
    // The quote: the original IP header and the first 8 bytes of its payload.
    icmp.load::<8, 28>(ctx, packet.l3)?;
    let csum = fold(icmp.sum(0)?);
    icmp.put(2, &csum.to_ne_bytes());
    let (client, frontend) = (packet.tuple.saddr, packet.tuple.daddr);
    let ip = ip_header(frontend, client, IPPROTO_ICMP, (IP_HLEN + 36) as u16)?;
    swap_macs(ctx)?;
    resize(ctx, (ETH_HLEN + IP_HLEN + 36) as u32)?;
    ctx.store(ETH_HLEN, &ip.0, 0)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp.0, 0)
}

#[inline(always)]
fn ct_key(tuple: &Tuple<u32>) -> Ct4Key {
    Ct4Key {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport_be: tuple.sport,
        dport_be: tuple.dport,
        protocol: tuple.proto,
        pad: [0; 3],
    }
}
