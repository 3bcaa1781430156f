//! Direct Server Return. The ingress node does not masquerade a DSR flow to a remote
//! endpoint: it rewrites the destination to the endpoint, keeps the client's address and
//! inserts the frontend (address and port) into the packet, as an IPv4 option (8 bytes) or
//! an IPv6 destination options header (24 bytes), with `bpf_skb_adjust_room` (no tunnel
//! device). It keeps only the forward entry: it never sees a reply.
//!
//! The endpoint's node recognises the option on arrival, checks that it names a frontend
//! it serves itself, records the reverse translation (pod → client tuple ⇒ frontend) in a
//! pinned LRU (so it outlives the agent), removes the option and lets the stack deliver the
//! packet. The pod's reply, entering the node from the pod's host veth, finds that entry
//! and leaves with the frontend as its source, straight to the client.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go to the helpers by reference: passed by value they are copied onto a stack the TC stages have little of"
)]
use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use proxy_common::{
    Ct4Key, Ct6Key, DatapathConfig, Dsr4Entry, Dsr6Entry, config_flags, ct_flags, ct_lifetime,
    dsr_option, protocol, reason, scope, service_flags,
};

use super::{
    DROP, PASS, Step,
    csum::Words,
    ct, fib,
    inet::{ETH_HLEN, Flow, Fragment, Inet, Packet, Tuple},
    parse_flow, pending, refused, rewrite,
};
use crate::{
    lb::{self, V4, V6},
    maps::{DSR_REV4_V1, DSR_REV6_V1},
    metrics,
};

/// `BPF_ADJ_ROOM_NET`: room is added or removed right after the fixed IP header.
const ADJ_ROOM_NET: u32 = 0;
const NS_PER_SEC: u64 = 1_000_000_000;

/// The frontend an option names.
#[derive(Clone, Copy)]
pub struct Frontend<A> {
    pub addr: A,
    pub port: u16,
}

/// What arrived with a frontend option: the frontend, the transport protocol and where the
/// transport header is once the option is gone (`None`: a fragment without ports).
#[derive(Clone, Copy)]
pub struct Arrival<A> {
    frontend: Frontend<A>,
    proto: u8,
    client: A,
    pod: A,
    has_ports: bool,
}

/// One family's encoding and reverse map.
pub trait Encoding: Inet {
    /// The bytes the encoding adds.
    const ROOM: u16;
    /// The unspecified address (a route lookup that picks the source).
    const UNSPECIFIED: Self::Addr;
    /// The ports of a packet that still carries the option (source, destination).
    fn ports_past_option(ctx: &TcContext) -> Result<(u16, u16), i64>;
    /// Whether the packet can carry the option (an IPv4 header without options).
    fn encodable(packet: &Packet<Self::Addr>) -> bool;
    /// Inserts the option after the fixed IP header (the packet's header is already
    /// rewritten to the endpoint).
    fn insert(ctx: &TcContext, frontend: &Frontend<Self::Addr>) -> Result<(), i64>;
    /// Cheap check on every packet: does it carry an option of ours?
    fn carries_option(ctx: &TcContext) -> bool;
    /// Reads the option (and the packet's addresses) without changing the packet.
    fn arrival(ctx: &TcContext) -> Result<Arrival<Self::Addr>, i64>;
    /// Removes the option, restoring the header as the client sent it (after DNAT).
    fn strip(ctx: &TcContext) -> Result<(), i64>;
    fn reverse_get(key: &Tuple<Self::Addr>) -> Option<(Frontend<Self::Addr>, u64)>;
    fn reverse_put(key: &Tuple<Self::Addr>, frontend: &Frontend<Self::Addr>, expires_ns: u64);
}

/// Whether a new flow of this frontend to a remote endpoint uses Direct Server Return: the
/// Service's annotation decides, else `--lb-mode` for the protocol.
#[inline(always)]
pub fn wanted(service_flags: u16, proto: u8, config: &DatapathConfig) -> bool {
    if service_flags & service_flags::FORWARD_SNAT != 0 {
        return false;
    }
    if service_flags & service_flags::FORWARD_DSR != 0 {
        return true;
    }
    match proto {
        protocol::TCP => config.flags & config_flags::DSR_TCP != 0,
        protocol::UDP => config.flags & config_flags::DSR_UDP != 0,
        _ => false,
    }
}

// ------------------------------------------------------------------------------------------
// Ingress node

/// A packet of a tracked DSR flow (its forward entry given): updates the flow's state and
/// says which stage sends it. The flow counts as established at the client's first packet
/// after its opening one (a TCP client acknowledges only a SYN-ACK it received; a UDP
/// client keeps talking), and then moves to the main conntrack map.
#[inline(always)]
pub fn track<I: Inet>(packet: &Packet<I::Addr>, entry: &Flow<I::Addr>, now: u64) -> Step {
    let syn = ct::is_syn(packet);
    let restart = entry.expires_ns <= now
        || (syn && ct::closed(entry.flags))
        || (syn && entry.unreplied && !ct::backend_current::<I>(entry));
    if restart {
        ct::forget::<I>(&packet.tuple, entry);
        if entry.expires_ns > now {
            metrics::count(reason::TC_SYN_RESTARTED);
        }
        return Step::NewFlow;
    }
    let mut flags = entry.flags | ct::tcp_bits(packet, ct_flags::FIN_FORWARD);
    if !syn {
        flags |= ct_flags::SEEN_REPLY;
    }
    let expires_ns = now + ct::lifetime_ns(packet.tuple.proto, flags);
    if entry.unreplied && flags & ct_flags::SEEN_REPLY != 0 {
        let confirmed = Flow {
            expires_ns,
            flags,
            unreplied: false,
            ..*entry
        };
        if I::ct_put(&packet.tuple, &confirmed, u64::from(BPF_ANY)).is_ok() {
            I::ct_delete_in(&packet.tuple, true);
        }
    } else {
        I::ct_touch(&packet.tuple, expires_ns, flags, entry.unreplied);
    }
    Step::DsrForward
}

/// Stage: a packet of a tracked DSR flow goes to its endpoint with the option.
#[inline(never)]
pub fn forward<I: Encoding>(ctx: &TcContext) -> Step {
    let Some(packet) = parse_flow::<I>(ctx) else {
        return Step::Verdict(PASS);
    };
    let Some(entry) = I::ct_get(&packet.tuple) else {
        return Step::Verdict(PASS);
    };
    metrics::count(reason::TC_CT_FORWARD);
    send::<I>(ctx, &packet, &entry.to)
}

/// Stage: stores a new DSR flow's forward entry (decided in `FLOW_SCRATCH`; no reply entry,
/// the client's tuple is kept as it is) and sends its first packet.
#[inline(never)]
pub fn commit<I: Encoding>(ctx: &TcContext) -> Step {
    let (Some(packet), Some(pending)) = (parse_flow::<I>(ctx), pending::<I>()) else {
        return Step::Verdict(PASS);
    };
    if I::ct_put(&packet.tuple, &pending.forward, u64::from(BPF_ANY)).is_err() {
        metrics::count(reason::TC_CT_STORE_FAILED);
        return Step::Verdict(DROP);
    }
    metrics::count(reason::TC_NEW_FLOW);
    super::events::new_flow::<I>(
        &packet.tuple,
        &pending.forward.to,
        pending.forward.rev_nat_id,
        pending.forward.backend_id,
    );
    let to = pending.forward.to;
    send::<I>(ctx, &packet, &to)
}

/// Rewrites the destination to the endpoint, inserts the frontend option and redirects the
/// packet towards the endpoint's node. Too big once grown: the client is told the MTU less
/// the option (the existing fragmentation-needed / packet-too-big path).
#[inline(always)]
fn send<I: Encoding>(ctx: &TcContext, packet: &Packet<I::Addr>, to: &Tuple<I::Addr>) -> Step {
    if !I::encodable(packet) {
        metrics::count(reason::TC_REWRITE_FAILED);
        return Step::Verdict(DROP);
    }
    let route = match fib::lookup_grown::<I>(ctx, &to.saddr, &to.daddr, false, I::ROOM) {
        Ok(route) => route,
        Err(no_route) => return refused(no_route),
    };
    let frontend = Frontend {
        addr: packet.tuple.daddr,
        port: packet.tuple.dport,
    };
    if rewrite::rewrite::<I>(ctx, packet, to).is_err() || I::insert(ctx, &frontend).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return Step::Verdict(DROP);
    }
    metrics::count(reason::TC_DSR_ENCODED);
    Step::Verdict(fib::redirect::<I>(ctx, &route))
}

// ------------------------------------------------------------------------------------------
// Endpoint's node

/// Stage, before anything else on every packet: one that carries our option is decoded here
/// (`None`: it carries none, the ordinary stages follow).
#[inline(always)]
pub fn arriving<I: Encoding>(ctx: &TcContext) -> Option<i32> {
    if I::carries_option(ctx) {
        Some(decode::<I>(ctx))
    } else {
        None
    }
}

/// Checks the option names a frontend this node serves, records the pod's reply tuple,
/// removes the option and lets the stack deliver the packet. The rule against spoofed
/// options: the frontend must be an external frontend in this node's services map (a
/// LoadBalancer IP or external IP, the same on every node), or, for another node's NodePort,
/// this node must serve a NodePort on the same port and protocol on the address it uses
/// towards the client. Anything else is dropped and creates no state.
#[inline(never)]
fn decode<I: Encoding>(ctx: &TcContext) -> i32 {
    let Ok(arrival) = I::arrival(ctx) else {
        metrics::count(reason::TC_DSR_REFUSED);
        return DROP;
    };
    if !serves::<I>(ctx, &arrival) {
        metrics::count(reason::TC_DSR_REFUSED);
        return DROP;
    }
    if arrival.has_ports
        && let Ok(ports) = I::ports_past_option(ctx)
    {
        let (client_port, pod_port) = ports;
        let reply = Tuple {
            saddr: arrival.pod,
            daddr: arrival.client,
            sport: pod_port,
            dport: client_port,
            proto: arrival.proto,
        };
        remember::<I>(&reply, &arrival.frontend);
    }
    if I::strip(ctx).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return DROP;
    }
    metrics::count(reason::TC_DSR_DECODED);
    PASS
}

/// Whether this node serves the frontend an arriving option names (see [`decode`]).
#[inline(always)]
fn serves<I: Encoding>(ctx: &TcContext, arrival: &Arrival<I::Addr>) -> bool {
    let frontend = &arrival.frontend;
    if !matches!(arrival.proto, protocol::TCP | protocol::UDP) {
        return false;
    }
    let key = I::service_key(frontend.addr, frontend.port, arrival.proto, scope::EXTERNAL);
    if let Some(master) = lb::master::<I>(key) {
        return master.flags & service_flags::EXTERNAL != 0;
    }
    // Another node's NodePort: the same port on this node's own address towards the client.
    let Ok(route) = fib::lookup::<I>(ctx, &I::UNSPECIFIED, &arrival.client, true) else {
        return false;
    };
    let key = I::service_key(route.src, frontend.port, arrival.proto, scope::EXTERNAL);
    lb::master::<I>(key).is_some_and(|master| master.flags & service_flags::NODE_PORT != 0)
}

/// Stores (or refreshes, when half its lifetime is gone) the reverse entry of a DSR flow.
#[inline(always)]
fn remember<I: Encoding>(reply: &Tuple<I::Addr>, frontend: &Frontend<I::Addr>) {
    let now = ct::now_ns();
    let lifetime = if reply.proto == protocol::TCP {
        ct_lifetime::TCP_ESTABLISHED_SECS
    } else {
        ct_lifetime::UDP_SECS
    } * NS_PER_SEC;
    if let Some((known, expires_ns)) = I::reverse_get(reply)
        && known.addr == frontend.addr
        && known.port == frontend.port
        && expires_ns > now + lifetime / 2
    {
        return;
    }
    I::reverse_put(reply, frontend, now + lifetime);
}

/// Whether a packet that is no service's is a pod's reply of a DSR flow served here.
#[inline(always)]
pub fn is_reply<I: Encoding>(tuple: &Tuple<I::Addr>) -> bool {
    I::reverse_get(tuple).is_some_and(|(_, expires_ns)| expires_ns > ct::now_ns())
}

/// Stage: a pod's reply of a DSR flow leaves with the frontend as its source, routed to the
/// client directly.
#[inline(never)]
pub fn reply<I: Encoding>(ctx: &TcContext) -> Step {
    let Some(packet) = parse_flow::<I>(ctx) else {
        return Step::Verdict(PASS);
    };
    let Some((frontend, expires_ns)) = I::reverse_get(&packet.tuple) else {
        return Step::Verdict(PASS);
    };
    if expires_ns <= ct::now_ns() || packet.fragment == Fragment::Later {
        return Step::Verdict(PASS);
    }
    let to = Tuple {
        saddr: frontend.addr,
        sport: frontend.port,
        ..packet.tuple
    };
    metrics::count(reason::TC_DSR_REPLY);
    super::translate::<I>(ctx, &packet, &to)
}

// ------------------------------------------------------------------------------------------
// The two encodings

const IP_HLEN: usize = 20;
const IP6_HLEN: usize = 40;
/// Flags and fragment offset bits of the IPv4 header (More Fragments, offset).
const IP_FRAGMENT_BITS: u16 = 0x3fff;

/// Recomputes the IPv4 header checksum of an `N`-byte header.
#[inline(always)]
fn fix_ipv4_checksum<const N: usize>(ctx: &TcContext) -> Result<(), i64> {
    let mut header = Words::<N>::zeroed();
    header.load::<0, N>(ctx, ETH_HLEN)?;
    header.put(10, &[0, 0]);
    let csum = super::csum::fold(header.sum(0)?);
    ctx.store(ETH_HLEN + 10, &csum, 0)
}

impl Encoding for V4 {
    const ROOM: u16 = dsr_option::IPV4_LEN as u16;
    const UNSPECIFIED: u32 = 0;

    #[inline(always)]
    fn ports_past_option(ctx: &TcContext) -> Result<(u16, u16), i64> {
        let l4 = ETH_HLEN + IP_HLEN + usize::from(Self::ROOM);
        Ok((ctx.load(l4)?, ctx.load(l4 + 2)?))
    }

    #[inline(always)]
    fn encodable(packet: &Packet<u32>) -> bool {
        packet.l4 == packet.l3 + IP_HLEN
    }

    #[inline(always)]
    fn insert(ctx: &TcContext, frontend: &Frontend<u32>) -> Result<(), i64> {
        let total: u16 = u16::from_be(ctx.load(ETH_HLEN + 2)?);
        ctx.adjust_room(i32::from(Self::ROOM), ADJ_ROOM_NET, 0)?;
        let port = frontend.port.to_ne_bytes();
        let addr = frontend.addr.to_ne_bytes();
        let option: [u8; 8] = [
            dsr_option::IPV4_TYPE,
            dsr_option::IPV4_LEN,
            port[0],
            port[1],
            addr[0],
            addr[1],
            addr[2],
            addr[3],
        ];
        ctx.store(ETH_HLEN + IP_HLEN, &option, 0)?;
        // Version 4, header length 7 words (20 + the 8-byte option).
        ctx.store(ETH_HLEN, &0x47u8, 0)?;
        ctx.store(ETH_HLEN + 2, &(total + Self::ROOM).to_be(), 0)?;
        fix_ipv4_checksum::<28>(ctx)
    }

    #[inline(always)]
    fn carries_option(ctx: &TcContext) -> bool {
        let Ok(ethertype) = ctx.load::<u16>(12) else {
            return false;
        };
        if u16::from_be(ethertype) != 0x0800 {
            return false;
        }
        matches!(ctx.load::<[u8; 2]>(ETH_HLEN), Ok([0x47, _]))
            && matches!(
                ctx.load::<[u8; 2]>(ETH_HLEN + IP_HLEN),
                Ok([dsr_option::IPV4_TYPE, dsr_option::IPV4_LEN])
            )
    }

    #[inline(always)]
    fn arrival(ctx: &TcContext) -> Result<Arrival<u32>, i64> {
        let l3 = ETH_HLEN;
        let fragment = u16::from_be(ctx.load(l3 + 6)?) & IP_FRAGMENT_BITS;
        Ok(Arrival {
            frontend: Frontend {
                port: ctx.load(l3 + IP_HLEN + 2)?,
                addr: ctx.load(l3 + IP_HLEN + 4)?,
            },
            proto: ctx.load(l3 + 9)?,
            client: ctx.load(l3 + Self::SADDR)?,
            pod: ctx.load(l3 + Self::DADDR)?,
            has_ports: fragment == 0,
        })
    }

    #[inline(always)]
    fn strip(ctx: &TcContext) -> Result<(), i64> {
        let total: u16 = u16::from_be(ctx.load(ETH_HLEN + 2)?);
        ctx.adjust_room(-i32::from(Self::ROOM), ADJ_ROOM_NET, 0)?;
        ctx.store(ETH_HLEN, &0x45u8, 0)?;
        ctx.store(ETH_HLEN + 2, &total.wrapping_sub(Self::ROOM).to_be(), 0)?;
        fix_ipv4_checksum::<20>(ctx)
    }

    #[inline(always)]
    fn reverse_get(key: &Tuple<u32>) -> Option<(Frontend<u32>, u64)> {
        // SAFETY: plain data, copied out at once.
        let entry = unsafe { DSR_REV4_V1.get(&rev4_key(key)) }.copied()?;
        Some((
            Frontend {
                addr: entry.address,
                port: entry.port_be,
            },
            entry.expires_ns,
        ))
    }

    #[inline(always)]
    fn reverse_put(key: &Tuple<u32>, frontend: &Frontend<u32>, expires_ns: u64) {
        let entry = Dsr4Entry {
            expires_ns,
            address: frontend.addr,
            port_be: frontend.port,
            pad: 0,
        };
        if DSR_REV4_V1
            .insert(&rev4_key(key), &entry, u64::from(BPF_ANY))
            .is_err()
        {
            metrics::count(reason::TC_CT_STORE_FAILED);
        }
    }
}

#[inline(always)]
fn rev4_key(tuple: &Tuple<u32>) -> Ct4Key {
    Ct4Key {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport_be: tuple.sport,
        dport_be: tuple.dport,
        protocol: tuple.proto,
        pad: [0; 3],
    }
}

impl Encoding for V6 {
    const ROOM: u16 = dsr_option::IPV6_HEADER_LEN as u16;
    const UNSPECIFIED: [u32; 4] = [0; 4];

    #[inline(always)]
    fn ports_past_option(ctx: &TcContext) -> Result<(u16, u16), i64> {
        let l4 = ETH_HLEN + IP6_HLEN + usize::from(Self::ROOM);
        Ok((ctx.load(l4)?, ctx.load(l4 + 2)?))
    }

    #[inline(always)]
    fn encodable(_packet: &Packet<[u32; 4]>) -> bool {
        true
    }

    #[inline(always)]
    fn insert(ctx: &TcContext, frontend: &Frontend<[u32; 4]>) -> Result<(), i64> {
        let payload: u16 = u16::from_be(ctx.load(ETH_HLEN + 4)?);
        let next: u8 = ctx.load(ETH_HLEN + 6)?;
        ctx.adjust_room(i32::from(Self::ROOM), ADJ_ROOM_NET, 0)?;
        let mut header = Words::<24>::zeroed();
        header.put(
            0,
            &[next, 2, dsr_option::IPV6_TYPE, dsr_option::IPV6_OPTION_LEN],
        );
        let mut i = 0;
        while i < 4 {
            header.put(4 + i * 4, &frontend.addr[i].to_ne_bytes());
            i += 1;
        }
        header.put(20, &frontend.port.to_ne_bytes());
        // PadN of two bytes fills the header to 24.
        header.put(22, &[1, 0]);
        ctx.store(ETH_HLEN + IP6_HLEN, &header.0, 0)?;
        ctx.store(ETH_HLEN + 6, &dsr_option::NEXTHDR_DEST, 0)?;
        ctx.store(ETH_HLEN + 4, &(payload + Self::ROOM).to_be(), 0)
    }

    #[inline(always)]
    fn carries_option(ctx: &TcContext) -> bool {
        let Ok(ethertype) = ctx.load::<u16>(12) else {
            return false;
        };
        if u16::from_be(ethertype) != 0x86dd {
            return false;
        }
        matches!(ctx.load::<u8>(ETH_HLEN + 6), Ok(dsr_option::NEXTHDR_DEST))
            && matches!(
                ctx.load::<[u8; 4]>(ETH_HLEN + IP6_HLEN),
                Ok([_, 2, dsr_option::IPV6_TYPE, dsr_option::IPV6_OPTION_LEN])
            )
    }

    #[inline(always)]
    fn arrival(ctx: &TcContext) -> Result<Arrival<[u32; 4]>, i64> {
        let l3 = ETH_HLEN;
        let proto: u8 = ctx.load(l3 + IP6_HLEN)?;
        Ok(Arrival {
            frontend: Frontend {
                addr: ctx.load(l3 + IP6_HLEN + 4)?,
                port: ctx.load(l3 + IP6_HLEN + 20)?,
            },
            proto,
            client: ctx.load(l3 + Self::SADDR)?,
            pod: ctx.load(l3 + Self::DADDR)?,
            // A Fragment header follows for a fragment: no ports to read here.
            has_ports: matches!(proto, protocol::TCP | protocol::UDP),
        })
    }

    #[inline(always)]
    fn strip(ctx: &TcContext) -> Result<(), i64> {
        let payload: u16 = u16::from_be(ctx.load(ETH_HLEN + 4)?);
        let next: u8 = ctx.load(ETH_HLEN + IP6_HLEN)?;
        ctx.adjust_room(-i32::from(Self::ROOM), ADJ_ROOM_NET, 0)?;
        ctx.store(ETH_HLEN + 6, &next, 0)?;
        ctx.store(ETH_HLEN + 4, &payload.wrapping_sub(Self::ROOM).to_be(), 0)
    }

    #[inline(always)]
    fn reverse_get(key: &Tuple<[u32; 4]>) -> Option<(Frontend<[u32; 4]>, u64)> {
        // SAFETY: plain data, copied out at once.
        let entry = unsafe { DSR_REV6_V1.get(&rev6_key(key)) }.copied()?;
        Some((
            Frontend {
                addr: entry.address,
                port: entry.port_be,
            },
            entry.expires_ns,
        ))
    }

    #[inline(always)]
    fn reverse_put(key: &Tuple<[u32; 4]>, frontend: &Frontend<[u32; 4]>, expires_ns: u64) {
        let entry = Dsr6Entry {
            expires_ns,
            address: frontend.addr,
            port_be: frontend.port,
            pad: [0; 3],
        };
        if DSR_REV6_V1
            .insert(&rev6_key(key), &entry, u64::from(BPF_ANY))
            .is_err()
        {
            metrics::count(reason::TC_CT_STORE_FAILED);
        }
    }
}

#[inline(always)]
fn rev6_key(tuple: &Tuple<[u32; 4]>) -> Ct6Key {
    Ct6Key {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport_be: tuple.sport,
        dport_be: tuple.dport,
        protocol: tuple.proto,
        pad: [0; 3],
    }
}
