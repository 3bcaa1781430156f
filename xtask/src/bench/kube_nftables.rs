//! `nft -f` input laid out the way kube-proxy's nftables mode programs ClusterIP services: the
//! `ip kube-proxy` table, its base chains and helper chains, the `service-ips` verdict map
//! (address . protocol . port → goto the service chain), one chain per service choosing an
//! endpoint with `numgen random mod M vmap`, one chain per endpoint that DNATs, and the
//! mark-for-masquerade / masquerading chains.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::services::{
    BACKEND_PORT, CLUSTER_CIDR, PORT_NAME, SERVICE_CIDR, SERVICE_PORT, ServiceSet, chain_hash,
};

const TABLE: &str = "ip kube-proxy";

fn service_chain(index: usize) -> String {
    let name = format!(
        "{}/{}/tcp/{PORT_NAME}",
        super::services::NAMESPACE,
        ServiceSet::name(index)
    );
    format!("service-{}-{name}", chain_hash(&name, 8))
}

fn endpoint_chain(index: usize, endpoint: Ipv4Addr) -> String {
    let name = format!(
        "{}/{}/tcp/{PORT_NAME}__{endpoint}/{BACKEND_PORT}",
        super::services::NAMESPACE,
        ServiceSet::name(index)
    );
    format!("endpoint-{}-{name}", chain_hash(&name, 8))
}

/// Removes everything this mode programmed (not timed).
pub fn empty() -> String {
    format!("add table {TABLE}\ndelete table {TABLE}\n")
}

/// The whole table from empty, in one transaction.
pub fn program_all(set: &ServiceSet) -> String {
    let mut out = String::with_capacity(set.count * set.endpoints.len() * 250);
    base(&mut out);
    for index in 0..set.count {
        // Endpoint chains first: the service chain's verdict map refers to them.
        for &endpoint in &set.endpoints {
            endpoint_rules(&mut out, index, endpoint);
        }
        service(&mut out, index, &set.endpoints);
        let vip = ServiceSet::vip(index);
        let _ = writeln!(out, "add element {TABLE} cluster-ips {{ {vip} }}");
        let _ = writeln!(
            out,
            "add element {TABLE} service-ips {{ {vip} . tcp . {SERVICE_PORT} : goto {} }}",
            service_chain(index)
        );
    }
    out
}

/// kube-proxy's partial sync when one endpoint of the measured service is replaced: the new
/// endpoint chain, the service chain flushed and rewritten, the stale endpoint chain removed.
pub fn update_one(set: &ServiceSet) -> String {
    let index = set.measured();
    let endpoints = set.updated_endpoints(index);
    let mut out = String::new();
    endpoint_rules(&mut out, index, endpoints[0]);
    service(&mut out, index, &endpoints);
    let stale = endpoint_chain(index, set.endpoints[0]);
    let _ = writeln!(
        out,
        "flush chain {TABLE} {stale}\ndelete chain {TABLE} {stale}"
    );
    out
}

fn base(out: &mut String) {
    let _ = write!(
        out,
        r#"add table {TABLE} {{ comment "rules for kube-proxy" ; }}
add set {TABLE} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}
add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}
add map {TABLE} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}
add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}
add map {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}
add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}
add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}
add chain {TABLE} cluster-ips-check
add chain {TABLE} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}
add chain {TABLE} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}
add chain {TABLE} filter-forward {{ type filter hook forward priority 0 ; }}
add chain {TABLE} filter-input {{ type filter hook input priority 0 ; }}
add chain {TABLE} filter-output {{ type filter hook output priority 0 ; }}
add chain {TABLE} firewall-check
add chain {TABLE} mark-for-masquerade
add chain {TABLE} masquerading
add chain {TABLE} nat-output {{ type nat hook output priority -100 ; }}
add chain {TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain {TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain {TABLE} nodeport-endpoints-check
add chain {TABLE} reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}
add chain {TABLE} services
add chain {TABLE} service-endpoints-check
add rule {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule {TABLE} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment "Drop traffic to unallocated ClusterIPs"
add rule {TABLE} filter-prerouting-pre-dnat ct state new jump firewall-check
add rule {TABLE} filter-forward ct state new jump service-endpoints-check
add rule {TABLE} filter-forward ct state new jump cluster-ips-check
add rule {TABLE} filter-input ct state new jump nodeport-endpoints-check
add rule {TABLE} filter-input ct state new jump service-endpoints-check
add rule {TABLE} filter-output ct state new jump service-endpoints-check
add rule {TABLE} filter-output-pre-dnat ct state new jump firewall-check
add rule {TABLE} filter-output ct state new jump cluster-ips-check
add rule {TABLE} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule {TABLE} mark-for-masquerade mark set mark or 0x4000
add rule {TABLE} masquerading mark and 0x4000 == 0 return
add rule {TABLE} masquerading mark set mark xor 0x4000
add rule {TABLE} masquerading masquerade fully-random
add rule {TABLE} nat-output jump services
add rule {TABLE} nat-postrouting jump masquerading
add rule {TABLE} nat-prerouting jump services
add rule {TABLE} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule {TABLE} reject-chain reject
add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {TABLE} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule {TABLE} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#
    );
}

/// The service chain (created or flushed) and its two rules.
fn service(out: &mut String, index: usize, endpoints: &[Ipv4Addr]) {
    let chain = service_chain(index);
    let choices = endpoints
        .iter()
        .enumerate()
        .map(|(i, &endpoint)| format!("{i} : goto {}", endpoint_chain(index, endpoint)))
        .collect::<Vec<_>>()
        .join(" , ");
    let _ = writeln!(
        out,
        "add chain {TABLE} {chain}\nflush chain {TABLE} {chain}\n\
         add rule {TABLE} {chain} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
         add rule {TABLE} {chain} numgen random mod {} vmap {{ {choices} }}",
        ServiceSet::vip(index),
        endpoints.len()
    );
}

fn endpoint_rules(out: &mut String, index: usize, endpoint: Ipv4Addr) {
    let chain = endpoint_chain(index, endpoint);
    let _ = writeln!(
        out,
        "add chain {TABLE} {chain}\n\
         add rule {TABLE} {chain} ip saddr {endpoint} jump mark-for-masquerade\n\
         add rule {TABLE} {chain} meta l4proto tcp dnat to {endpoint}:{BACKEND_PORT}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_services_out_like_kube_proxy() {
        let set = ServiceSet::new(
            2,
            vec![Ipv4Addr::new(10, 240, 1, 2), Ipv4Addr::new(10, 240, 2, 2)],
        );
        let rules = program_all(&set);
        assert!(rules.starts_with("add table ip kube-proxy"));
        assert!(rules.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.2 . tcp . 80 : goto {} }}",
            service_chain(1)
        )));
        assert!(rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("meta l4proto tcp dnat to 10.240.2.2:8080"));
        assert_eq!(
            rules.matches("add chain ip kube-proxy endpoint-").count(),
            4
        );
        let update = update_one(&set);
        assert!(update.contains("dnat to 10.240.251.2:8080"));
        assert!(update.contains(&format!(
            "delete chain ip kube-proxy {}",
            endpoint_chain(1, set.endpoints[0])
        )));
    }
}
