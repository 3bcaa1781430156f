//! Map keys, values and names shared by the eBPF programs and the agent.
//!
//! Every type here is a wire format between the kernel and userspace: `#[repr(C)]`, explicit
//! zeroed padding, no `bool`/`Option`/Rust enums, ports in network byte order (named `*_be`) and
//! addresses exactly as the kernel hands them to sock_addr programs (`user_ip4`/`user_ip6`, i.e.
//! network byte order stored in native `u32`s). A compile-time size/alignment assertion sits
//! beside each type so a layout change cannot slip through unnoticed; a layout change must bump
//! [`SOURCE_LAYOUT_VERSION`] so a new agent never adopts maps written with the old layout.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod map_table;

pub use addr::{Addr4, Addr6, WireAddr};

/// The map layout version of this source: bumped (and every pinned map renamed `_V<N>`) when a
/// key or value changes.
pub const SOURCE_LAYOUT_VERSION: u32 = 1;

/// Version of the map layout this build pins under (`<bpffs>/v<N>/`): the source's, unless
/// the build set `SWITCHYARD_MAP_LAYOUT_VERSION` (the upgrade tests build a second agent that
/// way; its map names keep the source's suffix).
pub const MAP_LAYOUT_VERSION: u32 =
    match parse_version(env!("SWITCHYARD_MAP_LAYOUT_VERSION_OVERRIDE").as_bytes()) {
        Some(version) => version,
        None => SOURCE_LAYOUT_VERSION,
    };

/// A decimal version, in a constant (`None` when empty or not a number).
const fn parse_version(text: &[u8]) -> Option<u32> {
    if text.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() {
            return None;
        }
        value = value * 10 + (text[i] - b'0') as u32;
        i += 1;
    }
    Some(value)
}

/// Map names as they appear in the eBPF object and under the pin directory; the rest of what
/// describes each map (kind, types, capacity, flags) is in [`map_table`].
pub mod map_names {
    pub const SERVICES4: &str = "SVC4_V1";
    pub const SERVICES6: &str = "SVC6_V1";
    pub const BACKENDS4: &str = "BACKEND4_V1";
    pub const BACKENDS6: &str = "BACKEND6_V1";
    pub const REV_NAT4: &str = "REV_NAT4_V1";
    pub const REV_NAT6: &str = "REV_NAT6_V1";
    pub const SOCK_REV_NAT4: &str = "SOCK_NAT4_V1";
    pub const SOCK_REV_NAT6: &str = "SOCK_NAT6_V1";
    pub const METRICS: &str = "METRICS_V1";
    pub const AFFINITY: &str = "AFFINITY_V1";
    pub const SERVICE_NAMES: &str = "SVC_NAMES_V1";
    pub const CT4: &str = "CT4_V1";
    pub const CT6: &str = "CT6_V1";
    /// The TC path's flows not yet confirmed by both sides (see `map_table::CT4_UNREPLIED`).
    pub const CT4_UNREPLIED: &str = "CT4_NEW_V1";
    pub const CT6_UNREPLIED: &str = "CT6_NEW_V1";
    pub const SOURCE_RANGES4: &str = "SRC_RANGE4_V1";
    pub const SOURCE_RANGES6: &str = "SRC_RANGE6_V1";
    pub const DATAPATH_CONFIG: &str = "CONFIG_V1";
    pub const SERVICE_STATUS: &str = "SVC_STATUS_V1";
    /// The service-CIDR guard: ServiceCIDR prefixes and active ClusterIPs (LPM tries).
    pub const SERVICE_GUARD4: &str = "SVC_GUARD4_V1";
    pub const SERVICE_GUARD6: &str = "SVC_GUARD6_V1";
    /// The socket hooks' settings (one entry).
    pub const SOCK_CONFIG: &str = "SOCK_CONFIG_V1";
    /// `switchyard monitor`: until when someone is monitoring (one entry: a lease the monitor
    /// renews, in `bpf_ktime_get_ns` nanoseconds), and the event ring buffer.
    pub const MONITOR_CONFIG: &str = "MONITOR_CFG_V1";
    pub const MONITOR_EVENTS: &str = "MONITOR_EVT_V1";
    pub const AFFINITY_MATCH: &str = "AFF_MATCH_V1";
    /// The TC path's IP fragments: which ports a fragmented datagram's first fragment carried.
    pub const FRAGMENTS4: &str = "FRAG4_V1";
    pub const FRAGMENTS6: &str = "FRAG6_V1";
    /// The Maglev lookup tables, one after the other (see `map_table::MAGLEV`).
    pub const MAGLEV: &str = "MAGLEV_V1";
    /// The Maglev tables' size and the flow hash's seed (one entry).
    pub const MAGLEV_CONFIG: &str = "MAGLEV_CFG_V1";
    /// Direct Server Return on an endpoint's node: reply tuple → the frontend the reply
    /// leaves with (see `map_table::DSR_REV4`).
    pub const DSR_REV4: &str = "DSR_REV4_V1";
    pub const DSR_REV6: &str = "DSR_REV6_V1";

    /// The TC path's per-CPU scratch space (not pinned, so not versioned).
    pub const FIB_SCRATCH: &str = "FIB_SCRATCH";
    /// The TC path's per-CPU scratch space for a new flow's entries (not pinned).
    pub const FLOW_SCRATCH: &str = "FLOW_SCRATCH";
    /// The TC path's per-CPU token buckets for refusals (not pinned: a restart refills them).
    pub const REJECT_BUCKET: &str = "REJECT_BUCKET";
}

/// Protocol numbers as stored in keys (IANA numbers, as in `bpf_sock_addr.protocol`).
pub mod protocol {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Frontend scope (the `scope` byte of a service key).
pub mod scope {
    /// Cluster-wide backend set (all usable endpoints).
    pub const EXTERNAL: u8 = 0;
    /// Node-local backend set (used by traffic policies `Local`).
    pub const LOCAL: u8 = 1;
}

/// Backend states (the `state` byte of a backend value).
pub mod backend_state {
    pub const ACTIVE: u8 = 0;
    pub const TERMINATING: u8 = 1;
}

/// Service flags (the `flags` field of a master entry).
pub mod service_flags {
    /// A ClusterIP frontend.
    pub const CLUSTER_IP: u16 = 1 << 0;
    /// With count 0: the service has usable endpoints, but the traffic policy leaves none for
    /// this node's traffic, so the datapath drops (kube-proxy's DROP) instead of refusing.
    pub const NO_LOCAL_ENDPOINTS: u16 = 1 << 1;
    /// A NodePort frontend (a node address selected by `--nodeport-addresses`).
    pub const NODE_PORT: u16 = 1 << 2;
    /// A `spec.externalIPs` frontend.
    pub const EXTERNAL_IP: u16 = 1 << 3;
    /// A `status.loadBalancer.ingress[].ip` frontend (ipMode VIP or unset).
    pub const LOAD_BALANCER: u16 = 1 << 4;
    /// On the cluster-scope entry of an external frontend: externalTrafficPolicy is Local, so
    /// traffic from outside the cluster uses the frontend's `scope::LOCAL` entry (local
    /// endpoints, client address kept) while pods short-circuit to this entry unmasqueraded.
    pub const EXTERNAL_LOCAL: u16 = 1 << 5;
    /// A LoadBalancer frontend with loadBalancerSourceRanges: new flows from sources outside
    /// the service's prefixes in the source-ranges trie are dropped.
    pub const SOURCE_RANGES: u16 = 1 << 6;

    /// An externalIP that is this node's own address or the API server's (CVE-2020-8554):
    /// never translated for sockets of the host's network namespace (the agent itself and
    /// every host process), which must keep reaching the real address.
    pub const NOT_FOR_HOST: u16 = 1 << 7;
    /// The Service's `switchyard.dev/forwarding-mode: dsr` annotation: flows of this external
    /// frontend to remote endpoints use Direct Server Return whatever `--lb-mode` says.
    pub const FORWARD_DSR: u16 = 1 << 8;
    /// The Service's `switchyard.dev/forwarding-mode: snat` annotation: always masqueraded.
    pub const FORWARD_SNAT: u16 = 1 << 9;

    /// On an external frontend (NodePort, externalIP, LoadBalancer IP): new flows through the
    /// TC path take their backend from the Maglev table whose number is the master entry's
    /// `backend_id` (see [`crate::maglev`]); otherwise a random slot.
    pub const MAGLEV: u16 = 1 << 10;

    /// Any externally reachable frontend kind.
    pub const EXTERNAL: u16 = NODE_PORT | EXTERNAL_IP | LOAD_BALANCER;
}

/// The programs' names: the eBPF crate names its entry points so (checked at compile time
/// there) and the agent loads them by these names.
pub mod program {
    pub const CONNECT4: &str = "sy_connect4";
    pub const SENDMSG4: &str = "sy_sendmsg4";
    pub const RECVMSG4: &str = "sy_recvmsg4";
    pub const GETPEERNAME4: &str = "sy_getpeername4";
    pub const CONNECT6: &str = "sy_connect6";
    pub const SENDMSG6: &str = "sy_sendmsg6";
    pub const RECVMSG6: &str = "sy_recvmsg6";
    pub const GETPEERNAME6: &str = "sy_getpeername6";
    /// The socket-lifetime hook that cleans socket reverse-NAT entries.
    pub const SOCK_RELEASE: &str = "sy_sock_release";
    /// TC ingress on the node's interfaces: the north-south load balancer.
    pub const TC_INGRESS: &str = "sy_tc_ingress";
    /// XDP on the node's external interfaces: the fast path of tracked north-south flows.
    pub const XDP_INGRESS: &str = "sy_xdp_ingress";

    /// The socket-address hooks.
    pub const SOCK_ADDR: [&str; 8] = [
        CONNECT4,
        SENDMSG4,
        RECVMSG4,
        GETPEERNAME4,
        CONNECT6,
        SENDMSG6,
        RECVMSG6,
        GETPEERNAME6,
    ];
}

/// Indexes into the per-CPU `METRICS` array: why a hook did (or did not) translate.
pub mod reason {
    /// Declares every reason once: its code, which is its slot in the pinned metrics array
    /// (a contract with older agents: never renumber), and its metric name.
    macro_rules! reasons {
        ($($(#[$doc:meta])* $name:ident = $code:literal => $label:literal,)*) => {
            $($(#[$doc])* pub const $name: u32 = $code;)*

            /// Human names, indexed by reason code.
            pub const NAMES: [&str; [$($code),*].len()] = [$($label),*];

            // `NAMES` is indexed by code: codes must run 0, 1, 2… in declaration order.
            const _: () = {
                let codes: &[u32] = &[$($code),*];
                let mut code: u32 = 0;
                while (code as usize) < codes.len() {
                    assert!(codes[code as usize] == code, "reason codes out of order");
                    code += 1;
                }
                assert!(codes.len() <= COUNT as usize, "more reasons than metric slots");
            };
        };
    }

    reasons! {
        /// A connect/sendmsg to a service was rewritten to a backend.
        TRANSLATED = 0 => "translated",
        /// A connect/sendmsg to a service with no backend was refused (ECONNREFUSED).
        NO_BACKEND = 1 => "no_backend",
        /// A slot or backend entry the master promised was missing (a race with the agent).
        BACKEND_LOOKUP_FAILED = 2 => "backend_lookup_failed",
        /// recvmsg/getpeername restored the service address.
        REV_NAT_APPLIED = 3 => "rev_nat_applied",
        /// The socket reverse-NAT entry could not be stored (getpeername would show the backend).
        SOCK_REV_NAT_STORE_FAILED = 4 => "sock_rev_nat_store_failed",
        /// A socket reverse-NAT entry was removed because its socket was released.
        SOCK_REV_NAT_RELEASED = 5 => "sock_rev_nat_released",
        /// A connect/sendmsg whose destination is not a service (left untouched).
        NOT_A_SERVICE = 6 => "not_a_service",
        /// A connect/sendmsg dropped: endpoints exist, none for this node (EHOSTUNREACH).
        NO_LOCAL_ENDPOINT = 7 => "no_local_endpoint",
        /// A connect/sendmsg went to the backend its client's affinity entry named.
        AFFINITY_HIT = 8 => "affinity_hit",
        /// The session-affinity entry could not be stored.
        AFFINITY_STORE_FAILED = 9 => "affinity_store_failed",
        /// TC: a new flow to a service was translated (conntrack entries created).
        TC_NEW_FLOW = 10 => "tc_new_flow",
        /// TC: a packet of a tracked flow was translated towards its backend.
        TC_CT_FORWARD = 11 => "tc_ct_forward",
        /// TC: a backend's reply was translated back to the service address.
        TC_CT_REPLY = 12 => "tc_ct_reply",
        /// TC: a flow to a service without any usable endpoint was refused (TCP RST or ICMP
        /// port unreachable sent back).
        TC_REJECTED = 13 => "tc_rejected",
        /// TC: dropped, the traffic policy leaves no endpoint on this node.
        TC_DROPPED_NO_LOCAL = 14 => "tc_dropped_no_local_endpoint",
        /// TC: dropped, the source is outside the service's loadBalancerSourceRanges.
        TC_DROPPED_SOURCE_RANGE = 15 => "tc_dropped_source_range",
        /// TC: an IP fragment was passed on untranslated (ports are not in every fragment).
        TC_FRAGMENT_PASSED = 16 => "tc_fragment_passed",
        /// TC: no route to the translated destination (packet dropped).
        TC_FIB_FAILED = 17 => "tc_fib_failed",
        /// TC: no free SNAT port was found for a new flow (packet dropped).
        TC_SNAT_EXHAUSTED = 18 => "tc_snat_exhausted",
        /// TC: a conntrack entry could not be stored (packet dropped).
        TC_CT_STORE_FAILED = 19 => "tc_ct_store_failed",
        /// TC: a non-service SYN removed a stale reply entry that claimed its 4-tuple.
        TC_STALE_CT_PURGED = 20 => "tc_stale_ct_purged",
        /// TC: an ICMP error about a tracked flow was translated.
        TC_ICMP_ERROR_TRANSLATED = 21 => "tc_icmp_error_translated",
        /// TC: a SYN for a closed or established flow started a new flow (new backend choice).
        TC_SYN_RESTARTED = 22 => "tc_syn_restarted",
        /// TC: a packet the TC path could not rewrite (malformed, or a helper failed): dropped.
        TC_REWRITE_FAILED = 23 => "tc_rewrite_failed",
        /// A connect/sendmsg to an active ClusterIP on a port that is none of its Service's:
        /// refused (ECONNREFUSED), as nftables-mode kube-proxy rejects it.
        GUARD_REJECTED = 24 => "guard_rejected",
        /// A connect/sendmsg to an address of a ServiceCIDR that no Service holds: dropped
        /// (EPERM, what a host process sees when nftables drops its packet).
        GUARD_DROPPED = 25 => "guard_dropped",
        /// TC: a packet to an active ClusterIP on a port that is none of its Service's: refused
        /// (TCP RST or ICMP port unreachable; also counted as `tc_rejected`).
        TC_GUARD_REJECTED = 26 => "tc_guard_rejected",
        /// TC: a packet to an unallocated address of a ServiceCIDR: dropped.
        TC_GUARD_DROPPED = 27 => "tc_guard_dropped",
        /// A connect/sendmsg from the host's network namespace to an externalIP that is a node
        /// or API server address: left untranslated (CVE-2020-8554).
        HOST_EXTERNAL_IP_BYPASSED = 28 => "host_external_ip_bypassed",
        /// `switchyard monitor` is on but its ring buffer was full: an event was lost.
        MONITOR_EVENTS_LOST = 29 => "monitor_events_lost",
        /// TC: a SYN on the tuple of an established flow was passed to that flow's backend
        /// without touching its state (a spoofed SYN cannot restart a live flow; a client that
        /// really lost its connection is answered by the backend's challenge ACK, and its RST
        /// closes the flow).
        TC_SYN_IGNORED = 30 => "tc_syn_ignored",
        /// TC: a RST whose sequence number lies outside the sequence space its sender used on
        /// the flow was dropped (the flow's state is left alone).
        TC_RST_OUT_OF_WINDOW = 31 => "tc_rst_out_of_window",
        /// TC: a packet's tuple belongs to another live flow, which is never overwritten: a
        /// non-service SYN on a live flow's reply tuple, a flow whose confirmation found its reply
        /// tuple taken, or the first packet of a flow whose reply tuple another CPU has just
        /// claimed for that same flow (dropped; a retransmission finds the flow). A new
        /// unmasqueraded flow whose tuple belongs to another flow takes another port instead
        /// ([`TC_CLIENT_PORT_REMAPPED`]).
        TC_CT_COLLISION = 32 => "tc_ct_collision",
        /// TC: a refusal was not sent because the packet must never be answered (a RST, or a
        /// broadcast or multicast source or destination); the packet is dropped.
        TC_REJECT_SUPPRESSED = 33 => "tc_reject_suppressed",
        /// TC: a refusal (RST or ICMP) was not sent because this CPU's token bucket was empty;
        /// the packet is dropped.
        TC_REJECT_RATE_LIMITED = 34 => "tc_reject_rate_limited",
        /// TC: a masqueraded flow kept its client's source port (it lies in the SNAT range and
        /// the translated tuple was free).
        TC_SNAT_PORT_KEPT = 35 => "tc_snat_port_kept",
        /// TC: a masqueraded flow took over the SNAT port of a flow that had ended (closed by
        /// FIN/RST or past its lifetime): ports return to the pool in the datapath.
        TC_SNAT_PORT_REUSED = 36 => "tc_snat_port_reused",
        /// A bound socket's connect/sendmsg to a LoadBalancer IP from outside its
        /// loadBalancerSourceRanges: failed with EPERM.
        SOCK_SOURCE_RANGE_DROPPED = 37 => "sock_source_range_dropped",
        /// An unbound socket's connect/sendmsg to a LoadBalancer IP with source ranges: left to
        /// the TC path, which sees the source the kernel picked.
        SOCK_SOURCE_RANGE_DEFERRED = 38 => "sock_source_range_deferred",
        /// TC: a new unmasqueraded flow's reply tuple belonged to another live flow (the same
        /// client port reaching the same backend through another frontend): the flow keeps the
        /// client's address but takes a source port of the SNAT range, as netfilter's NAT
        /// resolves a clash.
        TC_CLIENT_PORT_REMAPPED = 39 => "tc_client_port_remapped",
        /// TC: a non-first fragment of a UDP datagram was translated as its first fragment was
        /// (addresses only: later fragments carry no ports and no transport checksum).
        TC_FRAGMENT_TRANSLATED = 40 => "tc_fragment_translated",
        /// TC: a non-first UDP fragment whose first fragment was not seen (lost, evicted from the
        /// fragment map, or arriving after its later fragments): its ports are unknown, dropped.
        TC_FRAGMENT_UNTRACKED = 41 => "tc_fragment_untracked",
        /// TC: a translated packet larger than its route's MTU was answered with ICMP
        /// "fragmentation needed" (IPv4, DF set) or ICMPv6 "packet too big".
        TC_FRAG_NEEDED_SENT = 42 => "tc_frag_needed_sent",
        /// TC: a translated packet larger than its route's MTU was dropped without an answer
        /// (IPv4 without DF, a header with options, or this CPU's refusal bucket empty).
        TC_MTU_EXCEEDED = 43 => "tc_mtu_exceeded",
        /// TC, ingress node: a packet of a Direct Server Return flow was sent to its remote
        /// endpoint with the client's address and the frontend option.
        TC_DSR_ENCODED = 44 => "tc_dsr_encoded",
        /// TC, endpoint's node: a packet carrying the frontend option of a frontend this node
        /// serves had the option removed (and its reply tuple recorded) on the way to its pod.
        TC_DSR_DECODED = 45 => "tc_dsr_decoded",
        /// TC, endpoint's node: a pod's reply of a Direct Server Return flow left for the client
        /// with the frontend as its source.
        TC_DSR_REPLY = 46 => "tc_dsr_reply",
        /// TC, endpoint's node: a packet whose frontend option names no frontend this node serves
        /// (spoofed or garbled), or is malformed, was dropped.
        TC_DSR_REFUSED = 47 => "tc_dsr_refused",
        /// TC: a new flow of a Maglev frontend took the backend its Maglev table gives the flow's
        /// hash.
        TC_MAGLEV_PICKED = 48 => "tc_maglev_picked",
        /// TC: a new flow of a Maglev frontend went to a random backend: the agent had not (yet)
        /// given the datapath the table's settings, or the table slot was empty.
        TC_MAGLEV_UNAVAILABLE = 49 => "tc_maglev_unavailable",
        /// TC: a packet whose headers could not be read (cut short before the end of its IP
        /// or transport header) was passed to the stack untouched.
        TC_TRUNCATED_PASSED = 50 => "tc_truncated_passed",
        /// XDP: a client packet of a flow TC had set up was translated towards its backend and
        /// sent on (XDP_TX or XDP_REDIRECT) without reaching TC or the stack.
        XDP_FORWARDED = 51 => "xdp_forwarded",
        /// XDP: a backend's reply of a flow TC had set up was translated back and sent on.
        XDP_REPLIED = 52 => "xdp_replied",
        /// XDP: an IP packet was handed to TC and the stack (XDP_PASS): a new flow, a packet
        /// that changes a flow's state (SYN, FIN, RST, the first reply), or anything the XDP
        /// fast path does not translate (see the README's XDP section).
        XDP_PASSED = 53 => "xdp_passed",
    }

    /// Number of reason slots (size of the metrics array).
    pub const COUNT: u32 = 64;
}

macro_rules! assert_layout {
    // A type generic over the address: both instantiations are checked, and it is `Pod` for
    // both (`WireAddr` is sealed: there is no third).
    ($generic:ident<$a4:ty, $a6:ty>, size = ($size4:expr, $size6:expr), align = ($align4:expr, $align6:expr)) => {
        const _: () = assert!(core::mem::size_of::<$generic<$a4>>() == $size4);
        const _: () = assert!(core::mem::align_of::<$generic<$a4>>() == $align4);
        const _: () = assert!(core::mem::size_of::<$generic<$a6>>() == $size6);
        const _: () = assert!(core::mem::align_of::<$generic<$a6>>() == $align6);
        #[cfg(feature = "user")]
        // SAFETY: `#[repr(C)]`, made only of integers, and neither instantiation has implicit
        // padding (the size assertions above pin that down; `WireAddr` has no other
        // implementations), so every bit pattern is a valid value.
        #[allow(unsafe_code)]
        unsafe impl<A: WireAddr> aya::Pod for $generic<A> {}
    };
    ($ty:ty, size = $size:expr, align = $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
        const _: () = assert!(core::mem::align_of::<$ty>() == $align);
        #[cfg(feature = "user")]
        // SAFETY: the type is `#[repr(C)]`, made only of integers and has no implicit padding
        // (the size assertion above pins that down), so every bit pattern is a valid value.
        #[allow(unsafe_code)]
        unsafe impl aya::Pod for $ty {}
    };
}

// After the macro: its layout assertions use it.
pub mod maglev;

/// Key of the services maps. `backend_slot` 0 is the master entry of the frontend; slots
/// `1..=count` hold its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A: WireAddr> {
    pub address: A,
    pub port_be: u16,
    pub backend_slot: u16,
    pub protocol: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}
pub type Service4Key = ServiceKey<Addr4>;
pub type Service6Key = ServiceKey<Addr6>;
assert_layout!(ServiceKey<Addr4, Addr6>, size = (12, 24), align = (4, 4));

/// Value of both services maps. In the master entry (slot 0) `count`, `rev_nat_id`, `flags`
/// and `affinity_timeout_secs` describe the frontend, and `backend_id` is the number of its
/// Maglev table when `flags` has `service_flags::MAGLEV` (0 otherwise); in a backend slot
/// `backend_id` names the backend and `rev_nat_id` repeats the frontend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    pub rev_nat_id: u32,
    pub affinity_timeout_secs: u32,
}
assert_layout!(ServiceValue, size = 16, align = 4);

/// Value of the backends maps (key: `u32` backend id, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend<A: WireAddr> {
    pub address: A,
    pub port_be: u16,
    pub protocol: u8,
    pub state: u8,
}
pub type Backend4 = Backend<Addr4>;
pub type Backend6 = Backend<Addr6>;
assert_layout!(Backend<Addr4, Addr6>, size = (8, 20), align = (4, 4));

/// Value of the reverse-NAT maps (key: `u32` rev-NAT id): the service identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat<A: WireAddr> {
    pub address: A,
    pub port_be: u16,
    pub pad: u16,
}
pub type RevNat4 = RevNat<Addr4>;
pub type RevNat6 = RevNat<Addr6>;
assert_layout!(RevNat<Addr4, Addr6>, size = (8, 20), align = (4, 4));

/// Key of the socket reverse-NAT LRUs: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey<A: WireAddr> {
    pub cookie: u64,
    pub address: A,
    pub port_be: u16,
    pub pad: A::TailPad,
}
pub type SockRevNat4Key = SockRevNatKey<Addr4>;
pub type SockRevNat6Key = SockRevNatKey<Addr6>;
assert_layout!(SockRevNatKey<Addr4, Addr6>, size = (16, 32), align = (8, 8));

/// Value of the socket reverse-NAT LRUs: the service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat<A: WireAddr> {
    pub address: A,
    pub port_be: u16,
    pub pad: u16,
    pub rev_nat_id: u32,
}
pub type SockRevNat4 = SockRevNat<Addr4>;
pub type SockRevNat6 = SockRevNat<Addr6>;
assert_layout!(SockRevNat<Addr4, Addr6>, size = (12, 24), align = (4, 4));

/// Key of the session-affinity LRU: which client, which service. Clients are identified by
/// their network namespace cookie: each pod has its own network namespace, so this stands for
/// the pod's IP; every process in the host network namespace shares one identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub client_cookie: u64,
    pub rev_nat_id: u32,
    pub pad: u32,
}
assert_layout!(AffinityKey, size = 16, align = 8);

/// Value of the session-affinity LRU: the backend and when the client last used it
/// (`bpf_ktime_get_ns`, monotonic).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}
assert_layout!(AffinityValue, size = 16, align = 8);

/// Key of the affinity match map: a backend that serves a Service port (its rev-NAT id) now.
/// The datapath follows an affinity entry only while its pair is in this map, so an entry can
/// never send a client to a backend that left the Service, whatever the agent did or missed.
/// The value (`u32`) is unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub rev_nat_id: u32,
}
assert_layout!(AffinityMatchKey, size = 8, align = 4);

/// Value of the service-names map (key: `u32` rev-NAT id): `namespace/name:port`, NUL-padded,
/// so that `inspect` can name frontends with the agent stopped. Only userspace reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub bytes: [u8; 144],
}
assert_layout!(ServiceName, size = 144, align = 1);

impl Default for ServiceName {
    fn default() -> Self {
        Self { bytes: [0; 144] }
    }
}

/// Value of the service-status map (key: a [`ServiceName`] holding `namespace/name`): why the
/// agent could not program that Service (a short reason and a message, NUL-padded), so that
/// `inspect` can tell with the agent stopped. Only userspace reads and writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceStatus {
    pub reason: [u8; 32],
    pub message: [u8; 224],
}
assert_layout!(ServiceStatus, size = 256, align = 1);

impl Default for ServiceStatus {
    fn default() -> Self {
        Self {
            reason: [0; 32],
            message: [0; 224],
        }
    }
}

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

/// Value of the Direct Server Return maps on an endpoint's node (key: [`Ct4Key`], the
/// tuple the pod replies with): the frontend the reply's source is rewritten to, until
/// `expires_ns` (`bpf_ktime_get_ns`), which packets carrying the option push forward.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DsrEntry<A: WireAddr> {
    pub expires_ns: u64,
    pub address: A,
    pub port_be: u16,
    pub pad: A::TailPad,
}
pub type Dsr4Entry = DsrEntry<Addr4>;
pub type Dsr6Entry = DsrEntry<Addr6>;
assert_layout!(DsrEntry<Addr4, Addr6>, size = (16, 32), align = (8, 8));

/// The wire encoding of Direct Server Return: the ingress node inserts the frontend (address
/// and port) as an IPv4 option or an IPv6 destination option; the endpoint's node removes it.
pub mod dsr_option {
    /// IPv4 option type: copied on fragmentation (0x80), class 0, number 0x1a (the number
    /// Cilium uses for the same purpose; not assigned by IANA).
    pub const IPV4_TYPE: u8 = 0x9a;
    /// IPv4 option length: type, length, port (2), address (4).
    pub const IPV4_LEN: u8 = 8;
    /// IPv6 destination option type: the two high bits 00 ("skip if unrecognised"), an
    /// experimental number (RFC 4727 reserves 0x1e for experiments).
    pub const IPV6_TYPE: u8 = 0x1e;
    /// The destination options header: next header, length (2 = 24 bytes), option type,
    /// option length (20), address (16), port (2), and a PadN option of 2 bytes.
    pub const IPV6_HEADER_LEN: u8 = 24;
    pub const IPV6_OPTION_LEN: u8 = 20;
    /// The IPv6 next-header number of a destination options header.
    pub const NEXTHDR_DEST: u8 = 60;
}

/// Data of a source-ranges LPM key; the trie's prefix length is `32 + prefix`, so the
/// service id always matches exactly and the address by the range's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange<A: WireAddr> {
    /// The frontend's rev-NAT id, big-endian (the trie matches bytes from the first).
    pub rev_nat_id_be: u32,
    pub address: A,
}
pub type SourceRange4 = SourceRange<Addr4>;
pub type SourceRange6 = SourceRange<Addr6>;
assert_layout!(SourceRange<Addr4, Addr6>, size = (8, 20), align = (4, 4));

/// Flags of [`DatapathConfig`].
pub mod config_flags {
    /// `cluster_cidr4` is set: IPv4 sources inside it are pods.
    pub const CLUSTER_CIDR4: u8 = 1 << 0;
    /// `cluster_cidr6` is set.
    pub const CLUSTER_CIDR6: u8 = 1 << 1;
    /// `--masquerade-all`: every ClusterIP flow through TC is masqueraded.
    pub const MASQUERADE_ALL: u8 = 1 << 2;
    /// `--lb-mode dsr` or `hybrid`: external TCP flows to remote endpoints use Direct Server
    /// Return (unless their Service's annotation says `snat`).
    pub const DSR_TCP: u8 = 1 << 3;
    /// `--lb-mode dsr`: external UDP flows to remote endpoints use Direct Server Return.
    pub const DSR_UDP: u8 = 1 << 4;
}

/// The agent's settings for the TC path (index 0 of the config array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// `--cluster-cidr` (IPv4 part), network byte order.
    pub cluster_cidr4: u32,
    /// `--cluster-cidr` (IPv6 part), network byte order.
    pub cluster_cidr6: [u32; 4],
    pub cluster_prefix4: u8,
    pub cluster_prefix6: u8,
    pub flags: u8,
    pub pad: u8,
    /// Source ports for masqueraded flows, host byte order, inclusive; chosen outside the
    /// node's ephemeral range so they never collide with the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}
assert_layout!(DatapathConfig, size = 28, align = 4);

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert (for maps that are rarely written).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Flags of a service-guard entry (the value of [`ServiceGuard4`]/[`ServiceGuard6`] keys).
/// The longest matching prefix decides: an exact ClusterIP entry before its ServiceCIDR.
pub mod guard_flags {
    /// An active ClusterIP of a Service this agent serves: a port that is none of the
    /// Service's is refused (nftables mode's REJECT).
    pub const CLUSTER_IP: u32 = 1 << 0;
    /// A ServiceCIDR: an address no Service holds is dropped (nftables mode's DROP).
    pub const SERVICE_CIDR: u32 = 1 << 1;
    /// A ClusterIP of a Service that another proxy serves (`service-proxy-name`): left alone.
    pub const OTHER_PROXY: u32 = 1 << 2;
}

/// Data of a service-guard LPM key (prefix length 0..=32 or 0..=128).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceGuard<A: WireAddr> {
    /// Network byte order, as `user_ip4` and packet headers carry it.
    pub address: A,
}
pub type ServiceGuard4 = ServiceGuard<Addr4>;
pub type ServiceGuard6 = ServiceGuard<Addr6>;
assert_layout!(ServiceGuard<Addr4, Addr6>, size = (4, 16), align = (4, 4));

/// The socket hooks' settings (index 0 of the socket config array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConfig {
    /// The network namespace cookie of the host (the agent's own network namespace): sockets
    /// there are host processes. 0 until the agent wrote it.
    pub host_netns_cookie: u64,
}
assert_layout!(SockConfig, size = 8, align = 8);

/// What a [`MonitorEvent`] reports.
pub mod monitor_kind {
    /// Socket hook: a connect/sendmsg to a service was sent to a backend.
    pub const SOCK_TRANSLATED: u8 = 1;
    /// Socket hook: refused (ECONNREFUSED): no endpoint, or a port the ClusterIP does not
    /// serve.
    pub const SOCK_REFUSED: u8 = 2;
    /// Socket hook: failed without sending (EHOSTUNREACH: no endpoint for this node; EPERM:
    /// an unallocated address of a ServiceCIDR).
    pub const SOCK_DROPPED: u8 = 3;
    /// Socket hook: a host process reached an externalIP that is a node or API server
    /// address; left untranslated (CVE-2020-8554).
    pub const SOCK_UNTRANSLATED: u8 = 4;
    /// TC: a new flow was tracked and translated (NAT; `nat_src` is the masquerade source).
    pub const TC_NEW_FLOW: u8 = 5;
    /// TC: refused (TCP RST or ICMP port unreachable sent back).
    pub const TC_REJECTED: u8 = 6;
    /// TC: dropped (source range, no local endpoint, unallocated service address, no route,
    /// no SNAT port, ...; `reason` says which).
    pub const TC_DROPPED: u8 = 7;
}

/// Which hook saw a [`MonitorEvent`].
pub mod monitor_hook {
    pub const CONNECT: u8 = 1;
    pub const SENDMSG: u8 = 2;
    pub const TC_INGRESS: u8 = 3;
}

/// One datapath decision, as `switchyard monitor` reads it from the ring buffer. Addresses
/// are in network byte order; an IPv4 address is word 0 of its array (`family` 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Socket hooks: the socket's cookie.
    pub socket_cookie: u64,
    /// Socket hooks: the network namespace of the calling socket (a pod's, or the host's).
    pub netns_cookie: u64,
    /// Socket hooks: the calling process (`tgid << 32 | tid`).
    pub pid_tgid: u64,
    /// The frontend's identity (0 when the destination is no frontend).
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// `monitor_kind`.
    pub kind: u8,
    /// The `reason` code behind the decision.
    pub reason: u8,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    /// `monitor_hook`.
    pub hook: u8,
    pub pad: [u8; 3],
    /// TC: the client, as the packet arrived (socket hooks: unknown, zero).
    pub src: [u32; 4],
    /// The destination the client addressed (the frontend).
    pub dst: [u32; 4],
    /// TC: the source the backend sees (a node address when masqueraded, else the client).
    pub nat_src: [u32; 4],
    /// The backend chosen.
    pub backend: [u32; 4],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub nat_src_port_be: u16,
    pub backend_port_be: u16,
    /// Socket hooks: the calling task's name (NUL-padded).
    pub comm: [u8; 16],
}
assert_layout!(MonitorEvent, size = 136, align = 8);
