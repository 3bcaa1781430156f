//! Map keys, values and names shared by the eBPF programs and the agent.
//!
//! Every type here is a wire format between the kernel and userspace: `#[repr(C)]`, explicit
//! zeroed padding, no `bool`/`Option`/Rust enums, ports in network byte order (named `*_be`) and
//! addresses exactly as the kernel hands them to sock_addr programs (`user_ip4`/`user_ip6`, i.e.
//! network byte order stored in native `u32`s). A compile-time size/alignment assertion sits
//! beside each type so a layout change cannot slip through unnoticed; a layout change must bump
//! [`SOURCE_LAYOUT_VERSION`] so a new agent never adopts maps written with the old layout.
#![cfg_attr(not(test), no_std)]

pub mod map_table;

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

/// Indexes into the per-CPU `METRICS` array: why a hook did (or did not) translate.
pub mod reason {
    /// A connect/sendmsg to a service was rewritten to a backend.
    pub const TRANSLATED: u32 = 0;
    /// A connect/sendmsg to a service with no backend was refused (ECONNREFUSED).
    pub const NO_BACKEND: u32 = 1;
    /// A slot or backend entry the master promised was missing (a race with the agent).
    pub const BACKEND_LOOKUP_FAILED: u32 = 2;
    /// recvmsg/getpeername restored the service address.
    pub const REV_NAT_APPLIED: u32 = 3;
    /// The socket reverse-NAT entry could not be stored (getpeername would show the backend).
    pub const SOCK_REV_NAT_STORE_FAILED: u32 = 4;
    /// A socket reverse-NAT entry was removed because its socket was released.
    pub const SOCK_REV_NAT_RELEASED: u32 = 5;
    /// A connect/sendmsg whose destination is not a service (left untouched).
    pub const NOT_A_SERVICE: u32 = 6;
    /// A connect/sendmsg dropped: endpoints exist, none for this node (EHOSTUNREACH).
    pub const NO_LOCAL_ENDPOINT: u32 = 7;
    /// A connect/sendmsg went to the backend its client's affinity entry named.
    pub const AFFINITY_HIT: u32 = 8;
    /// The session-affinity entry could not be stored.
    pub const AFFINITY_STORE_FAILED: u32 = 9;
    /// TC: a new flow to a service was translated (conntrack entries created).
    pub const TC_NEW_FLOW: u32 = 10;
    /// TC: a packet of a tracked flow was translated towards its backend.
    pub const TC_CT_FORWARD: u32 = 11;
    /// TC: a backend's reply was translated back to the service address.
    pub const TC_CT_REPLY: u32 = 12;
    /// TC: a flow to a service without any usable endpoint was refused (TCP RST or ICMP
    /// port unreachable sent back).
    pub const TC_REJECTED: u32 = 13;
    /// TC: dropped, the traffic policy leaves no endpoint on this node.
    pub const TC_DROPPED_NO_LOCAL: u32 = 14;
    /// TC: dropped, the source is outside the service's loadBalancerSourceRanges.
    pub const TC_DROPPED_SOURCE_RANGE: u32 = 15;
    /// TC: an IP fragment was passed on untranslated (ports are not in every fragment).
    pub const TC_FRAGMENT_PASSED: u32 = 16;
    /// TC: no route to the translated destination (packet dropped).
    pub const TC_FIB_FAILED: u32 = 17;
    /// TC: no free SNAT port was found for a new flow (packet dropped).
    pub const TC_SNAT_EXHAUSTED: u32 = 18;
    /// TC: a conntrack entry could not be stored (packet dropped).
    pub const TC_CT_STORE_FAILED: u32 = 19;
    /// TC: a non-service SYN removed a stale reply entry that claimed its 4-tuple.
    pub const TC_STALE_CT_PURGED: u32 = 20;
    /// TC: an ICMP error about a tracked flow was translated.
    pub const TC_ICMP_ERROR_TRANSLATED: u32 = 21;
    /// TC: a SYN for a closed or established flow started a new flow (new backend choice).
    pub const TC_SYN_RESTARTED: u32 = 22;
    /// TC: a packet the TC path could not rewrite (malformed, or a helper failed): dropped.
    pub const TC_REWRITE_FAILED: u32 = 23;
    /// A connect/sendmsg to an active ClusterIP on a port that is none of its Service's:
    /// refused (ECONNREFUSED), as nftables-mode kube-proxy rejects it.
    pub const GUARD_REJECTED: u32 = 24;
    /// A connect/sendmsg to an address of a ServiceCIDR that no Service holds: dropped
    /// (EPERM, what a host process sees when nftables drops its packet).
    pub const GUARD_DROPPED: u32 = 25;
    /// TC: a packet to an active ClusterIP on a port that is none of its Service's: refused
    /// (TCP RST or ICMP port unreachable; also counted as `tc_rejected`).
    pub const TC_GUARD_REJECTED: u32 = 26;
    /// TC: a packet to an unallocated address of a ServiceCIDR: dropped.
    pub const TC_GUARD_DROPPED: u32 = 27;
    /// A connect/sendmsg from the host's network namespace to an externalIP that is a node
    /// or API server address: left untranslated (CVE-2020-8554).
    pub const HOST_EXTERNAL_IP_BYPASSED: u32 = 28;
    /// `switchyard monitor` is on but its ring buffer was full: an event was lost.
    pub const MONITOR_EVENTS_LOST: u32 = 29;
    /// TC: a SYN on the tuple of an established flow was passed to that flow's backend
    /// without touching its state (a spoofed SYN cannot restart a live flow; a client that
    /// really lost its connection is answered by the backend's challenge ACK, and its RST
    /// closes the flow).
    pub const TC_SYN_IGNORED: u32 = 30;
    /// TC: a RST whose sequence number lies outside the sequence space its sender used on
    /// the flow was dropped (the flow's state is left alone).
    pub const TC_RST_OUT_OF_WINDOW: u32 = 31;
    /// TC: a packet's tuple belongs to another live flow, which is never overwritten: a
    /// non-service SYN on a live flow's reply tuple, a flow whose confirmation found its reply
    /// tuple taken, or the first packet of a flow whose reply tuple another CPU has just
    /// claimed for that same flow (dropped; a retransmission finds the flow). A new
    /// unmasqueraded flow whose tuple belongs to another flow takes another port instead
    /// ([`TC_CLIENT_PORT_REMAPPED`]).
    pub const TC_CT_COLLISION: u32 = 32;
    /// TC: a refusal was not sent because the packet must never be answered (a RST, or a
    /// broadcast or multicast source or destination); the packet is dropped.
    pub const TC_REJECT_SUPPRESSED: u32 = 33;
    /// TC: a refusal (RST or ICMP) was not sent because this CPU's token bucket was empty;
    /// the packet is dropped.
    pub const TC_REJECT_RATE_LIMITED: u32 = 34;
    /// TC: a masqueraded flow kept its client's source port (it lies in the SNAT range and
    /// the translated tuple was free).
    pub const TC_SNAT_PORT_KEPT: u32 = 35;
    /// TC: a masqueraded flow took over the SNAT port of a flow that had ended (closed by
    /// FIN/RST or past its lifetime): ports return to the pool in the datapath.
    pub const TC_SNAT_PORT_REUSED: u32 = 36;
    /// A bound socket's connect/sendmsg to a LoadBalancer IP from outside its
    /// loadBalancerSourceRanges: failed with EPERM.
    pub const SOCK_SOURCE_RANGE_DROPPED: u32 = 37;
    /// An unbound socket's connect/sendmsg to a LoadBalancer IP with source ranges: left to
    /// the TC path, which sees the source the kernel picked.
    pub const SOCK_SOURCE_RANGE_DEFERRED: u32 = 38;
    /// TC: a new unmasqueraded flow's reply tuple belonged to another live flow (the same
    /// client port reaching the same backend through another frontend): the flow keeps the
    /// client's address but takes a source port of the SNAT range, as netfilter's NAT
    /// resolves a clash.
    pub const TC_CLIENT_PORT_REMAPPED: u32 = 39;
    /// TC: a non-first fragment of a UDP datagram was translated as its first fragment was
    /// (addresses only: later fragments carry no ports and no transport checksum).
    pub const TC_FRAGMENT_TRANSLATED: u32 = 40;
    /// TC: a non-first UDP fragment whose first fragment was not seen (lost, evicted from the
    /// fragment map, or arriving after its later fragments): its ports are unknown, dropped.
    pub const TC_FRAGMENT_UNTRACKED: u32 = 41;
    /// TC: a translated packet larger than its route's MTU was answered with ICMP
    /// "fragmentation needed" (IPv4, DF set) or ICMPv6 "packet too big".
    pub const TC_FRAG_NEEDED_SENT: u32 = 42;
    /// TC: a translated packet larger than its route's MTU was dropped without an answer
    /// (IPv4 without DF, a header with options, or this CPU's refusal bucket empty).
    pub const TC_MTU_EXCEEDED: u32 = 43;
    /// TC, ingress node: a packet of a Direct Server Return flow was sent to its remote
    /// endpoint with the client's address and the frontend option.
    pub const TC_DSR_ENCODED: u32 = 44;
    /// TC, endpoint's node: a packet carrying the frontend option of a frontend this node
    /// serves had the option removed (and its reply tuple recorded) on the way to its pod.
    pub const TC_DSR_DECODED: u32 = 45;
    /// TC, endpoint's node: a pod's reply of a Direct Server Return flow left for the client
    /// with the frontend as its source.
    pub const TC_DSR_REPLY: u32 = 46;
    /// TC, endpoint's node: a packet whose frontend option names no frontend this node serves
    /// (spoofed or garbled), or is malformed, was dropped.
    pub const TC_DSR_REFUSED: u32 = 47;
    /// TC: a new flow of a Maglev frontend took the backend its Maglev table gives the flow's
    /// hash.
    pub const TC_MAGLEV_PICKED: u32 = 48;
    /// TC: a new flow of a Maglev frontend went to a random backend: the agent had not (yet)
    /// given the datapath the table's settings, or the table slot was empty.
    pub const TC_MAGLEV_UNAVAILABLE: u32 = 49;
    /// XDP: a client packet of a flow TC had set up was translated towards its backend and
    /// sent on (XDP_TX or XDP_REDIRECT) without reaching TC or the stack.
    pub const XDP_FORWARDED: u32 = 50;
    /// XDP: a backend's reply of a flow TC had set up was translated back and sent on.
    pub const XDP_REPLIED: u32 = 51;
    /// XDP: an IP packet was handed to TC and the stack (XDP_PASS): a new flow, a packet
    /// that changes a flow's state (SYN, FIN, RST, the first reply), or anything the XDP
    /// fast path does not translate (see the README's XDP section).
    pub const XDP_PASSED: u32 = 52;
    /// Number of reason slots (size of the metrics array).
    pub const COUNT: u32 = 64;

    /// Human names, indexed by reason code.
    pub const NAMES: [&str; 53] = [
        "translated",
        "no_backend",
        "backend_lookup_failed",
        "rev_nat_applied",
        "sock_rev_nat_store_failed",
        "sock_rev_nat_released",
        "not_a_service",
        "no_local_endpoint",
        "affinity_hit",
        "affinity_store_failed",
        "tc_new_flow",
        "tc_ct_forward",
        "tc_ct_reply",
        "tc_rejected",
        "tc_dropped_no_local_endpoint",
        "tc_dropped_source_range",
        "tc_fragment_passed",
        "tc_fib_failed",
        "tc_snat_exhausted",
        "tc_ct_store_failed",
        "tc_stale_ct_purged",
        "tc_icmp_error_translated",
        "tc_syn_restarted",
        "tc_rewrite_failed",
        "guard_rejected",
        "guard_dropped",
        "tc_guard_rejected",
        "tc_guard_dropped",
        "host_external_ip_bypassed",
        "monitor_events_lost",
        "tc_syn_ignored",
        "tc_rst_out_of_window",
        "tc_ct_collision",
        "tc_reject_suppressed",
        "tc_reject_rate_limited",
        "tc_snat_port_kept",
        "tc_snat_port_reused",
        "sock_source_range_dropped",
        "sock_source_range_deferred",
        "tc_client_port_remapped",
        "tc_fragment_translated",
        "tc_fragment_untracked",
        "tc_frag_needed_sent",
        "tc_mtu_exceeded",
        "tc_dsr_encoded",
        "tc_dsr_decoded",
        "tc_dsr_reply",
        "tc_dsr_refused",
        "tc_maglev_picked",
        "tc_maglev_unavailable",
        "xdp_forwarded",
        "xdp_replied",
        "xdp_passed",
    ];
}

macro_rules! assert_layout {
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

/// Key of the IPv4 services map. `backend_slot` 0 is the master entry of the frontend; slots
/// `1..=count` hold its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    pub address: u32,
    pub port_be: u16,
    pub backend_slot: u16,
    pub protocol: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}
assert_layout!(Service4Key, size = 12, align = 4);

/// Key of the IPv6 services map (see [`Service4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service6Key {
    pub address: [u32; 4],
    pub port_be: u16,
    pub backend_slot: u16,
    pub protocol: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}
assert_layout!(Service6Key, size = 24, align = 4);

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

/// Value of the IPv4 backends map (key: `u32` backend id, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    pub address: u32,
    pub port_be: u16,
    pub protocol: u8,
    pub state: u8,
}
assert_layout!(Backend4, size = 8, align = 4);

/// Value of the IPv6 backends map (key: `u32` backend id, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend6 {
    pub address: [u32; 4],
    pub port_be: u16,
    pub protocol: u8,
    pub state: u8,
}
assert_layout!(Backend6, size = 20, align = 4);

/// Value of the IPv4 reverse-NAT map (key: `u32` rev-NAT id): the service identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4 {
    pub address: u32,
    pub port_be: u16,
    pub pad: u16,
}
assert_layout!(RevNat4, size = 8, align = 4);

/// Value of the IPv6 reverse-NAT map (key: `u32` rev-NAT id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat6 {
    pub address: [u32; 4],
    pub port_be: u16,
    pub pad: u16,
}
assert_layout!(RevNat6, size = 20, align = 4);

/// Key of the IPv4 socket reverse-NAT LRU: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    pub address: u32,
    pub port_be: u16,
    pub pad: u16,
}
assert_layout!(SockRevNat4Key, size = 16, align = 8);

/// Value of the IPv4 socket reverse-NAT LRU: the service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4 {
    pub address: u32,
    pub port_be: u16,
    pub pad: u16,
    pub rev_nat_id: u32,
}
assert_layout!(SockRevNat4, size = 12, align = 4);

/// Key of the IPv6 socket reverse-NAT LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub address: [u32; 4],
    pub port_be: u16,
    pub pad: [u16; 3],
}
assert_layout!(SockRevNat6Key, size = 32, align = 8);

/// Value of the IPv6 socket reverse-NAT LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat6 {
    pub address: [u32; 4],
    pub port_be: u16,
    pub pad: u16,
    pub rev_nat_id: u32,
}
assert_layout!(SockRevNat6, size = 24, align = 4);

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

/// Key of the IPv4 conntrack LRU: the packet's 5-tuple as it arrives (addresses and ports in
/// network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}
assert_layout!(Ct4Key, size = 16, align = 4);

/// Value of the IPv4 conntrack LRU: the tuple a matching packet is rewritten to. A forward
/// entry (client → frontend) rewrites to (client or node address → backend); its reply entry,
/// keyed by the tuple the backend answers with, rewrites back to (frontend → client).
/// `expires_ns` (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) is kept on the forward entry only; a
/// reply entry lives as long as its forward entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Entry {
    pub expires_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub flags: u16,
    pub pad: u16,
}
assert_layout!(Ct4Entry, size = 32, align = 8);

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

/// Key of the IPv6 conntrack LRU (see [`Ct4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct6Key {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}
assert_layout!(Ct6Key, size = 40, align = 4);

/// Value of the IPv6 conntrack LRU (see [`Ct4Entry`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Entry {
    pub expires_ns: u64,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub flags: u16,
    pub pad: u16,
}
assert_layout!(Ct6Entry, size = 56, align = 8);

/// Value of the IPv4 Direct Server Return map on an endpoint's node (key: [`Ct4Key`], the
/// tuple the pod replies with): the frontend the reply's source is rewritten to, until
/// `expires_ns` (`bpf_ktime_get_ns`), which packets carrying the option push forward.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Dsr4Entry {
    pub expires_ns: u64,
    pub address: u32,
    pub port_be: u16,
    pub pad: u16,
}
assert_layout!(Dsr4Entry, size = 16, align = 8);

/// Value of the IPv6 Direct Server Return map (key: [`Ct6Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Dsr6Entry {
    pub expires_ns: u64,
    pub address: [u32; 4],
    pub port_be: u16,
    pub pad: [u16; 3],
}
assert_layout!(Dsr6Entry, size = 32, align = 8);

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

/// Data of an IPv4 source-ranges LPM key; the trie's prefix length is `32 + prefix`, so the
/// service id always matches exactly and the address by the range's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange4 {
    /// The frontend's rev-NAT id, big-endian (the trie matches bytes from the first).
    pub rev_nat_id_be: u32,
    pub address: u32,
}
assert_layout!(SourceRange4, size = 8, align = 4);

/// Data of an IPv6 source-ranges LPM key (prefix length `32 + prefix`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange6 {
    pub rev_nat_id_be: u32,
    pub address: [u32; 4],
}
assert_layout!(SourceRange6, size = 20, align = 4);

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

/// Data of an IPv4 service-guard LPM key (prefix length 0..=32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceGuard4 {
    /// Network byte order, as `user_ip4` and packet headers carry it.
    pub address: u32,
}
assert_layout!(ServiceGuard4, size = 4, align = 4);

/// Data of an IPv6 service-guard LPM key (prefix length 0..=128).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceGuard6 {
    pub address: [u32; 4],
}
assert_layout!(ServiceGuard6, size = 16, align = 4);

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
