//! One address family as the TC path sees it: header layout, conntrack map, source ranges and
//! the cluster CIDR. The flow logic in the sibling modules is written once over this trait.
use aya_ebpf::{bindings::bpf_fib_lookup, helpers::bpf_csum_diff, programs::TcContext};
use proxy_common::{DatapathConfig, protocol};

use crate::lb::Family;

/// Length of the Ethernet header (no VLAN tags: tagged frames are passed untouched).
pub const ETH_HLEN: usize = 14;

/// A transport 5-tuple as it appears in the packet (addresses and ports in network order).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<A: Copy> Tuple<A> {
    /// The tuple of the other direction of the same flow.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// A conntrack entry, decoded: the tuple a matching packet is rewritten to, and the flow state.
#[derive(Clone, Copy)]
pub struct Flow<A> {
    pub to: Tuple<A>,
    pub expires_ns: u64,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub flags: u16,
    /// Where the entry lives: the map of flows not yet confirmed by both sides, or the main
    /// conntrack map (see `ct::promote`).
    pub unreplied: bool,
}

/// Who holds a reply tuple a new flow wants.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Nobody: the tuple is free.
    Free,
    /// A live flow (or a forward entry that happens to have this key): never taken over.
    Live,
    /// A flow that has ended (expired, replaced, or TCP closed by both FINs or a RST): its
    /// reply tuple may be taken over.
    Ended,
}

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment of a UDP datagram: it carries the transport header.
    First,
    /// A later fragment of a UDP datagram: no transport header (`l4` is where its data
    /// starts); its ports are those its first fragment carried (see `tc::frag`).
    Later,
}

/// Where the headers of a parsed packet are.
#[derive(Clone, Copy)]
pub struct Packet<A> {
    pub l3: usize,
    pub l4: usize,
    pub tuple: Tuple<A>,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    pub fragment: Fragment,
}

/// An ICMP error and the packet it quotes.
#[derive(Clone, Copy)]
pub struct IcmpError<A> {
    pub outer: Packet<A>,
    /// Offset of the quoted IP header and of its transport header.
    pub inner_l3: usize,
    pub inner_l4: usize,
    /// The quoted packet's tuple, as that packet was sent.
    pub inner: Tuple<A>,
}

/// What the parser found.
pub enum Parsed<A> {
    /// Not IP, not TCP/UDP/ICMP error, or a header we do not translate: pass untouched.
    Pass,
    /// A fragment of something other than UDP: passed untouched.
    Fragment,
    /// A later UDP fragment whose first fragment was not seen: its ports are unknown.
    UntrackedFragment,
    Flow(Packet<A>),
    IcmpError(IcmpError<A>),
}

/// One address family's packet layout and maps.
pub trait Inet: Family {
    type Addr: Copy + PartialEq + crate::addr::ServiceAddr + 'static;
    /// `AF_INET` / `AF_INET6`, as bpf_fib_lookup and bpf_redirect_neigh want it.
    const AF: u8;
    /// Source and destination address offsets inside the IP header.
    const SADDR: usize;
    const DADDR: usize;
    /// ICMPv6's checksum covers a pseudo-header (outer addresses) and the quoted addresses;
    /// ICMPv4's covers neither directly (the quoted IPv4 header sums to a constant).
    const ICMP_PSEUDO: bool;

    fn parse(ctx: &TcContext) -> Result<Parsed<Self::Addr>, i64>;
    fn store_addr(ctx: &TcContext, offset: usize, addr: &Self::Addr) -> Result<(), i64>;
    /// Offset of the IP header checksum (IPv4 only).
    fn ip_csum(l3: usize) -> Option<usize>;
    /// Decrements the TTL / hop limit as a router does; `Err` when it would reach zero.
    fn decrement_ttl(ctx: &TcContext, l3: usize) -> Result<(), i64>;

    fn service_key(addr: Self::Addr, port: u16, proto: u8, scope: u8) -> Self::Key;
    fn backend_target(backend: &Self::Backend) -> (Self::Addr, u16);

    /// The entry under `key`: the main map's, else the unreplied map's.
    fn ct_get(key: &Tuple<Self::Addr>) -> Option<Flow<Self::Addr>>;
    /// Stores an entry in the map `flow.unreplied` names.
    fn ct_put(key: &Tuple<Self::Addr>, flow: &Flow<Self::Addr>, flags: u64) -> Result<(), i64>;
    /// Removes the entry under `key` from both maps.
    fn ct_delete(key: &Tuple<Self::Addr>);
    /// Removes the entry under `key` from one map.
    fn ct_delete_in(key: &Tuple<Self::Addr>, unreplied: bool);
    /// Updates a forward entry's lifetime and state in place.
    fn ct_touch(key: &Tuple<Self::Addr>, expires_ns: u64, flags: u16, unreplied: bool);
    /// Who holds the reply tuple `key` (read in place, without copying entries: the new-flow
    /// stage has little stack to spare).
    fn ct_owner(key: &Tuple<Self::Addr>, now: u64) -> Owner;
    /// The sequence word, flags and map of the reply entry under `key`, if it is a reply
    /// entry that rewrites to `owner` (so belongs to the flow asking).
    fn ct_seq(key: &Tuple<Self::Addr>, owner: &Tuple<Self::Addr>) -> Option<(u64, u16, bool)>;
    /// Stores a reply entry's sequence word and flags in place.
    fn ct_set_seq(key: &Tuple<Self::Addr>, word: u64, flags: u16, unreplied: bool);
    /// The length of the IP payload (transport header included).
    fn l4_len(ctx: &TcContext, packet: &Packet<Self::Addr>) -> Result<u32, i64>;
    /// The IP packet's length (header included), as the MTU is checked against.
    fn ip_len(ctx: &TcContext) -> Result<u16, i64>;
    /// The length of the IP and transport headers (what each segment of a GSO packet
    /// carries before its share of the payload).
    fn headers_len(ctx: &TcContext) -> Result<u16, i64>;
    /// Whether a packet too big for its route must be answered rather than fragmented:
    /// IPv4 with DF set; always for IPv6, where routers never fragment.
    fn dont_fragment(ctx: &TcContext, l3: usize) -> Result<bool, i64>;
    /// Remembers the ports of a first fragment for the later fragments of its datagram.
    fn fragment_seen(ctx: &TcContext, packet: &Packet<Self::Addr>);
    /// A multicast, broadcast or unspecified address: never answered with a refusal.
    fn is_group(addr: &Self::Addr) -> bool;

    fn in_cluster_cidr(addr: &Self::Addr, config: &DatapathConfig) -> bool;
    fn has_cluster_cidr(config: &DatapathConfig) -> bool;
    fn source_allowed(rev_nat_id: u32, addr: &Self::Addr) -> bool;
    /// The client identity for session affinity on the TC path: its address.
    fn client_cookie(addr: &Self::Addr) -> u64;
    /// The flow's Maglev hash (`proxy_common::maglev`): the same on every node.
    fn flow_hash(tuple: &Tuple<Self::Addr>, seed: u32) -> u32;

    fn fib_params(params: &mut bpf_fib_lookup, src: &Self::Addr, dst: &Self::Addr);
    fn fib_src(params: &bpf_fib_lookup) -> Self::Addr;
    fn fib_dst(params: &bpf_fib_lookup) -> Self::Addr;

    /// Builds a TCP RST answering the packet, in place (addresses, ports, MACs swapped).
    fn write_tcp_reset(ctx: &TcContext, packet: &Packet<Self::Addr>) -> Result<(), i64>;
    /// Builds an ICMP port unreachable answering the packet, in place.
    fn write_port_unreachable(ctx: &TcContext, packet: &Packet<Self::Addr>) -> Result<(), i64>;
    /// Builds an ICMP "fragmentation needed" / ICMPv6 "packet too big" with `mtu`, in place.
    fn write_too_big(ctx: &TcContext, packet: &Packet<Self::Addr>, mtu: u16) -> Result<(), i64>;
}

/// The checksum difference between two addresses (for `l3/l4_csum_replace` with size 0).
#[inline(always)]
pub fn addr_diff<A: Copy>(old: &A, new: &A) -> i64 {
    let mut old = *old;
    let mut new = *new;
    let size = core::mem::size_of::<A>() as u32;
    // SAFETY: both pointers point at initialised stack copies of `size` bytes; addresses are
    // 4 or 16 bytes, the multiple of 4 the helper requires.
    unsafe { bpf_csum_diff((&raw mut old).cast(), size, (&raw mut new).cast(), size, 0) }
}

/// The length of the TCP (its data offset) or UDP (8 bytes) header at `l4`.
#[inline(always)]
pub fn transport_header_len(ctx: &TcContext, proto: u8, l4: usize) -> Result<usize, i64> {
    if proto == protocol::TCP {
        let data_offset: u8 = ctx.load(l4 + 12)?;
        Ok(usize::from(data_offset >> 4) * 4)
    } else {
        Ok(8)
    }
}
