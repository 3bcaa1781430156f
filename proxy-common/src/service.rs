//! Service frontends and backends as the maps hold them: the services, backends, reverse-NAT,
//! service-name and service-status maps, and the constants stored in their fields.

use crate::addr::{Addr4, Addr6, WireAddr};

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
