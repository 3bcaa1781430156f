//! This node's facts, read before every sync: its addresses (where NodePorts open,
//! `--nodeport-addresses`, kube-proxy's flag and semantics, and what loadBalancerSourceRanges
//! are checked against for the implicit load-balancer-IP allowance), and from its Node object
//! its zone and primary addresses.
//!
//! Addresses are those of the agent's network namespace (the node's, in a DaemonSet with
//! `hostNetwork`), loopback and IPv6 link-local excluded: localhost NodePorts exist only in
//! kube-proxy's iptables mode (its nftables mode has none), and a link-local address is not
//! reachable from off the link.
use std::{io, net::IpAddr};

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
use tracing::{info, warn};

use crate::model::{Cidr, ModelConfig, input::NodeInput, parse_cidr_lenient};

/// `--nodeport-addresses`: which node addresses NodePorts open on. Keywords and CIDRs
/// combine: the selection is the union of what each of them selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortAddresses {
    /// `all` (or the flag empty): every node address.
    pub all: bool,
    /// `primary`: the node's primary address of each family, from its Node object.
    pub primary: bool,
    /// `localhost` (KEP-6032): 127.0.0.1 and ::1, served by the socket hooks for the node's
    /// own processes.
    pub localhost: bool,
    /// The node addresses inside these ranges. When only ranges (and `localhost`) are given, a
    /// family without any range listed opens on every address of that family, as kube-proxy
    /// does (its per-family proxier falls back to `0.0.0.0/0` or `::/0`).
    pub cidrs: Vec<Cidr>,
}

impl Default for NodePortAddresses {
    fn default() -> Self {
        Self {
            all: true,
            primary: false,
            localhost: false,
            cidrs: Vec::new(),
        }
    }
}

/// The loopback addresses `localhost` adds.
const LOCALHOST: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
];

/// Parses `--nodeport-addresses`: empty, or comma-separated CIDRs and the keywords `all`,
/// `primary` and `localhost`.
pub fn parse_nodeport_addresses(text: &str) -> Result<NodePortAddresses, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(NodePortAddresses::default());
    }
    let mut selection = NodePortAddresses {
        all: false,
        ..NodePortAddresses::default()
    };
    for part in text.split(',').map(str::trim) {
        match part {
            "all" => selection.all = true,
            "primary" => selection.primary = true,
            "localhost" => selection.localhost = true,
            _ => selection.cidrs.push(parse_cidr_lenient(part).ok_or_else(|| {
                format!(
                    "{part:?} is neither a CIDR (like 192.168.0.0/24 or fd00::/64) nor one of all, primary, localhost"
                )
            })?),
        }
    }
    Ok(selection)
}

impl NodePortAddresses {
    /// Whether every node address is selected (the default): health-check node ports then
    /// listen on the wildcard address, as kube-proxy's do.
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// The addresses NodePorts open on, out of the node's addresses (`primary`: its Node
    /// object's primary addresses, which need not be on an interface, e.g. behind NAT).
    pub fn select(&self, node_addresses: &[IpAddr], primary: &[IpAddr]) -> Vec<IpAddr> {
        let mut selected: Vec<IpAddr> = Vec::new();
        if self.all {
            selected.extend_from_slice(node_addresses);
        }
        if self.primary {
            selected.extend_from_slice(primary);
        }
        if !self.cidrs.is_empty() {
            // The per-family fallback only where CIDRs are the whole selection.
            let fallback = !self.all && !self.primary;
            selected.extend(node_addresses.iter().copied().filter(|ip| {
                let mut same_family = self
                    .cidrs
                    .iter()
                    .filter(|cidr| cidr.ip().is_ipv4() == ip.is_ipv4())
                    .peekable();
                if same_family.peek().is_none() {
                    return fallback;
                }
                same_family.any(|cidr| cidr.contains(*ip))
            }));
        }
        if self.localhost {
            selected.extend_from_slice(&LOCALHOST);
        }
        let mut seen = std::collections::HashSet::new();
        selected.retain(|ip| seen.insert(*ip));
        selected
    }
}

fn is_node_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && !v6.is_unicast_link_local()
                // An IPv4-mapped address is not one a peer can send to.
                && v6.to_ipv4_mapped().is_none()
        }
    }
}

/// The addresses of this network namespace's interfaces, sorted, loopback and IPv6
/// link-local ones excluded.
pub fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = node_addresses_by_interface()?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// Every node address of this network namespace with the interface that carries it (the one
/// place that decides what a node address is, for NodePorts and for the TC attachment).
pub fn node_addresses_by_interface() -> io::Result<Vec<(String, IpAddr)>> {
    let mut found = Vec::new();
    for interface in getifaddrs().map_err(io::Error::from)? {
        if interface.flags.contains(InterfaceFlags::IFF_LOOPBACK) {
            continue;
        }
        let Some(address) = interface.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if is_node_address(ip) {
            found.push((interface.interface_name, ip));
        }
    }
    Ok(found)
}

/// The node's primary address of each family, as kube-proxy reads them from its Node object
/// (`GetNodeHostIPs`): the first InternalIP of the family, else its first ExternalIP.
pub fn primary_addresses(node: Option<&NodeInput>) -> Vec<IpAddr> {
    let Some(node) = node else {
        return Vec::new();
    };
    let of_type = |kind: &'static str, ipv4: bool| {
        node.addresses
            .iter()
            .filter(move |address| address.type_ == kind)
            .filter_map(|address| crate::model::parse_ip_lenient(&address.address))
            .find(|ip| ip.is_ipv4() == ipv4)
    };
    [true, false]
        .into_iter()
        .filter_map(|ipv4| of_type("InternalIP", ipv4).or_else(|| of_type("ExternalIP", ipv4)))
        .collect()
}

/// The model's settings as of now, asked for before every sync with this node's Node object
/// (if the source has it).
pub trait ModelConfigSource: Send {
    /// This node's name (which Node object to pass).
    fn node_name(&self) -> Option<&str>;
    fn model_config(&mut self, node: Option<&NodeInput>) -> ModelConfig;
}

/// Fixed settings (tests, and callers that know the node's addresses up front); the zone
/// comes from the Node object unless set.
impl ModelConfigSource for ModelConfig {
    fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    fn model_config(&mut self, node: Option<&NodeInput>) -> ModelConfig {
        let mut config = self.clone();
        if config.zone.is_none() {
            config.zone = node.and_then(|node| node.zone.clone());
        }
        config
    }
}

/// The agent's settings with the node's addresses read afresh each time, so an address
/// change reprograms the NodePorts at the next sync (at the latest after `--sync-period`).
pub struct NodeConfig {
    base: ModelConfig,
    nodeport: NodePortAddresses,
    read: fn() -> io::Result<Vec<IpAddr>>,
    /// The last addresses read, kept when a read fails.
    addresses: Vec<IpAddr>,
    failing: bool,
    /// The NodePort addresses last logged.
    logged: Option<Vec<IpAddr>>,
}

impl NodeConfig {
    /// Reads this network namespace's interfaces.
    pub fn new(base: ModelConfig, nodeport: NodePortAddresses) -> Self {
        Self::with_reader(base, nodeport, interface_addresses)
    }

    /// Reads addresses with `read` (tests).
    pub fn with_reader(
        base: ModelConfig,
        nodeport: NodePortAddresses,
        read: fn() -> io::Result<Vec<IpAddr>>,
    ) -> Self {
        Self {
            base,
            nodeport,
            read,
            addresses: Vec::new(),
            failing: false,
            logged: None,
        }
    }
}

fn list(addresses: &[IpAddr]) -> String {
    if addresses.is_empty() {
        return "none".to_owned();
    }
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ModelConfigSource for NodeConfig {
    fn node_name(&self) -> Option<&str> {
        self.base.node_name.as_deref()
    }

    fn model_config(&mut self, node: Option<&NodeInput>) -> ModelConfig {
        match (self.read)() {
            Ok(addresses) => {
                if self.failing {
                    info!("reading the node's addresses works again");
                }
                self.failing = false;
                self.addresses = addresses;
            }
            Err(failure) => {
                // Keep the last known addresses: a transient failure must not close NodePorts.
                if !self.failing {
                    warn!("cannot read the node's addresses, keeping the last ones: {failure}");
                }
                self.failing = true;
            }
        }
        let primary = primary_addresses(node);
        let nodeport_addresses = self.nodeport.select(&self.addresses, &primary);
        if self.logged.as_ref() != Some(&nodeport_addresses) {
            info!(
                "NodePorts open on {} (node addresses: {})",
                list(&nodeport_addresses),
                list(&self.addresses)
            );
            self.logged = Some(nodeport_addresses.clone());
        }
        ModelConfig {
            node_addresses: self.addresses.clone(),
            nodeport_addresses,
            zone: node.and_then(|node| node.zone.clone()),
            ..self.base.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(texts: &[&str]) -> Vec<IpAddr> {
        texts.iter().map(|text| text.parse().unwrap()).collect()
    }

    fn texts(ips: &[IpAddr]) -> Vec<String> {
        ips.iter().map(ToString::to_string).collect()
    }

    const NODE: [&str; 4] = ["192.168.0.2", "10.1.0.2", "fd00:192::2", "2001:db8::2"];

    #[test]
    fn an_empty_flag_opens_nodeports_on_every_node_address() {
        let all = parse_nodeport_addresses("").unwrap();
        assert_eq!(all, NodePortAddresses::default());
        assert!(all.is_all());
        assert_eq!(texts(&all.select(&ips(&NODE), &[])), NODE);
        assert_eq!(parse_nodeport_addresses("all").unwrap(), all);
    }

    #[test]
    fn cidrs_select_addresses_of_their_family_and_leave_an_unlisted_family_open() {
        let only_v4 = parse_nodeport_addresses("192.168.0.0/24").unwrap();
        assert_eq!(
            texts(&only_v4.select(&ips(&NODE), &[])),
            ["192.168.0.2", "fd00:192::2", "2001:db8::2"]
        );
        let both = parse_nodeport_addresses(" 10.1.0.0/16 , fd00::/8").unwrap();
        assert_eq!(
            texts(&both.select(&ips(&NODE), &[])),
            ["10.1.0.2", "fd00:192::2"]
        );
    }

    #[test]
    fn primary_uses_the_node_objects_first_internal_ip_of_each_family() {
        let yaml = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: Hostname, address: node-a}\n  - {type: ExternalIP, address: 198.51.100.2}\n  - {type: InternalIP, address: 192.168.0.2}\n  - {type: InternalIP, address: 10.1.0.2}\n  - {type: ExternalIP, address: '2001:db8::2'}\n";
        let snapshot = crate::source::manifest::parse(yaml).snapshot;
        let cluster = crate::model::cluster_of(&snapshot);
        let primary = primary_addresses(cluster.node("node-a"));
        assert_eq!(texts(&primary), ["192.168.0.2", "2001:db8::2"]);
        assert!(primary_addresses(cluster.node("node-b")).is_empty());
        let flag = parse_nodeport_addresses("primary").unwrap();
        assert_eq!(flag.select(&ips(&NODE), &primary), primary);
    }

    #[test]
    fn a_bad_cidr_is_refused_with_its_text() {
        let error = parse_nodeport_addresses("10.0.0.0/8,primay").unwrap_err();
        assert!(error.contains("\"primay\""), "{error}");
        assert!(parse_nodeport_addresses("10.0.0.0/33").is_err());
    }

    #[test]
    fn keywords_and_cidrs_combine() {
        let primary = ips(&["192.168.0.2"]);
        let node = ips(&NODE);
        let localhost = parse_nodeport_addresses("localhost").unwrap();
        assert_eq!(
            texts(&localhost.select(&node, &primary)),
            ["127.0.0.1", "::1"],
            "loopback only"
        );
        let primary_and_loopback = parse_nodeport_addresses("primary,localhost").unwrap();
        assert_eq!(
            texts(&primary_and_loopback.select(&node, &primary)),
            ["192.168.0.2", "127.0.0.1", "::1"]
        );
        let all_and_loopback = parse_nodeport_addresses("localhost, all").unwrap();
        assert_eq!(
            all_and_loopback.select(&node, &primary).len(),
            NODE.len() + 2
        );
        // CIDRs with localhost keep the per-family fallback: IPv6 has no range, so all of it.
        let cidr_and_loopback = parse_nodeport_addresses("10.1.0.0/16,localhost").unwrap();
        assert_eq!(
            texts(&cidr_and_loopback.select(&node, &primary)),
            ["10.1.0.2", "fd00:192::2", "2001:db8::2", "127.0.0.1", "::1"]
        );
        // With primary, a CIDR only adds what it holds.
        let primary_and_cidr = parse_nodeport_addresses("primary,10.1.0.0/16").unwrap();
        assert_eq!(
            texts(&primary_and_cidr.select(&node, &primary)),
            ["192.168.0.2", "10.1.0.2"]
        );
    }

    #[test]
    fn loopback_link_local_and_unspecified_addresses_are_not_node_addresses() {
        for ip in [
            "127.0.0.1",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_node_address(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "169.254.0.1", "fd00::1"] {
            assert!(is_node_address(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn interface_addresses_never_include_loopback() {
        let addresses = interface_addresses().expect("getifaddrs works in tests");
        assert!(
            addresses.iter().all(|ip| !ip.is_loopback()),
            "{addresses:?}"
        );
    }

    #[test]
    fn node_config_rereads_addresses_at_every_call_and_keeps_the_last_on_failure() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        fn reader() -> io::Result<Vec<IpAddr>> {
            match CALLS.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(vec!["192.168.0.2".parse().unwrap()]),
                1 => Ok(vec!["192.168.0.3".parse().unwrap()]),
                _ => Err(io::Error::other("netlink is gone")),
            }
        }
        let base = ModelConfig {
            node_name: Some("node-a".into()),
            ..ModelConfig::default()
        };
        let mut source = NodeConfig::with_reader(base, NodePortAddresses::default(), reader);
        let first = source.model_config(None);
        assert_eq!(texts(&first.nodeport_addresses), ["192.168.0.2"]);
        assert_eq!(first.node_name.as_deref(), Some("node-a"));
        let second = source.model_config(None);
        assert_eq!(texts(&second.nodeport_addresses), ["192.168.0.3"]);
        let third = source.model_config(None);
        assert_eq!(texts(&third.node_addresses), ["192.168.0.3"]);
    }
}
