//! A readable dump of what is programmed, with ids renumbered in order of appearance so that
//! two equal dataplanes dump identically whatever ids they were given (golden tests, `dump`).
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    model::Scope,
    state::{Programmed, RevNatTarget},
};
use proxy_common::service_flags;

fn flag_names(flags: u16) -> String {
    let mut names = Vec::new();
    if flags & service_flags::CLUSTER_IP != 0 {
        names.push("cluster-ip".to_owned());
    }
    if flags & service_flags::NO_LOCAL_ENDPOINTS != 0 {
        names.push("no-local-endpoints".to_owned());
    }
    let unknown = flags & !(service_flags::CLUSTER_IP | service_flags::NO_LOCAL_ENDPOINTS);
    if unknown != 0 {
        names.push(format!("{unknown:#x}"));
    }
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    }
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
    for (key, frontend) in &programmed.frontends {
        let scope = match key.scope {
            Scope::Cluster => "cluster",
        };
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
pub fn render_counters(counters: &[(&str, u64)]) -> String {
    let mut out = String::from("counters:");
    for (name, value) in counters {
        let _ = write!(out, " {name}={value}");
    }
    out.push('\n');
    out
}
