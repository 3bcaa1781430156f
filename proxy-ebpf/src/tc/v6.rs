//! IPv6 for the TC path. Extension headers are not walked: a packet whose next header is not
//! TCP, UDP or ICMPv6 directly is passed untouched; a Fragment header directly followed by
//! UDP is a UDP fragment (`tc::frag`), any other fragment is passed untouched.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "conntrack keys go to the map helpers by reference: passed by value they are copied onto a stack the TC stages have little of"
)]
use aya_ebpf::{bindings::bpf_fib_lookup, maps::lpm_trie::Key, programs::TcContext};
use proxy_common::{
    Backend6, Ct6Entry, Ct6Key, DatapathConfig, Frag6Key, FragPorts, Service6Key, SourceRange6,
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
    lb::V6,
    maps::{CT6_NEW_V1, CT6_V1, FRAG6_V1, SRC_RANGE6_V1},
};

const IPPROTO_ICMPV6: u8 = 58;
const NEXTHDR_FRAGMENT: u8 = 44;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;
const ICMPV6_PORT_UNREACH: u8 = 4;
const IP6_HLEN: usize = 40;
/// The Fragment header (RFC 8200 §4.5): next header, reserved, offset and M flag, identification.
const FRAG_HLEN: usize = 8;
const FRAG_OFFSET: u16 = 0xfff8;
const DEFAULT_HOP_LIMIT: u8 = 64;

type Addr = [u32; 4];

#[inline(always)]
fn addr_bytes(addr: &Addr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = addr[i].to_ne_bytes();
        bytes[i * 4] = word[0];
        bytes[i * 4 + 1] = word[1];
        bytes[i * 4 + 2] = word[2];
        bytes[i * 4 + 3] = word[3];
        i += 1;
    }
    bytes
}

#[inline(always)]
fn is_ipv6(ctx: &TcContext, l3: usize) -> Result<bool, i64> {
    let first: u8 = ctx.load(l3)?;
    Ok(first >> 4 == 6)
}

#[inline(always)]
fn ports(ctx: &TcContext, l4: usize) -> Result<(u16, u16), i64> {
    Ok((ctx.load(l4)?, ctx.load(l4 + 2)?))
}

/// The fragment map's key for the datagram whose Fragment header follows the header at `l3`.
#[inline(always)]
fn fragment_key(ctx: &TcContext, l3: usize, saddr: &Addr, daddr: &Addr) -> Result<Frag6Key, i64> {
    Ok(Frag6Key {
        saddr: *saddr,
        daddr: *daddr,
        id_be: ctx.load(l3 + IP6_HLEN + 4)?,
        protocol: protocol::UDP,
        pad: [0; 3],
    })
}

/// An IPv6 header from `src` to `dst`.
#[inline(always)]
fn ip_header(src: &Addr, dst: &Addr, next: u8, payload_len: u16) -> Words<40> {
    let mut header = Words::<40>::zeroed();
    header.put(0, &[0x60, 0, 0, 0]);
    header.put(4, &payload_len.to_be_bytes());
    header.put(6, &[next, DEFAULT_HOP_LIMIT]);
    header.put(8, &addr_bytes(src));
    header.put(24, &addr_bytes(dst));
    header
}

/// The checksum pseudo-header (RFC 8200 §8.1).
#[inline(always)]
fn pseudo_header(src: &Addr, dst: &Addr, next: u8, len: u32) -> Words<40> {
    let mut pseudo = Words::<40>::zeroed();
    pseudo.put(0, &addr_bytes(src));
    pseudo.put(16, &addr_bytes(dst));
    pseudo.put(32, &len.to_be_bytes());
    pseudo.put(36, &[0, 0, 0, next]);
    pseudo
}

impl Inet for V6 {
    type Addr = Addr;
    const AF: u8 = 10;
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    const ICMP_PSEUDO: bool = true;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Parsed<Addr>, i64> {
        let l3 = ETH_HLEN;
        if !is_ipv6(ctx, l3)? {
            return Ok(Parsed::Pass);
        }
        let mut next: u8 = ctx.load(l3 + 6)?;
        let saddr: Addr = ctx.load(l3 + Self::SADDR)?;
        let daddr: Addr = ctx.load(l3 + Self::DADDR)?;
        let mut l4 = l3 + IP6_HLEN;
        let mut fragment = Fragment::Whole;
        if next == NEXTHDR_FRAGMENT {
            let inner: u8 = ctx.load(l4)?;
            if inner != protocol::UDP {
                return Ok(Parsed::Fragment);
            }
            let offset = u16::from_be(ctx.load(l4 + 2)?) & FRAG_OFFSET;
            next = inner;
            l4 += FRAG_HLEN;
            if offset == 0 {
                fragment = Fragment::First;
            } else {
                let key = fragment_key(ctx, l3, &saddr, &daddr)?;
                // SAFETY: plain data, copied out at once.
                let Some(ports) = unsafe { FRAG6_V1.get(&key) }.copied() else {
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
                        proto: next,
                    },
                    tcp_flags: 0,
                    fragment: Fragment::Later,
                }));
            }
        }
        match next {
            protocol::TCP | protocol::UDP => {
                let (sport, dport) = ports(ctx, l4)?;
                let tcp_flags = if next == protocol::TCP {
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
                        proto: next,
                    },
                    tcp_flags,
                    fragment,
                }))
            }
            IPPROTO_ICMPV6 => {
                let kind: u8 = ctx.load(l4)?;
                if !matches!(
                    kind,
                    ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
                ) {
                    return Ok(Parsed::Pass);
                }
                let inner_l3 = l4 + 8;
                if !is_ipv6(ctx, inner_l3)? {
                    return Ok(Parsed::Pass);
                }
                let inner_next: u8 = ctx.load(inner_l3 + 6)?;
                if !matches!(inner_next, protocol::TCP | protocol::UDP) {
                    return Ok(Parsed::Pass);
                }
                let inner_l4 = inner_l3 + IP6_HLEN;
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
                            proto: next,
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
                        proto: inner_next,
                    },
                }))
            }
            _ => Ok(Parsed::Pass),
        }
    }

    #[inline(always)]
    fn store_addr(ctx: &TcContext, offset: usize, addr: &Addr) -> Result<(), i64> {
        ctx.store(offset, addr, 0)
    }

    #[inline(always)]
    fn ip_csum(_l3: usize) -> Option<usize> {
        None
    }

    #[inline(always)]
    fn decrement_ttl(ctx: &TcContext, l3: usize) -> Result<(), i64> {
        let hop_limit: u8 = ctx.load(l3 + 7)?;
        if hop_limit <= 1 {
            return Err(-1);
        }
        ctx.store(l3 + 7, &(hop_limit - 1), 0)
    }

    #[inline(always)]
    fn service_key(addr: Addr, port: u16, proto: u8, scope: u8) -> Service6Key {
        Service6Key {
            address: addr,
            port_be: port,
            backend_slot: 0,
            protocol: proto,
            scope,
            pad: [0; 2],
        }
    }

    #[inline(always)]
    fn backend_target(backend: &Backend6) -> (Addr, u16) {
        (backend.address, backend.port_be)
    }

    #[inline(always)]
    fn ct_get(key: &Tuple<Addr>) -> Option<Flow<Addr>> {
        let key_ = ct_key(key);
        // SAFETY: plain data, copied out at once.
        let (entry, unreplied) = match unsafe { CT6_V1.get(&key_) } {
            Some(entry) => (*entry, false),
            // SAFETY: as above.
            None => (*unsafe { CT6_NEW_V1.get(&key_) }?, true),
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
    fn ct_put(key: &Tuple<Addr>, flow: &Flow<Addr>, flags: u64) -> Result<(), i64> {
        let entry = Ct6Entry {
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
        let map = if flow.unreplied { &CT6_NEW_V1 } else { &CT6_V1 };
        map.insert(&ct_key(key), &entry, flags).map_err(i64::from)
    }

    #[inline(always)]
    fn ct_delete(key: &Tuple<Addr>) {
        // A missing entry is fine: someone else removed it first.
        let key = ct_key(key);
        let _ = CT6_V1.remove(&key);
        let _ = CT6_NEW_V1.remove(&key);
    }

    #[inline(always)]
    fn ct_delete_in(key: &Tuple<Addr>, unreplied: bool) {
        let map = if unreplied { &CT6_NEW_V1 } else { &CT6_V1 };
        let _ = map.remove(&ct_key(key));
    }

    #[inline(always)]
    fn ct_touch(key: &Tuple<Addr>, expires_ns: u64, flags: u16, unreplied: bool) {
        let map = if unreplied { &CT6_NEW_V1 } else { &CT6_V1 };
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
    fn ct_owner(key: &Tuple<Addr>, now: u64) -> Owner {
        let reply_key = ct_key(key);
        let Some(reply) = CT6_V1
            .get_ptr(&reply_key)
            .or_else(|| CT6_NEW_V1.get_ptr(&reply_key))
        else {
            return Owner::Free;
        };
        // SAFETY: the pointer comes from a successful lookup and points at a map value; the
        // fields are read one by one (a racing writer stores whole field values).
        let (flags, forward_key) = unsafe {
            (
                (*reply).flags,
                Ct6Key {
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
        let Some(forward) = CT6_V1
            .get_ptr(&forward_key)
            .or_else(|| CT6_NEW_V1.get_ptr(&forward_key))
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
    fn ct_seq(key: &Tuple<Addr>, owner: &Tuple<Addr>) -> Option<(u64, u16, bool)> {
        let entry = Self::ct_get(key)?;
        let owned = entry.flags & ct_flags::REPLY != 0 && entry.to == *owner;
        owned.then_some((entry.expires_ns, entry.flags, entry.unreplied))
    }

    #[inline(always)]
    fn ct_set_seq(key: &Tuple<Addr>, word: u64, flags: u16, unreplied: bool) {
        Self::ct_touch(key, word, flags, unreplied);
    }

    #[inline(always)]
    fn l4_len(ctx: &TcContext, packet: &Packet<Addr>) -> Result<u32, i64> {
        let payload: u16 = ctx.load(packet.l3 + 4)?;
        Ok(u32::from(u16::from_be(payload)))
    }

    #[inline(always)]
    fn ip_len(ctx: &TcContext) -> Result<u16, i64> {
        let payload = u16::from_be(ctx.load(ETH_HLEN + 4)?);
        Ok(payload.saturating_add(IP6_HLEN as u16))
    }

    #[inline(always)]
    fn headers_len(ctx: &TcContext) -> Result<u16, i64> {
        let next: u8 = ctx.load(ETH_HLEN + 6)?;
        let l4 = ETH_HLEN + IP6_HLEN;
        Ok((IP6_HLEN + transport_header_len(ctx, next, l4)?) as u16)
    }

    #[inline(always)]
    fn dont_fragment(_ctx: &TcContext, _l3: usize) -> Result<bool, i64> {
        Ok(true)
    }

    #[inline(always)]
    fn fragment_seen(ctx: &TcContext, packet: &Packet<Addr>) {
        let tuple = &packet.tuple;
        let Ok(key) = fragment_key(ctx, packet.l3, &tuple.saddr, &tuple.daddr) else {
            return;
        };
        let ports = FragPorts {
            sport_be: tuple.sport,
            dport_be: tuple.dport,
        };
        // As for IPv4: a failed write only costs this datagram's later fragments.
        let _ = FRAG6_V1.insert(&key, &ports, 0);
    }

    #[inline(always)]
    fn is_group(addr: &Addr) -> bool {
        // ff00::/8 (multicast; IPv6 has no broadcast) and :: (unspecified).
        u32::from_be(addr[0]) >> 24 == 0xff || (addr[0] | addr[1] | addr[2] | addr[3]) == 0
    }

    #[inline(always)]
    fn in_cluster_cidr(addr: &Addr, config: &DatapathConfig) -> bool {
        if config.flags & config_flags::CLUSTER_CIDR6 == 0 {
            return false;
        }
        let prefix = u32::from(config.cluster_prefix6.min(128));
        let mut i = 0;
        while i < 4 {
            let bits = prefix.saturating_sub(i as u32 * 32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            if (u32::from_be(addr[i]) ^ u32::from_be(config.cluster_cidr6[i])) & mask != 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    #[inline(always)]
    fn has_cluster_cidr(config: &DatapathConfig) -> bool {
        config.flags & config_flags::CLUSTER_CIDR6 != 0
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, addr: &Addr) -> bool {
        let key = Key::new(
            32 + 128,
            SourceRange6 {
                rev_nat_id_be: rev_nat_id.to_be(),
                address: *addr,
            },
        );
        SRC_RANGE6_V1.get(&key).is_some()
    }

    #[inline(always)]
    fn flow_hash(tuple: &Tuple<Addr>, seed: u32) -> u32 {
        proxy_common::maglev::flow_hash6(
            seed,
            &tuple.saddr,
            &tuple.daddr,
            tuple.sport,
            tuple.dport,
            tuple.proto,
        )
    }

    #[inline(always)]
    fn client_cookie(addr: &Addr) -> u64 {
        let high = (u64::from(addr[0]) << 32) | u64::from(addr[1]);
        let low = (u64::from(addr[2]) << 32) | u64::from(addr[3]);
        (1 << 62) ^ high ^ low.rotate_left(17)
    }

    #[inline(always)]
    fn fib_params(params: &mut bpf_fib_lookup, src: &Addr, dst: &Addr) {
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }

    #[inline(always)]
    fn fib_src(params: &bpf_fib_lookup) -> Addr {
        // SAFETY: the IPv6 member of the union is the one an AF_INET6 lookup fills.
        unsafe { params.__bindgen_anon_3.ipv6_src }
    }

    #[inline(always)]
    fn fib_dst(params: &bpf_fib_lookup) -> Addr {
        // SAFETY: as above.
        unsafe { params.__bindgen_anon_4.ipv6_dst }
    }

    #[inline(always)]
    fn write_tcp_reset(ctx: &TcContext, packet: &Packet<Addr>) -> Result<(), i64> {
        let payload: u16 = ctx.load(packet.l3 + 4)?;
        let payload_len = tcp_payload_len(ctx, packet, u32::from(u16::from_be(payload)))?;
        let mut tcp = reset_header(ctx, packet, payload_len)?;
        let (client, frontend) = (&packet.tuple.saddr, &packet.tuple.daddr);
        let ip = ip_header(frontend, client, protocol::TCP, 20);
        let mut pseudo = pseudo_header(frontend, client, protocol::TCP, 20);
        let csum = fold(tcp.sum(pseudo.sum(0)?)?);
        tcp.put(16, &csum.to_ne_bytes());
        swap_macs(ctx)?;
        resize(ctx, (ETH_HLEN + IP6_HLEN + 20) as u32)?;
        ctx.store(ETH_HLEN, &ip.0, 0)?;
        ctx.store(ETH_HLEN + IP6_HLEN, &tcp.0, 0)
    }

    #[inline(always)]
    fn write_port_unreachable(ctx: &TcContext, packet: &Packet<Addr>) -> Result<(), i64> {
        write_error(ctx, packet, [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH], 0)
    }

    #[inline(always)]
    fn write_too_big(ctx: &TcContext, packet: &Packet<Addr>, mtu: u16) -> Result<(), i64> {
        // RFC 4443 §3.2: the MTU of the next-hop link in the second word.
        write_error(ctx, packet, [ICMPV6_PKT_TOOBIG, 0], u32::from(mtu))
    }
}

/// Builds an ICMPv6 error of `kind` (type and code) with `word` as its second word answering
/// the packet, in place.
#[inline(always)]
fn write_error(
    ctx: &TcContext,
    packet: &Packet<Addr>,
    kind: [u8; 2],
    word: u32,
) -> Result<(), i64> {
    let mut icmp = Words::<56>::zeroed();
    icmp.put(0, &kind);
    icmp.put(4, &word.to_be_bytes());
    // The quote: the original IPv6 header and the first 8 bytes of its payload.
    icmp.load::<8, 48>(ctx, packet.l3)?;
    let (client, frontend) = (&packet.tuple.saddr, &packet.tuple.daddr);
    let mut pseudo = pseudo_header(frontend, client, IPPROTO_ICMPV6, 56);
    let csum = fold(icmp.sum(pseudo.sum(0)?)?);
    icmp.put(2, &csum.to_ne_bytes());
    let ip = ip_header(frontend, client, IPPROTO_ICMPV6, 56);
    swap_macs(ctx)?;
    resize(ctx, (ETH_HLEN + IP6_HLEN + 56) as u32)?;
    ctx.store(ETH_HLEN, &ip.0, 0)?;
    ctx.store(ETH_HLEN + IP6_HLEN, &icmp.0, 0)
}

#[inline(always)]
fn ct_key(tuple: &Tuple<Addr>) -> Ct6Key {
    Ct6Key {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport_be: tuple.sport,
        dport_be: tuple.dport,
        protocol: tuple.proto,
        pad: [0; 3],
    }
}
