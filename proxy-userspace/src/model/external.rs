//! What makes a Service reachable from outside the cluster: NodePorts, `spec.externalIPs`,
//! VIP-mode load-balancer ingress IPs, loadBalancerSourceRanges, externalTrafficPolicy and the
//! health-check node port, read as kube-proxy reads them (pkg/proxy/serviceport.go,
//! pkg/api/v1/service/util.go).
use std::net::IpAddr;

use super::{
    Cidr,
    input::ServiceInput,
    parse_cidr_lenient, parse_ip_lenient,
    problems::{Problems, ServiceId},
};

/// A Service's external addresses and the policies that apply to them, both families mixed
/// (each frontend keeps those of its own family).
#[derive(Debug, Default)]
pub(super) struct Exposure {
    /// `spec.externalIPs`, parsed, without duplicates.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose ipMode is VIP (or unset), without duplicates.
    pub load_balancer_ips: Vec<IpAddr>,
    /// loadBalancerSourceRanges that parsed, of either family.
    pub source_ranges: Vec<Cidr>,
    /// The Service lists source ranges but none of them parsed.
    pub source_ranges_unreadable: bool,
    /// externalTrafficPolicy Local on an externally accessible Service.
    pub external_local: bool,
    /// Whether NodePorts are opened (type NodePort or LoadBalancer).
    pub node_ports: bool,
    /// The healthCheckNodePort to serve (type LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
}

/// kube-proxy's `ExternallyAccessible`: NodePort and LoadBalancer Services, and ClusterIP
/// Services with externalIPs. Only those honour externalTrafficPolicy.
fn externally_accessible(service: &ServiceInput) -> bool {
    match service.type_name() {
        "NodePort" | "LoadBalancer" => true,
        "ClusterIP" => !service.external_ips.is_empty(),
        _ => false,
    }
}

/// Parses a list of addresses leniently, reporting the unreadable ones.
fn parse_addresses<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    what: &str,
    id: &ServiceId,
    problems: &mut Problems,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for text in texts {
        match parse_ip_lenient(text) {
            Some(ip) if !ips.contains(&ip) => ips.push(ip),
            Some(_) => {}
            None => id.report(
                problems,
                format!("{what} {text:?} is not an IP address; address ignored"),
            ),
        }
    }
    ips
}

/// VIP-mode ingress IPs. An ingress with ipMode Proxy is not intercepted: that load balancer
/// proxies to the nodes itself (kube-proxy's `IsVIPMode`, LoadBalancerIPMode on by default).
fn load_balancer_ips(service: &ServiceInput, problems: &mut Problems) -> Vec<IpAddr> {
    let id = &service.id;
    let mut texts = Vec::new();
    for entry in &service.load_balancer_ingress {
        // Hostname-only ingress entries have no address to intercept.
        let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        match entry.ip_mode.as_deref() {
            None | Some("VIP") => texts.push(ip),
            Some("Proxy") => {}
            Some(other) => id.report(
                problems,
                format!("load-balancer ingress {ip}: unknown ipMode {other:?}; address ignored"),
            ),
        }
    }
    parse_addresses(texts, "load-balancer ingress IP", id, problems)
}

/// The healthCheckNodePort of a Service that needs one, reporting a missing or bad one.
fn health_check_node_port(
    port: Option<i32>,
    id: &ServiceId,
    problems: &mut Problems,
) -> Option<u16> {
    let Some(port) = port else {
        id.report(
            problems,
            "type LoadBalancer with externalTrafficPolicy Local has no healthCheckNodePort; no health check served",
        );
        return None;
    };
    let parsed = u16::try_from(port).ok().filter(|port| *port != 0);
    if parsed.is_none() {
        id.report(
            problems,
            format!("healthCheckNodePort {port} is out of range 1-65535; no health check served"),
        );
    }
    parsed
}

/// Reads the Service's external addresses and policies, reporting unusable parts.
/// `ignore_external_ips`: `--allow-service-external-ips=false` (the field is not read at
/// all, so it makes no ClusterIP Service externally accessible either).
pub(super) fn read(
    service: &ServiceInput,
    ignore_external_ips: bool,
    problems: &mut Problems,
) -> Exposure {
    if !service.has_spec {
        return Exposure::default();
    }
    let id = &service.id;
    let external_ips = if ignore_external_ips {
        Vec::new()
    } else {
        parse_addresses(
            service.external_ips.iter().map(String::as_str),
            "externalIP",
            id,
            problems,
        )
    };
    let listed_ranges = &service.load_balancer_source_ranges;
    let mut source_ranges = Vec::new();
    for text in listed_ranges {
        // kube-proxy trims first: validation once let whitespace padding through.
        match parse_cidr_lenient(text) {
            Some(range) if !source_ranges.contains(&range) => source_ranges.push(range),
            Some(_) => {}
            None => id.report(
                problems,
                format!("loadBalancerSourceRange {text:?} is not a CIDR; range ignored"),
            ),
        }
    }
    let source_ranges_unreadable = !listed_ranges.is_empty() && source_ranges.is_empty();
    if source_ranges_unreadable {
        id.report(
            problems,
            "no loadBalancerSourceRange is readable: new flows to its load-balancer IPs are dropped",
        );
    }
    let accessible = if ignore_external_ips {
        matches!(service.type_name(), "NodePort" | "LoadBalancer")
    } else {
        externally_accessible(service)
    };
    let external_local = accessible && service.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = if service.type_name() == "LoadBalancer" && external_local {
        health_check_node_port(service.health_check_node_port, id, problems)
    } else {
        None
    };
    Exposure {
        external_ips,
        load_balancer_ips: load_balancer_ips(service, problems),
        source_ranges,
        source_ranges_unreadable,
        external_local,
        node_ports: matches!(service.type_name(), "NodePort" | "LoadBalancer"),
        health_check_node_port,
    }
}

impl Exposure {
    /// The source ranges of the load-balancer frontends of one family, or `None` when they
    /// admit every source.
    ///
    /// Ranges of the other family are left out, as each of kube-proxy's single-family
    /// proxiers does; when no range of this family remains, kube-proxy installs no firewall
    /// for the family and so do we (the Service's ranges simply say nothing about it). We
    /// part from kube-proxy in one case: when ranges are listed but *none* of them can be
    /// read (only possible for objects the API server would reject, e.g. from a manifests
    /// file), kube-proxy also ends up with an empty list and admits everyone; we drop every
    /// new flow instead, since the owner clearly asked for a restriction we cannot read.
    ///
    /// When a range covers one of the node's addresses, the Service's load-balancer IPs are
    /// admitted as sources too: traffic from the node to a VIP-mode LB IP that is also a
    /// local address loops back with the LB IP as its source (kube-proxy's `allowFromNode`,
    /// which admits every LB IP of the Service).
    pub(super) fn source_ranges_for(
        &self,
        ipv4: bool,
        node_addresses: &[IpAddr],
    ) -> Option<Vec<Cidr>> {
        if self.source_ranges_unreadable {
            return Some(Vec::new());
        }
        let mut ranges: Vec<Cidr> = self
            .source_ranges
            .iter()
            .filter(|range| range.ip().is_ipv4() == ipv4)
            .copied()
            .collect();
        if ranges.is_empty() {
            return None;
        }
        let covers_node = node_addresses
            .iter()
            .any(|address| ranges.iter().any(|range| range.contains(*address)));
        if covers_node {
            ranges.extend(
                self.load_balancer_ips
                    .iter()
                    .filter(|ip| ip.is_ipv4() == ipv4)
                    .map(|ip| Cidr::host(*ip)),
            );
        }
        Some(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn external(ranges: &[&str], lb_ips: &[&str]) -> Exposure {
        Exposure {
            load_balancer_ips: lb_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            source_ranges: ranges
                .iter()
                .map(|range| parse_cidr_lenient(range).unwrap())
                .collect(),
            ..Exposure::default()
        }
    }

    fn texts(ranges: Option<Vec<Cidr>>) -> Option<Vec<String>> {
        ranges.map(|ranges| ranges.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn source_ranges_keep_the_frontend_family_and_admit_everyone_when_none_is_left() {
        let service = external(&["203.0.113.0/25", "2001:db8::/64"], &["1.2.3.4"]);
        assert_eq!(
            texts(service.source_ranges_for(true, &[])),
            Some(vec!["203.0.113.0/25".to_owned()])
        );
        let v4_only = external(&["203.0.113.0/25"], &["1.2.3.4"]);
        assert_eq!(texts(v4_only.source_ranges_for(false, &[])), None);
    }

    #[test]
    fn a_range_covering_a_node_address_admits_the_service_lb_ips_as_sources() {
        let service = external(&["192.168.0.0/24"], &["1.2.3.4", "5.6.7.8", "fd00::4"]);
        let node: [IpAddr; 2] = ["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        assert_eq!(
            texts(service.source_ranges_for(true, &node)),
            Some(vec![
                "192.168.0.0/24".to_owned(),
                "1.2.3.4/32".to_owned(),
                "5.6.7.8/32".to_owned()
            ])
        );
        let elsewhere: [IpAddr; 1] = ["10.0.0.2".parse().unwrap()];
        assert_eq!(
            texts(service.source_ranges_for(true, &elsewhere)),
            Some(vec!["192.168.0.0/24".to_owned()])
        );
    }

    #[test]
    fn unreadable_ranges_drop_every_new_flow_instead_of_admitting_everyone() {
        let service = Exposure {
            source_ranges_unreadable: true,
            ..Exposure::default()
        };
        assert_eq!(
            texts(service.source_ranges_for(true, &[])),
            Some(Vec::new())
        );
    }
}
