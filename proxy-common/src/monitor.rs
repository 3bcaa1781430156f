//! `switchyard monitor`'s events: the datapath's decisions, as the ring buffer carries them.

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
