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
use std::fs::File;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader, Pod};
use nix::sched::{CloneFlags, setns};
use nix::time::{ClockId, clock_gettime};
use proxy_common::{
    Backend4, Backend6, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, DatapathConfig, Dsr4Entry, Dsr6Entry,
    RevNat4, RevNat6, Service4Key, Service6Key, ServiceGuard4, ServiceGuard6, ServiceValue,
    SourceRange4, SourceRange6, backend_state, config_flags, maglev::MaglevConfig, map_names,
    reason,
};

use crate::names;
use crate::packet::{Mac, Packet};
use crate::process::run_checked;

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
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// The fixture namespace's addresses and links.
pub mod net {
    use super::{Ipv4Addr, Ipv6Addr, Mac};

    /// The node's client-facing link (a node address is the NodePort frontend).
    pub const CLIENT_LINK: &str = "cl0";
    /// The node's backend-facing link (the pod network).
    pub const BACKEND_LINK: &str = "be0";

    pub const NODE_CLIENT_MAC: Mac = [0x02, 0x5e, 0, 0, 1, 1];
    pub const CLIENT_MAC: Mac = [0x02, 0x5e, 0, 0, 1, 2];
    pub const NODE_BACKEND_MAC: Mac = [0x02, 0x5e, 0, 0, 2, 1];

    pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    /// The on-link client, and the gateway to the remote networks below.
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
    /// Routed through the client: remote (external) sources.
    pub const REMOTE_NET_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 51, 100, 0), 24);
    pub const REMOTE_NET_V6: (Ipv6Addr, u8) =
        (Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0), 64);

    /// The node's address on the backend link: the masquerade source the FIB picks.
    pub const NODE_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 1);
    pub const NODE_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 1, 0, 0, 0, 0, 1);
    /// Hosts on the backend link with a permanent neighbour entry.
    pub const NEIGHBOUR_HOSTS: [u8; 9] = [2, 3, 4, 5, 6, 7, 8, 9, POD_HOST];
    /// A pod that is a client (not a backend) on the backend link.
    pub const POD_HOST: u8 = 50;
    /// An on-link host without a neighbour entry (the FIB answers "no neighbour").
    pub const UNRESOLVED_HOST: u8 = 20;
    /// The cluster CIDRs: the whole backend side is the pod network.
    pub const CLUSTER_CIDR4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 240, 0, 0), 16);
    pub const CLUSTER_CIDR6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0), 32);

    pub const fn backend_v4(host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 240, 1, host)
    }

    pub const fn backend_v6(host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x240, 1, 0, 0, 0, 0, host as u16)
    }

    pub const fn backend_mac(host: u8) -> Mac {
        [0x02, 0x5e, 0, 0, 2, host]
    }

    pub const fn remote_v4(host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, host)
    }

    pub const fn remote_v6(host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, host as u16)
    }
}

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

/// Address in the encoding of the maps: network byte order kept in memory.
pub fn v4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn v6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

pub fn v4_from_word(word: u32) -> Ipv4Addr {
    Ipv4Addr::from(word.to_ne_bytes())
}

pub fn v6_from_words(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
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

/// A conntrack key or the tuple of a conntrack value, family-neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: u8,
}

impl Tuple {
    pub fn new(src: SocketAddr, dst: SocketAddr, protocol: u8) -> Self {
        Self { src, dst, protocol }
    }

    /// The tuple of a packet (as it is in the frame).
    pub fn of(packet: &Packet) -> Self {
        Self::new(packet.src_socket(), packet.dst_socket(), packet.protocol())
    }

    #[must_use]
    pub fn reversed(&self) -> Self {
        Self::new(self.dst, self.src, self.protocol)
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} proto {}", self.src, self.dst, self.protocol)
    }
}

/// A conntrack value, family-neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    pub expires_ns: u64,
    /// The rewritten source and destination.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub flags: u16,
    pub pad: u16,
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

/// Reason counters summed over CPUs (index: `proxy_common::reason`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Counters(pub [u64; reason::COUNT as usize]);

impl Counters {
    pub fn get(&self, reason: u32) -> u64 {
        self.0[reason as usize]
    }

    /// The increase since `before`.
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        let mut delta = *self;
        for (value, old) in delta.0.iter_mut().zip(before.0) {
            *value = value.wrapping_sub(old);
        }
        delta
    }
}

/// Reasons that say a packet could not be handled: no test expects them unless it names them.
pub const FAILURE_REASONS: [u32; 5] = [
    reason::TC_FIB_FAILED,
    reason::TC_SNAT_EXHAUSTED,
    reason::TC_CT_STORE_FAILED,
    reason::TC_REWRITE_FAILED,
    reason::BACKEND_LOOKUP_FAILED,
];

impl Counters {
    /// Asserts that each listed reason moved by exactly its count and that no failure reason
    /// (see [`FAILURE_REASONS`]) moved unless listed.
    pub fn assert_moved(&self, expected: &[(u32, u64)], context: &str) {
        for &(reason, count) in expected {
            assert_eq!(
                self.get(reason),
                count,
                "{context}: counter {} moved by {}, expected {count} (all moves: {self})",
                reason_name(reason),
                self.get(reason)
            );
        }
        for reason in FAILURE_REASONS {
            if !expected.iter().any(|(r, _)| *r == reason) {
                assert_eq!(
                    self.get(reason),
                    0,
                    "{context}: failure counter {} moved (all moves: {self})",
                    reason_name(reason)
                );
            }
        }
    }
}

pub fn reason_name(reason: u32) -> &'static str {
    reason::NAMES.get(reason as usize).copied().unwrap_or("?")
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (index, value) in self.0.iter().enumerate() {
            if *value != 0 {
                let name = reason::NAMES.get(index).copied().unwrap_or("?");
                write!(f, "{}{name}={value}", if first { "" } else { ", " })?;
                first = false;
            }
        }
        if first {
            write!(f, "none")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counters({self})")
    }
}

/// A network namespace of this test process that the calling thread has entered; dropping
/// it returns the thread to its previous namespace and deletes the namespace.
#[derive(Debug)]
struct NetnsGuard {
    name: String,
    previous: Option<File>,
}

impl NetnsGuard {
    fn create() -> Result<Self> {
        crate::stale::sweep_once();
        let name = names::unique('n');
        run_checked(Command::new("ip").args(["netns", "add", &name]), IP_TIMEOUT)?;
        Ok(Self {
            name,
            previous: None,
        })
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(
            Command::new("ip").args(["-n", &self.name]).args(args),
            IP_TIMEOUT,
        )
        .map(drop)
    }

    fn enter(&mut self) -> Result<()> {
        let previous =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let path = format!("{}/{}", crate::netns::NETNS_DIR, self.name);
        let target = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", self.name))?;
        self.previous = Some(previous);
        Ok(())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take()
            && let Err(e) = setns(&previous, CloneFlags::CLONE_NEWNET)
        {
            eprintln!("warning: returning to the previous network namespace: {e}");
        }
        if let Err(e) = crate::netns::delete_namespace(&self.name) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The loaded object in its own namespace. Fields drop in order: the object (program and
/// maps) first, then the namespace.
pub struct TcFixture {
    ebpf: Ebpf,
    client_ifindex: u32,
    backend_ifindex: u32,
    netns: NetnsGuard,
    /// Pinned to the thread that entered the namespace.
    _not_send: PhantomData<*const ()>,
}

impl fmt::Debug for TcFixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcFixture")
            .field("netns", &self.netns.name)
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
        let mut netns = NetnsGuard::create()?;
        build_namespace(&netns).with_context(|| format!("setting up netns {}", netns.name))?;
        netns.enter()?;
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
                    address: v4_word(ip),
                    port_be,
                    pad: 0,
                };
                self.hash_mut::<u32, RevNat4>(map_names::REV_NAT4)?.insert(
                    frontend.rev_nat_id,
                    rev_nat,
                    0,
                )?;
                let key = |slot| Service4Key {
                    address: v4_word(ip),
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
                    address: v6_words(ip),
                    port_be,
                    pad: 0,
                };
                self.hash_mut::<u32, RevNat6>(map_names::REV_NAT6)?.insert(
                    frontend.rev_nat_id,
                    rev_nat,
                    0,
                )?;
                let key = |slot| Service6Key {
                    address: v6_words(ip),
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
                address: v4_word(address),
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
                address: v6_words(address),
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
                    address: v4_word(address),
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
                    address: v6_words(address),
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
                    address: v4_word(address),
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
                    address: v6_words(address),
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
                    optional(map.get(&ct4_key(key), 0))?.map(ct4_value)
                }
                (IpAddr::V6(_), IpAddr::V6(_)) => {
                    let map = self.hash::<Ct6Key, Ct6Entry>(name6)?;
                    optional(map.get(&ct6_key(key), 0))?.map(ct6_value)
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
                optional(map.get(&ct4_key(key), 0))?.map(|entry| {
                    let addr = IpAddr::V4(v4_from_word(entry.address));
                    (
                        SocketAddr::new(addr, u16::from_be(entry.port_be)),
                        entry.expires_ns,
                    )
                })
            }
            (IpAddr::V6(_), IpAddr::V6(_)) => {
                let map = self.hash::<Ct6Key, Dsr6Entry>(map_names::DSR_REV6)?;
                optional(map.get(&ct6_key(key), 0))?.map(|entry| {
                    let addr = IpAddr::V6(v6_from_words(entry.address));
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
                    entries.insert(tuple6(&key), ct6_value(value));
                }
            } else {
                for item in &self.hash::<Ct4Key, Ct4Entry>(name4)? {
                    let (key, value) = item?;
                    ensure!(
                        key.pad == [0; 3],
                        "{name4} key with non-zero padding: {key:?}"
                    );
                    entries.insert(tuple4(&key), ct4_value(value));
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
            self.hash_mut::<Ct4Key, Ct4Entry>(name4)?
                .insert(ct4_key(key), ct4_entry(value)?, 0)?;
        } else {
            self.hash_mut::<Ct6Key, Ct6Entry>(name6)?
                .insert(ct6_key(key), ct6_entry(value)?, 0)?;
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
                if optional(map.get(&ct4_key(key), 0))?.is_some() {
                    map.remove(&ct4_key(key))?;
                }
            } else {
                let mut map = self.hash_mut::<Ct6Key, Ct6Entry>(name6)?;
                if optional(map.get(&ct6_key(key), 0))?.is_some() {
                    map.remove(&ct6_key(key))?;
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

fn v4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} where IPv4 was expected"),
    }
}

fn v6(addr: SocketAddr) -> Ipv6Addr {
    match addr.ip() {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => panic!("{ip} where IPv6 was expected"),
    }
}

fn ct4_key(tuple: &Tuple) -> Ct4Key {
    Ct4Key {
        saddr: v4_word(v4(tuple.src)),
        daddr: v4_word(v4(tuple.dst)),
        sport_be: tuple.src.port().to_be(),
        dport_be: tuple.dst.port().to_be(),
        protocol: tuple.protocol,
        pad: [0; 3],
    }
}

fn ct6_key(tuple: &Tuple) -> Ct6Key {
    Ct6Key {
        saddr: v6_words(v6(tuple.src)),
        daddr: v6_words(v6(tuple.dst)),
        sport_be: tuple.src.port().to_be(),
        dport_be: tuple.dst.port().to_be(),
        protocol: tuple.protocol,
        pad: [0; 3],
    }
}

fn tuple4(key: &Ct4Key) -> Tuple {
    Tuple::new(
        SocketAddr::new(v4_from_word(key.saddr).into(), u16::from_be(key.sport_be)),
        SocketAddr::new(v4_from_word(key.daddr).into(), u16::from_be(key.dport_be)),
        key.protocol,
    )
}

fn tuple6(key: &Ct6Key) -> Tuple {
    Tuple::new(
        SocketAddr::new(v6_from_words(key.saddr).into(), u16::from_be(key.sport_be)),
        SocketAddr::new(v6_from_words(key.daddr).into(), u16::from_be(key.dport_be)),
        key.protocol,
    )
}

fn ct4_value(entry: Ct4Entry) -> CtValue {
    CtValue {
        expires_ns: entry.expires_ns,
        src: SocketAddr::new(
            v4_from_word(entry.saddr).into(),
            u16::from_be(entry.sport_be),
        ),
        dst: SocketAddr::new(
            v4_from_word(entry.daddr).into(),
            u16::from_be(entry.dport_be),
        ),
        rev_nat_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        flags: entry.flags,
        pad: entry.pad,
    }
}

fn ct6_value(entry: Ct6Entry) -> CtValue {
    CtValue {
        expires_ns: entry.expires_ns,
        src: SocketAddr::new(
            v6_from_words(entry.saddr).into(),
            u16::from_be(entry.sport_be),
        ),
        dst: SocketAddr::new(
            v6_from_words(entry.daddr).into(),
            u16::from_be(entry.dport_be),
        ),
        rev_nat_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        flags: entry.flags,
        pad: entry.pad,
    }
}

fn ct4_entry(value: &CtValue) -> Result<Ct4Entry> {
    ensure!(
        value.src.is_ipv4() && value.dst.is_ipv4(),
        "IPv4 entry expected"
    );
    Ok(Ct4Entry {
        expires_ns: value.expires_ns,
        saddr: v4_word(v4(value.src)),
        daddr: v4_word(v4(value.dst)),
        sport_be: value.src.port().to_be(),
        dport_be: value.dst.port().to_be(),
        rev_nat_id: value.rev_nat_id,
        backend_id: value.backend_id,
        flags: value.flags,
        pad: value.pad,
    })
}

fn ct6_entry(value: &CtValue) -> Result<Ct6Entry> {
    ensure!(
        value.src.is_ipv6() && value.dst.is_ipv6(),
        "IPv6 entry expected"
    );
    Ok(Ct6Entry {
        expires_ns: value.expires_ns,
        saddr: v6_words(v6(value.src)),
        daddr: v6_words(v6(value.dst)),
        sport_be: value.src.port().to_be(),
        dport_be: value.dst.port().to_be(),
        rev_nat_id: value.rev_nat_id,
        backend_id: value.backend_id,
        flags: value.flags,
        pad: value.pad,
    })
}

/// The configuration of a cluster whose pod network is the backend side
/// ([`net::CLUSTER_CIDR4`], [`net::CLUSTER_CIDR6`]), with `flags` added and SNAT ports
/// `snat_ports`.
pub fn cluster_config(extra_flags: u8, snat_ports: (u16, u16)) -> DatapathConfig {
    DatapathConfig {
        cluster_cidr4: v4_word(net::CLUSTER_CIDR4.0),
        cluster_cidr6: v6_words(net::CLUSTER_CIDR6.0),
        cluster_prefix4: net::CLUSTER_CIDR4.1,
        cluster_prefix6: net::CLUSTER_CIDR6.1,
        flags: config_flags::CLUSTER_CIDR4 | config_flags::CLUSTER_CIDR6 | extra_flags,
        pad: 0,
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
    }
}

fn mac_string(mac: Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Links, addresses, neighbours, routes and forwarding inside the fixture namespace.
fn build_namespace(ns: &NetnsGuard) -> Result<()> {
    ns.ip(&["link", "set", "lo", "up"])?;
    for (link, mac, v4, v6) in [
        (
            net::CLIENT_LINK,
            net::NODE_CLIENT_MAC,
            format!("{}/24", net::NODE_V4),
            format!("{}/64", net::NODE_V6),
        ),
        (
            net::BACKEND_LINK,
            net::NODE_BACKEND_MAC,
            format!("{}/24", net::NODE_BACKEND_V4),
            format!("{}/64", net::NODE_BACKEND_V6),
        ),
    ] {
        let peer = format!("{link}p");
        ns.ip(&["link", "add", link, "type", "veth", "peer", "name", &peer])?;
        ns.ip(&["link", "set", link, "address", &mac_string(mac)])?;
        ns.ip(&["addr", "add", &v4, "dev", link])?;
        // nodad: a tentative address is never a FIB source.
        ns.ip(&["-6", "addr", "add", &v6, "dev", link, "nodad"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
        ns.ip(&["link", "set", link, "up"])?;
    }
    let neighbour = |ip: IpAddr, mac: Mac, link: &str| {
        ns.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac_string(mac),
            "dev",
            link,
            "nud",
            "permanent",
        ])
    };
    neighbour(net::CLIENT_V4.into(), net::CLIENT_MAC, net::CLIENT_LINK)?;
    neighbour(net::CLIENT_V6.into(), net::CLIENT_MAC, net::CLIENT_LINK)?;
    for host in net::NEIGHBOUR_HOSTS {
        let mac = net::backend_mac(host);
        neighbour(net::backend_v4(host).into(), mac, net::BACKEND_LINK)?;
        neighbour(net::backend_v6(host).into(), mac, net::BACKEND_LINK)?;
    }
    let (remote4, prefix4) = net::REMOTE_NET_V4;
    let (remote6, prefix6) = net::REMOTE_NET_V6;
    ns.ip(&[
        "route",
        "add",
        &format!("{remote4}/{prefix4}"),
        "via",
        &net::CLIENT_V4.to_string(),
        "dev",
        net::CLIENT_LINK,
    ])?;
    ns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{remote6}/{prefix6}"),
        "via",
        &net::CLIENT_V6.to_string(),
        "dev",
        net::CLIENT_LINK,
    ])?;
    // bpf_fib_lookup answers "forwarding disabled" on an ingress device without forwarding.
    run_checked(
        Command::new("ip").args([
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.forwarding=1",
        ]),
        IP_TIMEOUT,
    )?;
    Ok(())
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

    #[test]
    fn map_encodings_round_trip() {
        let v4 = Ipv4Addr::new(10, 240, 1, 2);
        assert_eq!(v4_word(v4).to_ne_bytes(), [10, 240, 1, 2]);
        assert_eq!(v4_from_word(v4_word(v4)), v4);
        let v6 = net::backend_v6(2);
        assert_eq!(v6_from_words(v6_words(v6)), v6);
        let tuple = Tuple::new(
            SocketAddr::new(v4.into(), 40000),
            SocketAddr::new(net::NODE_V4.into(), 30080),
            6,
        );
        let key = ct4_key(&tuple);
        assert_eq!(key.sport_be, 40000_u16.to_be());
        assert_eq!(tuple4(&key), tuple);
    }
}
