//! `switchyard inspect`: what the pinned maps hold, named by Service, for an operator whose
//! traffic vanished. It reads the pins only, so it works with the agent stopped.
use std::{collections::BTreeMap, fmt::Write as _};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{
    SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, capacity, map_names, service_flags,
};
use serde_json::{Value, json};

use crate::{
    bpf::{counters::DatapathCounters, pins::PinLayout},
    dump::{flag_list, kind_name, ranges_of},
    state::{MapImage, Programmed, RevNatTarget, v4_from_word, v6_from_words},
};

/// A socket translation the hooks recorded (the socket load balancer's connection tracking).
pub struct SocketTranslation {
    pub cookie: u64,
    pub backend: String,
    pub rev_nat_id: u32,
}

/// Everything `inspect` shows, read from the pins.
pub struct Inspection {
    pub programmed: Programmed,
    pub image: MapImage,
    pub counters: Vec<(&'static str, u64)>,
    pub sockets: Vec<SocketTranslation>,
}

fn open_lru<K: aya::Pod, V: aya::Pod>(
    pins: &PinLayout,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(pins.map(name))?;
    Ok(HashMap::try_from(Map::LruHashMap(data))?)
}

/// Reads the socket translations (both families).
fn socket_translations(pins: &PinLayout) -> anyhow::Result<Vec<SocketTranslation>> {
    let mut sockets = Vec::new();
    let nat4: HashMap<MapData, SockRevNat4Key, SockRevNat4> =
        open_lru(pins, map_names::SOCK_REV_NAT4)?;
    for entry in &nat4 {
        let (key, value) = entry?;
        let backend = format!(
            "{}:{}",
            v4_from_word(key.address),
            u16::from_be(key.port_be)
        );
        sockets.push(SocketTranslation {
            cookie: key.cookie,
            backend,
            rev_nat_id: value.rev_nat_id,
        });
    }
    let nat6: HashMap<MapData, SockRevNat6Key, SockRevNat6> =
        open_lru(pins, map_names::SOCK_REV_NAT6)?;
    for entry in &nat6 {
        let (key, value) = entry?;
        let backend = format!(
            "[{}]:{}",
            v6_from_words(key.address),
            u16::from_be(key.port_be)
        );
        sockets.push(SocketTranslation {
            cookie: key.cookie,
            backend,
            rev_nat_id: value.rev_nat_id,
        });
    }
    Ok(sockets)
}

/// Reads every pinned map `inspect` shows.
pub fn read(
    pins: &PinLayout,
    image: MapImage,
    programmed: Programmed,
) -> anyhow::Result<Inspection> {
    let counters = DatapathCounters::open_pinned(&pins.map(map_names::METRICS))?.read();
    Ok(Inspection {
        programmed,
        image,
        counters,
        sockets: socket_translations(pins)?,
    })
}

fn service_of(programmed: &Programmed, rev_nat_id: u32) -> String {
    programmed
        .names
        .get(&rev_nat_id)
        .cloned()
        .unwrap_or_else(|| "<unnamed>".to_owned())
}

fn target_text(target: &RevNatTarget) -> String {
    if target.ip.is_ipv6() {
        format!("[{}]:{}", target.ip, target.port)
    } else {
        format!("{}:{}", target.ip, target.port)
    }
}

/// What happens to a new connection or flow the frontend has no backend for.
fn outcome_when_empty(count: u16, flags: u16) -> &'static str {
    let socket_only = flags & service_flags::EXTERNAL == 0;
    match (count, flags & service_flags::NO_LOCAL_ENDPOINTS != 0) {
        (1.., _) => "balanced",
        // The socket hooks fail connect() at once; TC drops the packet or answers with a TCP
        // reset or ICMP port unreachable.
        (0, true) if socket_only => "drop (EHOSTUNREACH)",
        (0, false) if socket_only => "reject (ECONNREFUSED)",
        (0, true) => "drop",
        (0, false) => "reject",
    }
}

/// The frontends with their backends, as JSON values.
pub fn services(inspection: &Inspection) -> Vec<Value> {
    let programmed = &inspection.programmed;
    programmed
        .frontends
        .iter()
        .map(|(key, frontend)| {
            let master = frontend.master.unwrap_or_default();
            let backends: Vec<Value> = frontend
                .slots
                .iter()
                .filter(|(slot, _)| **slot <= master.count)
                .map(|(slot, id)| {
                    let address = programmed
                        .backends
                        .get(id)
                        .map_or_else(|| "<missing>".to_owned(), ToString::to_string);
                    json!({"slot": slot, "backend_id": id, "address": address, "state": "active"})
                })
                .collect();
            // Scope Local is the node-local backend set of an externalTrafficPolicy Local
            // frontend: what traffic from outside the cluster gets.
            let source_ranges: Option<Vec<String>> =
                (master.flags & service_flags::SOURCE_RANGES != 0).then(|| {
                    ranges_of(programmed, master.rev_nat_id)
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                });
            json!({
                "frontend": key.to_string(),
                "scope": key.scope.to_string(),
                "service": service_of(programmed, master.rev_nat_id),
                "type": kind_name(master.flags),
                "flags": flag_list(master.flags),
                "affinity_timeout_seconds": master.affinity_timeout_secs,
                "backend_count": master.count,
                "outcome_when_empty": outcome_when_empty(master.count, master.flags),
                "source_ranges": source_ranges,
                "backends": backends,
            })
        })
        .collect()
}

/// Every backend with the Services that use it.
pub fn backends(inspection: &Inspection) -> Vec<Value> {
    let programmed = &inspection.programmed;
    let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for frontend in programmed.frontends.values() {
        if let Some(master) = frontend.master {
            for id in frontend
                .slots
                .iter()
                .filter(|(slot, _)| **slot <= master.count)
                .map(|(_, id)| id)
            {
                users
                    .entry(*id)
                    .or_default()
                    .push(service_of(programmed, master.rev_nat_id));
            }
        }
    }
    programmed
        .backends
        .iter()
        .map(|(id, backend)| {
            json!({"backend_id": id, "address": backend.to_string(), "state": "active", "services": users.remove(id).unwrap_or_default()})
        })
        .collect()
}

/// The socket translations, named by Service.
pub fn conntrack(inspection: &Inspection) -> Vec<Value> {
    inspection
        .sockets
        .iter()
        .map(|socket| {
            let frontend = inspection
                .programmed
                .rev_nats
                .get(&socket.rev_nat_id)
                .map(target_text);
            json!({
                "socket_cookie": socket.cookie,
                "service": service_of(&inspection.programmed, socket.rev_nat_id),
                "frontend": frontend,
                "backend": socket.backend,
            })
        })
        .collect()
}

/// Reason counters and map fill.
pub fn stats(inspection: &Inspection) -> Value {
    let image = &inspection.image;
    let fill = |name: &str, entries: usize, capacity: u32| json!({"map": name, "entries": entries, "capacity": capacity});
    json!({
        "datapath": inspection.counters.iter().map(|(name, value)| (name.to_string(), json!(value))).collect::<serde_json::Map<_, _>>(),
        "maps": [
            fill(map_names::SERVICES4, image.services4.len(), capacity::SERVICES),
            fill(map_names::SERVICES6, image.services6.len(), capacity::SERVICES),
            fill(map_names::BACKENDS4, image.backends4.len(), capacity::BACKENDS),
            fill(map_names::BACKENDS6, image.backends6.len(), capacity::BACKENDS),
            fill(map_names::REV_NAT4, image.rev_nat4.len(), capacity::REV_NAT),
            fill(map_names::REV_NAT6, image.rev_nat6.len(), capacity::REV_NAT),
            fill(map_names::AFFINITY, image.affinity.len(), capacity::AFFINITY),
            fill(map_names::SOURCE_RANGES4, image.source_ranges4.len(), capacity::SOURCE_RANGES),
            fill(map_names::SOURCE_RANGES6, image.source_ranges6.len(), capacity::SOURCE_RANGES),
            fill(map_names::SOCK_REV_NAT4, inspection.sockets.iter().filter(|s| !s.backend.starts_with('[')).count(), capacity::SOCK_REV_NAT),
            fill(map_names::SOCK_REV_NAT6, inspection.sockets.iter().filter(|s| s.backend.starts_with('[')).count(), capacity::SOCK_REV_NAT),
        ],
    })
}

/// Renders rows as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn rows(items: &[Value], fields: &[&str]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|item| fields.iter().map(|field| text(&item[*field])).collect())
        .collect()
}

/// The table form of one inspection target.
pub fn render_table(target: &str, inspection: &Inspection) -> String {
    match target {
        "services" => {
            let items: Vec<Value> = services(inspection)
                .into_iter()
                .map(|mut item| {
                    let addresses: Vec<Value> = item["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| b["address"].clone())
                        .collect();
                    item["backends"] = Value::Array(addresses);
                    item
                })
                .collect();
            let fields = [
                "frontend",
                "scope",
                "service",
                "type",
                "flags",
                "affinity_timeout_seconds",
                "backend_count",
                "outcome_when_empty",
                "source_ranges",
                "backends",
            ];
            table(
                &[
                    "FRONTEND",
                    "SCOPE",
                    "SERVICE",
                    "TYPE",
                    "FLAGS",
                    "AFFINITY(S)",
                    "COUNT",
                    "OUTCOME",
                    "SOURCE RANGES",
                    "BACKENDS",
                ],
                &rows(&items, &fields),
            )
        }
        "backends" => table(
            &["ID", "ADDRESS", "STATE", "SERVICES"],
            &rows(
                &backends(inspection),
                &["backend_id", "address", "state", "services"],
            ),
        ),
        "conntrack" => {
            let mut out = String::from(
                "# socket translations (the socket load balancer tracks connections per socket; TC conntrack comes with the TC path)\n",
            );
            out.push_str(&table(
                &["SOCKET", "SERVICE", "FRONTEND", "BACKEND"],
                &rows(
                    &conntrack(inspection),
                    &["socket_cookie", "service", "frontend", "backend"],
                ),
            ));
            out
        }
        _ => {
            let value = stats(inspection);
            let reasons: Vec<Vec<String>> = value["datapath"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, count)| vec![name.clone(), text(count)])
                .collect();
            let maps = rows(
                value["maps"].as_array().map_or(&[][..], Vec::as_slice),
                &["map", "entries", "capacity"],
            );
            format!(
                "{}\n{}",
                table(&["REASON", "COUNT"], &reasons),
                table(&["MAP", "ENTRIES", "CAPACITY"], &maps)
            )
        }
    }
}

/// The JSON form of one inspection target.
pub fn render_json(target: &str, inspection: &Inspection) -> String {
    let value = match target {
        "services" => Value::Array(services(inspection)),
        "backends" => Value::Array(backends(inspection)),
        "conntrack" => Value::Array(conntrack(inspection)),
        _ => stats(inspection),
    };
    serde_json::to_string_pretty(&value).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{FrontendKey, Protocol, Scope, parse_cidr_lenient},
        state::{Master, Op},
    };

    fn inspection(ops: &[Op]) -> Inspection {
        let mut programmed = Programmed::default();
        for op in ops {
            programmed.apply(op);
        }
        Inspection {
            programmed,
            image: MapImage::default(),
            counters: Vec::new(),
            sockets: Vec::new(),
        }
    }

    #[test]
    fn services_show_the_scope_kind_outcome_and_source_ranges_of_external_frontends() {
        let cluster = FrontendKey {
            ip: "1.2.3.4".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Cluster,
        };
        let local = FrontendKey {
            scope: Scope::Local,
            ..cluster
        };
        let master = |flags| Master {
            count: 0,
            rev_nat_id: 1,
            flags,
            affinity_timeout_secs: 0,
        };
        let lb = service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES;
        let inspection = inspection(&[
            Op::UpsertName {
                id: 1,
                name: "p/lb:http".into(),
            },
            Op::UpsertSourceRange {
                rev_nat_id: 1,
                range: parse_cidr_lenient("203.0.113.0/25").unwrap(),
            },
            Op::UpsertMaster {
                frontend: cluster,
                master: master(lb | service_flags::EXTERNAL_LOCAL),
            },
            Op::UpsertMaster {
                frontend: local,
                master: master(lb | service_flags::NO_LOCAL_ENDPOINTS),
            },
        ]);
        let items = services(&inspection);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["scope"], "cluster");
        assert_eq!(items[0]["type"], "LoadBalancer");
        assert_eq!(items[0]["outcome_when_empty"], "reject");
        assert_eq!(items[1]["scope"], "local");
        assert_eq!(items[1]["service"], "p/lb:http");
        assert_eq!(items[1]["outcome_when_empty"], "drop");
        assert_eq!(items[1]["source_ranges"], json!(["203.0.113.0/25"]));
        let table = render_table("services", &inspection);
        assert!(
            table.lines().any(|line| line.starts_with("1.2.3.4:80/TCP")
                && line.contains("local")
                && line.contains("LoadBalancer")),
            "{table}"
        );
    }

    #[test]
    fn a_clusterip_keeps_its_socket_outcomes() {
        assert_eq!(
            outcome_when_empty(0, service_flags::CLUSTER_IP),
            "reject (ECONNREFUSED)"
        );
        assert_eq!(
            outcome_when_empty(
                0,
                service_flags::CLUSTER_IP | service_flags::NO_LOCAL_ENDPOINTS
            ),
            "drop (EHOSTUNREACH)"
        );
        assert_eq!(outcome_when_empty(2, service_flags::NODE_PORT), "balanced");
    }
}
