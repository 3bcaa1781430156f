//! The XDP fast path of the north-south datapath (`--xdp-mode`): on the interfaces the TC
//! program is attached to, it forwards the packets of flows that TC has already set up, before
//! the kernel builds a socket buffer for them.
//!
//! It reads and updates the very conntrack entries TC wrote (`Inet::ct_*`, `ct`, `seq`), so
//! both paths agree on every flow. It translates only what changes no flow state beyond the
//! lifetime and the sequence ends: a client packet of a live flow (TCP once confirmed, UDP
//! always) and a backend's reply of a confirmed flow, unfragmented, without SYN, FIN or RST,
//! whose translated destination the FIB resolves to a neighbour. Everything else — new flows
//! (service lookup, backend choice, source ranges, REJECT/DROP, eTP Local), handshakes and
//! closes, ICMP, fragments, Direct Server Return, packets too big or about to expire, routes
//! through the stack or an unresolved neighbour — is XDP_PASS, and TC decides exactly as it
//! does without XDP. So there is one implementation of the service semantics.
use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{
        bpf_fib_lookup as fib_lookup_helper, bpf_redirect, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use proxy_common::{ct_flags, protocol, reason};

use super::{
    ct::{self, TCP_FIN, TCP_RST, TCP_SYN},
    inet::{ETH_HLEN, Fragment, Inet, Packet, Tuple},
    seq,
};
use crate::{
    lb::{V4, V6},
    metrics,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_HLEN: usize = 20;
const IP6_HLEN: usize = 40;
/// More Fragments and the fragment offset of an IPv4 header.
const IP_FRAGMENT_BITS: u16 = 0x3fff;

/// XDP entry: IPv4 and IPv6 frames of tracked flows are forwarded here; anything else passes.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    let frame = Frame(ctx);
    let Some(ethertype) = frame.load::<u16>(12) else {
        return xdp_action::XDP_PASS;
    };
    let verdict = match u16::from_be(ethertype) {
        ETH_P_IP => fast_path::<V4>(&frame),
        ETH_P_IPV6 => fast_path::<V6>(&frame),
        // Not IP (ARP, VLAN-tagged, ...): not ours to count.
        _ => return xdp_action::XDP_PASS,
    };
    verdict.unwrap_or_else(|| {
        metrics::count(reason::XDP_PASSED);
        xdp_action::XDP_PASS
    })
}

/// The frame, read and written in place through the XDP load/store helpers (they check the
/// bounds themselves: direct packet access at the variable offsets here has the compiler
/// merge the checks the verifier needs).
struct Frame<'a>(&'a XdpContext);

impl Frame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut value = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes `size_of::<T>()` bytes into `value` or fails; `T` is plain
        // data (integers and byte arrays), valid for any bytes.
        unsafe {
            let result = bpf_xdp_load_bytes(
                self.0.ctx.cast(),
                offset as u32,
                value.as_mut_ptr().cast(),
                size_of::<T>() as u32,
            );
            (result == 0).then(|| value.assume_init())
        }
    }

    #[inline(always)]
    fn store<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        let mut value = value;
        // SAFETY: the helper reads `size_of::<T>()` bytes of `value`, a live stack copy.
        let result = unsafe {
            bpf_xdp_store_bytes(
                self.0.ctx.cast(),
                offset as u32,
                (&raw mut value).cast(),
                size_of::<T>() as u32,
            )
        };
        (result == 0).then_some(())
    }

    /// The interface the frame arrived on.
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: `ctx` is the verifier-checked context of this XDP program.
        unsafe { (*self.0.ctx).ingress_ifindex }
    }
}

/// One address family's header layout, as the XDP path reads it.
trait XdpFamily: Inet {
    /// The packet's TCP/UDP flow, if it is an unfragmented one this path may translate.
    fn parse_flow(frame: &Frame) -> Option<Packet<Self::Addr>>;
    /// The IP packet's length (header included).
    fn frame_ip_len(frame: &Frame, l3: usize) -> Option<u16>;
    /// Offset of the TTL / hop limit.
    const TTL: usize;
    /// Offset of the IP header checksum (IPv4 only).
    const IP_CSUM: Option<usize>;
}

impl XdpFamily for V4 {
    const TTL: usize = 8;
    const IP_CSUM: Option<usize> = Some(10);

    #[inline(always)]
    fn parse_flow(frame: &Frame) -> Option<Packet<u32>> {
        let l3 = ETH_HLEN;
        let version_ihl: u8 = frame.load(l3)?;
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < IP_HLEN {
            return None;
        }
        let fragment_word = u16::from_be(frame.load(l3 + 6)?);
        if fragment_word & IP_FRAGMENT_BITS != 0 {
            return None;
        }
        flow::<Self>(frame, l3, l3 + ihl, frame.load(l3 + 9)?)
    }

    #[inline(always)]
    fn frame_ip_len(frame: &Frame, l3: usize) -> Option<u16> {
        Some(u16::from_be(frame.load(l3 + 2)?))
    }
}

impl XdpFamily for V6 {
    const TTL: usize = 7;
    const IP_CSUM: Option<usize> = None;

    /// Only a TCP or UDP header right after the fixed header: extension headers (fragments
    /// among them) are TC's.
    #[inline(always)]
    fn parse_flow(frame: &Frame) -> Option<Packet<[u32; 4]>> {
        let l3 = ETH_HLEN;
        let first: u8 = frame.load(l3)?;
        if first >> 4 != 6 {
            return None;
        }
        flow::<Self>(frame, l3, l3 + IP6_HLEN, frame.load(l3 + 6)?)
    }

    #[inline(always)]
    fn frame_ip_len(frame: &Frame, l3: usize) -> Option<u16> {
        let payload = u16::from_be(frame.load(l3 + 4)?);
        payload.checked_add(IP6_HLEN as u16)
    }
}

/// The TCP/UDP flow whose transport header is at `l4`.
#[inline(always)]
fn flow<I: Inet>(frame: &Frame, l3: usize, l4: usize, proto: u8) -> Option<Packet<I::Addr>> {
    if proto != protocol::TCP && proto != protocol::UDP {
        return None;
    }
    let tcp_flags = if proto == protocol::TCP {
        frame.load::<u8>(l4 + 13)?
    } else {
        0
    };
    Some(Packet {
        l3,
        l4,
        tuple: Tuple {
            saddr: frame.load(l3 + I::SADDR)?,
            daddr: frame.load(l3 + I::DADDR)?,
            sport: frame.load(l4)?,
            dport: frame.load(l4 + 2)?,
            proto,
        },
        tcp_flags,
        fragment: Fragment::Whole,
    })
}

/// Where a translated frame leaves: the interface and the MACs of its next hop.
struct Route {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// Routes the translated packet as the stack would forward it (its length checked against
/// the route's MTU). Only a resolved neighbour is a route here: no route, a local
/// destination, an unresolved neighbour or a packet too big are TC's to handle.
#[inline(always)]
fn route<I: XdpFamily>(
    frame: &Frame,
    packet: &Packet<I::Addr>,
    to: &Tuple<I::Addr>,
) -> Option<Route> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = I::AF;
    params.ifindex = frame.ingress_ifindex();
    params.__bindgen_anon_1.tot_len = I::frame_ip_len(frame, packet.l3)?;
    I::fib_params(&mut params, &to.saddr, &to.daddr);
    // SAFETY: `params` is a live stack struct of the size passed; ctx is this program's.
    let result = unsafe {
        fib_lookup_helper(
            frame.0.as_ptr(),
            &raw mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    (result == i64::from(BPF_FIB_LKUP_RET_SUCCESS)).then_some(Route {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// The sequence numbers of a TCP segment for `seq::follow_with` (as `seq` reads them on TC).
#[inline(always)]
fn numbers<I: XdpFamily>(frame: &Frame, packet: &Packet<I::Addr>) -> Option<(u32, u32, u32)> {
    let seq = u32::from_be(frame.load::<u32>(packet.l4 + 4)?);
    let ack = u32::from_be(frame.load::<u32>(packet.l4 + 8)?);
    let ip_len = u32::from(I::frame_ip_len(frame, packet.l3)?);
    let data_offset = u32::from(frame.load::<u8>(packet.l4 + 12)? >> 4) * 4;
    let headers = (packet.l4 - packet.l3) as u32 + data_offset;
    // SYN and FIN never come this way: the payload is the segment's whole length.
    Some((seq, ack, seq.wrapping_add(ip_len.saturating_sub(headers))))
}

/// A tracked flow's packet, translated and sent on; `None`: it is TC's (nothing changed).
#[inline(always)]
fn fast_path<I: XdpFamily>(frame: &Frame) -> Option<u32> {
    let packet = I::parse_flow(frame)?;
    if packet.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    if checksum_pending::<I>(frame, &packet)? {
        return None;
    }
    let entry = I::ct_get(&packet.tuple)?;
    if entry.flags & ct_flags::DSR != 0 {
        return None;
    }
    let ttl: u8 = frame.load(packet.l3 + I::TTL)?;
    if ttl <= 1 {
        return None;
    }
    let now = ct::now_ns();
    let counted = if entry.flags & ct_flags::REPLY != 0 {
        let (forward_key, forward) = ct::forward_of::<I>(&packet.tuple, &entry, now)?;
        // The first reply confirms a flow: that move between the conntrack maps is TC's.
        if forward.unreplied {
            return None;
        }
        let route = route::<I>(frame, &packet, &entry.to)?;
        if !seq::follow_with::<I>(&packet, &packet.tuple, &entry.to, seq::Side::Reply, || {
            numbers::<I>(frame, &packet)
        }) {
            return None;
        }
        let flags = forward.flags | ct_flags::SEEN_REPLY;
        let expires_ns = now + ct::lifetime_ns(packet.tuple.proto, flags);
        I::ct_touch(&forward_key, expires_ns, flags, false);
        (route, reason::XDP_REPLIED)
    } else {
        if entry.expires_ns <= now {
            return None;
        }
        // An unconfirmed TCP flow is confirmed by the client's ACK: TC's.
        if entry.unreplied && packet.tuple.proto == protocol::TCP {
            return None;
        }
        let route = route::<I>(frame, &packet, &entry.to)?;
        let reply_key = entry.to.reversed();
        let owner = packet.tuple.reversed();
        if !seq::follow_with::<I>(&packet, &reply_key, &owner, seq::Side::Forward, || {
            numbers::<I>(frame, &packet)
        }) {
            return None;
        }
        let expires_ns = now + ct::lifetime_ns(packet.tuple.proto, entry.flags);
        I::ct_touch(&packet.tuple, expires_ns, entry.flags, entry.unreplied);
        (route, reason::XDP_FORWARDED)
    };
    let (route, counter) = counted;
    if rewrite::<I>(frame, &packet, &entry.to, ttl, &route).is_none() {
        // Every access was bounds-checked by the parse: this cannot happen, and a frame
        // rewritten halfway must not go on.
        metrics::count(reason::TC_REWRITE_FAILED);
        return Some(xdp_action::XDP_DROP);
    }
    metrics::count(counter);
    if route.ifindex == frame.ingress_ifindex() {
        return Some(xdp_action::XDP_TX);
    }
    // SAFETY: a helper call with plain integer arguments.
    Some(unsafe { bpf_redirect(route.ifindex, 0) } as u32)
}

/// Whether the transport checksum is still to be completed by checksum offload: a packet
/// sent through a veth by a local stack (a pod, a client namespace) carries only its
/// pseudo-header's sum there (CHECKSUM_PARTIAL), which the kernel fills in later. XDP cannot
/// see that state, and a frame it redirects loses it, so such packets go to TC, whose
/// checksum helpers know it. A frame from a wire always has its full checksum; one that
/// happens to equal its pseudo-header sum (1 in 65 536) only takes the TC path.
#[inline(always)]
fn checksum_pending<I: XdpFamily>(frame: &Frame, packet: &Packet<I::Addr>) -> Option<bool> {
    let tuple = &packet.tuple;
    let offset = packet.l4 + if tuple.proto == protocol::TCP { 16 } else { 6 };
    let field: u16 = frame.load(offset)?;
    let l4_len = I::frame_ip_len(frame, packet.l3)?.checked_sub((packet.l4 - packet.l3) as u16)?;
    let mut sum = add_words(add_words(0, &tuple.saddr, false), &tuple.daddr, false);
    sum += u32::from(u16::from_ne_bytes([0, tuple.proto]));
    sum += u32::from(u16::from_ne_bytes(l4_len.to_be_bytes()));
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    Some(field == sum as u16)
}

/// Adds the 16-bit words of `value` (each inverted with `invert`) to `sum`: one side of an
/// incremental checksum update (RFC 1624), in memory order like the checksum field itself.
#[inline(always)]
fn add_words<A: Copy>(sum: u32, value: &A, invert: bool) -> u32 {
    let words = size_of::<A>() / 2;
    let ptr = core::ptr::from_ref(value).cast::<u16>();
    let mut sum = sum;
    let mut i = 0;
    while i < words {
        // SAFETY: `i` words of 2 bytes lie inside `value` (its size is even: 2, 4 or 16).
        let word = unsafe { ptr.add(i).read_unaligned() };
        sum += u32::from(if invert { !word } else { word });
        i += 1;
    }
    sum
}

/// What replacing `old` by `new` adds to a checksum's one's-complement sum.
#[inline(always)]
fn diff<A: Copy>(old: &A, new: &A) -> u32 {
    add_words(add_words(0, old, true), new, false)
}

/// The checksum field value after its covered data changed by `diff` (RFC 1624 eq. 3).
#[inline(always)]
fn updated(csum: u16, diff: u32) -> u16 {
    let mut sum = u32::from(!csum) + diff;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites the packet to `to`, decrements its TTL (`ttl` now) and addresses it to the
/// route's next hop, fixing the checksums incrementally (XDP has no csum_replace helpers).
#[inline(always)]
fn rewrite<I: XdpFamily>(
    frame: &Frame,
    packet: &Packet<I::Addr>,
    to: &Tuple<I::Addr>,
    ttl: u8,
    route: &Route,
) -> Option<()> {
    let from = &packet.tuple;
    let addr_diff = diff(&from.saddr, &to.saddr) + diff(&from.daddr, &to.daddr);
    let port_diff = diff(&from.sport, &to.sport) + diff(&from.dport, &to.dport);
    let csum_offset = packet.l4 + if from.proto == protocol::TCP { 16 } else { 6 };
    let l4_csum: u16 = frame.load(csum_offset)?;
    // A UDP datagram without a checksum (zero) keeps none; a computed zero is sent as
    // all ones, its equivalent.
    if from.proto == protocol::TCP || l4_csum != 0 {
        let mut csum = updated(l4_csum, addr_diff + port_diff);
        if from.proto == protocol::UDP && csum == 0 {
            csum = 0xffff;
        }
        frame.store(csum_offset, csum)?;
    }
    if let Some(ip_csum) = I::IP_CSUM {
        // The TTL shares its 16-bit word with the protocol.
        let ttl_word = packet.l3 + I::TTL;
        let old: u16 = frame.load(ttl_word)?;
        let mut new_bytes = old.to_ne_bytes();
        new_bytes[0] = ttl - 1;
        let new = u16::from_ne_bytes(new_bytes);
        let csum: u16 = frame.load(packet.l3 + ip_csum)?;
        frame.store(
            packet.l3 + ip_csum,
            updated(csum, addr_diff + diff(&old, &new)),
        )?;
    }
    frame.store(packet.l3 + I::TTL, ttl - 1)?;
    frame.store(packet.l3 + I::SADDR, to.saddr)?;
    frame.store(packet.l3 + I::DADDR, to.daddr)?;
    frame.store(packet.l4, to.sport)?;
    frame.store(packet.l4 + 2, to.dport)?;
    frame.store(0, route.dmac)?;
    frame.store(6, route.smac)
}
