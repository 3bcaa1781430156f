//! The north-south datapath's userspace side: which interfaces get the TC ingress program,
//! attaching it (TCX links, pinned like the socket hooks' links) at start and to interfaces
//! that appear or are re-created later, and the settings it reads from the `CONFIG_V1` map
//! (pod CIDRs, masquerade-all, masquerade ports). With `--xdp-mode`, the XDP fast path goes
//! onto the same interfaces, after TC (which keeps handling whatever XDP passes).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode as AttachMode, links::PinnedLink},
};
use proxy_common::{DatapathConfig, config_flags, map_names};
use tracing::{info, warn};

use super::{
    error::LoadError,
    interfaces::{self, Choice, Pattern},
    pins::{PinLayout, pin_link},
};
use crate::model::Cidr;

/// The TC ingress program, by name.
pub const TC_INGRESS_PROGRAM: &str = proxy_common::program::TC_INGRESS;
/// The XDP fast path, by name.
pub const XDP_INGRESS_PROGRAM: &str = proxy_common::program::XDP_INGRESS;

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
    /// `--interfaces` (names or patterns); empty means every interface carrying a node
    /// address. Endpoint-facing interfaces are added either way (see [`interfaces`]).
    pub interfaces: Vec<String>,
    pub cluster_cidrs: Vec<Cidr>,
    pub masquerade_all: bool,
    pub snat_ports: PortRange,
    /// Which external flows to remote endpoints use Direct Server Return (`--lb-mode`).
    pub dsr: Dsr,
    /// Whether the XDP fast path goes onto the interfaces too (`--xdp-mode`).
    pub xdp: XdpMode,
}

/// `--xdp-mode off | native | best-effort`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// TC only.
    #[default]
    Off,
    /// XDP in driver mode on every interface TC is on; an interface where that fails is
    /// reported missing (and fails the agent's start).
    Native,
    /// XDP in driver mode where the driver has it; elsewhere a warning and TC alone.
    BestEffort,
}

/// Direct Server Return by protocol (`--lb-mode snat | dsr | hybrid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Dsr {
    #[default]
    Off,
    TcpAndUdp,
    TcpOnly,
}

impl NorthSouth {
    /// The interfaces to attach to now (see [`interfaces`]).
    fn choose(&self) -> Result<Choice, LoadError> {
        let facts = interfaces::read_facts().map_err(LoadError::Interfaces)?;
        let patterns: Vec<Pattern> = self.interfaces.iter().map(|e| Pattern::parse(e)).collect();
        Ok(interfaces::choose(&patterns, &self.cluster_cidrs, &facts))
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
        config.flags |= match self.dsr {
            Dsr::Off => 0,
            Dsr::TcpAndUdp => config_flags::DSR_TCP | config_flags::DSR_UDP,
            Dsr::TcpOnly => config_flags::DSR_TCP,
        };
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
    let name = map_names::DATAPATH_CONFIG;
    let map_error = |source| LoadError::Map {
        map: name,
        action: "writing the datapath settings",
        source,
    };
    let map = ebpf
        .map_mut(name)
        .ok_or(LoadError::MissingMap { map: name })?;
    let mut config: Array<_, DatapathConfig> = Array::try_from(map).map_err(map_error)?;
    config
        .set(0, north_south.datapath_config(), 0)
        .map_err(map_error)
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
        .map_err(LoadError::program(TC_INGRESS_PROGRAM, "type check"))
}

/// Refuses kernels without TCX links (before Linux 6.6): aya would attach there through
/// netlink, which needs a clsact qdisc and gives a link that cannot be pinned, so the
/// attachment would die with the agent and "traffic keeps flowing when the agent dies" would
/// be false.
fn require_tcx() -> Result<(), LoadError> {
    use aya::util::KernelVersion;
    let version = match KernelVersion::current() {
        Ok(version) if version >= KernelVersion::new(6, 6, 0) => return Ok(()),
        Ok(version) => version.to_string(),
        Err(error) => format!("unknown ({error})"),
    };
    Err(LoadError::KernelTooOld { version })
}

/// Loads the TC ingress program; the first pass of the [`InterfaceFollower`] attaches it.
/// Nothing here depends on an interface existing: an `--interfaces` entry that does not
/// exist yet is attached when it appears.
pub fn load(ebpf: &mut Ebpf, xdp: XdpMode) -> Result<(), LoadError> {
    require_tcx()?;
    loaded_program(ebpf)?
        .load()
        .map_err(LoadError::program(TC_INGRESS_PROGRAM, "loading"))?;
    if xdp != XdpMode::Off {
        loaded_xdp(ebpf)?
            .load()
            .map_err(LoadError::program(XDP_INGRESS_PROGRAM, "loading"))?;
    }
    Ok(())
}

fn loaded_xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let name = XDP_INGRESS_PROGRAM;
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(LoadError::program(XDP_INGRESS_PROGRAM, "type check"))
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

/// Follows the node's interfaces and routes: attaches the program to interfaces that appear
/// (a pod's host veth, a bridge a CNI creates with the first pod, a hot-plugged NIC) or are
/// re-created, and removes the defunct links of deleted ones. Driven by rtnetlink events
/// (see `link_events`). A failure is logged once per interface index, never fatal; what is
/// missing is reported so `/readyz` can say so.
pub struct InterfaceFollower {
    ebpf: Ebpf,
    pins: PinLayout,
    generation: String,
    north_south: NorthSouth,
    attached: TcAttachments,
    /// Indexes an attach failed on, with the error, so a broken interface is reported once.
    failed: BTreeMap<u32, String>,
    /// Interfaces already reported as skipped.
    skipped: BTreeSet<String>,
    /// Whether the first pass (at start) is done: later attachments are new interfaces.
    started: bool,
    /// Interfaces (name → index) the XDP fast path is attached to.
    xdp_attached: TcAttachments,
    /// XDP attach failures by interface index (reported once).
    xdp_failed: BTreeMap<u32, String>,
}

/// Interfaces a needed attachment is missing on, with the reason.
pub type MissingAttachments = BTreeMap<String, String>;

impl InterfaceFollower {
    pub fn new(ebpf: Ebpf, pins: PinLayout, generation: String, north_south: NorthSouth) -> Self {
        Self {
            ebpf,
            pins,
            generation,
            north_south,
            attached: TcAttachments::new(),
            failed: BTreeMap::new(),
            skipped: BTreeSet::new(),
            started: false,
            xdp_attached: TcAttachments::new(),
            xdp_failed: BTreeMap::new(),
        }
    }

    /// One pass; returns what is missing afterwards (empty: every needed interface has the
    /// program).
    pub fn follow(&mut self) -> MissingAttachments {
        let choice = match self.north_south.choose() {
            Ok(choice) => choice,
            Err(error) => {
                warn!("{error}");
                return MissingAttachments::from([("(all)".to_owned(), error.to_string())]);
            }
        };
        for (name, reason) in &choice.skipped {
            if self.skipped.insert(name.clone()) {
                info!(interface = %name, "not attaching the TC program: {reason}");
            }
        }
        self.skipped
            .retain(|name| choice.skipped.contains_key(name));
        let wanted: TcAttachments = choice
            .attach
            .keys()
            .filter_map(|name| interface_index(name).map(|index| (name.clone(), index)))
            .collect();
        let changes = interface_changes(&wanted, &self.attached, interface_index);
        for name in changes.forget {
            self.attached.remove(&name);
            self.xdp_attached.remove(&name);
            for pin in [
                self.pins.link(&pin_name(&name), &self.generation),
                self.pins.link(&xdp_pin_name(&name), &self.generation),
            ] {
                match std::fs::remove_file(&pin) {
                    Ok(()) => {
                        info!(interface = %name, pin = %pin.display(), "interface gone: its link was removed");
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        warn!(pin = %pin.display(), "cannot remove a defunct link: {error}");
                    }
                }
            }
        }
        let mut missing = choice.missing;
        if !changes.attach.is_empty() {
            match loaded_program(&mut self.ebpf) {
                Ok(program) => {
                    for (name, index) in changes.attach {
                        let role = choice.attach.get(&name).copied();
                        match attach_one(program, &self.pins, &self.generation, &name) {
                            Ok(_pinned) => {
                                if self.started {
                                    info!(interface = %name, ?role, "TC ingress attached to a new interface");
                                } else {
                                    info!(interface = %name, ?role, "TC ingress attached");
                                }
                                self.failed.remove(&index);
                                self.attached.insert(name, index);
                            }
                            Err(error) => {
                                let error = error.to_string();
                                if self.failed.insert(index, error.clone()).is_none() {
                                    warn!(interface = %name, "north-south traffic on this interface is not load-balanced: {error}");
                                }
                            }
                        }
                    }
                }
                Err(error) => warn!("{error}"),
            }
        }
        for (name, index) in &wanted {
            if self.attached.get(name) != Some(index) {
                let reason = self
                    .failed
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| "not attached".to_owned());
                missing.insert(name.clone(), reason);
            }
        }
        self.failed
            .retain(|index, _| wanted.values().any(|i| i == index));
        self.follow_xdp(&wanted, &mut missing);
        self.started = true;
        missing
    }

    /// Puts the XDP fast path on the interfaces TC is attached to (TC first: it handles
    /// whatever XDP passes, so XDP never runs without it).
    fn follow_xdp(&mut self, wanted: &TcAttachments, missing: &mut MissingAttachments) {
        let mode = self.north_south.xdp;
        if mode == XdpMode::Off {
            return;
        }
        self.xdp_attached
            .retain(|name, index| self.attached.get(name) == Some(index));
        let todo: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|(name, index)| self.xdp_attached.get(*name) != Some(*index))
            .map(|(name, index)| (name.clone(), *index))
            .collect();
        for (name, index) in todo {
            let attached = loaded_xdp(&mut self.ebpf)
                .and_then(|program| attach_xdp(program, &self.pins, &self.generation, &name));
            match attached {
                Ok(_pinned) => {
                    info!(interface = %name, "XDP fast path attached (driver mode)");
                    self.xdp_failed.remove(&index);
                    self.xdp_attached.insert(name, index);
                }
                Err(error) => {
                    let error = error.to_string();
                    let first = self.xdp_failed.insert(index, error.clone()).is_none();
                    match mode {
                        XdpMode::Native if first => {
                            warn!(interface = %name, "--xdp-mode native: XDP cannot be attached in driver mode: {error}");
                        }
                        XdpMode::BestEffort if first => {
                            warn!(interface = %name, "--xdp-mode best-effort: no XDP in driver mode here, this interface stays on TC alone: {error}");
                        }
                        _ => {}
                    }
                }
            }
        }
        self.xdp_failed
            .retain(|index, _| wanted.values().any(|i| i == index));
        if mode == XdpMode::Native {
            for (name, index) in wanted {
                if let Some(reason) = self.xdp_failed.get(index) {
                    missing
                        .entry(name.clone())
                        .or_insert_with(|| format!("XDP (--xdp-mode native): {reason}"));
                }
            }
        }
    }

    /// The XDP attach failures of `--xdp-mode native` (interface → reason).
    pub fn xdp_failures(&self) -> MissingAttachments {
        if self.north_south.xdp != XdpMode::Native {
            return MissingAttachments::new();
        }
        self.attached
            .iter()
            .filter_map(|(name, index)| {
                self.xdp_failed
                    .get(index)
                    .map(|reason| (name.clone(), reason.clone()))
            })
            .collect()
    }

    /// The interfaces the XDP fast path is attached to now.
    pub fn xdp_attached(&self) -> &TcAttachments {
        &self.xdp_attached
    }

    /// The interfaces the program is attached to now.
    pub fn attached(&self) -> &TcAttachments {
        &self.attached
    }
}

/// The link pin of `interface` (collision-free, no dots: see [`interfaces::pin_name`]).
fn pin_name(interface: &str) -> String {
    interfaces::pin_name(TC_INGRESS_PROGRAM, interface)
}

/// The XDP link pin of `interface`.
fn xdp_pin_name(interface: &str) -> String {
    interfaces::pin_name(XDP_INGRESS_PROGRAM, interface)
}

/// Attaches the XDP fast path to `interface` in driver mode and pins its link. An interface
/// holds one XDP link: an earlier agent's is removed first (TC, already attached, carries
/// the traffic meanwhile).
fn attach_xdp(
    program: &mut Xdp,
    pins: &PinLayout,
    generation: &str,
    interface: &str,
) -> Result<PinnedLink, LoadError> {
    let failed = |action| LoadError::on_interface(XDP_INGRESS_PROGRAM, interface, action);
    retire_other_xdp_links(pins, generation, interface);
    let id = program
        .attach(interface, AttachMode::Driver)
        .map_err(failed("attaching in driver mode"))?;
    let link = program.take_link(id).map_err(failed("taking its link"))?;
    pin_link(
        XDP_INGRESS_PROGRAM,
        link,
        pins.link(&xdp_pin_name(interface), generation),
    )
}

/// Removes the XDP link pins of `interface` that belong to other generations.
fn retire_other_xdp_links(pins: &PinLayout, generation: &str, interface: &str) {
    let prefix = format!("{}@", xdp_pin_name(interface));
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return;
    };
    for path in entries.filter_map(Result::ok).map(|entry| entry.path()) {
        let ours = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&prefix));
        if !ours || PinLayout::is_generation(&path, generation) {
            continue;
        }
        let outcome = PinnedLink::from_pin(&path)
            .map_err(|error| error.to_string())
            .and_then(|link| link.unpin().map(drop).map_err(|error| error.to_string()));
        if let Err(error) = outcome {
            warn!(path = %path.display(), "cannot retire an earlier XDP link: {error}");
        }
    }
}

fn attach_one(
    program: &mut SchedClassifier,
    pins: &PinLayout,
    generation: &str,
    interface: &str,
) -> Result<PinnedLink, LoadError> {
    let failed = |action| LoadError::on_interface(TC_INGRESS_PROGRAM, interface, action);
    let id = program
        .attach(interface, TcAttachType::Ingress)
        .map_err(failed("attaching"))?;
    let link = program.take_link(id).map_err(failed("taking its link"))?;
    pin_link(
        TC_INGRESS_PROGRAM,
        link,
        pins.link(&pin_name(interface), generation),
    )
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
    fn lb_mode_sets_the_dsr_protocols_and_snat_sets_none() {
        let settings = |dsr| NorthSouth {
            interfaces: Vec::new(),
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            snat_ports: PortRange {
                min: 46000,
                max: 65535,
            },
            dsr,
            xdp: XdpMode::Off,
        };
        let both = config_flags::DSR_TCP | config_flags::DSR_UDP;
        assert_eq!(settings(Dsr::Off).datapath_config().flags & both, 0);
        assert_eq!(
            settings(Dsr::TcpAndUdp).datapath_config().flags & both,
            both
        );
        assert_eq!(
            settings(Dsr::TcpOnly).datapath_config().flags & both,
            config_flags::DSR_TCP
        );
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
        assert_eq!(pin_name("eth0.100"), "sy_tc_ingress-eth0_2e100");
    }
}
