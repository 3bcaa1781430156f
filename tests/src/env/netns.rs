//! Isolated network namespaces: one "node" namespace wired to N backend namespaces.
//!
//! Nothing here touches the root namespace: the veth pairs are created inside the node namespace
//! with their peer moved straight into a backend namespace, and no namespace has a default
//! route, so traffic to any address that is not on a test link fails with ENETUNREACH instead of
//! leaving the machine.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::env::names;
use crate::env::process::{run_checked, wait_until};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

const IP_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Namespaces created so far, so a failure half-way still cleans up.
    created: Vec<String>,
}

impl Topology {
    pub fn new(backends: usize) -> Result<Self> {
        ensure!(backends <= MAX_BACKENDS, "at most {MAX_BACKENDS} backends");
        crate::env::stale::sweep_once();
        let node = names::unique('n');
        let mut topology = Self {
            node: node.clone(),
            backends: Vec::with_capacity(backends),
            created: Vec::new(),
        };
        topology.add_namespace(&node)?;
        for index in 0..backends {
            let backend = backend_addresses(index, format!("{node}b{index}"));
            topology.add_namespace(&backend.namespace)?;
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
        self.add_namespace(&peer.namespace)?;
        wire(&self.node, &peer)?;
        Ok(peer)
    }

    fn add_namespace(&mut self, name: &str) -> Result<()> {
        run_checked(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT)?;
        self.created.push(name.to_owned());
        ip_in(name, &["link", "set", "lo", "up"])
    }
}

impl Drop for Topology {
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

/// Links the node to `backend`: the veth is created inside the node namespace and its peer is
/// moved directly into the backend namespace, so neither end ever exists in the root namespace.
/// Interface names only need to be unique inside their own namespace.
fn wire(node: &str, backend: &Backend) -> Result<()> {
    let node_end = format!("b{}", backend.index);
    let backend_end = "eth0";
    ip_in(
        node,
        &[
            "link",
            "add",
            &node_end,
            "type",
            "veth",
            "peer",
            "name",
            backend_end,
            "netns",
            &backend.namespace,
        ],
    )?;
    for (namespace, device, v4, v6) in [
        (
            node,
            node_end.as_str(),
            backend.node_ipv4,
            backend.node_ipv6,
        ),
        (
            backend.namespace.as_str(),
            backend_end,
            backend.ipv4,
            backend.ipv6,
        ),
    ] {
        ip_in(
            namespace,
            &["addr", "add", &format!("{v4}/24"), "dev", device],
        )?;
        // Without nodad the address stays tentative for a while and binds/connects fail.
        ip_in(
            namespace,
            &[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                device,
                "nodad",
            ],
        )?;
        ip_in(namespace, &["link", "set", device, "up"])?;
    }
    // The kernel activates a link's queue asynchronously after "up"; packets sent before that
    // are dropped, which costs the first IPv6 neighbour solicitation a 1 s retransmit.
    for (namespace, device) in [
        (node, node_end.as_str()),
        (backend.namespace.as_str(), backend_end),
    ] {
        wait_until_operational(namespace, device)?;
    }
    Ok(())
}

/// Waits until `device` in `namespace` is operationally up.
pub(crate) fn wait_until_operational(namespace: &str, device: &str) -> Result<()> {
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

fn ip_in(namespace: &str, args: &[&str]) -> Result<()> {
    run_checked(
        Command::new("ip").args(["-n", namespace]).args(args),
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
