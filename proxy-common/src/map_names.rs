//! Map names as they appear in the eBPF object and under the pin directory; the rest of what
//! describes each map (kind, types, capacity, flags) is in [`map_table`].

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
