//! The maps shared with the agent. Layouts and names come from `proxy-common`; the agent pins
//! every one of them so they outlive it.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use proxy_common::{
    AffinityKey, AffinityValue, BPF_F_NO_PREALLOC, Backend4, Backend6, Ct4Entry, Ct4Key, Ct6Entry,
    Ct6Key, DatapathConfig, RevNat4, RevNat6, Service4Key, Service6Key, ServiceGuard4,
    ServiceGuard6, ServiceName, ServiceStatus, ServiceValue, SockConfig, SockRevNat4,
    SockRevNat4Key, SockRevNat6, SockRevNat6Key, SourceRange4, SourceRange6, capacity, reason,
};

#[map]
pub static SVC4_V1: HashMap<Service4Key, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, 0);
#[map]
pub static SVC6_V1: HashMap<Service6Key, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, 0);
#[map]
pub static BACKEND4_V1: HashMap<u32, Backend4> = HashMap::with_max_entries(capacity::BACKENDS, 0);
#[map]
pub static BACKEND6_V1: HashMap<u32, Backend6> = HashMap::with_max_entries(capacity::BACKENDS, 0);
#[map]
pub static REV_NAT4_V1: HashMap<u32, RevNat4> = HashMap::with_max_entries(capacity::REV_NAT, 0);
#[map]
pub static REV_NAT6_V1: HashMap<u32, RevNat6> = HashMap::with_max_entries(capacity::REV_NAT, 0);
#[map]
pub static SOCK_NAT4_V1: LruHashMap<SockRevNat4Key, SockRevNat4> =
    LruHashMap::with_max_entries(capacity::SOCK_REV_NAT, 0);
#[map]
pub static SOCK_NAT6_V1: LruHashMap<SockRevNat6Key, SockRevNat6> =
    LruHashMap::with_max_entries(capacity::SOCK_REV_NAT, 0);
#[map]
pub static METRICS_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);
#[map]
pub static AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);
/// Written and read by the agent only (names for `inspect`); no program touches it.
#[map]
pub static SVC_NAMES_V1: HashMap<u32, ServiceName> =
    HashMap::with_max_entries(capacity::REV_NAT, BPF_F_NO_PREALLOC);
/// Written and read by the agent only (Services it could not program, for `inspect`).
#[map]
pub static SVC_STATUS_V1: HashMap<ServiceName, ServiceStatus> =
    HashMap::with_max_entries(capacity::SERVICE_STATUS, BPF_F_NO_PREALLOC);
/// The TC path's connection tracking: forward and reply entries of every translated flow.
#[map]
pub static CT4_V1: LruHashMap<Ct4Key, Ct4Entry> = LruHashMap::with_max_entries(capacity::CT4, 0);
#[map]
pub static CT6_V1: LruHashMap<Ct6Key, Ct6Entry> = LruHashMap::with_max_entries(capacity::CT6, 0);
/// loadBalancerSourceRanges per frontend (LPM tries must be created without preallocation).
#[map]
pub static SRC_RANGE4_V1: LpmTrie<SourceRange4, u32> =
    LpmTrie::with_max_entries(capacity::SOURCE_RANGES, BPF_F_NO_PREALLOC);
#[map]
pub static SRC_RANGE6_V1: LpmTrie<SourceRange6, u32> =
    LpmTrie::with_max_entries(capacity::SOURCE_RANGES, BPF_F_NO_PREALLOC);
/// The agent's settings for the TC path (one entry).
#[map]
pub static CONFIG_V1: Array<DatapathConfig> = Array::with_max_entries(1, 0);
/// Per-CPU scratch space for bpf_fib_lookup's parameters: the stack of the TC stages is too
/// small to hold them next to an IPv6 flow's state. Not pinned (it holds nothing between
/// packets).
#[map]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);
/// The service-CIDR guard: ServiceCIDR prefixes and every ClusterIP, with `guard_flags`.
#[map]
pub static SVC_GUARD4_V1: LpmTrie<ServiceGuard4, u32> =
    LpmTrie::with_max_entries(capacity::SERVICE_GUARD, BPF_F_NO_PREALLOC);
#[map]
pub static SVC_GUARD6_V1: LpmTrie<ServiceGuard6, u32> =
    LpmTrie::with_max_entries(capacity::SERVICE_GUARD, BPF_F_NO_PREALLOC);
/// The socket hooks' settings (one entry).
#[map]
pub static SOCK_CONFIG_V1: Array<SockConfig> = Array::with_max_entries(1, 0);
/// `switchyard monitor`: until when someone is monitoring (one entry, CLOCK_MONOTONIC
/// nanoseconds). The monitor renews this lease every second, so a monitor killed without
/// clearing it stops the events within two seconds.
#[map]
pub static MONITOR_CFG_V1: Array<u64> = Array::with_max_entries(1, 0);
/// `switchyard monitor`: the datapath's decisions, written only while it is on.
#[map]
pub static MONITOR_EVT_V1: RingBuf = RingBuf::with_byte_size(capacity::MONITOR_RING_BYTES, 0);
