//! Who may reach which frontend: loadBalancerSourceRanges and the service-CIDR guard (LPM
//! trie keys and their flags).

use crate::addr::{Addr4, Addr6, WireAddr};

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
