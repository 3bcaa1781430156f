//! The cluster's network namespaces, links and routes (see the module documentation of
//! [`crate::cluster`] for the picture and the addresses).
//!
//! Every veth is created inside a test namespace with its peer moved straight into another, never
//! in the root namespace, and no namespace has a default route except pods (via their node, which
//! has none): nothing can leave the machine.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::netns::delete_namespace;
use crate::process::{run_checked, wait_until};

const IP_TIMEOUT: Duration = Duration::from_secs(10);
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many nodes (a node's index is an octet of its addresses).
pub const MAX_NODES: usize = 50;
/// Host numbers of pods on a node's /24 (10.240.NODE.HOST); 2 is the node's client pod.
const FIRST_POD_HOST: u8 = 10;
const LAST_POD_HOST: u8 = 250;

/// The client pod of each node (not behind any Service): 10.240.NODE.2.
pub const CLIENT_POD_HOST: u8 = 2;
/// The external client, on its link to the router.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const ROUTER_TO_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The load balancer's side of its link to the router, and the router's.
const BALANCER_UP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const ROUTER_TO_BALANCER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// The load balancer's addresses (LoadBalancer ingress IPs); the router sends them to it.
pub const LB_NET: &str = "198.51.100.0/24";
/// Every pod network (10.240.NODE.0/24 per node): `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.240.0.0/16";

/// The routed CNI's pod gateway (Calico's), answered for by the host side's fixed MAC.
const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const HOST_SIDE_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// Interface names (unique inside their own namespace only).
pub const NODE_UPLINK: &str = "up0";
pub const NODE_BALANCER_LINK: &str = "lb0";

/// A node's address on its link to the router (its InternalIP): 172.16.NODE.2.
pub fn node_address(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, octet(node), 2)
}

fn router_to_node(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, octet(node), 1)
}

/// A node's address on its link to the load balancer: 172.17.NODE.2 (where the balancer sends
/// traffic and probes health-check node ports).
pub fn node_balancer_address(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 17, octet(node), 2)
}

fn balancer_to_node(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 17, octet(node), 1)
}

/// The load balancer's interface towards `node`.
pub fn balancer_link(node: usize) -> String {
    format!("n{node}")
}

/// Address `host` of `node`'s pod network.
pub fn pod_address(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, octet(node), host)
}

fn pod_network(node: usize) -> String {
    format!("10.240.{}.0/24", octet(node))
}

fn octet(node: usize) -> u8 {
    assert!(node < MAX_NODES, "at most {MAX_NODES} nodes");
    u8::try_from(node).expect("bounded by MAX_NODES")
}

/// Hands out pod host numbers per node; a replaced pod gets a fresh address, as IPAM does
/// while the old one may still terminate.
#[derive(Debug, Default)]
pub struct PodAddresses {
    next: Vec<u8>,
}

impl PodAddresses {
    pub fn next(&mut self, node: usize) -> Result<u8> {
        if self.next.len() <= node {
            self.next.resize(node + 1, FIRST_POD_HOST);
        }
        let host = self.next[node];
        ensure!(
            host <= LAST_POD_HOST,
            "node {node} ran out of pod addresses"
        );
        self.next[node] += 1;
        Ok(host)
    }
}

/// Namespaces created so far, deleted in reverse order on drop (which deletes their links).
#[derive(Debug, Default)]
pub struct Namespaces {
    created: Vec<String>,
}

impl Namespaces {
    pub fn add(&mut self, name: &str) -> Result<()> {
        run_checked(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT)?;
        self.created.push(name.to_owned());
        ip_in(name, &["link", "set", "lo", "up"])?;
        sysctl(
            name,
            &[
                // Asymmetric paths (the load balancer's traffic returns through the router)
                // must not be dropped.
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )
    }

    /// Deletes one namespace now (a pod that went away), if it is ours.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if let Some(position) = self.created.iter().position(|n| n == name) {
            self.created.remove(position);
            delete_namespace(name)?;
        }
        Ok(())
    }

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

/// The fixed part of the world: router, external client, load balancer, and the nodes' links
/// to router and load balancer, with every route.
pub struct Fabric<'a> {
    pub router: &'a str,
    pub client: &'a str,
    pub balancer: &'a str,
    pub nodes: &'a [String],
}

impl Fabric<'_> {
    pub fn build(&self) -> Result<()> {
        for router in [self.router, self.balancer] {
            forwarding(router)?;
        }
        link(
            (self.router, "cl0", ROUTER_TO_CLIENT),
            (self.client, "eth0", CLIENT),
        )?;
        link(
            (self.router, "lb0", ROUTER_TO_BALANCER),
            (self.balancer, "up0", BALANCER_UP),
        )?;
        // The client reaches node addresses and the LB addresses, nothing else.
        for prefix in ["172.16.0.0/16", LB_NET] {
            ip_in(
                self.client,
                &["route", "add", prefix, "via", &ROUTER_TO_CLIENT.to_string()],
            )?;
        }
        ip_in(
            self.router,
            &["route", "add", LB_NET, "via", &BALANCER_UP.to_string()],
        )?;
        // L4 hashing, so the balancer's connections spread over every healthy node.
        sysctl(self.balancer, &["net.ipv4.fib_multipath_hash_policy=1"])?;
        for (index, node) in self.nodes.iter().enumerate() {
            forwarding(node)?;
            link(
                (node, NODE_UPLINK, node_address(index)),
                (self.router, &format!("n{index}"), router_to_node(index)),
            )?;
            link(
                (node, NODE_BALANCER_LINK, node_balancer_address(index)),
                (
                    self.balancer,
                    &balancer_link(index),
                    balancer_to_node(index),
                ),
            )?;
            let via = router_to_node(index).to_string();
            // Other nodes, their pods and the external client through the router; the node's
            // own pods by their /32 routes (added with each pod).
            for prefix in ["172.16.0.0/16", "10.240.0.0/16", "203.0.113.0/24"] {
                ip_in(node, &["route", "add", prefix, "via", &via])?;
            }
            ip_in(
                self.router,
                &[
                    "route",
                    "add",
                    &pod_network(index),
                    "via",
                    &node_address(index).to_string(),
                ],
            )?;
        }
        Ok(())
    }
}

/// Wires pod namespace `pod` to node namespace `node` as a routed CNI does: the node's side
/// (`host_link`) has no address and a fixed MAC, the node routes the pod's /32 to it, the pod
/// has its /32 and a default route through a link-local gateway pinned to that MAC.
pub fn wire_pod(node: &str, host_link: &str, pod: &str, address: Ipv4Addr) -> Result<()> {
    ip_in(
        node,
        &[
            "link",
            "add",
            host_link,
            "address",
            HOST_SIDE_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod,
        ],
    )?;
    ip_in(
        pod,
        &["addr", "add", &format!("{address}/32"), "dev", "eth0"],
    )?;
    ip_in(node, &["link", "set", host_link, "up"])?;
    ip_in(pod, &["link", "set", "eth0", "up"])?;
    wait_until_operational(node, host_link)?;
    wait_until_operational(pod, "eth0")?;
    ip_in(
        node,
        &["route", "add", &format!("{address}/32"), "dev", host_link],
    )?;
    let gateway = POD_GATEWAY.to_string();
    ip_in(
        pod,
        &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )?;
    ip_in(
        pod,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;
    ip_in(
        pod,
        &[
            "neigh",
            "replace",
            &gateway,
            "lladdr",
            HOST_SIDE_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
}

/// Points the balancer's route for `address` at `nodes` (equal-cost next hops), or makes it
/// unreachable (an immediate ICMP error for the client) when there is none.
pub fn steer(balancer: &str, address: Ipv4Addr, nodes: &[usize]) -> Result<()> {
    let destination = format!("{address}/32");
    let mut args: Vec<String> = vec!["route".into(), "replace".into()];
    if nodes.is_empty() {
        args.extend(["unreachable".into(), destination]);
    } else {
        args.push(destination);
        for node in nodes {
            args.extend([
                "nexthop".into(),
                "via".into(),
                node_balancer_address(*node).to_string(),
                "dev".into(),
                balancer_link(*node),
            ]);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ip_in(balancer, &args)
}

/// Takes every link of `netns` (but loopback) down: the machine is gone for its peers.
pub fn isolate(netns: &str, devices: &[&str]) -> Result<()> {
    for device in devices {
        ip_in(netns, &["link", "set", device, "down"])?;
    }
    Ok(())
}

fn forwarding(netns: &str) -> Result<()> {
    sysctl(netns, &["net.ipv4.ip_forward=1"])
}

/// A veth pair between two namespaces, created in the first with its peer moved into the
/// second, each end with a /24.
fn link(a: (&str, &str, Ipv4Addr), b: (&str, &str, Ipv4Addr)) -> Result<()> {
    ip_in(
        a.0,
        &[
            "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
        ],
    )?;
    for (netns, device, address) in [a, b] {
        ip_in(
            netns,
            &["addr", "add", &format!("{address}/24"), "dev", device],
        )?;
        ip_in(netns, &["link", "set", device, "up"])?;
    }
    for (netns, device, _) in [a, b] {
        wait_until_operational(netns, device)?;
    }
    Ok(())
}

fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    run_checked(
        Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-q", "-w"])
            .args(settings),
        IP_TIMEOUT,
    )
    .map(drop)
}

fn wait_until_operational(netns: &str, device: &str) -> Result<()> {
    let is_up = || {
        let output = run_checked(
            Command::new("ip").args(["-n", netns, "-o", "link", "show", "dev", device]),
            IP_TIMEOUT,
        )
        .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .contains(" state UP ")
            .then_some(())
    };
    wait_until(LINK_UP_TIMEOUT, Duration::from_millis(5), is_up)
        .with_context(|| format!("{device} in {netns} did not come up"))
}

pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    run_checked(
        Command::new("ip").args(["-n", netns]).args(args),
        IP_TIMEOUT,
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_nodes_and_pods_apart() {
        assert_eq!(node_address(2), Ipv4Addr::new(172, 16, 2, 2));
        assert_eq!(node_balancer_address(2), Ipv4Addr::new(172, 17, 2, 2));
        assert_eq!(pod_address(1, 10), Ipv4Addr::new(10, 240, 1, 10));
        let mut pods = PodAddresses::default();
        assert_eq!(pods.next(1).unwrap(), FIRST_POD_HOST);
        assert_eq!(pods.next(1).unwrap(), FIRST_POD_HOST + 1);
        assert_eq!(pods.next(0).unwrap(), FIRST_POD_HOST);
        for _ in FIRST_POD_HOST + 1..=LAST_POD_HOST {
            pods.next(0).unwrap();
        }
        assert!(pods.next(0).is_err());
    }
}
