//! One lane per mode: a client namespace, a node namespace that forwards between the client and
//! M backend namespaces, and the backends' servers. Every lane has the same addresses, so the
//! modes differ only in what the node (or the client's cgroup) does with service traffic, and
//! they can be measured in the same run, interleaved. No namespace has a link to the root
//! namespace nor a default route: traffic cannot leave the machine.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use switchyard_tests::env::netns::{Backend, Topology};
use switchyard_tests::env::process::run_checked;

use super::loadgen::{self, Server};
use super::services::{CLUSTER_CIDR, SERVICE_CIDR};

/// The client is wired like backend number 199 would be: 10.240.200.2, inside the pod network.
const CLIENT_INDEX: usize = 199;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Many short connections from one client: a wide port range, and TIME_WAIT ports reused for
/// new outgoing connections (the client closes first, so it holds them).
pub const CLIENT_SYSCTLS: [&str; 2] = [
    "net.ipv4.ip_local_port_range=1024 65000",
    "net.ipv4.tcp_tw_reuse=1",
];

/// Fields drop in declaration order: servers first, namespaces last.
pub struct Lane {
    _servers: Vec<Server>,
    client: Backend,
    topology: Topology,
}

impl Lane {
    pub fn new(backends: usize) -> Result<Self> {
        let mut topology = Topology::new(backends)?;
        let client = topology.add_peer(CLIENT_INDEX)?;
        let node = topology.node_namespace().to_owned();
        sysctl(
            &node,
            &[
                "net.ipv4.ip_forward=1",
                // Paths are symmetric, but a strict reverse-path filter must never be what
                // a mode pays for.
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        sysctl(&client.namespace, &CLIENT_SYSCTLS)?;
        for prefix in [CLUSTER_CIDR, SERVICE_CIDR] {
            route(&client.namespace, prefix, client.node_ipv4)?;
        }
        for backend in topology.backends() {
            route(&backend.namespace, CLUSTER_CIDR, backend.node_ipv4)?;
        }
        let servers = topology
            .backends()
            .iter()
            .map(|backend| loadgen::serve(&backend.namespace))
            .collect::<Result<_>>()?;
        Ok(Self {
            _servers: servers,
            client,
            topology,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn client_namespace(&self) -> &str {
        &self.client.namespace
    }

    /// The node's address on the client's link: where the client reaches NodePorts.
    pub fn node_address_for_client(&self) -> Ipv4Addr {
        self.client.node_ipv4
    }

    /// Readies the namespaces around the node for the XDP fast path: XDP_REDIRECT into a veth
    /// queues the frame on its peer's NAPI ring, which needs GRO on that peer (or an XDP
    /// program; the kernel's veth XDP notes); and the peers send full checksums, as frames
    /// from a wire have them (XDP leaves frames with checksum offload pending to TC).
    pub fn prepare_for_xdp(&self) -> Result<()> {
        let namespaces = std::iter::once(self.client.namespace.as_str()).chain(
            self.topology
                .backends()
                .iter()
                .map(|backend| backend.namespace.as_str()),
        );
        for namespace in namespaces {
            let listed = run_checked(
                Command::new("ip").args(["-n", namespace, "-o", "link", "show", "type", "veth"]),
                COMMAND_TIMEOUT,
            )?;
            let text = String::from_utf8_lossy(&listed.stdout).into_owned();
            for device in text.lines().filter_map(veth_name) {
                run_checked(
                    Command::new("ip").args([
                        "netns", "exec", namespace, "ethtool", "-K", device, "gro", "on", "tx",
                        "off",
                    ]),
                    COMMAND_TIMEOUT,
                )?;
            }
        }
        Ok(())
    }

    pub fn backend_ips(&self) -> Vec<Ipv4Addr> {
        self.topology.backends().iter().map(|b| b.ipv4).collect()
    }
}

/// The device name of an `ip -o link show` line (`3: name@if2: <...>`).
fn veth_name(line: &str) -> Option<&str> {
    let name = line.split(": ").nth(1)?;
    Some(name.split('@').next().unwrap_or(name))
}

pub fn sysctl(namespace: &str, settings: &[&str]) -> Result<()> {
    run_checked(
        Command::new("ip")
            .args(["netns", "exec", namespace, "sysctl", "-q", "-w"])
            .args(settings),
        COMMAND_TIMEOUT,
    )
    .map(drop)
}

fn route(namespace: &str, prefix: &str, via: Ipv4Addr) -> Result<()> {
    run_checked(
        Command::new("ip").args([
            "-n",
            namespace,
            "route",
            "add",
            prefix,
            "via",
            &via.to_string(),
        ]),
        COMMAND_TIMEOUT,
    )
    .map(drop)
}
