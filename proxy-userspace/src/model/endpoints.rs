//! Which endpoints of a service port this node may use: kube-proxy's rules
//! (pkg/proxy/topology.go, `CategorizeEndpoints`), kept pure.
//!
//! - Conditions: unset `ready` and `serving` mean true, unset `terminating` means false. Ready
//!   endpoints are used; only when none is ready are serving+terminating ones used, decided
//!   separately for the cluster-wide and the node-local set. Not-serving endpoints never.
//! - Topology: hints narrow the cluster-wide set all-or-nothing: only when every ready endpoint
//!   carries a hint and at least one hint names this node (PreferSameNode) or zone.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    Protocol,
    input::SliceInput,
    parse_ip_lenient,
    problems::{ObjectKind, Problems, parse_protocol},
};

/// One endpoint of a service port, in one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "they are the EndpointSlice API's own conditions"
)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName` is this node.
    pub local: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

/// A service port as the slices name it: (name, protocol).
pub struct PortRef<'a> {
    pub name: &'a str,
    pub protocol: Protocol,
}

fn address_type_matches(slice: &SliceInput, ipv4: bool) -> bool {
    match slice.address_type.as_ref() {
        "IPv4" => ipv4,
        "IPv6" => !ipv4,
        _ => false,
    }
}

/// The endpoints of `port` in one family, merged over all slices. When the same address and
/// port appear twice, the non-terminating copy wins. `publish_not_ready`: the Service's
/// `publishNotReadyAddresses`, under which every listed endpoint counts as ready, terminating
/// ones included, as the EndpointSlice controller publishes them (kube-proxy's e2e: such
/// endpoints stay reachable only then).
pub fn collect(
    slices: &[&SliceInput],
    ipv4: bool,
    port: &PortRef<'_>,
    node_name: Option<&str>,
    publish_not_ready: bool,
    problems: &mut Problems,
) -> Vec<Endpoint> {
    let mut by_address: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices
        .iter()
        .filter(|slice| address_type_matches(slice, ipv4))
    {
        let ns = &*slice.key.namespace;
        let slice_name = &*slice.key.name;
        let Some(slice_port) = slice.ports.iter().find(|candidate| {
            candidate.name.as_deref().unwrap_or_default() == port.name
                && parse_protocol(candidate.protocol.as_deref()).ok() == Some(port.protocol)
        }) else {
            continue;
        };
        let Some(number) = slice_port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            problems.report(
                ObjectKind::EndpointSlice,
                ns,
                slice_name,
                format!(
                    "port {:?} has no valid port number; port ignored",
                    port.name
                ),
            );
            continue;
        };
        for endpoint in &slice.endpoints {
            // Only the first address counts (the EndpointSlice API's contract).
            let Some(text) = endpoint.address.as_deref() else {
                continue;
            };
            let ip = match parse_ip_lenient(text) {
                Some(ip) if ip.is_ipv4() == ipv4 => ip,
                _ => {
                    problems.report(
                        ObjectKind::EndpointSlice,
                        ns,
                        slice_name,
                        format!(
                            "endpoint address {text:?} is not an {} address; endpoint ignored",
                            slice.address_type
                        ),
                    );
                    continue;
                }
            };
            let candidate = Endpoint {
                ip,
                port: number,
                ready: publish_not_ready || endpoint.ready.unwrap_or(true),
                serving: endpoint.serving.unwrap_or(true),
                terminating: endpoint.terminating.unwrap_or(false),
                local: node_name.is_some() && endpoint.node_name.as_deref() == node_name,
                zone_hints: endpoint.zone_hints.iter().cloned().collect(),
                node_hints: endpoint.node_hints.iter().cloned().collect(),
            };
            match by_address.get(&(ip, number)) {
                Some(existing) if !existing.terminating || candidate.terminating => {}
                _ => {
                    by_address.insert((ip, number), candidate);
                }
            }
        }
    }
    by_address.into_values().collect()
}

/// How topology hints narrow the cluster-wide set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

fn topology_mode(endpoints: &[Endpoint], node: Option<&str>, zone: Option<&str>) -> TopologyMode {
    let ready = || endpoints.iter().filter(|e| e.ready);
    let all_node_hints = ready().all(|e| !e.node_hints.is_empty());
    let node_hinted = node.is_some_and(|node| ready().any(|e| e.node_hints.contains(node)));
    if all_node_hints && node_hinted {
        return TopologyMode::SameNode;
    }
    let all_zone_hints = ready().all(|e| !e.zone_hints.is_empty());
    let zone_hinted = zone.is_some_and(|zone| ready().any(|e| e.zone_hints.contains(zone)));
    if all_zone_hints && zone_hinted {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available_for_topology(
    endpoint: &Endpoint,
    mode: TopologyMode,
    node: Option<&str>,
    zone: Option<&str>,
) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameZone => zone.is_some_and(|zone| endpoint.zone_hints.contains(zone)),
        TopologyMode::SameNode => node.is_some_and(|node| endpoint.node_hints.contains(node)),
    }
}

/// The endpoint sets of one service port as seen from this node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Cluster-wide set (after topology); empty when the port does not use it.
    pub cluster: Vec<Endpoint>,
    /// Endpoints on this node; empty when the port does not use them.
    pub local: Vec<Endpoint>,
    /// Whether any endpoint anywhere is usable (ready, or serving and terminating). When the
    /// chosen set is empty this tells DROP (endpoints elsewhere) from REJECT (none at all).
    pub any_usable: bool,
}

/// Splits endpoints into the cluster-wide and node-local sets the service port uses.
pub fn categorize(
    endpoints: &[Endpoint],
    node: Option<&str>,
    zone: Option<&str>,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized {
    let mut result = Categorized::default();
    let serving_terminating = |e: &&Endpoint| e.serving && e.terminating;
    if uses_cluster {
        let mode = topology_mode(endpoints, node, zone);
        result.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node, zone))
            .cloned()
            .collect();
        if result.cluster.is_empty() {
            result.cluster = endpoints
                .iter()
                .filter(serving_terminating)
                .cloned()
                .collect();
        }
        result.any_usable = !result.cluster.is_empty();
    }
    if uses_local {
        result.any_usable |= endpoints
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating));
        let local = || endpoints.iter().filter(|e| e.local);
        result.local = if local().any(|e| e.ready) {
            local().filter(|e| e.ready).cloned().collect()
        } else {
            local().filter(serving_terminating).cloned().collect()
        };
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(last_octet: u8) -> Endpoint {
        Endpoint {
            ip: IpAddr::from([10, 0, 0, last_octet]),
            port: 80,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        }
    }

    fn terminating(mut e: Endpoint, serving: bool) -> Endpoint {
        e.ready = false;
        e.serving = serving;
        e.terminating = true;
        e
    }

    fn local(mut e: Endpoint) -> Endpoint {
        e.local = true;
        e
    }

    fn zone(mut e: Endpoint, zone: &str) -> Endpoint {
        e.zone_hints.insert(zone.to_owned());
        e
    }

    fn octets(endpoints: &[Endpoint]) -> Vec<u8> {
        endpoints
            .iter()
            .map(|e| match e.ip {
                IpAddr::V4(ip) => ip.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    const NODE: Option<&str> = Some("node-a");
    const ZONE: Option<&str> = Some("zone-a");

    #[test]
    fn ready_endpoints_are_used_and_terminating_ones_only_as_a_fallback() {
        let eps = [endpoint(1), terminating(endpoint(2), true)];
        assert_eq!(
            octets(&categorize(&eps, NODE, ZONE, true, false).cluster),
            [1]
        );
        let only_terminating = [
            terminating(endpoint(2), true),
            terminating(endpoint(3), false),
        ];
        let result = categorize(&only_terminating, NODE, ZONE, true, false);
        assert_eq!(
            octets(&result.cluster),
            [2],
            "serving+terminating yes, not-serving never"
        );
        assert!(result.any_usable);
    }

    #[test]
    fn the_fallback_is_decided_separately_for_the_local_set() {
        // Only terminating endpoints exist locally; a ready one exists remotely.
        let eps = [endpoint(1), local(terminating(endpoint(2), true))];
        let result = categorize(&eps, NODE, ZONE, true, true);
        assert_eq!(octets(&result.cluster), [1]);
        assert_eq!(octets(&result.local), [2]);
    }

    #[test]
    fn no_local_endpoint_but_endpoints_elsewhere_means_drop_not_reject() {
        let result = categorize(&[endpoint(1)], NODE, ZONE, false, true);
        assert!(result.local.is_empty());
        assert!(result.any_usable, "endpoints exist elsewhere: DROP");
        let nothing = categorize(&[terminating(endpoint(1), false)], NODE, ZONE, false, true);
        assert!(!nothing.any_usable, "nothing usable anywhere: REJECT");
    }

    #[test]
    fn zone_hints_apply_only_when_every_ready_endpoint_has_one_and_one_matches() {
        let hinted = [zone(endpoint(1), "zone-a"), zone(endpoint(2), "zone-b")];
        assert_eq!(
            octets(&categorize(&hinted, NODE, ZONE, true, false).cluster),
            [1]
        );
        let partly = [zone(endpoint(1), "zone-a"), endpoint(2)];
        assert_eq!(
            octets(&categorize(&partly, NODE, ZONE, true, false).cluster),
            [1, 2],
            "all or nothing"
        );
        let elsewhere = [zone(endpoint(1), "zone-b"), zone(endpoint(2), "zone-c")];
        assert_eq!(
            octets(&categorize(&elsewhere, NODE, ZONE, true, false).cluster),
            [1, 2],
            "no hint for our zone"
        );
        assert_eq!(
            octets(&categorize(&hinted, NODE, None, true, false).cluster),
            [1, 2],
            "node without zone label"
        );
    }

    #[test]
    fn node_hints_prefer_this_node() {
        let mut mine = endpoint(1);
        mine.node_hints.insert("node-a".into());
        let mut theirs = endpoint(2);
        theirs.node_hints.insert("node-b".into());
        assert_eq!(
            octets(&categorize(&[mine, theirs], NODE, ZONE, true, false).cluster),
            [1]
        );
    }

    #[test]
    fn hints_on_not_ready_endpoints_do_not_count() {
        let eps = [
            zone(endpoint(1), "zone-a"),
            zone(endpoint(2), "zone-b"),
            terminating(endpoint(3), true),
        ];
        assert_eq!(
            octets(&categorize(&eps, NODE, ZONE, true, false).cluster),
            [1]
        );
    }
}
