//! A readable dump of what is programmed, with ids renumbered in order of appearance so that
//! two equal dataplanes dump identically whatever ids they were given (golden tests, `dump`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use crate::{
    model::Cidr,
    plan::{mirror::Programmed, op::RevNatTarget},
};
use proxy_common::{guard_flags, service_flags};

/// The service flags by name: the frontend's kind first, then how it behaves.
const FLAG_NAMES: [(u16, &str); 9] = [
    (service_flags::CLUSTER_IP, "cluster-ip"),
    (service_flags::NODE_PORT, "node-port"),
    (service_flags::EXTERNAL_IP, "external-ip"),
    (service_flags::LOAD_BALANCER, "load-balancer"),
    (service_flags::EXTERNAL_LOCAL, "external-local"),
    (service_flags::SOURCE_RANGES, "source-ranges"),
    (service_flags::NO_LOCAL_ENDPOINTS, "no-local-endpoints"),
    (service_flags::NOT_FOR_HOST, "not-for-host"),
    (service_flags::MAGLEV, "maglev"),
];

/// The names of the flags set, unknown bits in hex.
pub fn flag_list(flags: u16) -> Vec<String> {
    let mut names: Vec<String> = FLAG_NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect();
    let known = FLAG_NAMES.iter().fold(0, |all, (bit, _)| all | bit);
    let unknown = flags & !known;
    if unknown != 0 {
        names.push(format!("{unknown:#x}"));
    }
    names
}

fn flag_names(flags: u16) -> String {
    let names = flag_list(flags);
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    }
}

/// The Kubernetes name of the frontend kind a master's flags carry.
pub fn kind_name(flags: u16) -> &'static str {
    if flags & service_flags::NODE_PORT != 0 {
        "NodePort"
    } else if flags & service_flags::LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else if flags & service_flags::EXTERNAL_IP != 0 {
        "ExternalIP"
    } else if flags & service_flags::CLUSTER_IP != 0 {
        "ClusterIP"
    } else {
        "unknown"
    }
}

/// The source ranges programmed for a rev-NAT id.
pub fn ranges_of(programmed: &Programmed, rev_nat_id: u32) -> Vec<Cidr> {
    programmed
        .source_ranges
        .range((rev_nat_id, Cidr::FIRST)..)
        .take_while(|(id, _)| *id == rev_nat_id)
        .map(|(_, range)| *range)
        .collect()
}

fn target(rev: &RevNatTarget) -> String {
    if rev.ip.is_ipv6() {
        format!("[{}]:{}", rev.ip, rev.port)
    } else {
        format!("{}:{}", rev.ip, rev.port)
    }
}

/// Renumbers ids in order of first use.
#[derive(Default)]
struct Renumber(BTreeMap<u32, usize>);

impl Renumber {
    fn get(&mut self, id: u32) -> usize {
        let next = self.0.len() + 1;
        *self.0.entry(id).or_insert(next)
    }
}

/// Renders the programmed state.
pub fn render(programmed: &Programmed) -> String {
    let mut out = String::new();
    let mut backends = Renumber::default();
    let mut rev_nats = Renumber::default();
    let mut with_master = BTreeSet::new();
    for (key, frontend) in &programmed.frontends {
        let scope = key.scope;
        match frontend.master {
            Some(master) => {
                let rev = rev_nats.get(master.rev_nat_id);
                let _ = writeln!(
                    out,
                    "frontend {key} scope={scope} flags={} affinity={}s count={} rev_nat=r{rev}{}",
                    flag_names(master.flags),
                    master.affinity_timeout_secs,
                    master.count,
                    programmed
                        .names
                        .get(&master.rev_nat_id)
                        .map_or_else(String::new, |name| format!(" service={name}")),
                );
                with_master.insert(master.rev_nat_id);
                if master.flags & service_flags::SOURCE_RANGES != 0 {
                    let ranges: Vec<String> = ranges_of(programmed, master.rev_nat_id)
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let _ = if ranges.is_empty() {
                        writeln!(out, "  source-ranges: none (new flows dropped)")
                    } else {
                        writeln!(out, "  source-ranges: {}", ranges.join(" "))
                    };
                }
            }
            None => {
                let _ = writeln!(out, "frontend {key} scope={scope} (no master entry)");
            }
        }
        for (slot, id) in &frontend.slots {
            let number = backends.get(*id);
            let address = programmed
                .backends
                .get(id)
                .map_or_else(|| "<missing>".to_owned(), ToString::to_string);
            let _ = writeln!(out, "  slot {slot}: b{number} {address}");
        }
    }
    let mut listed: Vec<(usize, String)> = programmed
        .rev_nats
        .iter()
        .map(|(id, rev)| (rev_nats.get(*id), target(rev)))
        .collect();
    listed.sort();
    for (number, rev) in listed {
        let _ = writeln!(out, "rev_nat r{number}: {rev}");
    }
    // Ranges no master refers to: leftovers an interrupted sync will remove.
    for (id, range) in programmed
        .source_ranges
        .iter()
        .filter(|(id, _)| !with_master.contains(id))
    {
        let _ = writeln!(
            out,
            "source_range r{} (no frontend): {range}",
            rev_nats.get(*id)
        );
    }
    let mut listed: Vec<(usize, String)> = programmed
        .backends
        .iter()
        .map(|(id, backend)| (backends.get(*id), backend.to_string()))
        .collect();
    listed.sort();
    for (number, backend) in listed {
        let _ = writeln!(out, "backend b{number}: {backend}");
    }
    out
}

/// Renders the datapath's reason counters.
/// What a service-guard entry does, in words.
pub fn guard_action(flags: u32) -> &'static str {
    if flags & guard_flags::CLUSTER_IP != 0 {
        "cluster-ip: other ports refused"
    } else if flags & guard_flags::OTHER_PROXY != 0 {
        "cluster-ip of another proxy: left alone"
    } else if flags & guard_flags::SERVICE_CIDR != 0 {
        "service-cidr: unallocated addresses dropped"
    } else {
        "none"
    }
}

/// The service-CIDR guard, one line per range (nothing when it is empty).
pub fn render_guard(guard: &BTreeMap<Cidr, u32>) -> String {
    let mut out = String::new();
    for (range, flags) in guard {
        let _ = writeln!(out, "guard {range}: {}", guard_action(*flags));
    }
    out
}

pub fn render_counters(counters: &[(&str, u64)]) -> String {
    let mut out = String::from("counters:");
    for (name, value) in counters {
        let _ = write!(out, " {name}={value}");
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{FrontendKey, Protocol, Scope, parse_cidr_lenient},
        plan::op::{Master, Op},
    };

    #[test]
    fn flags_read_kind_first_and_unknown_bits_in_hex() {
        let flags = service_flags::NO_LOCAL_ENDPOINTS | service_flags::NODE_PORT | 0x8000;
        assert_eq!(
            flag_list(flags),
            ["node-port", "no-local-endpoints", "0x8000"]
        );
        assert_eq!(kind_name(flags), "NodePort");
        assert_eq!(kind_name(service_flags::CLUSTER_IP), "ClusterIP");
    }

    #[test]
    fn source_ranges_show_under_their_frontend_and_leftovers_on_their_own() {
        let frontend = FrontendKey {
            ip: "1.2.3.4".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Local,
        };
        let mut programmed = Programmed::default();
        for op in [
            Op::UpsertSourceRange {
                rev_nat_id: 7,
                range: parse_cidr_lenient("203.0.113.0/25").unwrap(),
            },
            Op::UpsertSourceRange {
                rev_nat_id: 9,
                range: parse_cidr_lenient("10.0.0.0/8").unwrap(),
            },
            Op::UpsertMaster {
                frontend,
                master: Master {
                    count: 0,
                    rev_nat_id: 7,
                    flags: service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES,
                    affinity_timeout_secs: 0,
                    maglev_table: 0,
                },
            },
        ] {
            programmed.apply(&op);
        }
        let text = render(&programmed);
        assert!(
            text.starts_with(
                "frontend 1.2.3.4:80/TCP scope=local flags=load-balancer,source-ranges affinity=0s count=0 rev_nat=r1\n  source-ranges: 203.0.113.0/25\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("source_range r2 (no frontend): 10.0.0.0/8"),
            "{text}"
        );
    }
}
