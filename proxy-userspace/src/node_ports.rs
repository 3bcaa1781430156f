//! The masquerade ports of the TC path belong to the node's network namespace: a masqueraded
//! flow and a connection of the node itself must never share a source port towards the same
//! backend. The agent therefore reserves `--snat-port-range` in
//! `net.ipv4.ip_local_reserved_ports` (the kernel then never picks those ports for the node's
//! own connections; Cilium reserves its NodePort range the same way). Where it cannot write
//! that setting, a range that overlaps the node's ephemeral ports
//! (`net.ipv4.ip_local_port_range`) is refused. The setting is per network namespace and
//! covers IPv6 too.
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::bpf::north_south::PortRange;

/// Where the two settings live.
#[derive(Clone, Debug)]
pub struct PortSettings {
    pub reserved: PathBuf,
    pub ephemeral: PathBuf,
}

impl Default for PortSettings {
    fn default() -> Self {
        Self {
            reserved: "/proc/sys/net/ipv4/ip_local_reserved_ports".into(),
            ephemeral: "/proc/sys/net/ipv4/ip_local_port_range".into(),
        }
    }
}

/// Why the masquerade range cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error(
        "--snat-port-range {range} overlaps the node's ephemeral ports {ephemeral} \
         (net.ipv4.ip_local_port_range) and could not be reserved in {reserved}: {reason}; \
         a node connection and a masqueraded flow could share a port. Let the agent write \
         that file, reserve the range yourself, or pick a range outside {ephemeral}"
    )]
    Overlap {
        range: PortRange,
        ephemeral: PortRange,
        reserved: String,
        reason: String,
    },
}

/// What [`reserve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The range was reserved already.
    AlreadyReserved,
    /// The agent added the range to the reserved ports.
    Reserved,
    /// Not reserved (the setting could not be written), but it lies outside the node's
    /// ephemeral ports.
    OutsideEphemeral,
}

/// Parses the kernel's list of reserved ports (`"8080,46000-65535"`; empty when none).
pub fn parse_list(text: &str) -> Vec<PortRange> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (low, high) = item.split_once('-').unwrap_or((item, item));
            let (min, max) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
            (min <= max).then_some(PortRange { min, max })
        })
        .collect()
}

/// Whether every port of `range` is in one of `list`'s ranges.
pub fn covered(list: &[PortRange], range: PortRange) -> bool {
    let mut sorted = list.to_vec();
    sorted.sort_by_key(|r| r.min);
    let mut next = u32::from(range.min);
    for r in sorted {
        if u32::from(r.min) <= next && next <= u32::from(r.max) {
            next = u32::from(r.max) + 1;
        }
        if next > u32::from(range.max) {
            return true;
        }
    }
    false
}

/// The list with `range` added, as the kernel takes it.
pub fn with_range(list: &[PortRange], range: PortRange) -> String {
    list.iter()
        .chain(std::iter::once(&range))
        .map(|r| {
            if r.min == r.max {
                r.min.to_string()
            } else {
                r.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn overlaps(a: PortRange, b: PortRange) -> bool {
    a.min <= b.max && b.min <= a.max
}

fn ephemeral_range(path: &Path) -> Option<PortRange> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut bounds = text.split_whitespace().filter_map(|n| n.parse().ok());
    Some(PortRange {
        min: bounds.next()?,
        max: bounds.next()?,
    })
}

/// Reserves `range` for masquerading (see the module doc), or refuses it.
pub fn reserve(settings: &PortSettings, range: PortRange) -> Result<Reservation, PortsError> {
    let written = std::fs::read_to_string(&settings.reserved).and_then(|current| {
        let list = parse_list(&current);
        if covered(&list, range) {
            return Ok(Reservation::AlreadyReserved);
        }
        std::fs::write(&settings.reserved, with_range(&list, range))?;
        Ok(Reservation::Reserved)
    });
    let reason = match written {
        Ok(done) => {
            if done == Reservation::Reserved {
                info!(
                    ports = %range,
                    "reserved the masquerade ports in net.ipv4.ip_local_reserved_ports: the node's own connections no longer pick them"
                );
            }
            return Ok(done);
        }
        Err(error) => error.to_string(),
    };
    match ephemeral_range(&settings.ephemeral) {
        Some(ephemeral) if overlaps(ephemeral, range) => Err(PortsError::Overlap {
            range,
            ephemeral,
            reserved: settings.reserved.display().to_string(),
            reason,
        }),
        _ => {
            warn!(
                ports = %range,
                %reason,
                "could not reserve the masquerade ports in net.ipv4.ip_local_reserved_ports; they lie outside the node's ephemeral ports, so only a process binding one of them explicitly could collide"
            );
            Ok(Reservation::OutsideEphemeral)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(min: u16, max: u16) -> PortRange {
        PortRange { min, max }
    }

    #[test]
    fn the_kernel_list_is_parsed_and_extended() {
        assert_eq!(parse_list(""), vec![]);
        assert_eq!(parse_list("\n"), vec![]);
        assert_eq!(
            parse_list("8080,46000-65535\n"),
            vec![range(8080, 8080), range(46_000, 65_535)]
        );
        assert_eq!(
            with_range(&parse_list("8080"), range(46_000, 65_535)),
            "8080,46000-65535"
        );
        assert_eq!(with_range(&[], range(7, 7)), "7");
    }

    #[test]
    fn coverage_joins_adjacent_ranges() {
        let list = parse_list("100-199,200-300,400");
        assert!(covered(&list, range(150, 300)));
        assert!(covered(&list, range(400, 400)));
        assert!(!covered(&list, range(150, 301)));
        assert!(!covered(&list, range(300, 400)));
        assert!(!covered(&[], range(1, 1)));
        assert!(covered(&parse_list("1-65535"), range(65_535, 65_535)));
    }

    fn files(reserved: Option<&str>, ephemeral: &str) -> (tempfile::TempDir, PortSettings) {
        let dir = tempfile::tempdir().unwrap();
        let settings = PortSettings {
            reserved: dir.path().join("reserved"),
            ephemeral: dir.path().join("ephemeral"),
        };
        if let Some(text) = reserved {
            std::fs::write(&settings.reserved, text).unwrap();
        }
        std::fs::write(&settings.ephemeral, ephemeral).unwrap();
        (dir, settings)
    }

    #[test]
    fn the_range_is_added_to_the_reserved_ports_once() {
        let (_dir, settings) = files(Some("8080\n"), "32768\t60999\n");
        let snat = range(46_000, 65_535);
        assert_eq!(reserve(&settings, snat).unwrap(), Reservation::Reserved);
        assert_eq!(
            std::fs::read_to_string(&settings.reserved).unwrap(),
            "8080,46000-65535"
        );
        assert_eq!(
            reserve(&settings, snat).unwrap(),
            Reservation::AlreadyReserved
        );
    }

    #[test]
    fn an_unreservable_range_is_refused_only_when_it_overlaps_the_ephemeral_ports() {
        let (_dir, settings) = files(None, "32768\t60999\n");
        let error = reserve(&settings, range(46_000, 65_535)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("46000-65535"), "{message}");
        assert!(message.contains("32768-60999"), "{message}");
        assert_eq!(
            reserve(&settings, range(61_000, 65_535)).unwrap(),
            Reservation::OutsideEphemeral
        );
    }
}
