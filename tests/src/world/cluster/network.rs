//! The cluster's network namespaces, links and routes (see the module documentation of
//! [`crate::world::cluster`] for the picture and the addresses).
//!
//! Every veth is created inside a test namespace with its peer moved straight into another, never
//! in the root namespace, and no namespace has a default route except pods (via their node, which
//! has none): nothing can leave the machine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, ensure};

use crate::env::netns::ip_in;
use crate::env::netns::{Namespaces, VethEnd, sysctl, veth, wait_until_operational};

/// At most this many nodes (a node's index is an octet of its addresses).
pub const MAX_NODES: usize = 50;
/// Host numbers of pods on a node's /24 (10.240.NODE.HOST); 2 is the node's client pod.
const FIRST_POD_HOST: u8 = 10;
const LAST_POD_HOST: u8 = 250;

/// The client pod of each node (not behind any Service): 10.240.NODE.2.
pub const CLIENT_POD_HOST: u8 = 2;
/// The external client, on its link to the router.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
const ROUTER_TO_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const ROUTER_TO_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
/// The load balancer's side of its link to the router, and the router's.
const BALANCER_UP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const BALANCER_UP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 2);
const ROUTER_TO_BALANCER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const ROUTER_TO_BALANCER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 1);
/// The load balancer's addresses (LoadBalancer ingress IPs); the router sends them to it.
pub const LB_NET: &str = "198.51.100.0/24";
pub const LB_NET6: &str = "2001:db8:5e::/64";
/// Every pod network (10.240.NODE.0/24 and fd00:240:0:NODE::/64 per node): `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.240.0.0/16,fd00:240::/48";
/// Node addresses (both links) and every pod network, IPv6.
const NODES_NET6: &str = "fd00:172:16::/48";
const PODS_NET6: &str = "fd00:240::/48";
const CLIENT_NET6: &str = "2001:db8:c::/64";

/// The routed CNI's pod gateway (Calico's), answered for by the host side's fixed MAC.
const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const HOST_SIDE_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The link-local address the kernel derives from [`HOST_SIDE_MAC`] (EUI-64): the pods'
/// IPv6 gateway.
const POD_GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";

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

/// A node's IPv6 address on its link to the router (its IPv6 InternalIP): fd00:172:16:NODE::2.
pub fn node_address6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x16, group(node), 0, 0, 0, 2)
}

fn router_to_node6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x16, group(node), 0, 0, 0, 1)
}

/// A node's IPv6 address on its link to the load balancer: fd00:172:17:NODE::2.
pub fn node_balancer_address6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x17, group(node), 0, 0, 0, 2)
}

fn balancer_to_node6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x17, group(node), 0, 0, 0, 1)
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

/// IPv6 address `host` of `node`'s pod network: fd00:240:0:NODE::HOST.
pub fn pod_address6(node: usize, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x240, 0, group(node), 0, 0, 0, u16::from(host))
}

fn pod_network(node: usize) -> String {
    format!("10.240.{}.0/24", octet(node))
}

fn pod_network6(node: usize) -> String {
    format!("fd00:240:0:{:x}::/64", group(node))
}

fn octet(node: usize) -> u8 {
    assert!(node < MAX_NODES, "at most {MAX_NODES} nodes");
    u8::try_from(node).expect("bounded by MAX_NODES")
}

fn group(node: usize) -> u16 {
    u16::from(octet(node))
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

/// Creates namespace `name` among `namespaces`, with the settings every cluster namespace
/// shares.
pub fn add_namespace(namespaces: &mut Namespaces, name: &str) -> Result<()> {
    namespaces.add(name)?;
    sysctl(
        name,
        &[
            // Asymmetric paths (the load balancer's traffic returns through the router)
            // must not be dropped.
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            // Link-local addresses (the pods' IPv6 gateway) usable at once; global ones
            // are added with nodad.
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )
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
            (self.router, "cl0", ROUTER_TO_CLIENT, ROUTER_TO_CLIENT6),
            (self.client, "eth0", CLIENT, CLIENT6),
        )?;
        link(
            (self.router, "lb0", ROUTER_TO_BALANCER, ROUTER_TO_BALANCER6),
            (self.balancer, "up0", BALANCER_UP, BALANCER_UP6),
        )?;
        // The client reaches node addresses and the LB addresses, nothing else.
        for prefix in ["172.16.0.0/16", LB_NET] {
            ip_in(
                self.client,
                &["route", "add", prefix, "via", &ROUTER_TO_CLIENT.to_string()],
            )?;
        }
        for prefix in [NODES_NET6, LB_NET6] {
            ip_in(
                self.client,
                &[
                    "-6",
                    "route",
                    "add",
                    prefix,
                    "via",
                    &ROUTER_TO_CLIENT6.to_string(),
                ],
            )?;
        }
        ip_in(
            self.router,
            &["route", "add", LB_NET, "via", &BALANCER_UP.to_string()],
        )?;
        ip_in(
            self.router,
            &[
                "-6",
                "route",
                "add",
                LB_NET6,
                "via",
                &BALANCER_UP6.to_string(),
            ],
        )?;
        // L4 hashing, so the balancer's connections spread over every healthy node.
        sysctl(
            self.balancer,
            &[
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
            ],
        )?;
        for (index, node) in self.nodes.iter().enumerate() {
            self.wire_node(index, node)?;
        }
        Ok(())
    }

    /// A node's links to the router and the balancer, its routes and the router's route to
    /// its pod networks.
    fn wire_node(&self, index: usize, node: &str) -> Result<()> {
        forwarding(node)?;
        link(
            (node, NODE_UPLINK, node_address(index), node_address6(index)),
            (
                self.router,
                &format!("n{index}"),
                router_to_node(index),
                router_to_node6(index),
            ),
        )?;
        link(
            (
                node,
                NODE_BALANCER_LINK,
                node_balancer_address(index),
                node_balancer_address6(index),
            ),
            (
                self.balancer,
                &balancer_link(index),
                balancer_to_node(index),
                balancer_to_node6(index),
            ),
        )?;
        // Other nodes, their pods and the external client through the router; the node's
        // own pods by their /32 and /128 routes (added with each pod).
        let via = router_to_node(index).to_string();
        for prefix in ["172.16.0.0/16", "10.240.0.0/16", "203.0.113.0/24"] {
            ip_in(node, &["route", "add", prefix, "via", &via])?;
        }
        let via6 = router_to_node6(index).to_string();
        for prefix in [NODES_NET6, PODS_NET6, CLIENT_NET6] {
            ip_in(node, &["-6", "route", "add", prefix, "via", &via6])?;
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
        ip_in(
            self.router,
            &[
                "-6",
                "route",
                "add",
                &pod_network6(index),
                "via",
                &node_address6(index).to_string(),
            ],
        )?;
        Ok(())
    }
}

/// Wires pod namespace `pod` to node namespace `node` as a routed CNI does: the node's side
/// (`host_link`) has no address and a fixed MAC, the node routes the pod's /32 and /128 to it,
/// the pod has its /32 and /128 and default routes through a link-local gateway pinned to that
/// MAC (IPv4) and the host side's link-local address (IPv6).
pub fn wire_pod(
    node: &str,
    host_link: &str,
    pod: &str,
    address: Ipv4Addr,
    address6: Ipv6Addr,
) -> Result<()> {
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
    ip_in(
        pod,
        &[
            "-6",
            "addr",
            "add",
            &format!("{address6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip_in(node, &["link", "set", host_link, "up"])?;
    ip_in(pod, &["link", "set", "eth0", "up"])?;
    wait_until_operational(node, host_link)?;
    wait_until_operational(pod, "eth0")?;
    ip_in(
        node,
        &["route", "add", &format!("{address}/32"), "dev", host_link],
    )?;
    ip_in(
        node,
        &[
            "-6",
            "route",
            "add",
            &format!("{address6}/128"),
            "dev",
            host_link,
        ],
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
    )?;
    ip_in(
        pod,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY6,
            "dev",
            "eth0",
        ],
    )
}

/// Points the balancer's route for `address` at `nodes` (equal-cost next hops), or makes it
/// unreachable (an immediate ICMP error for the client) when there is none.
pub fn steer(balancer: &str, address: IpAddr, nodes: &[usize]) -> Result<()> {
    let (family, destination) = match address {
        IpAddr::V4(v4) => ("-4", format!("{v4}/32")),
        IpAddr::V6(v6) => ("-6", format!("{v6}/128")),
    };
    let mut args: Vec<String> = vec![family.into(), "route".into(), "replace".into()];
    if nodes.is_empty() {
        args.extend(["unreachable".into(), destination]);
    } else {
        args.push(destination);
        for node in nodes {
            let via = match address {
                IpAddr::V4(_) => node_balancer_address(*node).to_string(),
                IpAddr::V6(_) => node_balancer_address6(*node).to_string(),
            };
            args.extend([
                "nexthop".into(),
                "via".into(),
                via,
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
    sysctl(
        netns,
        &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
    )
}

/// A veth pair between two namespaces (see [`veth`]), each end with a /24 and a /64.
fn link(a: (&str, &str, Ipv4Addr, Ipv6Addr), b: (&str, &str, Ipv4Addr, Ipv6Addr)) -> Result<()> {
    veth(
        &VethEnd {
            netns: a.0,
            device: a.1,
            v4: (a.2, 24),
            v6: (a.3, 64),
        },
        &VethEnd {
            netns: b.0,
            device: b.1,
            v4: (b.2, 24),
            v6: (b.3, 64),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_nodes_and_pods_apart() {
        assert_eq!(node_address(2), Ipv4Addr::new(172, 16, 2, 2));
        assert_eq!(node_balancer_address(2), Ipv4Addr::new(172, 17, 2, 2));
        assert_eq!(pod_address(1, 10), Ipv4Addr::new(10, 240, 1, 10));
        assert_eq!(pod_address6(1, 10).to_string(), "fd00:240:0:1::a");
        assert_eq!(pod_network6(12), "fd00:240:0:c::/64");
        assert_eq!(node_address6(2).to_string(), "fd00:172:16:2::2");
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
