//! The north-south datapath's userspace side: which interfaces get the TC ingress program,
//! attaching it (TCX links, pinned like the socket hooks' links) at start and to interfaces
//! that appear or are re-created later, and the settings it reads from the `CONFIG_V1` map
//! (pod CIDRs, masquerade-all, masquerade ports).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{SchedClassifier, TcAttachType, links::FdLink, links::PinnedLink},
};
use proxy_common::{DatapathConfig, config_flags, map_names};
use tracing::{info, warn};

use super::{error::LoadError, pins::PinLayout};
use crate::{model::Cidr, node::node_addresses_by_interface};

/// The TC ingress program, by name.
pub const TC_INGRESS_PROGRAM: &str = "sy_tc_ingress";

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

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

/// The interfaces the TC program is attached to, by name, with the index each had then (a
/// re-created interface gets a new index and needs a new attachment).
pub type TcAttachments = BTreeMap<String, u32>;

fn interface_index(interface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(interface).ok()
}

fn loaded_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let name = TC_INGRESS_PROGRAM;
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(program_error("type check"))
}

/// Attaches the TC ingress program to the chosen interfaces and pins each link under this
/// generation. Links already attached are pushed onto `pinned` so a failure can roll back.
pub fn attach(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    generation: &str,
    north_south: &NorthSouth,
    pinned: &mut Vec<PinnedLink>,
) -> Result<TcAttachments, LoadError> {
    let (targets, explicit) = north_south.targets()?;
    let program = loaded_program(ebpf)?;
    program.load().map_err(program_error("loading"))?;
    let mut attached = TcAttachments::new();
    for interface in targets {
        let index = interface_index(&interface);
        match attach_one(program, pins, generation, &interface) {
            Ok(link) => {
                pinned.push(link);
                attached.insert(interface, index.unwrap_or_default());
            }
            Err(error) if explicit => return Err(error),
            Err(error) => {
                warn!(%interface, "north-south traffic on this interface is not load-balanced: {error}");
            }
        }
    }
    info!(interfaces = ?attached.keys().collect::<Vec<_>>(), "TC ingress attached");
    Ok(attached)
}

/// What one pass over the node's interfaces should do, given what is attached.
#[derive(Debug, Default, PartialEq, Eq)]
struct InterfaceChanges {
    /// (name, index) to attach: new interfaces and re-created ones.
    attach: Vec<(String, u32)>,
    /// Names whose attachment is gone with its interface (deleted, or re-created under the
    /// same name): their pinned links are defunct and are removed.
    forget: Vec<String>,
}

/// Compares the wanted interfaces (name → current index) with the attached ones;
/// `current_index` tells the index an attached name has now (None: deleted).
fn interface_changes(
    wanted: &TcAttachments,
    attached: &TcAttachments,
    current_index: impl Fn(&str) -> Option<u32>,
) -> InterfaceChanges {
    let mut changes = InterfaceChanges::default();
    for (name, index) in attached {
        if current_index(name) != Some(*index) {
            changes.forget.push(name.clone());
        }
    }
    for (name, index) in wanted {
        let same = attached.get(name) == Some(index);
        if !same {
            changes.attach.push((name.clone(), *index));
        }
    }
    changes
}

/// Follows the node's interfaces after start: attaches the program to interfaces that appear
/// (a bridge a CNI creates with the first pod, a hot-plugged NIC) or are re-created, and
/// removes the defunct links of deleted ones. With `--interfaces`, only those names are
/// followed. A failure is logged once per interface index, never fatal.
pub struct InterfaceFollower {
    ebpf: Ebpf,
    pins: PinLayout,
    generation: String,
    north_south: NorthSouth,
    attached: TcAttachments,
    /// Indexes an attach failed on, so a broken interface is reported once.
    failed: BTreeSet<u32>,
}

impl InterfaceFollower {
    pub fn new(
        ebpf: Ebpf,
        pins: PinLayout,
        generation: String,
        north_south: NorthSouth,
        attached: TcAttachments,
    ) -> Self {
        Self {
            ebpf,
            pins,
            generation,
            north_south,
            attached,
            failed: BTreeSet::new(),
        }
    }

    /// The interfaces wanted now, with their current index (missing ones left out).
    fn wanted(&self) -> TcAttachments {
        let names = match self.north_south.targets() {
            Ok((names, _explicit)) => names,
            Err(error) => {
                warn!("{error}");
                return self.attached.clone();
            }
        };
        names
            .into_iter()
            .filter_map(|name| interface_index(&name).map(|index| (name, index)))
            .collect()
    }

    /// One pass; returns the interfaces newly attached.
    pub fn follow(&mut self) -> Vec<String> {
        let changes = interface_changes(&self.wanted(), &self.attached, interface_index);
        for name in changes.forget {
            self.attached.remove(&name);
            let pin = self.pins.link(&pin_name(&name), &self.generation);
            match std::fs::remove_file(&pin) {
                Ok(()) => info!(interface = %name, "interface gone: its TC link was removed"),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    warn!(pin = %pin.display(), "cannot remove a defunct TC link: {error}");
                }
            }
        }
        let mut attached_now = Vec::new();
        if changes.attach.is_empty() {
            return attached_now;
        }
        let program = match loaded_program(&mut self.ebpf) {
            Ok(program) => program,
            Err(error) => {
                warn!("{error}");
                return attached_now;
            }
        };
        for (name, index) in changes.attach {
            match attach_one(program, &self.pins, &self.generation, &name) {
                Ok(_pinned) => {
                    info!(interface = %name, "TC ingress attached to a new interface");
                    self.failed.remove(&index);
                    self.attached.insert(name.clone(), index);
                    attached_now.push(name);
                }
                Err(error) => {
                    if self.failed.insert(index) {
                        warn!(interface = %name, "north-south traffic on this interface is not load-balanced: {error}");
                    }
                }
            }
        }
        attached_now
    }
}

/// The link pin of `interface` (bpffs refuses names with dots, and interface names may have
/// them, e.g. VLANs).
fn pin_name(interface: &str) -> String {
    format!("{TC_INGRESS_PROGRAM}-{}", interface.replace('.', "_"))
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
    let path = pins.link(&pin_name(interface), generation);
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
/// (The masquerade ports are reserved, or refused, by `crate::node_ports`.)
pub fn check_node_settings() {
    check_sysctl(
        "/proc/sys/net/ipv4/ip_forward",
        |value| value.trim() == "1",
        "IPv4 forwarding is off in this network namespace: north-south IPv4 traffic to remote endpoints cannot be forwarded",
    );
}

fn check_sysctl(path: &str, healthy: impl Fn(&str) -> bool, warning: &str) {
    if let Ok(value) = std::fs::read_to_string(Path::new(path))
        && !healthy(&value)
    {
        warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interfaces(pairs: &[(&str, u32)]) -> TcAttachments {
        pairs
            .iter()
            .map(|(name, index)| ((*name).to_owned(), *index))
            .collect()
    }

    #[test]
    fn new_interfaces_are_attached_and_attached_ones_left_alone() {
        let attached = interfaces(&[("eth0", 2)]);
        let wanted = interfaces(&[("eth0", 2), ("cni0", 7)]);
        let now = |name: &str| wanted.get(name).copied();
        assert_eq!(
            interface_changes(&wanted, &attached, now),
            InterfaceChanges {
                attach: vec![("cni0".to_owned(), 7)],
                forget: vec![],
            }
        );
    }

    #[test]
    fn a_recreated_interface_is_forgotten_then_attached_again() {
        let attached = interfaces(&[("eth0", 2), ("cni0", 7)]);
        let wanted = interfaces(&[("eth0", 2), ("cni0", 9)]);
        let now = |name: &str| wanted.get(name).copied();
        assert_eq!(
            interface_changes(&wanted, &attached, now),
            InterfaceChanges {
                attach: vec![("cni0".to_owned(), 9)],
                forget: vec!["cni0".to_owned()],
            }
        );
    }

    #[test]
    fn a_deleted_interface_is_forgotten_one_without_addresses_stays_attached() {
        let attached = interfaces(&[("eth0", 2), ("gone0", 5), ("bare0", 6)]);
        // bare0 still exists (same index) but lost its addresses, so it is not wanted.
        let wanted = interfaces(&[("eth0", 2)]);
        let now = |name: &str| match name {
            "eth0" => Some(2),
            "bare0" => Some(6),
            _ => None,
        };
        assert_eq!(
            interface_changes(&wanted, &attached, now),
            InterfaceChanges {
                attach: vec![],
                forget: vec!["gone0".to_owned()],
            }
        );
    }

    #[test]
    fn dots_in_interface_names_never_reach_bpffs() {
        assert_eq!(pin_name("eth0.100"), "sy_tc_ingress-eth0_100");
    }
}
