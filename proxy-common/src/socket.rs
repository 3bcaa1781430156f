//! What the socket hooks keep: which backend a socket was sent to, session affinity, and the
//! hooks' settings.

use crate::addr::{Addr4, Addr6, WireAddr};

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

/// The socket hooks' settings (index 0 of the socket config array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConfig {
    /// The network namespace cookie of the host (the agent's own network namespace): sockets
    /// there are host processes. 0 until the agent wrote it.
    pub host_netns_cookie: u64,
}
assert_layout!(SockConfig, size = 8, align = 8);
