//! Map keys, values and names shared by the eBPF programs and the agent.
//!
//! Every type here is a wire format between the kernel and userspace: `#[repr(C)]`, explicit
//! zeroed padding, no `bool`/`Option`/Rust enums, ports in network byte order (named `*_be`) and
//! addresses exactly as the kernel hands them to sock_addr programs (`user_ip4`/`user_ip6`, i.e.
//! network byte order stored in native `u32`s). A compile-time size/alignment assertion sits
//! beside each type so a layout change cannot slip through unnoticed; a layout change must bump
//! [`MAP_LAYOUT_VERSION`] so a new agent never adopts maps written with the old layout.
#![no_std]

/// Version of the map layout. It is part of every map name and of the bpffs pin directory.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Map names as they appear in the eBPF object and under the pin directory.
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

    /// Every map the agent pins and adopts.
    pub const ALL: [&str; 11] = [
        SERVICES4,
        SERVICES6,
        BACKENDS4,
        BACKENDS6,
        REV_NAT4,
        REV_NAT6,
        SOCK_REV_NAT4,
        SOCK_REV_NAT6,
        METRICS,
        AFFINITY,
        SERVICE_NAMES,
    ];
}

/// Capacities of the maps (the eBPF side declares them with these numbers).
pub mod capacity {
    /// Service entries: one master slot plus one slot per backend, for every frontend.
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    pub const REV_NAT: u32 = 131_072;
    /// Socket reverse-NAT entries are an LRU: connected sockets are removed at sock_release,
    /// unconnected UDP entries age out under pressure.
    pub const SOCK_REV_NAT: u32 = 262_144;
    /// ClientIP session-affinity entries (one per client and service); an LRU.
    pub const AFFINITY: u32 = 131_072;
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
    /// Number of reason slots (size of the metrics array).
    pub const COUNT: u32 = 16;

    /// Human names, indexed by reason code.
    pub const NAMES: [&str; 10] = [
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

/// Value of both services maps. In the master entry (slot 0) `backend_id` is 0 and `count`,
/// `rev_nat_id`, `flags` and `affinity_timeout_secs` describe the frontend; in a backend slot
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

/// Value of the service-names map (key: `u32` rev-NAT id): `namespace/name:port`, NUL-padded,
/// so that `inspect` can name frontends with the agent stopped. Only userspace reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub bytes: [u8; 144],
}
assert_layout!(ServiceName, size = 144, align = 1);

impl Default for ServiceName {
    fn default() -> Self {
        Self { bytes: [0; 144] }
    }
}

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert (for maps that are rarely written).
pub const BPF_F_NO_PREALLOC: u32 = 1;
