//! The north-south world's namespaces wired together: sysctls, veth links (bridged or routed
//! pod layout), routes, and the checksum offload and nstat checks (see the module
//! documentation of [`crate::world::north_south`] for the picture).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Result, bail, ensure};

use super::{
    CLIENT4, CLIENT6, EXTERNAL_NET4, EXTERNAL_NET6, LOCAL_POD4, LOCAL_POD6, Layout,
    NODE_CLIENT_LINK, NODE_EXT4, NODE_EXT6, NODE_NODE2_LINK, NODE_POD_GW4, NODE_POD_GW6,
    NODE_POD_LINK, NODE_TO_NODE2_4, NODE_TO_NODE2_6, NODE2_4, NODE2_6, NODE2_POD_GW4,
    NODE2_POD_GW6, NODE2_UP_LINK, REMOTE_POD4, REMOTE_POD6, ROUTED_GATEWAY4, ROUTED_GATEWAY6,
    ROUTED_HOST_MAC,
};
use crate::env::netns::{IP_TIMEOUT, VethEnd, ip_in, sysctl, veth, wait_until_operational};
use crate::env::process::run_checked;

/// The names of the topology's namespaces.
pub(super) struct Spaces {
    pub node: String,
    pub client: String,
    pub node2: String,
    pub local: String,
    pub remote: String,
    pub layout: Layout,
}

impl Spaces {
    /// Sysctls: DAD off, reverse-path filtering off, forwarding on in both nodes.
    pub(super) fn configure(&self) -> Result<()> {
        for netns in [
            &self.node,
            &self.client,
            &self.node2,
            &self.local,
            &self.remote,
        ] {
            sysctl(
                netns,
                &[
                    // Link-local addresses usable at once (globals are added with nodad).
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    // Asymmetric paths (a reply through another node) must not be dropped.
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
        }
        for router in [&self.node, &self.node2] {
            sysctl(
                router,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            )?;
        }
        Ok(())
    }

    /// The four veth links; returns every (namespace, device) end.
    pub(super) fn wire(&self) -> Result<Vec<(String, String)>> {
        let mut world = WorldBuilder { links: Vec::new() };
        let (node_end, client_end) = client_link_ends(&self.node, &self.client);
        world.link(&node_end, &client_end)?;
        match self.layout {
            Layout::Bridged => world.link(
                &VethEnd {
                    netns: &self.node,
                    device: NODE_POD_LINK,
                    v4: (NODE_POD_GW4, 24),
                    v6: (NODE_POD_GW6, 64),
                },
                &VethEnd {
                    netns: &self.local,
                    device: "eth0",
                    v4: (LOCAL_POD4, 24),
                    v6: (LOCAL_POD6, 64),
                },
            )?,
            Layout::Routed => world.routed_pod_link(&self.node, &self.local)?,
        }
        world.link(
            &VethEnd {
                netns: &self.node,
                device: NODE_NODE2_LINK,
                v4: (NODE_TO_NODE2_4, 24),
                v6: (NODE_TO_NODE2_6, 64),
            },
            &VethEnd {
                netns: &self.node2,
                device: NODE2_UP_LINK,
                v4: (NODE2_4, 24),
                v6: (NODE2_6, 64),
            },
        )?;
        world.link(
            &VethEnd {
                netns: &self.node2,
                device: "pod0",
                v4: (NODE2_POD_GW4, 24),
                v6: (NODE2_POD_GW6, 64),
            },
            &VethEnd {
                netns: &self.remote,
                device: "eth0",
                v4: (REMOTE_POD4, 24),
                v6: (REMOTE_POD6, 64),
            },
        )?;
        Ok(world.links)
    }

    /// Specific routes only (see the module documentation).
    pub(super) fn route(&self) -> Result<()> {
        route_client(&self.client)?;
        // The node: the remote pod network via node2; no default route.
        ip_in(
            &self.node,
            &["route", "add", "10.241.0.0/16", "via", &NODE2_4.to_string()],
        )?;
        ip_in(
            &self.node,
            &[
                "-6",
                "route",
                "add",
                "fd00:241::/32",
                "via",
                &NODE2_6.to_string(),
            ],
        )?;
        // Node2: specific routes back via the node; no default route.
        let node_from_node2 = (NODE_TO_NODE2_4.to_string(), NODE_TO_NODE2_6.to_string());
        for prefix in ["203.0.113.0/24", "10.240.0.0/16", EXTERNAL_NET4] {
            ip_in(
                &self.node2,
                &["route", "add", prefix, "via", &node_from_node2.0],
            )?;
        }
        for prefix in ["2001:db8:c::/64", "fd00:240::/32", EXTERNAL_NET6] {
            ip_in(
                &self.node2,
                &["-6", "route", "add", prefix, "via", &node_from_node2.1],
            )?;
        }
        // Pods: default route via their node (which has none itself).
        let mut pods = vec![(&self.remote, NODE2_POD_GW4, NODE2_POD_GW6)];
        match self.layout {
            Layout::Bridged => pods.push((&self.local, NODE_POD_GW4, NODE_POD_GW6)),
            Layout::Routed => route_routed_pod(&self.node, &self.local)?,
        }
        for (pod, gw4, gw6) in pods {
            ip_in(pod, &["route", "add", "default", "via", &gw4.to_string()])?;
            ip_in(
                pod,
                &["-6", "route", "add", "default", "via", &gw6.to_string()],
            )?;
        }
        Ok(())
    }
}

/// The routed layout's routes: the node's /32 and /128 to the pod through its unnumbered
/// link, the pod's default routes through the gateway the node answers for.
fn route_routed_pod(node: &str, pod: &str) -> Result<()> {
    ip_in(
        node,
        &[
            "route",
            "add",
            &format!("{LOCAL_POD4}/32"),
            "dev",
            NODE_POD_LINK,
        ],
    )?;
    ip_in(
        node,
        &[
            "-6",
            "route",
            "add",
            &format!("{LOCAL_POD6}/128"),
            "dev",
            NODE_POD_LINK,
        ],
    )?;
    let gateway = ROUTED_GATEWAY4.to_string();
    ip_in(
        pod,
        &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )?;
    ip_in(
        pod,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;
    // Proxy ARP answers for the gateway only when the node has a route to it elsewhere,
    // and this node has no default route: pin the answer, as a CNI may.
    ip_in(
        pod,
        &[
            "neigh",
            "replace",
            &gateway,
            "lladdr",
            ROUTED_HOST_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    ip_in(
        pod,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            ROUTED_GATEWAY6,
            "dev",
            "eth0",
        ],
    )
}

/// The client's routes: pods and external addresses via the node, nothing else.
pub(super) fn route_client(client: &str) -> Result<()> {
    let (ext4, ext6) = (NODE_EXT4.to_string(), NODE_EXT6.to_string());
    for prefix in ["10.240.0.0/15", EXTERNAL_NET4] {
        ip_in(client, &["route", "add", prefix, "via", &ext4])?;
    }
    for prefix in ["fd00:240::/31", EXTERNAL_NET6] {
        ip_in(client, &["-6", "route", "add", prefix, "via", &ext6])?;
    }
    Ok(())
}

/// The node ↔ client link's two ends.
pub(super) fn client_link_ends<'a>(node: &'a str, client: &'a str) -> (VethEnd<'a>, VethEnd<'a>) {
    (
        VethEnd {
            netns: node,
            device: NODE_CLIENT_LINK,
            v4: (NODE_EXT4, 24),
            v6: (NODE_EXT6, 64),
        },
        VethEnd {
            netns: client,
            device: "eth0",
            v4: (CLIENT4, 24),
            v6: (CLIENT6, 64),
        },
    )
}

pub(super) struct WorldBuilder {
    pub links: Vec<(String, String)>,
}

impl WorldBuilder {
    /// The routed layout's pod link: the node's side without addresses (a fixed MAC, so its
    /// link-local address is known, and proxy ARP on), the pod's side with its /32 and /128.
    pub(super) fn routed_pod_link(&mut self, node: &str, pod: &str) -> Result<()> {
        ip_in(
            node,
            &[
                "link",
                "add",
                NODE_POD_LINK,
                "address",
                ROUTED_HOST_MAC,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod,
            ],
        )?;
        self.links.push((node.to_owned(), NODE_POD_LINK.to_owned()));
        self.links.push((pod.to_owned(), "eth0".to_owned()));
        sysctl(
            node,
            &[&format!("net.ipv4.conf.{NODE_POD_LINK}.proxy_arp=1")],
        )?;
        ip_in(
            pod,
            &["addr", "add", &format!("{LOCAL_POD4}/32"), "dev", "eth0"],
        )?;
        ip_in(
            pod,
            &[
                "-6",
                "addr",
                "add",
                &format!("{LOCAL_POD6}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip_in(node, &["link", "set", NODE_POD_LINK, "up"])?;
        ip_in(pod, &["link", "set", "eth0", "up"])?;
        wait_until_operational(node, NODE_POD_LINK)?;
        wait_until_operational(pod, "eth0")
    }

    /// A veth pair between `a` and `b` (see [`veth`]), recorded among the links.
    pub(super) fn link(&mut self, a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<()> {
        veth(a, b)?;
        self.links.push((a.netns.to_owned(), a.device.to_owned()));
        self.links.push((b.netns.to_owned(), b.device.to_owned()));
        Ok(())
    }
}

/// `ethtool -K DEV rx off tx off`, then checks that it took.
pub(super) fn checksum_offloads_off(netns: &str, device: &str) -> Result<()> {
    run_checked(
        Command::new("ip").args([
            "netns", "exec", netns, "ethtool", "-K", device, "rx", "off", "tx", "off",
        ]),
        IP_TIMEOUT,
    )?;
    let output = run_checked(
        Command::new("ip").args(["netns", "exec", netns, "ethtool", "-k", device]),
        IP_TIMEOUT,
    )?;
    let features = String::from_utf8_lossy(&output.stdout);
    for feature in ["rx-checksumming", "tx-checksumming"] {
        ensure!(
            features
                .lines()
                .any(|line| line.trim() == format!("{feature}: off")),
            "{feature} still on for {device} in {netns}:\n{features}"
        );
    }
    Ok(())
}

pub(super) fn checksum_errors(netns: &str) -> Result<BTreeMap<String, u64>> {
    // -a: absolute values (ignore history), -s: leave the history alone, -z: zeros too.
    let output = run_checked(
        Command::new("ip").args(["netns", "exec", netns, "nstat", "-a", "-s", "-z"]),
        IP_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let counters: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let value = fields.next()?.parse().ok()?;
            name.contains("CsumErrors")
                .then(|| (name.to_owned(), value))
        })
        .collect();
    for required in ["TcpInCsumErrors", "UdpInCsumErrors"] {
        if !counters.contains_key(required) {
            bail!("nstat in {netns} shows no {required}:\n{text}");
        }
    }
    Ok(counters)
}
