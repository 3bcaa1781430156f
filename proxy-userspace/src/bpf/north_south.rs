//! The north-south datapath's userspace side: which interfaces get the TC ingress program,
//! attaching it (TCX links, pinned like the socket hooks' links), and the settings it reads
//! from the `CONFIG_V1` map (pod CIDRs, masquerade-all, masquerade ports).
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::Array,
    programs::{SchedClassifier, TcAttachType, links::FdLink, links::PinnedLink},
};
use proxy_common::{DatapathConfig, config_flags, map_names};
use tracing::{info, warn};

use super::{loader::LoadError, pins::PinLayout};
use crate::{cli::PortRange, model::Cidr, node_addresses::node_addresses_by_interface};

/// The TC ingress program, by name.
pub const TC_INGRESS_PROGRAM: &str = "sy_tc_ingress";

/// Where the TC program goes and what it is told.
#[derive(Clone, Debug)]
pub struct NorthSouth {
    /// `--interfaces`; empty means every interface carrying a node address.
    pub interfaces: Vec<String>,
    pub cluster_cidrs: Vec<Cidr>,
    pub masquerade_all: bool,
    pub snat_ports: PortRange,
}

/// Interfaces of this network namespace that carry a node address (as `node_addresses`
/// defines them: loopback and IPv6 link-local excluded).
pub fn node_interfaces() -> std::io::Result<Vec<String>> {
    let names: BTreeSet<String> = node_addresses_by_interface()?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    Ok(names.into_iter().collect())
}

impl NorthSouth {
    /// The interfaces to attach to, and whether the operator named them (then a failure to
    /// attach is fatal; for discovered ones it is a warning).
    fn targets(&self) -> Result<(Vec<String>, bool), LoadError> {
        if !self.interfaces.is_empty() {
            return Ok((self.interfaces.clone(), true));
        }
        let found = node_interfaces().map_err(|error| LoadError::Program {
            name: TC_INGRESS_PROGRAM,
            action: "listing the node's interfaces",
            reason: error.to_string(),
        })?;
        Ok((found, false))
    }

    /// What the datapath reads from `CONFIG_V1`.
    pub fn datapath_config(&self) -> DatapathConfig {
        let mut config = DatapathConfig {
            snat_port_min: self.snat_ports.min,
            snat_port_max: self.snat_ports.max,
            ..DatapathConfig::default()
        };
        if self.masquerade_all {
            config.flags |= config_flags::MASQUERADE_ALL;
        }
        for cidr in &self.cluster_cidrs {
            match cidr.ip() {
                IpAddr::V4(v4) => {
                    config.cluster_cidr4 = u32::from_ne_bytes(v4.octets());
                    config.cluster_prefix4 = cidr.prefix();
                    config.flags |= config_flags::CLUSTER_CIDR4;
                }
                IpAddr::V6(v6) => {
                    let octets = v6.octets();
                    for (word, chunk) in config.cluster_cidr6.iter_mut().zip(octets.chunks(4)) {
                        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    }
                    config.cluster_prefix6 = cidr.prefix();
                    config.flags |= config_flags::CLUSTER_CIDR6;
                }
            }
        }
        config
    }
}

/// Writes the datapath settings before any program that reads them is attached.
pub fn write_config(ebpf: &mut Ebpf, north_south: &NorthSouth) -> Result<(), LoadError> {
    let map_error = |reason: String| LoadError::Program {
        name: TC_INGRESS_PROGRAM,
        action: "writing its settings",
        reason,
    };
    let map = ebpf
        .map_mut(map_names::DATAPATH_CONFIG)
        .ok_or_else(|| map_error(format!("map {} is missing", map_names::DATAPATH_CONFIG)))?;
    let mut config: Array<_, DatapathConfig> =
        Array::try_from(map).map_err(|error| map_error(error.to_string()))?;
    config
        .set(0, north_south.datapath_config(), 0)
        .map_err(|error| map_error(error.to_string()))
}

/// Attaches the TC ingress program to the chosen interfaces and pins each link under this
/// generation. Links already attached are pushed onto `pinned` so a failure can roll back.
pub fn attach(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    generation: &str,
    north_south: &NorthSouth,
    pinned: &mut Vec<PinnedLink>,
) -> Result<Vec<String>, LoadError> {
    let name = TC_INGRESS_PROGRAM;
    let (targets, explicit) = north_south.targets()?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(program_error("type check"))?;
    program.load().map_err(program_error("loading"))?;
    let mut attached = Vec::new();
    for interface in targets {
        match attach_one(program, pins, generation, &interface) {
            Ok(link) => {
                pinned.push(link);
                attached.push(interface);
            }
            Err(error) if explicit => return Err(error),
            Err(error) => {
                warn!(%interface, "north-south traffic on this interface is not load-balanced: {error}");
            }
        }
    }
    info!(interfaces = ?attached, "TC ingress attached");
    Ok(attached)
}

fn attach_one(
    program: &mut SchedClassifier,
    pins: &PinLayout,
    generation: &str,
    interface: &str,
) -> Result<PinnedLink, LoadError> {
    let action_error = |action: &'static str| {
        move |reason: String| LoadError::Program {
            name: TC_INGRESS_PROGRAM,
            action,
            reason: format!("interface {interface}: {reason}"),
        }
    };
    let id = program
        .attach(interface, TcAttachType::Ingress)
        .map_err(|error| action_error("attaching")(error.to_string()))?;
    let link: FdLink = program
        .take_link(id)
        .map_err(|error| action_error("taking its link")(error.to_string()))?
        .try_into()
        .map_err(|error: aya::programs::links::LinkError| {
            action_error("converting its link")(error.to_string())
        })?;
    // bpffs refuses names with dots (and interface names may have them, e.g. VLANs).
    let pin_name = format!("{TC_INGRESS_PROGRAM}-{}", interface.replace('.', "_"));
    let path = pins.link(&pin_name, generation);
    link.pin(&path)
        .map_err(|error| action_error("pinning its link")(error.to_string()))
}

fn program_error(action: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> LoadError {
    move |error| LoadError::Program {
        name: TC_INGRESS_PROGRAM,
        action,
        reason: error.to_string(),
    }
}

/// Warns about node settings that would make the TC path fail quietly.
pub fn check_node_settings(north_south: &NorthSouth) {
    check_sysctl(
        "/proc/sys/net/ipv4/ip_forward",
        |value| value.trim() == "1",
        "IPv4 forwarding is off in this network namespace: north-south IPv4 traffic to remote endpoints cannot be forwarded",
    );
    if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
        let mut bounds = range
            .split_whitespace()
            .filter_map(|n| n.parse::<u16>().ok());
        if let (Some(low), Some(high)) = (bounds.next(), bounds.next())
            && low <= north_south.snat_ports.max
            && north_south.snat_ports.min <= high
        {
            warn!(
                ephemeral = %format!("{low}-{high}"),
                snat = %north_south.snat_ports,
                "--snat-port-range overlaps the node's ephemeral port range: a node connection and a masqueraded flow could share a port"
            );
        }
    }
}

fn check_sysctl(path: &str, healthy: impl Fn(&str) -> bool, warning: &str) {
    if let Ok(value) = std::fs::read_to_string(Path::new(path))
        && !healthy(&value)
    {
        warn!("{warning}");
    }
}
