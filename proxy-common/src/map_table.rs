//! The one table of maps. Every map of the eBPF object is described here once: its name, kind,
//! key and value types (and so their sizes), default capacity, creation flags and who writes
//! its entries. The eBPF crate declares its `#[map]` statics from these definitions, and the
//! agent's loader, writer, metrics and `inspect` read them; nothing else keeps a list of maps.
//!
//! Compile-time checks below hold the table to what the kernel and the pin layout require
//! (names bpffs accepts and that carry the layout version, LPM tries without preallocation,
//! LRU maps with it, agent-written hash maps without it).
use core::marker::PhantomData;

use crate::{
    AffinityKey, AffinityMatchKey, AffinityValue, BPF_F_NO_PREALLOC, Backend4, Backend6, Ct4Entry,
    Ct4Key, Ct6Entry, Ct6Key, DatapathConfig, Dsr4Entry, Dsr6Entry, Frag4Key, Frag6Key, FragPorts,
    RevNat4, RevNat6, SOURCE_LAYOUT_VERSION, Service4Key, Service6Key, ServiceGuard4,
    ServiceGuard6, ServiceName, ServiceStatus, ServiceValue, SockConfig, SockRevNat4,
    SockRevNat4Key, SockRevNat6, SockRevNat6Key, SourceRange4, SourceRange6, maglev::MaglevConfig,
    map_names, reason,
};

/// The kernel map types the datapath uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_LRU_HASH`: always preallocated; full means the least recently used entry
    /// gives way.
    LruHash,
    /// `BPF_MAP_TYPE_LPM_TRIE`: never preallocated.
    LpmTrie,
    /// `BPF_MAP_TYPE_ARRAY`: a fixed set of slots.
    Array,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`: a fixed set of slots, one copy per CPU.
    PerCpuArray,
    /// `BPF_MAP_TYPE_RINGBUF`: a byte ring the datapath writes records to (its capacity is
    /// in bytes, a power of two and a multiple of the page size; no keys, no values).
    RingBuf,
}

impl MapKind {
    /// The kernel's `enum bpf_map_type` number (include/uapi/linux/bpf.h).
    pub const fn bpf_type(self) -> u32 {
        match self {
            Self::Hash => 1,
            Self::Array => 2,
            Self::PerCpuArray => 6,
            Self::LruHash => 9,
            Self::LpmTrie => 11,
            Self::RingBuf => 27,
        }
    }

    /// The kind with this `bpf_map_type` number, if the datapath uses it.
    pub const fn from_bpf_type(number: u32) -> Option<Self> {
        match number {
            1 => Some(Self::Hash),
            2 => Some(Self::Array),
            6 => Some(Self::PerCpuArray),
            9 => Some(Self::LruHash),
            11 => Some(Self::LpmTrie),
            27 => Some(Self::RingBuf),
            _ => None,
        }
    }

    /// A short name for messages and `inspect`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::LruHash => "lru_hash",
            Self::LpmTrie => "lpm_trie",
            Self::Array => "array",
            Self::PerCpuArray => "percpu_array",
            Self::RingBuf => "ringbuf",
        }
    }

    /// Whether entries come and go (so a fill can be counted), unlike an array's fixed slots.
    pub const fn has_entries(self) -> bool {
        matches!(self, Self::Hash | Self::LruHash | Self::LpmTrie)
    }
}

/// Who creates a map's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The agent, from the cluster state (its mirror knows the exact count).
    Agent,
    /// The eBPF programs, per connection or packet (the agent may delete, never adds).
    Datapath,
}

/// The agent's capacity settings; each sizes a group of maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CapacitySetting {
    /// Services, backends, reverse-NAT and service names (`--bpf-lb-map-max`).
    LoadBalancer,
    /// The TC path's connection tracking (`--bpf-ct-global-max`).
    Conntrack,
    /// The TC path's flows not yet confirmed by both sides (`--bpf-ct-unreplied-max`).
    ConntrackUnreplied,
    /// The socket reverse-NAT maps (`--bpf-sock-rev-map-max`).
    SockRevNat,
    /// Session affinity (`--bpf-affinity-map-max`).
    Affinity,
    /// loadBalancerSourceRanges prefixes (`--bpf-lb-source-range-map-max`).
    SourceRanges,
    /// Slots of every Maglev table together (`--bpf-maglev-tables-max` times
    /// `--maglev-table-size`).
    Maglev,
    /// Direct Server Return flows served by this node's endpoints (`--bpf-dsr-rev-map-max`).
    DsrReverse,
}

/// The DSR reply maps' default capacity when `--lb-mode` is `dsr` or `hybrid`: one entry per
/// flow, as many flows as the default conntrack capacity holds (two entries each).
pub const DSR_FLOWS_WHEN_DEFAULT: u32 = 65_536;

/// The number of Maglev tables the default capacity holds.
pub const DEFAULT_MAGLEV_TABLES: u32 = 64;

impl CapacitySetting {
    pub const ALL: [Self; 8] = [
        Self::LoadBalancer,
        Self::Conntrack,
        Self::ConntrackUnreplied,
        Self::SockRevNat,
        Self::Affinity,
        Self::SourceRanges,
        Self::Maglev,
        Self::DsrReverse,
    ];

    /// The default capacity of every map this setting sizes.
    #[expect(
        clippy::match_same_arms,
        reason = "equal by coincidence: each group is sized on its own"
    )]
    pub const fn default_capacity(self) -> u32 {
        match self {
            // A frontend takes one entry plus one per backend slot: 10 000 Services with 10
            // endpoints and a NodePort each need about 220 000. Not preallocated, so an unused
            // entry costs only its share of the hash table's buckets.
            Self::LoadBalancer => 262_144,
            // Two entries per flow (forward and reply): 65 536 north-south flows per family.
            Self::Conntrack => 131_072,
            // Two entries per flow until both sides have spoken: a SYN flood churns this map
            // only, so established flows never give way to it.
            Self::ConntrackUnreplied => 32_768,
            // One per connected socket (and per backend of an unconnected UDP socket).
            Self::SockRevNat => 131_072,
            // One per (client network namespace, Service port) with ClientIP affinity.
            Self::Affinity => 65_536,
            // Prefixes of every Service's loadBalancerSourceRanges together, per family.
            Self::SourceRanges => 65_536,
            // 64 tables of the default size: 4 MiB, preallocated.
            Self::Maglev => DEFAULT_MAGLEV_TABLES * crate::maglev::DEFAULT_TABLE_SIZE,
            // One per DSR flow whose endpoint is on this node. With `--lb-mode snat` only
            // Services annotated for DSR use it, so the object's default is small; the agent
            // raises it to [`DSR_FLOWS_WHEN_DEFAULT`] when DSR is the node's mode.
            Self::DsrReverse => 16_384,
        }
    }
}

/// How a map's capacity is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// Always this many entries (arrays whose size is part of the layout).
    Fixed(u32),
    /// By one of the agent's capacity settings.
    Setting(CapacitySetting),
}

/// One map of the table, without its Rust types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The name in the eBPF object, in the kernel and under the pin directory.
    pub name: &'static str,
    pub kind: MapKind,
    /// Key size as the kernel sees it (for an LPM trie: the 4-byte prefix length plus the data).
    pub key_size: u32,
    pub value_size: u32,
    pub sizing: Sizing,
    /// `map_flags` at creation (`BPF_F_NO_PREALLOC` or 0).
    pub flags: u32,
    pub writer: Writer,
    /// Pinned under `<bpffs>/v<N>/maps/` so it outlives the agent.
    pub pinned: bool,
}

impl MapSpec {
    /// The capacity the eBPF object declares (what the agent uses unless told otherwise).
    pub const fn default_capacity(&self) -> u32 {
        match self.sizing {
            Sizing::Fixed(entries) => entries,
            Sizing::Setting(setting) => setting.default_capacity(),
        }
    }

    /// Whether the kernel allocates every entry when the map is created.
    pub const fn preallocated(&self) -> bool {
        matches!(self.kind, MapKind::Hash | MapKind::LruHash) && self.flags & BPF_F_NO_PREALLOC == 0
    }
}

/// A map of the table with its key and value types (for an LPM trie, `K` is the key's data
/// after the prefix length).
pub struct MapDef<K, V> {
    pub spec: MapSpec,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> MapDef<K, V> {
    const fn new(
        name: &'static str,
        kind: MapKind,
        sizing: Sizing,
        flags: u32,
        writer: Writer,
    ) -> Self {
        let data = size_of::<K>();
        let key = if matches!(kind, MapKind::LpmTrie) {
            size_of::<u32>() + data
        } else {
            data
        };
        Self {
            spec: MapSpec {
                name,
                kind,
                key_size: small(key),
                value_size: small(size_of::<V>()),
                sizing,
                flags,
                writer,
                pinned: true,
            },
            types: PhantomData,
        }
    }
}

const fn small(size: usize) -> u32 {
    assert!(size <= u32::MAX as usize, "a map key or value of 4 GiB");
    #[expect(clippy::cast_possible_truncation, reason = "checked on the line above")]
    let size = size as u32;
    size
}

const LB: Sizing = Sizing::Setting(CapacitySetting::LoadBalancer);
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

/// Service entries (master and backend slots) of IPv4 frontends.
pub const SERVICES4: MapDef<Service4Key, ServiceValue> = MapDef::new(
    map_names::SERVICES4,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Service entries of IPv6 frontends.
pub const SERVICES6: MapDef<Service6Key, ServiceValue> = MapDef::new(
    map_names::SERVICES6,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Backend id → IPv4 backend.
pub const BACKENDS4: MapDef<u32, Backend4> = MapDef::new(
    map_names::BACKENDS4,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Backend id → IPv6 backend.
pub const BACKENDS6: MapDef<u32, Backend6> = MapDef::new(
    map_names::BACKENDS6,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Rev-NAT id → IPv4 frontend (the service identity replies are restored to).
pub const REV_NAT4: MapDef<u32, RevNat4> = MapDef::new(
    map_names::REV_NAT4,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Rev-NAT id → IPv6 frontend.
pub const REV_NAT6: MapDef<u32, RevNat6> = MapDef::new(
    map_names::REV_NAT6,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Rev-NAT id → `namespace/name:port`, for `inspect` with the agent stopped (both families).
pub const SERVICE_NAMES: MapDef<u32, ServiceName> = MapDef::new(
    map_names::SERVICE_NAMES,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// Which IPv4 backend a socket was sent to, for recvmsg/getpeername.
pub const SOCK_REV_NAT4: MapDef<SockRevNat4Key, SockRevNat4> = MapDef::new(
    map_names::SOCK_REV_NAT4,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::SockRevNat),
    0,
    Writer::Datapath,
);
/// Which IPv6 backend a socket was sent to.
pub const SOCK_REV_NAT6: MapDef<SockRevNat6Key, SockRevNat6> = MapDef::new(
    map_names::SOCK_REV_NAT6,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::SockRevNat),
    0,
    Writer::Datapath,
);
/// The datapath's reason counters.
pub const METRICS: MapDef<u32, u64> = MapDef::new(
    map_names::METRICS,
    MapKind::PerCpuArray,
    Sizing::Fixed(reason::COUNT),
    0,
    Writer::Datapath,
);
/// ClientIP session affinity: (client, service) → backend.
pub const AFFINITY: MapDef<AffinityKey, AffinityValue> = MapDef::new(
    map_names::AFFINITY,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::Affinity),
    0,
    Writer::Datapath,
);
/// (backend id, rev-NAT id) pairs of the Services with ClientIP affinity: the datapath
/// follows an affinity entry only while its backend is in this map for that Service.
pub const AFFINITY_MATCH: MapDef<AffinityMatchKey, u32> = MapDef::new(
    map_names::AFFINITY_MATCH,
    MapKind::Hash,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// The TC path's IPv4 connection tracking.
pub const CT4: MapDef<Ct4Key, Ct4Entry> = MapDef::new(
    map_names::CT4,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::Conntrack),
    0,
    Writer::Datapath,
);
/// The TC path's IPv6 connection tracking.
pub const CT6: MapDef<Ct6Key, Ct6Entry> = MapDef::new(
    map_names::CT6,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::Conntrack),
    0,
    Writer::Datapath,
);
/// The TC path's IPv4 flows not yet confirmed by both sides (a TCP flow until the client
/// acknowledges the backend's SYN-ACK, a UDP flow until its first reply): a smaller LRU of
/// its own, so a flood of unanswered flows evicts only its kind, never an established flow
/// (netfilter's early drop of unassured entries, by construction). Same entries as `CT4`.
pub const CT4_UNREPLIED: MapDef<Ct4Key, Ct4Entry> = MapDef::new(
    map_names::CT4_UNREPLIED,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::ConntrackUnreplied),
    0,
    Writer::Datapath,
);
/// The TC path's IPv6 flows not yet confirmed by both sides.
pub const CT6_UNREPLIED: MapDef<Ct6Key, Ct6Entry> = MapDef::new(
    map_names::CT6_UNREPLIED,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::ConntrackUnreplied),
    0,
    Writer::Datapath,
);
/// Direct Server Return on an endpoint's node: the tuple a pod replies with (pod → client) →
/// the frontend the reply leaves with. Written by the TC path when a packet carrying the
/// frontend option arrives (so it survives the agent), one entry per DSR flow served here;
/// sized by `--bpf-dsr-rev-map-max` (preallocated, so small unless DSR is the node's mode).
pub const DSR_REV4: MapDef<Ct4Key, Dsr4Entry> = MapDef::new(
    map_names::DSR_REV4,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::DsrReverse),
    0,
    Writer::Datapath,
);
/// Direct Server Return reverse entries of IPv6 flows.
pub const DSR_REV6: MapDef<Ct6Key, Dsr6Entry> = MapDef::new(
    map_names::DSR_REV6,
    MapKind::LruHash,
    Sizing::Setting(CapacitySetting::DsrReverse),
    0,
    Writer::Datapath,
);
/// Entries of the fragment maps: datagrams being fragmented through the TC path at once. An
/// entry lives until LRU eviction (a datagram's fragments arrive within microseconds, so
/// 8 192 datagrams in flight is far beyond what a node forwards).
pub const FRAGMENT_CAPACITY: u32 = 8_192;

/// The TC path's IPv4 fragmented UDP datagrams: (source, destination, IP ID, protocol) →
/// the ports of the first fragment, written when it passes, read by the later fragments.
pub const FRAGMENTS4: MapDef<Frag4Key, FragPorts> = MapDef::new(
    map_names::FRAGMENTS4,
    MapKind::LruHash,
    Sizing::Fixed(FRAGMENT_CAPACITY),
    0,
    Writer::Datapath,
);
/// The TC path's IPv6 fragmented UDP datagrams (the Fragment header's identification).
pub const FRAGMENTS6: MapDef<Frag6Key, FragPorts> = MapDef::new(
    map_names::FRAGMENTS6,
    MapKind::LruHash,
    Sizing::Fixed(FRAGMENT_CAPACITY),
    0,
    Writer::Datapath,
);
/// loadBalancerSourceRanges of IPv4 frontends: (rev-NAT id, prefix).
pub const SOURCE_RANGES4: MapDef<SourceRange4, u32> = MapDef::new(
    map_names::SOURCE_RANGES4,
    MapKind::LpmTrie,
    Sizing::Setting(CapacitySetting::SourceRanges),
    NO_PREALLOC,
    Writer::Agent,
);
/// loadBalancerSourceRanges of IPv6 frontends.
pub const SOURCE_RANGES6: MapDef<SourceRange6, u32> = MapDef::new(
    map_names::SOURCE_RANGES6,
    MapKind::LpmTrie,
    Sizing::Setting(CapacitySetting::SourceRanges),
    NO_PREALLOC,
    Writer::Agent,
);
/// `namespace/name` → why the agent could not program that Service, for `inspect` with the
/// agent stopped (only Services in trouble have an entry).
pub const SERVICE_STATUS: MapDef<ServiceName, ServiceStatus> = MapDef::new(
    map_names::SERVICE_STATUS,
    MapKind::Hash,
    Sizing::Fixed(16_384),
    NO_PREALLOC,
    Writer::Agent,
);
/// The agent's settings for the TC path (one slot).
pub const DATAPATH_CONFIG: MapDef<u32, DatapathConfig> = MapDef::new(
    map_names::DATAPATH_CONFIG,
    MapKind::Array,
    Sizing::Fixed(1),
    0,
    Writer::Agent,
);

/// The Maglev lookup tables, `table_size` slots each, one after the other: table `n` (1-based,
/// as a master entry's `backend_id` names it) holds slots `(n - 1) * table_size ..
/// n * table_size`, each a backend id. A flat array (as Katran's) rather than a map of maps:
/// aya-ebpf 0.2.1 declares no map-of-maps. Its size is set by the agent's flags, and the agent
/// rewrites every table it uses at start, so a resized map is never copied.
pub const MAGLEV: MapDef<u32, u32> = MapDef::new(
    map_names::MAGLEV,
    MapKind::Array,
    Sizing::Setting(CapacitySetting::Maglev),
    0,
    Writer::Agent,
);
/// The Maglev tables' size and the flow hash's seed (one slot).
pub const MAGLEV_CONFIG: MapDef<u32, MaglevConfig> = MapDef::new(
    map_names::MAGLEV_CONFIG,
    MapKind::Array,
    Sizing::Fixed(1),
    0,
    Writer::Agent,
);

/// The service-CIDR guard, IPv4: ServiceCIDR prefixes and every ClusterIP, with `guard_flags`.
pub const SERVICE_GUARD4: MapDef<ServiceGuard4, u32> = MapDef::new(
    map_names::SERVICE_GUARD4,
    MapKind::LpmTrie,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// The service-CIDR guard, IPv6.
pub const SERVICE_GUARD6: MapDef<ServiceGuard6, u32> = MapDef::new(
    map_names::SERVICE_GUARD6,
    MapKind::LpmTrie,
    LB,
    NO_PREALLOC,
    Writer::Agent,
);
/// The socket hooks' settings (one slot).
pub const SOCK_CONFIG: MapDef<u32, SockConfig> = MapDef::new(
    map_names::SOCK_CONFIG,
    MapKind::Array,
    Sizing::Fixed(1),
    0,
    Writer::Agent,
);
/// `switchyard monitor`'s lease: until when someone is monitoring (one slot).
pub const MONITOR_CONFIG: MapDef<u32, u64> = MapDef::new(
    map_names::MONITOR_CONFIG,
    MapKind::Array,
    Sizing::Fixed(1),
    0,
    Writer::Agent,
);
/// `switchyard monitor`'s events: the datapath's decisions, written only while it is on.
pub const MONITOR_EVENTS: MapSpec = MapSpec {
    name: map_names::MONITOR_EVENTS,
    kind: MapKind::RingBuf,
    key_size: 0,
    value_size: 0,
    sizing: Sizing::Fixed(512 * 1024),
    flags: 0,
    writer: Writer::Datapath,
    pinned: true,
};
/// aya-log's records (only written when `--bpf-log-level` turns logging on); read by the
/// agent that loaded the programs, so not pinned.
pub const AYA_LOGS: MapSpec = MapSpec {
    name: "AYA_LOGS",
    kind: MapKind::RingBuf,
    key_size: 0,
    value_size: 0,
    sizing: Sizing::Fixed(1 << 17),
    flags: 0,
    writer: Writer::Datapath,
    pinned: false,
};

/// Size of the kernel's `struct bpf_fib_lookup` (include/uapi/linux/bpf.h), the value of the
/// scratch map; the eBPF crate checks it against its bindings.
pub const FIB_LOOKUP_SIZE: u32 = 64;

/// Per-CPU scratch space for bpf_fib_lookup's parameters (the TC stages' stack is too small to
/// hold them next to an IPv6 flow). Holds nothing between packets, so it is not pinned.
pub const FIB_SCRATCH: MapSpec = MapSpec {
    name: map_names::FIB_SCRATCH,
    kind: MapKind::PerCpuArray,
    key_size: 4,
    value_size: FIB_LOOKUP_SIZE,
    sizing: Sizing::Fixed(1),
    flags: 0,
    writer: Writer::Datapath,
    pinned: false,
};

/// Bytes of [`FLOW_SCRATCH`]'s one value.
pub const FLOW_SCRATCH_SIZE: u32 = 256;

/// Per-CPU scratch space for a new flow's two conntrack entries while the TC path builds and
/// claims them (an IPv6 flow's would not fit the new-flow stage's stack). Holds nothing
/// between packets, so it is not pinned.
pub const FLOW_SCRATCH: MapSpec = MapSpec {
    name: map_names::FLOW_SCRATCH,
    kind: MapKind::PerCpuArray,
    key_size: 4,
    value_size: FLOW_SCRATCH_SIZE,
    sizing: Sizing::Fixed(1),
    flags: 0,
    writer: Writer::Datapath,
    pinned: false,
};

/// Per-CPU token buckets of the TC path's refusals ([`crate::RejectBucket`]); not pinned, a
/// new program starts with full buckets.
pub const REJECT_BUCKET: MapSpec = MapSpec {
    name: map_names::REJECT_BUCKET,
    kind: MapKind::PerCpuArray,
    key_size: 4,
    value_size: small(size_of::<crate::RejectBucket>()),
    sizing: Sizing::Fixed(1),
    flags: 0,
    writer: Writer::Datapath,
    pinned: false,
};

/// Declares the list of maps and, for the agent, the typed dispatch over it, from one list.
macro_rules! table {
    (typed: [$($def:ident),* $(,)?], untyped: [$($spec:ident),* $(,)?] $(,)?) => {
        /// Every map of the eBPF object.
        pub const ALL: &[&MapSpec] = &[$(&$def.spec,)* $(&$spec,)*];

        /// Calls `visitor` with the typed definition of the pinned map called `name`.
        #[cfg(feature = "user")]
        pub fn with_types<T: TypedVisitor>(name: &str, visitor: T) -> Option<T::Output> {
            $(
                if name == $def.spec.name {
                    return Some(visitor.visit(&$def));
                }
            )*
            None
        }
    };
}

table! {
    typed: [
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
        AFFINITY_MATCH,
        SERVICE_NAMES,
        CT4,
        CT6,
        CT4_UNREPLIED,
        CT6_UNREPLIED,
        FRAGMENTS4,
        FRAGMENTS6,
        SOURCE_RANGES4,
        SOURCE_RANGES6,
        DATAPATH_CONFIG,
        SERVICE_STATUS,
        SERVICE_GUARD4,
        SERVICE_GUARD6,
        SOCK_CONFIG,
        MONITOR_CONFIG,
        MAGLEV,
        MAGLEV_CONFIG,
        DSR_REV4,
        DSR_REV6,
    ],
    untyped: [FIB_SCRATCH, FLOW_SCRATCH, REJECT_BUCKET, MONITOR_EVENTS, AYA_LOGS],
}

/// Something generic over a map's key and value types (see [`with_types`]).
#[cfg(feature = "user")]
pub trait TypedVisitor {
    type Output;
    fn visit<K: aya::Pod, V: aya::Pod>(self, def: &MapDef<K, V>) -> Self::Output;
}

/// The map called `name`, if the table has one.
pub fn spec(name: &str) -> Option<&'static MapSpec> {
    ALL.iter().copied().find(|spec| spec.name == name)
}

/// The maps the agent pins (and adopts, migrates or refuses at start).
pub fn pinned() -> impl Iterator<Item = &'static MapSpec> {
    ALL.iter().copied().filter(|spec| spec.pinned)
}

/// Byte-wise string equality, usable in constants (the eBPF crate checks its statics' names).
pub const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Longest map name the kernel keeps (`BPF_OBJ_NAME_LEN` is 16 with the NUL).
const MAX_NAME_LEN: usize = 15;

/// Whether `name` is accepted by the kernel and bpffs (no dots) and, for a pinned map, ends
/// with `_V<SOURCE_LAYOUT_VERSION>` (a layout change renames every pinned map).
const fn valid_name(name: &str, pinned: bool) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if !(bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            return false;
        }
        i += 1;
    }
    !pinned || versioned(bytes)
}

const fn versioned(name: &[u8]) -> bool {
    // The version's digits, read backwards from the end of the name.
    let mut version: u64 = 0;
    let mut scale: u64 = 1;
    let mut i = name.len();
    while i > 0 && name[i - 1].is_ascii_digit() {
        version += (name[i - 1] - b'0') as u64 * scale;
        scale *= 10;
        i -= 1;
    }
    i >= 2
        && i < name.len()
        && name[i - 1] == b'V'
        && name[i - 2] == b'_'
        && version == SOURCE_LAYOUT_VERSION as u64
}

/// What the kernel and this table's readers require of one map.
const fn well_formed(spec: &MapSpec) -> bool {
    let no_prealloc = spec.flags & BPF_F_NO_PREALLOC != 0;
    let kind_rules = match spec.kind {
        // The agent's hash maps grow with the cluster: only what is used is allocated.
        MapKind::Hash => no_prealloc || !matches!(spec.writer, Writer::Agent),
        // The kernel refuses LRU maps without preallocation, and LPM tries with it.
        MapKind::LruHash => !no_prealloc,
        MapKind::LpmTrie => no_prealloc,
        // Arrays are indexed by u32 and their size is part of the layout, except the Maglev
        // tables' (the agent's flags size it, and it is never copied).
        MapKind::Array | MapKind::PerCpuArray => {
            spec.key_size == 4
                && (matches!(spec.sizing, Sizing::Fixed(_))
                    || matches!(spec.sizing, Sizing::Setting(CapacitySetting::Maglev)))
                && !no_prealloc
        }
        // A byte ring of a fixed size, no keys or values.
        MapKind::RingBuf => {
            spec.key_size == 0
                && spec.value_size == 0
                && spec.flags == 0
                && matches!(spec.sizing, Sizing::Fixed(bytes) if bytes.is_power_of_two() && bytes >= 4096)
        }
    };
    kind_rules && spec.default_capacity() > 0 && valid_name(spec.name, spec.pinned)
}

const fn names_unique(all: &[&MapSpec]) -> bool {
    let mut i = 0;
    while i < all.len() {
        let mut j = i + 1;
        while j < all.len() {
            if same_name(all[i].name, all[j].name) {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

const fn table_well_formed(all: &[&MapSpec]) -> bool {
    let mut i = 0;
    while i < all.len() {
        if !well_formed(all[i]) {
            return false;
        }
        i += 1;
    }
    names_unique(all)
}

const _: () = assert!(
    table_well_formed(ALL),
    "the map table breaks a kernel or layout rule"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_short_dotless_and_versioned() {
        assert!(valid_name("SVC4_V1", true));
        assert!(!valid_name("SVC4_V2", true), "another layout version");
        assert!(!valid_name("SVC4", true), "no version");
        assert!(!valid_name("SVC4.V1", true), "bpffs refuses dots");
        assert!(
            !valid_name("A_VERY_LONG_NAME_V1", true),
            "longer than 15 bytes"
        );
        assert!(
            valid_name("FIB_SCRATCH", false),
            "unpinned maps need no version"
        );
    }

    #[test]
    fn kernel_rules_on_preallocation_are_enforced() {
        let mut lru = CT4.spec;
        assert!(well_formed(&lru));
        lru.flags = BPF_F_NO_PREALLOC;
        assert!(!well_formed(&lru), "an LRU map must be preallocated");
        let mut trie = SOURCE_RANGES4.spec;
        trie.flags = 0;
        assert!(!well_formed(&trie), "an LPM trie must not be preallocated");
        let mut services = SERVICES4.spec;
        services.flags = 0;
        assert!(
            !well_formed(&services),
            "an agent-written hash map is not preallocated"
        );
    }

    #[test]
    fn sizes_come_from_the_wire_types() {
        assert_eq!(SERVICES4.spec.key_size, 12);
        assert_eq!(SERVICES4.spec.value_size, 16);
        // The LPM key carries the 4-byte prefix length before the data.
        assert_eq!(SOURCE_RANGES6.spec.key_size, 4 + 20);
        assert_eq!(METRICS.spec.default_capacity(), reason::COUNT);
        assert_eq!(FRAGMENTS4.spec.key_size, 12);
        assert_eq!(FRAGMENTS6.spec.key_size, 40);
        assert_eq!(FRAGMENTS4.spec.value_size, 4);
        assert_eq!(FRAGMENTS6.spec.default_capacity(), FRAGMENT_CAPACITY);
        assert_eq!(MAGLEV.spec.value_size, 4, "a backend id per slot");
        assert_eq!(MAGLEV_CONFIG.spec.value_size, 8);
        assert_eq!(
            MAGLEV.spec.default_capacity(),
            DEFAULT_MAGLEV_TABLES * crate::maglev::DEFAULT_TABLE_SIZE
        );
        let mut sized_array = DATAPATH_CONFIG.spec;
        sized_array.sizing = Sizing::Setting(CapacitySetting::Conntrack);
        assert!(
            !well_formed(&sized_array),
            "only the Maglev array is sized by a setting"
        );
        assert!(FRAGMENTS4.spec.preallocated(), "an LRU map is preallocated");
        assert_eq!(FRAGMENTS4.spec.writer, Writer::Datapath);
        assert!(!SERVICES4.spec.preallocated());
        assert!(CT4.spec.preallocated());
        // Direct Server Return: keyed like conntrack, sized with it, written by the datapath.
        assert_eq!(DSR_REV4.spec.key_size, CT4.spec.key_size);
        assert_eq!(DSR_REV6.spec.key_size, CT6.spec.key_size);
        assert_eq!(DSR_REV4.spec.value_size, 16);
        assert_eq!(DSR_REV6.spec.value_size, 32);
        assert_eq!(
            DSR_REV6.spec.sizing,
            Sizing::Setting(CapacitySetting::DsrReverse)
        );
        assert_eq!(DSR_REV4.spec.sizing, DSR_REV6.spec.sizing);
        assert_eq!(DSR_REV4.spec.writer, Writer::Datapath);
        assert!(DSR_REV4.spec.pinned && DSR_REV4.spec.preallocated());
    }

    #[test]
    fn every_name_has_one_entry_and_one_map() {
        assert!(names_unique(ALL));
        // Only per-packet scratch space, the per-CPU refusal buckets and the loading agent's
        // own log records go unpinned.
        let mut unpinned: Vec<&str> = ALL
            .iter()
            .filter(|spec| !spec.pinned)
            .map(|spec| spec.name)
            .collect();
        unpinned.sort_unstable();
        let mut expected = [
            AYA_LOGS.name,
            FIB_SCRATCH.name,
            FLOW_SCRATCH.name,
            REJECT_BUCKET.name,
        ];
        expected.sort_unstable();
        assert_eq!(unpinned, expected);
        assert_eq!(pinned().count(), ALL.len() - unpinned.len());
        for spec in ALL {
            assert_eq!(super::spec(spec.name), Some(*spec));
        }
        assert_eq!(super::spec("NOPE_V1"), None);
        for kind in [
            MapKind::Hash,
            MapKind::LruHash,
            MapKind::LpmTrie,
            MapKind::Array,
            MapKind::PerCpuArray,
        ] {
            assert_eq!(MapKind::from_bpf_type(kind.bpf_type()), Some(kind));
        }
    }
}
