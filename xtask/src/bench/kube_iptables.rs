//! iptables-restore input laid out the way kube-proxy's iptables mode programs ClusterIP
//! services: KUBE-SERVICES with one rule per service port, a KUBE-SVC-* chain per service
//! choosing an endpoint with `statistic --mode random`, a KUBE-SEP-* chain per endpoint that
//! DNATs, KUBE-MARK-MASQ / KUBE-POSTROUTING for masquerading, KUBE-NODEPORTS as the last rule,
//! and the filter-table chains (KUBE-FORWARD, ...). Rules are written in service order, so the
//! last service is the worst-placed one.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::services::{BACKEND_PORT, CLUSTER_CIDR, SERVICE_PORT, ServiceSet, chain_hash};

const FILTER_CHAINS: [&str; 5] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
];
const NAT_CHAINS: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

fn svc_chain(index: usize) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}tcp", ServiceSet::port_name(index)), 16)
    )
}

fn sep_chain(index: usize, endpoint: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(
            &format!(
                "{}tcp{endpoint}:{BACKEND_PORT}",
                ServiceSet::port_name(index)
            ),
            16
        )
    )
}

/// Both tables emptied: every rule flushed, every user chain deleted (a full restore).
pub fn empty() -> String {
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
     *nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
     :POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
        .to_owned()
}

/// Every service from empty tables, as one restore. The jumps from the built-in chains (which
/// kube-proxy ensures with separate `iptables -I` calls) are included.
pub fn program_all(set: &ServiceSet) -> String {
    let mut out = String::with_capacity(set.count * set.endpoints.len() * 300);
    filter_table(&mut out, true);
    out.push_str("*nat\n");
    for chain in NAT_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for index in 0..set.count {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(index));
        for &endpoint in &set.endpoints {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(index, endpoint));
        }
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    nat_base_rules(&mut out);
    kube_services(&mut out, set);
    for index in 0..set.count {
        service_rules(&mut out, index, &set.endpoints);
    }
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy's partial sync writes (with `--noflush`) when one endpoint of the measured
/// service is replaced: the top-level chains rewritten in full (KUBE-SERVICES lists every
/// service), the changed KUBE-SVC chain, the new KUBE-SEP chain, the stale one deleted.
pub fn update_one(set: &ServiceSet) -> String {
    let index = set.measured();
    let endpoints = set.updated_endpoints(index);
    let mut out = String::with_capacity(set.count * 200);
    filter_table(&mut out, false);
    out.push_str("*nat\n");
    for chain in NAT_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(index));
    let _ = writeln!(out, ":{} - [0:0]", sep_chain(index, endpoints[0]));
    // Declaring the stale chain flushes it, so that it can be deleted below.
    let stale = sep_chain(index, set.endpoints[0]);
    let _ = writeln!(out, ":{stale} - [0:0]");
    nat_base_rules(&mut out);
    kube_services(&mut out, set);
    svc_rules(&mut out, index, &endpoints);
    sep_rules(&mut out, index, endpoints[0]);
    let _ = writeln!(out, "-X {stale}");
    out.push_str("COMMIT\n");
    out
}

fn filter_table(out: &mut String, with_jumps: bool) {
    out.push_str("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if with_jumps {
        out.push_str(
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
             -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
             -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
             -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
             -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
             -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
    }
    out.push_str(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
}

fn nat_base_rules(out: &mut String) {
    out.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
}

fn kube_services(out: &mut String, set: &ServiceSet) {
    for index in 0..set.count {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {} --dport {SERVICE_PORT} -j {}",
            ServiceSet::port_name(index),
            ServiceSet::vip(index),
            svc_chain(index)
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

fn service_rules(out: &mut String, index: usize, endpoints: &[Ipv4Addr]) {
    svc_rules(out, index, endpoints);
    for &endpoint in endpoints {
        sep_rules(out, index, endpoint);
    }
}

fn svc_rules(out: &mut String, index: usize, endpoints: &[Ipv4Addr]) {
    let name = ServiceSet::port_name(index);
    let chain = svc_chain(index);
    let _ = writeln!(
        out,
        "-A {chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {} --dport {SERVICE_PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        ServiceSet::vip(index)
    );
    let count = endpoints.len();
    for (i, &endpoint) in endpoints.iter().enumerate() {
        let target = sep_chain(index, endpoint);
        if i + 1 < count {
            // Endpoint i of n is taken with probability 1/(n-i) among those left.
            #[allow(clippy::cast_precision_loss)] // endpoint counts are tiny
            let probability = 1.0 / (count - i) as f64;
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{name} -> {endpoint}:{BACKEND_PORT}\" -m statistic --mode random --probability {probability:.10} -j {target}"
            );
        } else {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{name} -> {endpoint}:{BACKEND_PORT}\" -j {target}"
            );
        }
    }
}

fn sep_rules(out: &mut String, index: usize, endpoint: Ipv4Addr) {
    let name = ServiceSet::port_name(index);
    let chain = sep_chain(index, endpoint);
    let _ = writeln!(
        out,
        "-A {chain} -m comment --comment {name} -s {endpoint}/32 -j KUBE-MARK-MASQ\n\
         -A {chain} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {endpoint}:{BACKEND_PORT}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> ServiceSet {
        ServiceSet::new(
            2,
            vec![Ipv4Addr::new(10, 240, 1, 2), Ipv4Addr::new(10, 240, 2, 2)],
        )
    }

    #[test]
    fn lays_services_out_like_kube_proxy() {
        let rules = program_all(&set());
        let lines: Vec<&str> = rules.lines().collect();
        let services: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(services[1].contains("-d 10.96.0.2 --dport 80 -j KUBE-SVC-"));
        assert!(services[2].contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        let svc = svc_chain(1);
        let svc_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc} ")))
            .collect();
        assert_eq!(svc_rules.len(), 3);
        assert!(svc_rules[0].ends_with("! -s 10.240.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(svc_rules[1].contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(!svc_rules[2].contains("statistic"));
        assert!(rules.contains("-j DNAT --to-destination 10.240.2.2:8080"));
        assert_eq!(rules.matches("COMMIT").count(), 2);
        // Two services with two endpoints: 2 SVC + 4 SEP chains declared.
        assert_eq!(rules.matches(":KUBE-SEP-").count(), 4);
        assert_eq!(rules.matches(":KUBE-SVC-").count(), 2);
    }

    #[test]
    fn an_update_rewrites_the_top_chains_and_swaps_one_endpoint_chain() {
        let set = set();
        let update = update_one(&set);
        assert_eq!(update.matches("-A KUBE-SERVICES").count(), 3);
        assert!(update.contains(&format!("-X {}", sep_chain(1, set.endpoints[0]))));
        assert!(update.contains("--to-destination 10.240.251.2:8080"));
        // Other services' chains are left alone (only jumped to from KUBE-SERVICES).
        assert!(!update.contains(&format!(":{} ", svc_chain(0))));
        assert!(!update.contains(&format!("-A {} ", svc_chain(0))));
    }
}
