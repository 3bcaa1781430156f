//! The agent's settings for the TC path, and map creation flags.

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
