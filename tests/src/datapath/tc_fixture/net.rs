//! The fixture namespace's addresses and links, and the namespace built from them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::datapath::packet::Mac;
use crate::env::netns::{ip_in, sysctl};

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
pub const REMOTE_NET_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0), 64);

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

fn mac_string(mac: Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Links, addresses, neighbours, routes and forwarding inside the fixture namespace.
pub(super) fn build_namespace(netns: &str) -> Result<()> {
    let ip = |args: &[&str]| ip_in(netns, args);
    for (link, mac, v4, v6) in [
        (
            CLIENT_LINK,
            NODE_CLIENT_MAC,
            format!("{NODE_V4}/24"),
            format!("{NODE_V6}/64"),
        ),
        (
            BACKEND_LINK,
            NODE_BACKEND_MAC,
            format!("{NODE_BACKEND_V4}/24"),
            format!("{NODE_BACKEND_V6}/64"),
        ),
    ] {
        let peer = format!("{link}p");
        ip(&["link", "add", link, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", link, "address", &mac_string(mac)])?;
        ip(&["addr", "add", &v4, "dev", link])?;
        // nodad: a tentative address is never a FIB source.
        ip(&["-6", "addr", "add", &v6, "dev", link, "nodad"])?;
        ip(&["link", "set", &peer, "up"])?;
        ip(&["link", "set", link, "up"])?;
    }
    let neighbour = |address: IpAddr, mac: Mac, link: &str| {
        ip(&[
            "neigh",
            "replace",
            &address.to_string(),
            "lladdr",
            &mac_string(mac),
            "dev",
            link,
            "nud",
            "permanent",
        ])
    };
    neighbour(CLIENT_V4.into(), CLIENT_MAC, CLIENT_LINK)?;
    neighbour(CLIENT_V6.into(), CLIENT_MAC, CLIENT_LINK)?;
    for host in NEIGHBOUR_HOSTS {
        let mac = backend_mac(host);
        neighbour(backend_v4(host).into(), mac, BACKEND_LINK)?;
        neighbour(backend_v6(host).into(), mac, BACKEND_LINK)?;
    }
    let (remote4, prefix4) = REMOTE_NET_V4;
    let (remote6, prefix6) = REMOTE_NET_V6;
    ip(&[
        "route",
        "add",
        &format!("{remote4}/{prefix4}"),
        "via",
        &CLIENT_V4.to_string(),
        "dev",
        CLIENT_LINK,
    ])?;
    ip(&[
        "-6",
        "route",
        "add",
        &format!("{remote6}/{prefix6}"),
        "via",
        &CLIENT_V6.to_string(),
        "dev",
        CLIENT_LINK,
    ])?;
    // bpf_fib_lookup answers "forwarding disabled" on an ingress device without forwarding.
    sysctl(
        netns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.forwarding=1",
        ],
    )
}
