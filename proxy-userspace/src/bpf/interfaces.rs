//! Which of the node's interfaces the TC ingress program goes on, decided from facts read
//! from the kernel (links, node addresses, routes) by pure functions.
//!
//! Two kinds of interfaces need it:
//! - the *external* devices, where north-south traffic arrives: those `--interfaces` names
//!   (exact names or patterns), or by default every interface carrying a node address;
//! - the *endpoint-facing* devices, where endpoints' replies enter the node: the devices of
//!   direct routes to single addresses and of every route into the cluster CIDR. A routed
//!   CNI (Calico, AWS VPC CNI) gives every pod an unnumbered host veth with a /32 (/128)
//!   route; a bridged one gives the bridge a subnet route inside the cluster CIDR; other
//!   nodes' pods are reached through an overlay device or a peer link, also inside it.
//!   Switchyard is not the CNI, so it follows these routes instead of assuming a layout.
//!
//! The program reads an Ethernet header; devices without one (wireguard, ipip, tun) are
//! skipped with a reason.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::model::Cidr;

/// `ARPHRD_ETHER`: the link type of devices whose frames start with an Ethernet header.
const ARPHRD_ETHER: u16 = 1;

/// One `--interfaces` entry: an exact name, a prefix (`eth+`, as iptables and Cilium write
/// it) or a glob (`bond*`, `en?0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Glob(String),
}

impl Pattern {
    pub fn parse(entry: &str) -> Self {
        if let Some(prefix) = entry.strip_suffix('+')
            && !prefix.contains(['*', '?'])
        {
            return Self::Prefix(prefix.to_owned());
        }
        if entry.contains(['*', '?']) {
            Self::Glob(entry.to_owned())
        } else {
            Self::Exact(entry.to_owned())
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == name,
            Self::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Self::Glob(glob) => glob_matches(glob.as_bytes(), name.as_bytes()),
        }
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else itself.
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    // Iterative matching with one backtrack point (the last `*`): linear enough for names
    // of at most 15 bytes.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// The pin name of `program`'s link on `interface`. bpffs refuses dots, and interface names
/// may contain them (VLANs): every byte outside `[A-Za-z0-9-]` is written as `_` and two hex
/// digits, `_` included, so two names never share a pin (`eth0.100` → `eth0_2e100`,
/// `eth0_100` → `eth0_5f100`).
pub fn pin_name(program: &str, interface: &str) -> String {
    use std::fmt::Write as _;
    let mut name = format!("{program}-");
    for byte in interface.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            name.push(char::from(byte));
        } else {
            let _ = write!(name, "_{byte:02x}");
        }
    }
    name
}

/// What the kernel says about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// The link type (`ARPHRD_*`).
    pub kind: u16,
    pub loopback: bool,
}

/// A route of the main table, as far as choosing interfaces needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    pub device: String,
    /// Reached through a gateway (then the device is not where pods sit).
    pub via_gateway: bool,
}

/// The facts a choice is made from.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub links: Vec<Link>,
    /// Interfaces carrying a node address.
    pub addressed: BTreeSet<String>,
    pub routes: Vec<Route>,
}

/// Why an interface is wanted (for logs, and whether its absence matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    External,
    EndpointFacing,
}

/// The outcome: where to attach, what is skipped and why, and which needed interfaces are
/// missing (these keep `/readyz` at 503).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    pub attach: BTreeMap<String, Role>,
    pub skipped: BTreeMap<String, &'static str>,
    pub missing: BTreeMap<String, String>,
}

const NOT_ETHERNET: &str = "it has no Ethernet header (an L3 device such as wireguard, ipip or tun): the TC program cannot parse its packets";

/// Chooses the interfaces: external ones by `patterns` (none: every interface with a node
/// address), endpoint-facing ones by the routes (see the module documentation).
pub fn choose(patterns: &[Pattern], cluster_cidrs: &[Cidr], facts: &Facts) -> Choice {
    let mut choice = Choice::default();
    let mut wanted: BTreeMap<&str, Role> = BTreeMap::new();
    for link in &facts.links {
        let external = if patterns.is_empty() {
            facts.addressed.contains(&link.name)
        } else {
            patterns.iter().any(|pattern| pattern.matches(&link.name))
        };
        if external {
            wanted.insert(&link.name, Role::External);
        }
    }
    for route in &facts.routes {
        if is_endpoint_route(route, cluster_cidrs) {
            wanted.entry(&route.device).or_insert(Role::EndpointFacing);
        }
    }
    for link in &facts.links {
        let Some(&role) = wanted.get(link.name.as_str()) else {
            continue;
        };
        if link.loopback {
            continue;
        }
        if link.kind != ARPHRD_ETHER {
            let named = patterns
                .iter()
                .any(|pattern| *pattern == Pattern::Exact(link.name.clone()));
            if named {
                choice.missing.insert(
                    link.name.clone(),
                    format!("named in --interfaces, but {NOT_ETHERNET}"),
                );
            } else {
                choice.skipped.insert(link.name.clone(), NOT_ETHERNET);
            }
            continue;
        }
        choice.attach.insert(link.name.clone(), role);
    }
    for pattern in patterns {
        if let Pattern::Exact(name) = pattern
            && !facts.links.iter().any(|link| &link.name == name)
        {
            choice.missing.insert(
                name.clone(),
                "named in --interfaces, but it does not exist (yet)".to_owned(),
            );
        }
    }
    choice
}

/// A direct route to one address (a routed CNI's pod on this node), or any route into the
/// cluster CIDR: a bridged CNI's pod subnet, or the way to other nodes' pods (an overlay
/// device, the link to a peer node), where masqueraded replies of remote endpoints enter.
fn is_endpoint_route(route: &Route, cluster_cidrs: &[Cidr]) -> bool {
    let destination = route.destination;
    let host_route = !route.via_gateway
        && match destination.ip() {
            IpAddr::V4(v4) => destination.prefix() == 32 && !v4.is_loopback() && !v4.is_multicast(),
            IpAddr::V6(v6) => {
                destination.prefix() == 128
                    && !v6.is_loopback()
                    && !v6.is_multicast()
                    && !v6.is_unicast_link_local()
            }
        };
    host_route
        || cluster_cidrs.iter().any(|cidr| {
            cidr.ip().is_ipv4() == destination.ip().is_ipv4()
                && cidr.prefix() <= destination.prefix()
                && cidr.contains(destination.ip())
        })
}

/// `RTF_GATEWAY` in `/proc/net/route` and `/proc/net/ipv6_route`.
const RTF_GATEWAY: u32 = 0x2;
/// IPv6 routes to the node's own and anycast addresses (the local table).
const RTF_LOCAL: u32 = 0x8000_0000;
const RTF_ANYCAST: u32 = 0x0010_0000;
/// Reject routes (unreachable, prohibit, blackhole) point at no device worth attaching.
const RTF_REJECT: u32 = 0x0200;

/// Parses `/proc/net/route` (this namespace's IPv4 main table).
pub fn parse_routes4(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (device, destination, flags, mask) = (
                *fields.first()?,
                fields.get(1)?,
                fields.get(3)?,
                fields.get(7)?,
            );
            // The kernel prints each network-order address as a host-order number.
            let address = Ipv4Addr::from(hex_u32(destination)?.to_ne_bytes());
            let mask = u32::from_be_bytes(hex_u32(mask)?.to_ne_bytes());
            let flags = hex_u32(flags)?;
            if flags & RTF_REJECT != 0 {
                return None;
            }
            let prefix = u8::try_from(mask.count_ones()).ok()?;
            Some(Route {
                destination: Cidr::new(IpAddr::V4(address), prefix)?,
                device: device.to_owned(),
                via_gateway: flags & RTF_GATEWAY != 0,
            })
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route` (every table; local and anycast routes left out).
pub fn parse_routes6(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let destination = u128::from_str_radix(fields.first()?, 16).ok()?;
            let prefix = u8::from_str_radix(fields.get(1)?, 16).ok()?;
            let flags = hex_u32(fields.get(8)?)?;
            let device = *fields.get(9)?;
            if flags & (RTF_LOCAL | RTF_ANYCAST | RTF_REJECT) != 0 || device == "lo" {
                return None;
            }
            Some(Route {
                destination: Cidr::new(IpAddr::V6(Ipv6Addr::from(destination)), prefix)?,
                device: device.to_owned(),
                via_gateway: flags & RTF_GATEWAY != 0,
            })
        })
        .collect()
}

fn hex_u32(text: &str) -> Option<u32> {
    u32::from_str_radix(text, 16).ok()
}

/// Reads the facts from this network namespace.
pub fn read_facts() -> std::io::Result<Facts> {
    use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
    let mut links: BTreeMap<String, Link> = BTreeMap::new();
    for interface in getifaddrs().map_err(std::io::Error::from)? {
        let loopback = interface.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let kind = interface
            .address
            .as_ref()
            .and_then(|address| address.as_link_addr())
            .map(nix::sys::socket::LinkAddr::hatype);
        let entry = links
            .entry(interface.interface_name.clone())
            .or_insert_with(|| Link {
                name: interface.interface_name.clone(),
                kind: u16::MAX,
                loopback,
            });
        if let Some(kind) = kind {
            entry.kind = kind;
        }
    }
    let addressed = crate::node::node_addresses_by_interface()?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let mut routes = std::fs::read_to_string("/proc/net/route")
        .map(|text| parse_routes4(&text))
        .unwrap_or_default();
    // A kernel without IPv6 has no such file: no IPv6 routes.
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        routes.extend(parse_routes6(&text));
    }
    Ok(Facts {
        links: links.into_values().collect(),
        addressed,
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        let (ip, prefix) = text.split_once('/').unwrap();
        Cidr::new(ip.parse().unwrap(), prefix.parse().unwrap()).unwrap()
    }

    fn ether(name: &str) -> Link {
        Link {
            name: name.to_owned(),
            kind: ARPHRD_ETHER,
            loopback: false,
        }
    }

    fn direct(destination: &str, device: &str) -> Route {
        Route {
            destination: cidr(destination),
            device: device.to_owned(),
            via_gateway: false,
        }
    }

    #[test]
    fn patterns_match_prefixes_globs_and_exact_names() {
        let prefix = Pattern::parse("eth+");
        assert_eq!(prefix, Pattern::Prefix("eth".to_owned()));
        assert!(prefix.matches("eth0") && prefix.matches("eth") && !prefix.matches("veth0"));
        let glob = Pattern::parse("bond*");
        assert!(glob.matches("bond0") && glob.matches("bond") && !glob.matches("xbond0"));
        let middle = Pattern::parse("en*s?");
        assert!(middle.matches("enp0s3") && !middle.matches("enp0s31") && !middle.matches("en"));
        let star_middle = Pattern::parse("a*b*c");
        assert!(star_middle.matches("aXbYc") && star_middle.matches("abbc"));
        assert!(!star_middle.matches("aXbY"));
        let exact = Pattern::parse("eth0.100");
        assert!(exact.matches("eth0.100") && !exact.matches("eth0.1000"));
    }

    #[test]
    fn pin_names_never_collide_and_carry_no_dots() {
        let names = ["eth0.100", "eth0_100", "eth0-100", "eth0_2e100", "eth0"];
        let pins: BTreeSet<String> = names.iter().map(|n| pin_name("p", n)).collect();
        assert_eq!(pins.len(), names.len());
        assert_eq!(pin_name("p", "eth0.100"), "p-eth0_2e100");
        assert_eq!(pin_name("p", "eth0_100"), "p-eth0_5f100");
        assert!(pins.iter().all(|pin| !pin.contains('.')));
    }

    #[test]
    fn routed_pod_veths_are_endpoint_facing_even_with_explicit_interfaces() {
        let facts = Facts {
            links: vec![
                ether("eth0"),
                ether("eth1"),
                ether("cali1a2b"),
                ether("cali3c4d"),
            ],
            addressed: ["eth0".to_owned(), "eth1".to_owned()].into(),
            routes: vec![
                direct("10.0.0.0/24", "eth0"),
                direct("10.244.1.7/32", "cali1a2b"),
                direct("fd00:244::7/128", "cali3c4d"),
                Route {
                    destination: cidr("10.9.9.9/32"),
                    device: "eth1".to_owned(),
                    via_gateway: true,
                },
            ],
        };
        let choice = choose(&[Pattern::parse("eth0")], &[], &facts);
        assert_eq!(
            choice.attach,
            BTreeMap::from([
                ("cali1a2b".to_owned(), Role::EndpointFacing),
                ("cali3c4d".to_owned(), Role::EndpointFacing),
                ("eth0".to_owned(), Role::External),
            ])
        );
        assert!(choice.missing.is_empty() && choice.skipped.is_empty());
    }

    #[test]
    fn a_bridge_is_endpoint_facing_through_the_cluster_cidr() {
        let facts = Facts {
            links: vec![ether("eth0"), ether("cni0"), ether("docker0")],
            addressed: ["eth0".to_owned(), "cni0".to_owned(), "docker0".to_owned()].into(),
            routes: vec![
                direct("10.244.0.0/24", "cni0"),
                direct("172.17.0.0/16", "docker0"),
            ],
        };
        let choice = choose(&[Pattern::parse("eth+")], &[cidr("10.244.0.0/16")], &facts);
        assert_eq!(
            choice.attach.keys().collect::<Vec<_>>(),
            ["cni0", "eth0"],
            "docker0 is neither external nor inside the cluster CIDR"
        );
    }

    #[test]
    fn devices_towards_other_nodes_pods_are_endpoint_facing_through_the_cluster_cidr() {
        let facts = Facts {
            links: vec![ether("eth0"), ether("flannel.1"), ether("eth1")],
            addressed: ["eth0".to_owned()].into(),
            routes: vec![
                Route {
                    destination: cidr("10.244.2.0/24"),
                    device: "flannel.1".to_owned(),
                    via_gateway: true,
                },
                Route {
                    destination: cidr("0.0.0.0/0"),
                    device: "eth1".to_owned(),
                    via_gateway: true,
                },
            ],
        };
        let choice = choose(&[Pattern::parse("eth0")], &[cidr("10.244.0.0/16")], &facts);
        assert_eq!(
            choice.attach.keys().collect::<Vec<_>>(),
            ["eth0", "flannel.1"]
        );
        let without_cidr = choose(&[Pattern::parse("eth0")], &[], &facts);
        assert_eq!(without_cidr.attach.keys().collect::<Vec<_>>(), ["eth0"]);
    }

    #[test]
    fn the_default_is_every_addressed_interface() {
        let facts = Facts {
            links: vec![ether("eth0"), ether("pod0"), ether("spare0")],
            addressed: ["eth0".to_owned()].into(),
            routes: vec![direct("10.240.1.2/32", "pod0")],
        };
        let choice = choose(&[], &[], &facts);
        assert_eq!(choice.attach.keys().collect::<Vec<_>>(), ["eth0", "pod0"]);
    }

    #[test]
    fn l3_devices_are_skipped_and_a_missing_named_one_is_reported() {
        let wg = Link {
            name: "wg0".to_owned(),
            kind: 65534,
            loopback: false,
        };
        let facts = Facts {
            links: vec![ether("eth0"), wg.clone()],
            addressed: ["eth0".to_owned(), "wg0".to_owned()].into(),
            routes: vec![direct("10.1.2.3/32", "wg0")],
        };
        let by_default = choose(&[], &[], &facts);
        assert_eq!(by_default.attach.keys().collect::<Vec<_>>(), ["eth0"]);
        assert_eq!(by_default.skipped.keys().collect::<Vec<_>>(), ["wg0"]);
        assert!(by_default.missing.is_empty());
        let named = choose(
            &[Pattern::parse("wg0"), Pattern::parse("eth9")],
            &[],
            &facts,
        );
        assert_eq!(named.missing.keys().collect::<Vec<_>>(), ["eth9", "wg0"]);
        assert!(
            named.attach.is_empty(),
            "eth0 is neither named nor endpoint-facing"
        );
    }

    #[test]
    fn proc_routes_parse_host_routes_gateways_and_skip_rejects() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  pod0\t0201F00A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0000000A\t00000000\t0201\t0\t0\t0\t000000FF\t0\t0\t0\n";
        assert_eq!(
            parse_routes4(v4),
            [
                direct("10.240.1.2/32", "pod0"),
                Route {
                    destination: cidr("0.0.0.0/0"),
                    device: "eth0".to_owned(),
                    via_gateway: true,
                },
            ]
        );
        let v6 = "fd000240000100000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     pod0\n\
                  20010db8000c00000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001     ext0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        assert_eq!(
            parse_routes6(v6),
            [
                direct("fd00:240:1::2/128", "pod0"),
                Route {
                    destination: cidr("::/0"),
                    device: "eth0".to_owned(),
                    via_gateway: true,
                },
            ]
        );
    }
}
