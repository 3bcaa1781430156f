//! The TC path's connection tracking: its keys and entries, their flags, lifetimes and TCP
//! sequence tracking, the rate limit of refusals and the fragment maps.

use crate::addr::{Addr4, Addr6, WireAddr};

/// Conntrack entry flags (the `flags` field of [`Ct4Entry`]/[`Ct6Entry`]).
pub mod ct_flags {
    /// The entry translates the reply direction (backend → client); otherwise it is the
    /// forward entry (client → service), which alone carries the flow's state and lifetime.
    pub const REPLY: u16 = 1 << 0;
    /// The flow's source was translated to a node address (masquerade).
    pub const SNAT: u16 = 1 << 1;
    /// A reply was seen: the flow is established.
    pub const SEEN_REPLY: u16 = 1 << 2;
    /// The client sent a FIN.
    pub const FIN_FORWARD: u16 = 1 << 3;
    /// The backend sent a FIN.
    pub const FIN_REPLY: u16 = 1 << 4;
    /// Either side sent a RST (one inside the sequence space its sender used).
    pub const RST: u16 = 1 << 5;
    /// On the reply entry of a TCP flow: `expires_ns` holds the flow's sequence ends (see
    /// [`super::ct_seq`]); this bit says the client's half is set.
    pub const SEQ_FORWARD: u16 = 1 << 6;
    /// On the reply entry of a TCP flow: the backend's half of the sequence ends is set.
    pub const SEQ_REPLY: u16 = 1 << 7;
    /// On a forward entry: the flow uses Direct Server Return (the endpoint's node answers the
    /// client directly; this node never sees a reply and keeps no reply entry).
    pub const DSR: u16 = 1 << 8;
}

/// The sequence space a TCP flow has used, kept on its reply entry: a reply entry has no
/// lifetime of its own (it lives as long as its forward entry), so its `expires_ns` holds,
/// for a TCP flow, the highest sequence end (seq + length, SYN and FIN counting one) each side
/// has sent: the client's in the low 32 bits, the backend's in the high 32 bits. A RST
/// changes the flow's state only when its sequence number lies within [`RST_WINDOW`] below
/// its sender's end (a RST is sent at the sender's next sequence number, or at the one the
/// peer last acknowledged).
pub mod ct_seq {
    /// How far below the sender's highest sequence end a RST may lie (bytes in flight).
    pub const RST_WINDOW: u32 = 1 << 24;

    /// Splits a reply entry's `expires_ns` into (client end, backend end).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the low and high halves of the word, on purpose"
    )]
    pub const fn split(word: u64) -> (u32, u32) {
        (word as u32, (word >> 32) as u32)
    }

    pub const fn join(forward: u32, reply: u32) -> u64 {
        (forward as u64) | ((reply as u64) << 32)
    }

    /// Whether `seq` (a RST's) lies in `[end - RST_WINDOW, end]` of sequence space.
    pub const fn rst_in_window(seq: u32, end: u32) -> bool {
        end.wrapping_sub(seq) <= RST_WINDOW
    }

    /// Whether `candidate` is after `end` in sequence space (RFC 1982 comparison).
    pub const fn after(candidate: u32, end: u32) -> bool {
        candidate.wrapping_sub(end).cast_signed() > 0
    }
}

/// Refusals (TCP RST, ICMP port unreachable) sent by the TC path are rate-limited per CPU,
/// like the kernel's own ICMP (`net.ipv4.icmp_msgs_per_sec` and `icmp_msgs_burst`).
pub mod reject_limit {
    /// Tokens added per second, per CPU.
    pub const PER_SEC: u64 = 1_000;
    /// The bucket's size: refusals a CPU sends in a burst.
    pub const BURST: u64 = 50;
}

/// The per-CPU token bucket of the TC path's refusals (see [`reject_limit`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RejectBucket {
    /// `bpf_ktime_get_ns` when tokens were last added.
    pub refilled_ns: u64,
    pub tokens: u64,
}
assert_layout!(RejectBucket, size = 16, align = 8);

/// Masquerade ports when the agent has not configured any; the agent's default
/// `--snat-port-range` too (it reserves them in `net.ipv4.ip_local_reserved_ports`).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (46_000, 65_535);

/// Conntrack lifetimes, refreshed by every packet of the flow (either direction).
pub mod ct_lifetime {
    /// A TCP flow whose SYN has not been answered yet.
    pub const TCP_SYN_SECS: u64 = 60;
    /// An established TCP flow (kube-proxy sets nf_conntrack_tcp_timeout_established to 24 h).
    pub const TCP_ESTABLISHED_SECS: u64 = 86_400;
    /// A TCP flow after one side's FIN (half-closed connections may still carry data).
    pub const TCP_HALF_CLOSED_SECS: u64 = 300;
    /// A TCP flow after both FINs or a RST: kept briefly for the last ACKs and retransmits.
    pub const TCP_CLOSED_SECS: u64 = 10;
    /// A UDP flow without a reply yet.
    pub const UDP_UNREPLIED_SECS: u64 = 30;
    /// A UDP flow that has seen replies.
    pub const UDP_SECS: u64 = 120;
}

/// Key of the conntrack LRUs: the packet's 5-tuple as it arrives (addresses and ports in
/// network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A: WireAddr> {
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}
pub type Ct4Key = CtKey<Addr4>;
pub type Ct6Key = CtKey<Addr6>;
assert_layout!(CtKey<Addr4, Addr6>, size = (16, 40), align = (4, 4));

/// Value of the conntrack LRUs: the tuple a matching packet is rewritten to. A forward
/// entry (client → frontend) rewrites to (client or node address → backend); its reply entry,
/// keyed by the tuple the backend answers with, rewrites back to (frontend → client).
/// `expires_ns` (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) is kept on the forward entry only; a
/// reply entry lives as long as its forward entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry<A: WireAddr> {
    pub expires_ns: u64,
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub flags: u16,
    pub pad: u16,
}
pub type Ct4Entry = CtEntry<Addr4>;
pub type Ct6Entry = CtEntry<Addr6>;
assert_layout!(CtEntry<Addr4, Addr6>, size = (32, 56), align = (8, 8));

impl<A: WireAddr> CtKey<A> {
    /// (source, destination) of the packets the key matches.
    pub fn ends(&self) -> (core::net::SocketAddr, core::net::SocketAddr) {
        (
            self.saddr.socket(self.sport_be),
            self.daddr.socket(self.dport_be),
        )
    }
}

impl<A: WireAddr> CtEntry<A> {
    /// The key of the packets that answer those this entry rewrites (its rewrite tuple,
    /// reversed): for a forward entry its reply entry, for a reply entry its forward entry.
    pub fn partner_key(&self, protocol: u8) -> CtKey<A> {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            protocol,
            pad: [0; 3],
        }
    }

    /// Where a forward entry sends the flow.
    pub fn destination(&self) -> core::net::SocketAddr {
        self.daddr.socket(self.dport_be)
    }

    /// The source a forward entry gives the flow (a node address when masqueraded).
    pub fn source(&self) -> core::net::SocketAddr {
        self.saddr.socket(self.sport_be)
    }
}

/// Key of the IPv4 fragment LRU: one fragmented datagram as its fragments arrive (RFC 791
/// §3.2: source, destination, protocol and identification name a datagram).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frag4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub id_be: u16,
    pub protocol: u8,
    pub pad: u8,
}
assert_layout!(Frag4Key, size = 12, align = 4);

/// Key of the IPv6 fragment LRU (the Fragment header's 32-bit identification, RFC 8200 §4.5).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frag6Key {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub id_be: u32,
    pub protocol: u8,
    pub pad: [u8; 3],
}
assert_layout!(Frag6Key, size = 40, align = 4);

/// Value of the fragment LRUs: the transport ports the datagram's first fragment carried, so
/// its later fragments (which carry none) find the same conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}
assert_layout!(FragPorts, size = 4, align = 2);
