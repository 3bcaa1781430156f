//! The maps shared with the agent, declared from `proxy_common::map_table`: each static takes
//! its kind, types, default capacity and flags from the table, and a compile-time check holds
//! its name (the static's identifier, which becomes the map's name) to the table's. The agent
//! pins every pinned map so they outlive it, and sizes them at load time.
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend4, Backend6, Ct4Entry, Ct4Key, Ct6Entry,
    Ct6Key, DatapathConfig, Dsr4Entry, Dsr6Entry, Frag4Key, Frag6Key, FragPorts, RejectBucket,
    RevNat4, RevNat6, Service4Key, Service6Key, ServiceGuard4, ServiceGuard6, ServiceName,
    ServiceStatus, ServiceValue, SockConfig, SockRevNat4, SockRevNat4Key, SockRevNat6,
    SockRevNat6Key, SourceRange4, SourceRange6,
    maglev::MaglevConfig,
    map_table::{self, MapDef, MapKind, MapSpec},
};

// Constructors that take everything from a table definition; the key and value types must be
// the definition's, and the kind is checked when the static is evaluated (at compile time).

const fn hash<K, V>(def: &MapDef<K, V>) -> HashMap<K, V> {
    assert!(matches!(def.spec.kind, MapKind::Hash));
    HashMap::with_max_entries(def.spec.default_capacity(), def.spec.flags)
}

const fn lru<K, V>(def: &MapDef<K, V>) -> LruHashMap<K, V> {
    assert!(matches!(def.spec.kind, MapKind::LruHash));
    LruHashMap::with_max_entries(def.spec.default_capacity(), def.spec.flags)
}

const fn trie<K, V>(def: &MapDef<K, V>) -> LpmTrie<K, V> {
    assert!(matches!(def.spec.kind, MapKind::LpmTrie));
    LpmTrie::with_max_entries(def.spec.default_capacity(), def.spec.flags)
}

const fn array<V>(def: &MapDef<u32, V>) -> Array<V> {
    assert!(matches!(def.spec.kind, MapKind::Array));
    Array::with_max_entries(def.spec.default_capacity(), def.spec.flags)
}

const fn per_cpu_array<V>(def: &MapDef<u32, V>) -> PerCpuArray<V> {
    assert!(matches!(def.spec.kind, MapKind::PerCpuArray));
    PerCpuArray::with_max_entries(def.spec.default_capacity(), def.spec.flags)
}

/// For a map whose value type lives outside `proxy-common` (the kernel's own structs): the
/// table gives its size, checked here.
const fn per_cpu_array_of<V>(spec: &MapSpec) -> PerCpuArray<V> {
    assert!(matches!(spec.kind, MapKind::PerCpuArray));
    assert!(size_of::<V>() == spec.value_size as usize);
    PerCpuArray::with_max_entries(spec.default_capacity(), spec.flags)
}

/// A byte ring of the table's size.
const fn ring_buf(spec: &MapSpec) -> RingBuf {
    assert!(matches!(spec.kind, MapKind::RingBuf));
    RingBuf::with_byte_size(spec.default_capacity(), spec.flags)
}

/// Declares a `#[map]` static from a table entry and checks that its name is the table's.
macro_rules! table_map {
    ($(#[$doc:meta])* $name:ident: $ty:ty = $constructor:ident($def:expr)) => {
        table_map!(@declare $(#[$doc])* $name: $ty = $constructor(&$def), $def.spec.name);
    };
    ($(#[$doc:meta])* untyped $name:ident: $ty:ty = $constructor:ident($spec:expr)) => {
        table_map!(@declare $(#[$doc])* $name: $ty = $constructor(&$spec), $spec.name);
    };
    (@declare $(#[$doc:meta])* $name:ident: $ty:ty = $init:expr, $table_name:expr) => {
        $(#[$doc])*
        #[map]
        pub static $name: $ty = $init;
        const _: () = assert!(
            map_table::same_name(stringify!($name), $table_name),
            concat!("the static ", stringify!($name), " is not named as its map_table entry"),
        );
    };
}

table_map!(SVC4_V1: HashMap<Service4Key, ServiceValue> = hash(map_table::SERVICES4));
table_map!(SVC6_V1: HashMap<Service6Key, ServiceValue> = hash(map_table::SERVICES6));
table_map!(BACKEND4_V1: HashMap<u32, Backend4> = hash(map_table::BACKENDS4));
table_map!(BACKEND6_V1: HashMap<u32, Backend6> = hash(map_table::BACKENDS6));
table_map!(REV_NAT4_V1: HashMap<u32, RevNat4> = hash(map_table::REV_NAT4));
table_map!(REV_NAT6_V1: HashMap<u32, RevNat6> = hash(map_table::REV_NAT6));
table_map!(SOCK_NAT4_V1: LruHashMap<SockRevNat4Key, SockRevNat4> = lru(map_table::SOCK_REV_NAT4));
table_map!(SOCK_NAT6_V1: LruHashMap<SockRevNat6Key, SockRevNat6> = lru(map_table::SOCK_REV_NAT6));
table_map!(METRICS_V1: PerCpuArray<u64> = per_cpu_array(map_table::METRICS));
table_map!(AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> = lru(map_table::AFFINITY));
table_map!(
    /// (backend, Service port) pairs an affinity entry may still name (written by the agent).
    AFF_MATCH_V1: HashMap<AffinityMatchKey, u32> = hash(map_table::AFFINITY_MATCH)
);
table_map!(
    /// Written and read by the agent only (names for `inspect`); no program touches it.
    SVC_NAMES_V1: HashMap<u32, ServiceName> = hash(map_table::SERVICE_NAMES)
);
table_map!(
    /// Written and read by the agent only (Services it could not program, for `inspect`).
    SVC_STATUS_V1: HashMap<ServiceName, ServiceStatus> = hash(map_table::SERVICE_STATUS)
);
table_map!(
    /// The TC path's connection tracking: forward and reply entries of every translated flow.
    CT4_V1: LruHashMap<Ct4Key, Ct4Entry> = lru(map_table::CT4)
);
table_map!(CT6_V1: LruHashMap<Ct6Key, Ct6Entry> = lru(map_table::CT6));
table_map!(
    /// Flows not yet confirmed by both sides; promoted to `CT4_V1` when they are.
    CT4_NEW_V1: LruHashMap<Ct4Key, Ct4Entry> = lru(map_table::CT4_UNREPLIED)
);
table_map!(CT6_NEW_V1: LruHashMap<Ct6Key, Ct6Entry> = lru(map_table::CT6_UNREPLIED));
table_map!(
    /// The ports of fragmented UDP datagrams, from their first fragment (see `tc::frag`).
    FRAG4_V1: LruHashMap<Frag4Key, FragPorts> = lru(map_table::FRAGMENTS4)
);
table_map!(FRAG6_V1: LruHashMap<Frag6Key, FragPorts> = lru(map_table::FRAGMENTS6));
table_map!(
    /// Direct Server Return on an endpoint's node: a pod's reply tuple → its frontend.
    DSR_REV4_V1: LruHashMap<Ct4Key, Dsr4Entry> = lru(map_table::DSR_REV4)
);
table_map!(DSR_REV6_V1: LruHashMap<Ct6Key, Dsr6Entry> = lru(map_table::DSR_REV6));
table_map!(
    /// loadBalancerSourceRanges per frontend.
    SRC_RANGE4_V1: LpmTrie<SourceRange4, u32> = trie(map_table::SOURCE_RANGES4)
);
table_map!(SRC_RANGE6_V1: LpmTrie<SourceRange6, u32> = trie(map_table::SOURCE_RANGES6));
table_map!(
    /// The agent's settings for the TC path (one entry).
    CONFIG_V1: Array<DatapathConfig> = array(map_table::DATAPATH_CONFIG)
);
table_map!(
    /// Per-CPU scratch space for bpf_fib_lookup's parameters: the stack of the TC stages is too
    /// small to hold them next to an IPv6 flow's state. Not pinned (it holds nothing between
    /// packets).
    untyped FIB_SCRATCH: PerCpuArray<bpf_fib_lookup> = per_cpu_array_of(map_table::FIB_SCRATCH)
);
table_map!(
    /// Per-CPU scratch space for a new flow's two entries (see `tc::establish`).
    untyped FLOW_SCRATCH: PerCpuArray<[u64; 32]> = per_cpu_array_of(map_table::FLOW_SCRATCH)
);
table_map!(
    /// Per-CPU token buckets limiting the TC path's refusals (RST, ICMP port unreachable).
    untyped REJECT_BUCKET: PerCpuArray<RejectBucket> = per_cpu_array_of(map_table::REJECT_BUCKET)
);
table_map!(
    /// The service-CIDR guard: ServiceCIDR prefixes and every ClusterIP, with `guard_flags`.
    SVC_GUARD4_V1: LpmTrie<ServiceGuard4, u32> = trie(map_table::SERVICE_GUARD4)
);
table_map!(SVC_GUARD6_V1: LpmTrie<ServiceGuard6, u32> = trie(map_table::SERVICE_GUARD6));
table_map!(
    /// The socket hooks' settings (one entry).
    SOCK_CONFIG_V1: Array<SockConfig> = array(map_table::SOCK_CONFIG)
);
table_map!(
    /// `switchyard monitor`: until when someone is monitoring (one entry, CLOCK_MONOTONIC
    /// nanoseconds). The monitor renews this lease every second, so a monitor killed without
    /// clearing it stops the events within two seconds.
    MONITOR_CFG_V1: Array<u64> = array(map_table::MONITOR_CONFIG)
);
table_map!(
    /// `switchyard monitor`: the datapath's decisions, written only while it is on.
    untyped MONITOR_EVT_V1: RingBuf = ring_buf(map_table::MONITOR_EVENTS)
);
table_map!(
    /// The Maglev lookup tables, one after the other (written by the agent; see
    /// `map_table::MAGLEV`).
    MAGLEV_V1: Array<u32> = array(map_table::MAGLEV)
);
table_map!(
    /// The Maglev tables' size and the flow hash's seed (one entry; size 0: not in use).
    MAGLEV_CFG_V1: Array<MaglevConfig> = array(map_table::MAGLEV_CONFIG)
);
