//! Indexes into the per-CPU `METRICS` array: why a hook did (or did not) translate.

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
