//! BPF_PROG_TEST_RUN of the TC program `sy_tc_ingress`: a private network namespace with
//! routes and neighbours for `bpf_fib_lookup`, the eBPF object loaded with fresh maps, helpers
//! that write services, configuration and source ranges as the agent would, and readers for
//! conntrack entries and reason counters.
//!
//! BPF_PROG_TEST_RUN runs the program in the calling thread's network namespace (the device
//! named by `__sk_buff.ifindex` and every FIB lookup are resolved there), so
//! [`TcFixture::new`] moves the calling thread into a namespace of its own and moves it back
//! when dropped. A fixture therefore stays on the thread that created it (it is not `Send`).
//! Test runs never transmit: a redirect only sets the return code.
//!
//! The namespace, with no route off the machine:
//!
//! ```text
//!  client side (cl0, 02:5e:00:00:01:01)          backend side (be0, 02:5e:00:00:02:01)
//!  203.0.113.1/24, 2001:db8:1::1/64              10.240.1.1/24, fd00:240:1::1/64
//!  neighbour: client .2 / ::2 (02:5e:00:00:01:02) neighbours: .2-.9, .50 / ::2-::9, ::50
//!  198.51.100.0/24 and 2001:db8:51::/64 via the client                (02:5e:00:00:02:<host>)
//! ```
//!
//! Both veth ends stay in the namespace, so the links are up with a carrier; nothing is sent.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader, Pod};
use nix::time::{ClockId, clock_gettime};
use proxy_common::{
    Addr4, Addr6, Backend4, Backend6, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, DatapathConfig,
    Dsr4Entry, Dsr6Entry, RevNat4, RevNat6, Service4Key, Service6Key, ServiceGuard4, ServiceGuard6,
    ServiceValue, SourceRange4, SourceRange6, WireAddr, backend_state, config_flags,
    maglev::MaglevConfig, map_names, reason,
};

use crate::datapath::packet::Packet;
use crate::env::names;
use crate::env::netns::{Namespaces, ThreadNetns};

mod counters;
pub mod net;
mod wire;

pub use self::counters::{Counters, FAILURE_REASONS, reason_name};
use self::net::build_namespace;
pub use self::wire::{CtValue, Tuple};
use self::wire::{ct_entry, ct_key, ct_value, tuple_of};

/// The program under test.
pub const PROGRAM: &str = "sy_tc_ingress";
/// Environment variable naming the eBPF object (default: the one `cargo xtask build` leaves).
pub const OBJECT_ENV: &str = "SWITCHYARD_EBPF_OBJECT";

/// TC return codes (include/uapi/linux/pkt_cls.h).
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// The XDP fast path, run against the same maps by [`TcFixture::run_xdp_on`].
pub const XDP_PROGRAM: &str = "sy_xdp_ingress";
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// `sizeof(struct __sk_buff)` (include/uapi/linux/bpf.h, unchanged up to 6.18).
const SK_BUFF_SIZE: usize = 192;
/// Offsets of `ingress_ifindex` and `ifindex` in `struct __sk_buff`.
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;
/// Output buffer: room for any packet the program may grow (an ICMP error quoting a frame).
const DATA_OUT: usize = 2048;

/// How much of a verifier rejection to show.
const VERIFIER_LOG_LINES: usize = 30;

/// The first line of `text` and its last `count` lines.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= count + 1 {
        return text.to_owned();
    }
    let skipped = lines.len() - count - 1;
    format!(
        "{}\n[... {skipped} lines of the verifier log ...]\n{}",
        lines[0],
        lines[lines.len() - count..].join("\n")
    )
}

/// Where the eBPF object is: `$SWITCHYARD_EBPF_OBJECT`, else the workspace's build output.
pub fn object_path() -> PathBuf {
    std::env::var_os(OBJECT_ENV).map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/proxy-ebpf")
        },
        PathBuf::from,
    )
}

fn missing_object(path: &std::path::Path) -> String {
    format!(
        "reading the eBPF object {} (run `cargo xtask build`, or set {OBJECT_ENV})",
        path.display()
    )
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns` (conntrack expiry).
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is readable");
    let secs = u64::try_from(now.tv_sec()).expect("monotonic time is positive");
    let nanos = u64::try_from(now.tv_nsec()).expect("nanoseconds are positive");
    secs * 1_000_000_000 + nanos
}

/// A backend of a frontend: its global id and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub id: u32,
    pub addr: SocketAddr,
}

/// One frontend entry of the services map (one scope), with its backends in slot order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub addr: SocketAddr,
    pub protocol: u8,
    pub scope: u8,
    pub rev_nat_id: u32,
    pub flags: u16,
    pub backends: Vec<Backend>,
}

/// The outcome of one test run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub code: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
}

impl Outcome {
    /// The output parsed (panics with the bytes if it does not parse).
    pub fn packet(&self) -> Packet {
        Packet::parse(&self.data)
            .unwrap_or_else(|e| panic!("output does not parse ({e:#}): {:02x?}", self.data))
    }
}

/// The loaded object in its own namespace. Fields drop in order: the object (program and
/// maps) first, then the thread returns to its namespace, then the namespace goes.
pub struct TcFixture {
    ebpf: Ebpf,
    client_ifindex: u32,
    backend_ifindex: u32,
    _entered: ThreadNetns,
    netns: Namespaces,
    /// Pinned to the thread that entered the namespace.
    _not_send: PhantomData<*const ()>,
}

impl fmt::Debug for TcFixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcFixture")
            .field("netns", &self.netns.all())
            .field("client_ifindex", &self.client_ifindex)
            .field("backend_ifindex", &self.backend_ifindex)
            .finish_non_exhaustive()
    }
}

impl TcFixture {
    /// Creates the namespace, moves the calling thread into it and loads the object with
    /// fresh maps (no pinning).
    pub fn new() -> Result<Self> {
        Self::with_capacities(&[])
    }

    /// As [`TcFixture::new`], with the named maps created with these capacities.
    pub fn with_capacities(capacities: &[(&str, u32)]) -> Result<Self> {
        let path = object_path();
        let bytes = std::fs::read(&path).with_context(|| missing_object(&path))?;
        crate::env::stale::sweep_once();
        let netns_name = names::unique('n');
        let mut netns = Namespaces::default();
        netns.add(&netns_name)?;
        build_namespace(&netns_name).with_context(|| format!("setting up netns {netns_name}"))?;
        let entered = ThreadNetns::enter(&netns_name)?;
        let client_ifindex = nix::net::if_::if_nametoindex(net::CLIENT_LINK)
            .with_context(|| format!("ifindex of {}", net::CLIENT_LINK))?;
        let backend_ifindex = nix::net::if_::if_nametoindex(net::BACKEND_LINK)
            .with_context(|| format!("ifindex of {}", net::BACKEND_LINK))?;
        let mut loader = EbpfLoader::new();
        for (name, entries) in capacities {
            loader.map_max_entries(name, *entries);
        }
        let mut ebpf = loader
            .load(&bytes)
            .with_context(|| format!("loading {}", path.display()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| {
                anyhow!(
                    "{} has no program {PROGRAM} (rebuild with `cargo xtask build`)",
                    path.display()
                )
            })?
            .try_into()
            .with_context(|| format!("{PROGRAM} is not a TC classifier"))?;
        // The verifier's log runs to thousands of lines; its end says what it rejected.
        program.load().map_err(|e| {
            anyhow!(
                "loading {PROGRAM} into the kernel: {}",
                last_lines(&e.to_string(), VERIFIER_LOG_LINES)
            )
        })?;
        Ok(Self {
            ebpf,
            client_ifindex,
            backend_ifindex,
            _entered: entered,
            netns,
            _not_send: PhantomData,
        })
    }

    pub fn client_ifindex(&self) -> u32 {
        self.client_ifindex
    }

    pub fn backend_ifindex(&self) -> u32 {
        self.backend_ifindex
    }

    /// Runs a frame received on the client link.
    pub fn run(&self, frame: &[u8]) -> Result<Outcome> {
        self.run_on(self.client_ifindex, frame)
    }

    /// Runs a frame received on the link `ifindex` (`skb->dev` and the ingress interface).
    pub fn run_on(&self, ifindex: u32, frame: &[u8]) -> Result<Outcome> {
        let program: &SchedClassifier = self
            .ebpf
            .program(PROGRAM)
            .context("program vanished")?
            .try_into()?;
        let mut ctx = [0u8; SK_BUFF_SIZE];
        ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[SK_BUFF_INGRESS_IFINDEX..SK_BUFF_INGRESS_IFINDEX + 4]
            .copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; DATA_OUT];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        let size = usize::try_from(result.data_size_out).expect("u32 fits usize");
        ensure!(size <= DATA_OUT, "output of {size} bytes overflowed");
        out.truncate(size);
        Ok(Outcome {
            code: result.return_value,
            data: out,
        })
    }

    /// Loads the XDP fast path (it shares this object's maps) for [`Self::run_xdp_on`].
    pub fn load_xdp(&mut self) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .with_context(|| format!("the object has no program {XDP_PROGRAM}"))?
            .try_into()?;
        program.load().map_err(|e| {
            anyhow!(
                "loading {XDP_PROGRAM} into the kernel: {}",
                last_lines(&e.to_string(), VERIFIER_LOG_LINES)
            )
        })
    }

    /// Runs a frame through the XDP fast path as received on the link `ifindex`.
    pub fn run_xdp_on(&self, ifindex: u32, frame: &[u8]) -> Result<Outcome> {
        let program: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .context("program vanished")?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let len = u32::try_from(frame.len()).context("frame length")?;
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&len.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; DATA_OUT];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN (XDP)")?;
        let size = usize::try_from(result.data_size_out).expect("u32 fits usize");
        ensure!(size <= DATA_OUT, "output of {size} bytes overflowed");
        out.truncate(size);
        Ok(Outcome {
            code: result.return_value,
            data: out,
        })
    }

    fn hash<K: Pod, V: Pod>(&self, name: &str) -> Result<HashMap<&MapData, K, V>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("the object has no map {name}"))?;
        HashMap::try_from(map).with_context(|| format!("map {name}"))
    }

    fn hash_mut<K: Pod, V: Pod>(&mut self, name: &str) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("the object has no map {name}"))?;
        HashMap::try_from(map).with_context(|| format!("map {name}"))
    }

    /// Writes (or rewrites) a frontend as the agent does, make-before-break: backends,
    /// reverse NAT, slots, then the master entry publishing the count, then surplus slots.
    pub fn add_frontend(&mut self, frontend: &Frontend) -> Result<()> {
        self.add_frontend_with_table(frontend, 0)
    }

    /// Writes Maglev table `table` (1-based) of `backend_ids.len()` slots and the Maglev
    /// settings, then `frontend` as a Maglev frontend reading it (its master's `backend_id` is
    /// the table number), as the agent does: the table before the master.
    pub fn add_maglev_frontend(
        &mut self,
        frontend: &Frontend,
        table: u32,
        backend_ids: &[u32],
        seed: u32,
    ) -> Result<()> {
        let size = u32::try_from(backend_ids.len()).context("table size")?;
        {
            let map = self
                .ebpf
                .map_mut(map_names::MAGLEV)
                .context("the object has no Maglev map")?;
            let mut array: Array<&mut MapData, u32> = Array::try_from(map)?;
            let base = (table - 1) * size;
            for (offset, id) in (0..size).zip(backend_ids) {
                array.set(base + offset, id, 0)?;
            }
        }
        {
            let map = self
                .ebpf
                .map_mut(map_names::MAGLEV_CONFIG)
                .context("the object has no Maglev config map")?;
            let mut array: Array<&mut MapData, MaglevConfig> = Array::try_from(map)?;
            array.set(
                0,
                MaglevConfig {
                    table_size: size,
                    seed,
                },
                0,
            )?;
        }
        let maglev = Frontend {
            flags: frontend.flags | proxy_common::service_flags::MAGLEV,
            ..frontend.clone()
        };
        self.add_frontend_with_table(&maglev, table)
    }

    fn add_frontend_with_table(&mut self, frontend: &Frontend, maglev_table: u32) -> Result<()> {
        let count = u16::try_from(frontend.backends.len()).context("too many backends")?;
        let master = ServiceValue {
            backend_id: maglev_table,
            count,
            flags: frontend.flags,
            rev_nat_id: frontend.rev_nat_id,
            affinity_timeout_secs: 0,
        };
        let slots: Vec<ServiceValue> = frontend
            .backends
            .iter()
            .map(|backend| ServiceValue {
                backend_id: backend.id,
                rev_nat_id: frontend.rev_nat_id,
                ..ServiceValue::default()
            })
            .collect();
        match frontend.addr.ip() {
            IpAddr::V4(ip) => {
                self.add_backends4(frontend)?;
                let port_be = frontend.addr.port().to_be();
                let rev_nat = RevNat4 {
                    address: Addr4::from_ip(ip),
                    port_be,
                    pad: 0,
                };
                self.hash_mut::<u32, RevNat4>(map_names::REV_NAT4)?.insert(
                    frontend.rev_nat_id,
                    rev_nat,
                    0,
                )?;
                let key = |slot| Service4Key {
                    address: Addr4::from_ip(ip),
                    port_be,
                    backend_slot: slot,
                    protocol: frontend.protocol,
                    scope: frontend.scope,
                    pad: [0; 2],
                };
                let services = self.hash_mut(map_names::SERVICES4)?;
                write_slots(services, key, master, &slots)
            }
            IpAddr::V6(ip) => {
                self.add_backends6(frontend)?;
                let port_be = frontend.addr.port().to_be();
                let rev_nat = RevNat6 {
                    address: Addr6::from_ip(ip),
                    port_be,
                    pad: 0,
                };
                self.hash_mut::<u32, RevNat6>(map_names::REV_NAT6)?.insert(
                    frontend.rev_nat_id,
                    rev_nat,
                    0,
                )?;
                let key = |slot| Service6Key {
                    address: Addr6::from_ip(ip),
                    port_be,
                    backend_slot: slot,
                    protocol: frontend.protocol,
                    scope: frontend.scope,
                    pad: [0; 2],
                };
                let services = self.hash_mut(map_names::SERVICES6)?;
                write_slots(services, key, master, &slots)
            }
        }
    }

    fn add_backends4(&mut self, frontend: &Frontend) -> Result<()> {
        let mut map = self.hash_mut::<u32, Backend4>(map_names::BACKENDS4)?;
        for backend in &frontend.backends {
            let IpAddr::V4(address) = backend.addr.ip() else {
                bail!("IPv6 backend {} of an IPv4 frontend", backend.addr);
            };
            let value = Backend4 {
                address: Addr4::from_ip(address),
                port_be: backend.addr.port().to_be(),
                protocol: frontend.protocol,
                state: backend_state::ACTIVE,
            };
            map.insert(backend.id, value, 0)?;
        }
        Ok(())
    }

    fn add_backends6(&mut self, frontend: &Frontend) -> Result<()> {
        let mut map = self.hash_mut::<u32, Backend6>(map_names::BACKENDS6)?;
        for backend in &frontend.backends {
            let IpAddr::V6(address) = backend.addr.ip() else {
                bail!("IPv4 backend {} of an IPv6 frontend", backend.addr);
            };
            let value = Backend6 {
                address: Addr6::from_ip(address),
                port_be: backend.addr.port().to_be(),
                protocol: frontend.protocol,
                state: backend_state::ACTIVE,
            };
            map.insert(backend.id, value, 0)?;
        }
        Ok(())
    }

    /// Deletes backend `id` from its family's backends map, as the agent does once no Service
    /// uses the endpoint (missing is fine).
    pub fn remove_backend(&mut self, id: u32, ipv6: bool) -> Result<()> {
        if ipv6 {
            let mut map = self.hash_mut::<u32, Backend6>(map_names::BACKENDS6)?;
            if optional(map.get(&id, 0))?.is_some() {
                map.remove(&id)?;
            }
        } else {
            let mut map = self.hash_mut::<u32, Backend4>(map_names::BACKENDS4)?;
            if optional(map.get(&id, 0))?.is_some() {
                map.remove(&id)?;
            }
        }
        Ok(())
    }

    /// Writes the datapath configuration (index 0 of the config array).
    pub fn set_config(&mut self, config: &DatapathConfig) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::DATAPATH_CONFIG)
            .context("the object has no config map")?;
        let mut array: Array<&mut MapData, DatapathConfig> = Array::try_from(map)?;
        array.set(0, config, 0)?;
        Ok(())
    }

    /// Adds a loadBalancerSourceRanges prefix for the frontend `rev_nat_id`, as the agent
    /// does: the trie matches the id exactly and the address by `prefix`.
    pub fn add_source_range(&mut self, rev_nat_id: u32, address: IpAddr, prefix: u8) -> Result<()> {
        let prefix_len = 32 + u32::from(prefix);
        match address {
            IpAddr::V4(address) => {
                ensure!(prefix <= 32, "IPv4 prefix {prefix}");
                let map = self
                    .ebpf
                    .map_mut(map_names::SOURCE_RANGES4)
                    .context("no SRC_RANGE4 map")?;
                let mut trie: LpmTrie<&mut MapData, SourceRange4, u32> = LpmTrie::try_from(map)?;
                let data = SourceRange4 {
                    rev_nat_id_be: rev_nat_id.to_be(),
                    address: Addr4::from_ip(address),
                };
                trie.insert(&LpmKey::new(prefix_len, data), 1, 0)?;
            }
            IpAddr::V6(address) => {
                ensure!(prefix <= 128, "IPv6 prefix {prefix}");
                let map = self
                    .ebpf
                    .map_mut(map_names::SOURCE_RANGES6)
                    .context("no SRC_RANGE6 map")?;
                let mut trie: LpmTrie<&mut MapData, SourceRange6, u32> = LpmTrie::try_from(map)?;
                let data = SourceRange6 {
                    rev_nat_id_be: rev_nat_id.to_be(),
                    address: Addr6::from_ip(address),
                };
                trie.insert(&LpmKey::new(prefix_len, data), 1, 0)?;
            }
        }
        Ok(())
    }

    /// Adds a service-CIDR guard prefix with its `guard_flags`, as the agent does.
    pub fn add_guard(&mut self, address: IpAddr, prefix: u8, flags: u32) -> Result<()> {
        let prefix_len = u32::from(prefix);
        match address {
            IpAddr::V4(address) => {
                ensure!(prefix <= 32, "IPv4 prefix {prefix}");
                let map = self
                    .ebpf
                    .map_mut(map_names::SERVICE_GUARD4)
                    .context("no SVC_GUARD4 map")?;
                let mut trie: LpmTrie<&mut MapData, ServiceGuard4, u32> = LpmTrie::try_from(map)?;
                let data = ServiceGuard4 {
                    address: Addr4::from_ip(address),
                };
                trie.insert(&LpmKey::new(prefix_len, data), flags, 0)?;
            }
            IpAddr::V6(address) => {
                ensure!(prefix <= 128, "IPv6 prefix {prefix}");
                let map = self
                    .ebpf
                    .map_mut(map_names::SERVICE_GUARD6)
                    .context("no SVC_GUARD6 map")?;
                let mut trie: LpmTrie<&mut MapData, ServiceGuard6, u32> = LpmTrie::try_from(map)?;
                let data = ServiceGuard6 {
                    address: Addr6::from_ip(address),
                };
                trie.insert(&LpmKey::new(prefix_len, data), flags, 0)?;
            }
        }
        Ok(())
    }

    /// The reason counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map = self
            .ebpf
            .map(map_names::METRICS)
            .context("no metrics map")?;
        let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut counters = Counters([0; reason::COUNT as usize]);
        for (index, slot) in (0..).zip(counters.0.iter_mut()) {
            *slot = array.get(&index, 0)?.iter().sum();
        }
        Ok(counters)
    }

    /// The conntrack entry under `key`, if any, as the datapath finds it: in the main map,
    /// else in the map of unconfirmed flows.
    pub fn ct(&self, key: &Tuple) -> Result<Option<CtValue>> {
        Ok(self.ct_in(key)?.map(|(value, _)| value))
    }

    /// The conntrack entry under `key` and whether it is in the map of unconfirmed flows.
    pub fn ct_in(&self, key: &Tuple) -> Result<Option<(CtValue, bool)>> {
        for (unreplied, (name4, name6)) in [
            (false, (map_names::CT4, map_names::CT6)),
            (true, (map_names::CT4_UNREPLIED, map_names::CT6_UNREPLIED)),
        ] {
            let found = match (key.src.ip(), key.dst.ip()) {
                (IpAddr::V4(_), IpAddr::V4(_)) => {
                    let map = self.hash::<Ct4Key, Ct4Entry>(name4)?;
                    optional(map.get(&ct_key::<Addr4>(key)?, 0))?.map(ct_value)
                }
                (IpAddr::V6(_), IpAddr::V6(_)) => {
                    let map = self.hash::<Ct6Key, Ct6Entry>(name6)?;
                    optional(map.get(&ct_key::<Addr6>(key)?, 0))?.map(ct_value)
                }
                _ => bail!("mixed-family tuple {key}"),
            };
            if let Some(value) = found {
                return Ok(Some((value, unreplied)));
            }
        }
        Ok(None)
    }

    /// The Direct Server Return reverse entry under `key` (a pod's reply tuple): the frontend
    /// its replies leave with and when the entry expires.
    pub fn dsr_reverse(&self, key: &Tuple) -> Result<Option<(SocketAddr, u64)>> {
        Ok(match (key.src.ip(), key.dst.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let map = self.hash::<Ct4Key, Dsr4Entry>(map_names::DSR_REV4)?;
                optional(map.get(&ct_key::<Addr4>(key)?, 0))?.map(|entry| {
                    let addr = IpAddr::V4(entry.address.to_ip());
                    (
                        SocketAddr::new(addr, u16::from_be(entry.port_be)),
                        entry.expires_ns,
                    )
                })
            }
            (IpAddr::V6(_), IpAddr::V6(_)) => {
                let map = self.hash::<Ct6Key, Dsr6Entry>(map_names::DSR_REV6)?;
                optional(map.get(&ct_key::<Addr6>(key)?, 0))?.map(|entry| {
                    let addr = IpAddr::V6(entry.address.to_ip());
                    (
                        SocketAddr::new(addr, u16::from_be(entry.port_be)),
                        entry.expires_ns,
                    )
                })
            }
            _ => bail!("mixed-family tuple {key}"),
        })
    }

    /// The number of Direct Server Return reverse entries of one family.
    pub fn dsr_reverse_count(&self, ipv6: bool) -> Result<usize> {
        Ok(if ipv6 {
            self.hash::<Ct6Key, Dsr6Entry>(map_names::DSR_REV6)?
                .keys()
                .count()
        } else {
            self.hash::<Ct4Key, Dsr4Entry>(map_names::DSR_REV4)?
                .keys()
                .count()
        })
    }

    /// Every conntrack entry of one family, in both maps (the main map's where a key is in
    /// both). Fails if a key's padding is not zero (such a key could never be found by a
    /// lookup built from a packet).
    pub fn ct_entries(&self, ipv6: bool) -> Result<BTreeMap<Tuple, CtValue>> {
        let mut entries = BTreeMap::new();
        for (name4, name6) in [
            (map_names::CT4_UNREPLIED, map_names::CT6_UNREPLIED),
            (map_names::CT4, map_names::CT6),
        ] {
            if ipv6 {
                for item in &self.hash::<Ct6Key, Ct6Entry>(name6)? {
                    let (key, value) = item?;
                    ensure!(
                        key.pad == [0; 3],
                        "{name6} key with non-zero padding: {key:?}"
                    );
                    entries.insert(tuple_of(&key), ct_value(value));
                }
            } else {
                for item in &self.hash::<Ct4Key, Ct4Entry>(name4)? {
                    let (key, value) = item?;
                    ensure!(
                        key.pad == [0; 3],
                        "{name4} key with non-zero padding: {key:?}"
                    );
                    entries.insert(tuple_of(&key), ct_value(value));
                }
            }
        }
        Ok(entries)
    }

    /// Writes a conntrack entry (to age or forge state the way time would) in the map that
    /// holds it now (the main map for a new key).
    pub fn ct_put(&mut self, key: &Tuple, value: &CtValue) -> Result<()> {
        let unreplied = self.ct_in(key)?.is_some_and(|(_, unreplied)| unreplied);
        let (name4, name6) = if unreplied {
            (map_names::CT4_UNREPLIED, map_names::CT6_UNREPLIED)
        } else {
            (map_names::CT4, map_names::CT6)
        };
        if key.src.is_ipv4() {
            self.hash_mut::<Ct4Key, Ct4Entry>(name4)?.insert(
                ct_key::<Addr4>(key)?,
                ct_entry(value)?,
                0,
            )?;
        } else {
            self.hash_mut::<Ct6Key, Ct6Entry>(name6)?.insert(
                ct_key::<Addr6>(key)?,
                ct_entry(value)?,
                0,
            )?;
        }
        Ok(())
    }

    /// Removes a conntrack entry from both maps (missing is fine).
    pub fn ct_delete(&mut self, key: &Tuple) -> Result<()> {
        for (name4, name6) in [
            (map_names::CT4, map_names::CT6),
            (map_names::CT4_UNREPLIED, map_names::CT6_UNREPLIED),
        ] {
            if key.src.is_ipv4() {
                let mut map = self.hash_mut::<Ct4Key, Ct4Entry>(name4)?;
                if optional(map.get(&ct_key::<Addr4>(key)?, 0))?.is_some() {
                    map.remove(&ct_key::<Addr4>(key)?)?;
                }
            } else {
                let mut map = self.hash_mut::<Ct6Key, Ct6Entry>(name6)?;
                if optional(map.get(&ct_key::<Addr6>(key)?, 0))?.is_some() {
                    map.remove(&ct_key::<Addr6>(key)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Slots `1..=n`, then the master (slot 0) publishing `n`, then removal of the slots the old
/// master counted beyond `n`.
fn write_slots<K: Pod>(
    mut services: HashMap<&mut MapData, K, ServiceValue>,
    key: impl Fn(u16) -> K,
    master: ServiceValue,
    slots: &[ServiceValue],
) -> Result<()> {
    let old_count = optional(services.get(&key(0), 0))?.map_or(0, |m| m.count);
    for (slot, value) in (1..).zip(slots) {
        services.insert(key(slot), value, 0)?;
    }
    services.insert(key(0), master, 0)?;
    for slot in master.count + 1..=old_count {
        services.remove(&key(slot))?;
    }
    Ok(())
}

/// A map lookup's "no such key" as `None`.
fn optional<T>(result: Result<T, aya::maps::MapError>) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The configuration of a cluster whose pod network is the backend side
/// ([`net::CLUSTER_CIDR4`], [`net::CLUSTER_CIDR6`]), with `flags` added and SNAT ports
/// `snat_ports`.
pub fn cluster_config(extra_flags: u8, snat_ports: (u16, u16)) -> DatapathConfig {
    DatapathConfig {
        cluster_cidr4: Addr4::from_ip(net::CLUSTER_CIDR4.0),
        cluster_cidr6: Addr6::from_ip(net::CLUSTER_CIDR6.0),
        cluster_prefix4: net::CLUSTER_CIDR4.1,
        cluster_prefix6: net::CLUSTER_CIDR6.1,
        flags: config_flags::CLUSTER_CIDR4 | config_flags::CLUSTER_CIDR6 | extra_flags,
        pad: 0,
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_verifier_logs_keep_their_first_and_last_lines() {
        assert_eq!(last_lines("a\nb\nc", 2), "a\nb\nc");
        let log: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert_eq!(
            last_lines(&log.join("\n"), 3),
            "0\n[... 6 lines of the verifier log ...]\n7\n8\n9"
        );
    }
}
