//! Network namespaces: [`Namespaces`], the one owner of the namespaces a test creates (every
//! world and fixture holds one), the calling thread moved into a namespace ([`ThreadNetns`],
//! [`run_in`]), commands inside a namespace ([`ip_in`], [`sysctl`]), veth pairs between two
//! namespaces ([`veth`]), and the simplest topology built from them, [`Topology`]: one "node"
//! namespace wired to N backend namespaces.
//!
//! Nothing here touches the root namespace: a veth pair is created inside one test namespace
//! with its peer moved straight into another, and no namespace of a [`Topology`] has a default
//! route, so traffic to any address that is not on a test link fails with ENETUNREACH instead
//! of leaving the machine.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sched::{CloneFlags, setns};

use crate::env::names;
use crate::env::process::{run_checked, wait_until};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// How long one `ip` or `sysctl` command may take.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// The third octet (and the fourth IPv6 group) numbers the backend, so at most this many.
const MAX_BACKENDS: usize = 250;

/// One backend namespace and the addresses of both ends of its link to the node.
#[derive(Debug, Clone)]
pub struct Backend {
    pub index: usize,
    pub namespace: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub node_ipv4: Ipv4Addr,
    pub node_ipv6: Ipv6Addr,
}

/// A node namespace with one veth link to each backend namespace; dropping it deletes every
/// namespace (which deletes the veth pairs with them).
#[derive(Debug)]
pub struct Topology {
    node: String,
    backends: Vec<Backend>,
    namespaces: Namespaces,
}

impl Topology {
    pub fn new(backends: usize) -> Result<Self> {
        ensure!(backends <= MAX_BACKENDS, "at most {MAX_BACKENDS} backends");
        crate::env::stale::sweep_once();
        let node = names::unique('n');
        let mut topology = Self {
            node: node.clone(),
            backends: Vec::with_capacity(backends),
            namespaces: Namespaces::default(),
        };
        topology.namespaces.add(&node)?;
        for index in 0..backends {
            let backend = backend_addresses(index, format!("{node}b{index}"));
            topology.namespaces.add(&backend.namespace)?;
            wire(&node, &backend)?;
            topology.backends.push(backend);
        }
        Ok(topology)
    }

    pub fn node_namespace(&self) -> &str {
        &self.node
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Adds a namespace linked to the node like a backend but not listed among the backends
    /// (e.g. a client whose traffic the node forwards); it is deleted with the topology.
    /// `index` numbers its addresses as a backend's would and must come after the backends.
    pub fn add_peer(&mut self, index: usize) -> Result<Backend> {
        ensure!(
            (self.backends.len()..MAX_BACKENDS).contains(&index),
            "peer index {index} collides with a backend or exceeds {MAX_BACKENDS}"
        );
        let peer = backend_addresses(index, format!("{}p{index}", self.node));
        self.namespaces.add(&peer.namespace)?;
        wire(&self.node, &peer)?;
        Ok(peer)
    }
}

/// Network namespaces created so far; dropping it deletes them in reverse order (which
/// deletes their links), also when the test panics half-way through building its world.
/// Names come from [`names::unique`], so the stale sweep finds them if the process dies.
#[derive(Debug, Default)]
pub struct Namespaces {
    created: Vec<String>,
}

impl Namespaces {
    /// Creates namespace `name` with its loopback up.
    pub fn add(&mut self, name: &str) -> Result<()> {
        run_checked(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT)?;
        self.created.push(name.to_owned());
        ip_in(name, &["link", "set", "lo", "up"])
    }

    /// Deletes one namespace now (e.g. a pod that went away), if it is one of these.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if let Some(position) = self.created.iter().position(|n| n == name) {
            self.created.remove(position);
            delete_namespace(name)?;
        }
        Ok(())
    }

    /// Every namespace still held, in creation order.
    pub fn all(&self) -> &[String] {
        &self.created
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for namespace in self.created.iter().rev() {
            if let Err(e) = delete_namespace(namespace) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

pub fn delete_namespace(name: &str) -> Result<()> {
    run_checked(Command::new("ip").args(["netns", "del", name]), IP_TIMEOUT).map(drop)
}

/// The calling thread moved into a network namespace (setns affects only that thread);
/// dropping it moves the thread back. Keep it on the thread that made it.
#[derive(Debug)]
pub struct ThreadNetns {
    previous: File,
}

impl ThreadNetns {
    pub fn enter(netns: &str) -> Result<Self> {
        let previous =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let path = format!("{NETNS_DIR}/{netns}");
        let target = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {netns}"))?;
        Ok(Self { previous })
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.previous, CloneFlags::CLONE_NEWNET) {
            eprintln!("warning: returning to the previous network namespace: {e}");
        }
    }
}

fn backend_addresses(index: usize, namespace: String) -> Backend {
    let octet = u8::try_from(index + 1).expect("bounded by MAX_BACKENDS");
    let group = u16::from(octet);
    Backend {
        index,
        namespace,
        ipv4: Ipv4Addr::new(10, 240, octet, 2),
        ipv6: Ipv6Addr::new(0xfd00, 0x5e, 0, group, 0, 0, 0, 2),
        node_ipv4: Ipv4Addr::new(10, 240, octet, 1),
        node_ipv6: Ipv6Addr::new(0xfd00, 0x5e, 0, group, 0, 0, 0, 1),
    }
}

/// Links the node to `backend` (interface `b<index>` in the node, `eth0` in the backend).
fn wire(node: &str, backend: &Backend) -> Result<()> {
    veth(
        &VethEnd {
            netns: node,
            device: &format!("b{}", backend.index),
            v4: (backend.node_ipv4, 24),
            v6: (backend.node_ipv6, 64),
        },
        &VethEnd {
            netns: &backend.namespace,
            device: "eth0",
            v4: (backend.ipv4, 24),
            v6: (backend.ipv6, 64),
        },
    )
}

/// One end of a veth pair: its namespace, interface name and addresses with prefix lengths.
#[derive(Debug, Clone, Copy)]
pub struct VethEnd<'a> {
    pub netns: &'a str,
    pub device: &'a str,
    pub v4: (Ipv4Addr, u8),
    pub v6: (Ipv6Addr, u8),
}

/// A veth pair created inside `a`'s namespace with its peer moved straight into `b`'s, so
/// neither end ever exists in the root namespace (interface names only need to be unique
/// inside their own namespace); both ends addressed (IPv6 without duplicate address
/// detection), up, and operational when this returns.
pub fn veth(a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<()> {
    ip_in(
        a.netns,
        &[
            "link", "add", a.device, "type", "veth", "peer", "name", b.device, "netns", b.netns,
        ],
    )?;
    for end in [a, b] {
        let (v4, prefix4) = end.v4;
        let (v6, prefix6) = end.v6;
        ip_in(
            end.netns,
            &["addr", "add", &format!("{v4}/{prefix4}"), "dev", end.device],
        )?;
        // Without nodad the address stays tentative for a while and binds/connects fail.
        ip_in(
            end.netns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{v6}/{prefix6}"),
                "dev",
                end.device,
                "nodad",
            ],
        )?;
        ip_in(end.netns, &["link", "set", end.device, "up"])?;
    }
    // The kernel activates a link's queue asynchronously after "up"; packets sent before that
    // are dropped, which costs the first IPv6 neighbour solicitation a 1 s retransmit.
    for end in [a, b] {
        wait_until_operational(end.netns, end.device)?;
    }
    Ok(())
}

/// Waits until `device` in `namespace` is operationally up.
pub fn wait_until_operational(namespace: &str, device: &str) -> Result<()> {
    let is_up = || {
        let output = run_checked(
            Command::new("ip").args(["-n", namespace, "-o", "link", "show", "dev", device]),
            IP_TIMEOUT,
        )
        .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .contains(" state UP ")
            .then_some(())
    };
    wait_until(LINK_UP_TIMEOUT, Duration::from_millis(5), is_up)
        .with_context(|| format!("{device} in {namespace} did not come up"))
}

/// `ip -n NETNS ARGS...`.
pub fn ip_in(namespace: &str, args: &[&str]) -> Result<()> {
    run_checked(
        Command::new("ip").args(["-n", namespace]).args(args),
        IP_TIMEOUT,
    )
    .map(drop)
}

/// `sysctl -w` of each `key=value` inside `netns`.
pub fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    run_checked(
        Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-q", "-w"])
            .args(settings),
        IP_TIMEOUT,
    )
    .map(drop)
}

/// Runs `work` on a thread of its own inside network namespace `netns` (setns affects only
/// the calling thread), for tests that need sockets in a test namespace.
pub fn run_in<T: Send + 'static>(
    netns: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("{NETNS_DIR}/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let namespace = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        work()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread working in {netns} panicked"))?
}
