//! `switchyard inspect`: what the pinned maps hold, named by Service, for an operator whose
//! traffic vanished. It reads the pins only, so it works with the agent stopped.
use std::{collections::BTreeMap, fmt::Write as _};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use proxy_common::{
    BPF_F_NO_PREALLOC, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, WireAddr,
    map_names,
    map_table::{self, MapKind},
    service_flags,
};
use serde_json::{Value, json};

use super::dump::{flag_list, kind_name, ranges_of};
use crate::{
    bpf::pins::PinLayout,
    datapath::{
        conntrack::{Conntrack, TrackedFlow, monotonic_now_ns},
        counters::DatapathCounters,
        fill,
    },
    maps::encode::{MapImage, decode_status},
    plan::{mirror::Programmed, op::RevNatTarget},
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
    /// The TC path's live flows.
    pub flows: Vec<TrackedFlow>,
    /// Direct Server Return flows whose endpoints are on this node.
    pub dsr_replies: Vec<crate::datapath::conntrack::DsrReply>,
    /// Every pinned map as the kernel holds it.
    pub maps: Vec<PinnedMap>,
}

/// One pinned map: what it is, how full and how big.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedMap {
    pub name: &'static str,
    pub kind: MapKind,
    /// Entries in use (`None` for arrays, whose slots always exist).
    pub entries: Option<usize>,
    /// Capacity, flags and memory as the kernel reports them (`None` if unreadable).
    pub capacity: Option<u32>,
    pub preallocated: Option<bool>,
    pub memory_bytes: Option<u64>,
}

/// Entries of every map with entries, from what `read` already walked.
fn entry_counts(
    image: &MapImage,
    sockets: &[SocketTranslation],
    conntrack: [(&'static str, usize); 4],
) -> BTreeMap<&'static str, usize> {
    let ipv6_sockets = sockets
        .iter()
        .filter(|s| s.backend.starts_with('['))
        .count();
    let mut counts = BTreeMap::from([
        (map_names::SERVICES4, image.services4.len()),
        (map_names::SERVICES6, image.services6.len()),
        (map_names::BACKENDS4, image.backends4.len()),
        (map_names::BACKENDS6, image.backends6.len()),
        (map_names::REV_NAT4, image.rev_nat4.len()),
        (map_names::REV_NAT6, image.rev_nat6.len()),
        (map_names::SERVICE_NAMES, image.service_names.len()),
        (map_names::AFFINITY, image.affinity.len()),
        (map_names::SOURCE_RANGES4, image.source_ranges4.len()),
        (map_names::SOURCE_RANGES6, image.source_ranges6.len()),
        (map_names::SOCK_REV_NAT4, sockets.len() - ipv6_sockets),
        (map_names::SOCK_REV_NAT6, ipv6_sockets),
    ]);
    counts.extend(conntrack);
    counts
}

/// Every pinned map of the table, with its fill, capacity, allocation and memory.
fn pinned_maps(pins: &PinLayout, entries: &BTreeMap<&'static str, usize>) -> Vec<PinnedMap> {
    map_table::pinned()
        .map(|spec| {
            let path = pins.map(spec.name);
            let info = MapInfo::from_pin(&path).ok();
            PinnedMap {
                name: spec.name,
                kind: spec.kind,
                entries: entries.get(spec.name).copied(),
                capacity: info.as_ref().map(MapInfo::max_entries),
                preallocated: info.as_ref().map(|info| {
                    spec.kind != MapKind::LpmTrie && info.map_flags() & BPF_F_NO_PREALLOC == 0
                }),
                memory_bytes: fill::memory_of_pin(&path),
            }
        })
        .collect()
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
        let backend = format!("{}:{}", key.address.to_ip(), u16::from_be(key.port_be));
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
        let backend = format!("[{}]:{}", key.address.to_ip(), u16::from_be(key.port_be));
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
    let conntrack = Conntrack::open_pinned(pins)?;
    let sockets = socket_translations(pins)?;
    let entries = entry_counts(&image, &sockets, conntrack.entry_counts());
    Ok(Inspection {
        programmed,
        image,
        counters,
        sockets,
        flows: conntrack.flows(monotonic_now_ns()),
        dsr_replies: crate::datapath::conntrack::dsr_replies(pins, monotonic_now_ns()),
        maps: pinned_maps(pins, &entries),
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
                "programmed": true,
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

/// Services the agent could not program, with the reason (from the status map).
pub fn not_programmed(inspection: &Inspection) -> Vec<Value> {
    inspection
        .image
        .service_status
        .iter()
        .map(|(key, status)| {
            let (service, reason, message) = decode_status(key, status);
            json!({"service": service, "programmed": false, "reason": reason, "message": message})
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

/// The socket translations (`"kind": "socket"`) and the TC path's live flows
/// (`"kind": "tc"`), named by Service.
pub fn conntrack(inspection: &Inspection) -> Vec<Value> {
    let sockets = inspection.sockets.iter().map(|socket| {
        let frontend = inspection
            .programmed
            .rev_nats
            .get(&socket.rev_nat_id)
            .map(target_text);
        json!({
            "kind": "socket",
            "socket_cookie": socket.cookie,
            "service": service_of(&inspection.programmed, socket.rev_nat_id),
            "frontend": frontend,
            "backend": socket.backend,
        })
    });
    let flows = inspection.flows.iter().map(|flow| {
        json!({
            "kind": "tc",
            "protocol": protocol_name(flow.protocol),
            "service": service_of(&inspection.programmed, flow.rev_nat_id),
            "client": flow.client.to_string(),
            "frontend": flow.frontend.to_string(),
            "translated_source": flow.translated_source.to_string(),
            "backend": flow.backend.to_string(),
            "masqueraded": flow.masqueraded(),
            "direct_server_return": flow.direct_server_return(),
            "state": flow.state(),
            "expires_in_seconds": flow.expires_in_ns / 1_000_000_000,
        })
    });
    let dsr_replies = inspection.dsr_replies.iter().map(|reply| {
        json!({
            "kind": "dsr-reply",
            "protocol": protocol_name(reply.protocol),
            "client": reply.client.to_string(),
            "frontend": reply.frontend.to_string(),
            "backend": reply.pod.to_string(),
            "expires_in_seconds": reply.expires_in_ns / 1_000_000_000,
        })
    });
    sockets.chain(flows).chain(dsr_replies).collect()
}

fn protocol_name(number: u8) -> String {
    match number {
        proxy_common::protocol::TCP => "tcp".to_owned(),
        proxy_common::protocol::UDP => "udp".to_owned(),
        other => other.to_string(),
    }
}

/// One map's row of `inspect stats`.
fn map_stats(map: &PinnedMap) -> Value {
    let fill_percent = match (map.entries, map.capacity) {
        (Some(entries), Some(capacity @ 1..)) => {
            Some((fill::percent(entries as u64, capacity) * 10.0).round() / 10.0)
        }
        _ => None,
    };
    json!({
        "map": map.name,
        "kind": map.kind.name(),
        "entries": map.entries,
        "capacity": map.capacity,
        "fill_percent": fill_percent,
        "preallocated": map.preallocated,
        "memory_bytes": map.memory_bytes,
    })
}

/// Reason counters and every map's fill against its capacity.
pub fn stats(inspection: &Inspection) -> Value {
    json!({
        "datapath": inspection.counters.iter().map(|(name, value)| (name.to_string(), json!(value))).collect::<serde_json::Map<_, _>>(),
        "maps": inspection.maps.iter().map(map_stats).collect::<Vec<_>>(),
    })
}

/// Bytes as KiB or MiB, for the table.
#[expect(
    clippy::cast_precision_loss,
    reason = "map sizes stay far below 2^52 bytes"
)]
fn memory_text(value: &Value) -> String {
    const MIB: u64 = 1024 * 1024;
    match value.as_u64() {
        None => "-".to_owned(),
        Some(bytes) if bytes < MIB => format!("{} KiB", bytes.div_ceil(1024)),
        Some(bytes) => format!("{:.1} MiB", bytes as f64 / MIB as f64),
    }
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

/// Socket translations, then TC flows, as two tables.
fn conntrack_table(inspection: &Inspection) -> String {
    let (sockets, others): (Vec<Value>, Vec<Value>) = conntrack(inspection)
        .into_iter()
        .partition(|item| item["kind"] == "socket");
    let (dsr_replies, flows): (Vec<Value>, Vec<Value>) = others
        .into_iter()
        .partition(|item| item["kind"] == "dsr-reply");
    let mut out = String::from(
        "# socket translations (the socket load balancer: one per connected socket)\n",
    );
    out.push_str(&table(
        &["SOCKET", "SERVICE", "FRONTEND", "BACKEND"],
        &rows(
            &sockets,
            &["socket_cookie", "service", "frontend", "backend"],
        ),
    ));
    out.push_str(
        "\n# TC flows (NodePort, externalIP and load-balancer IP traffic from outside the node)\n",
    );
    out.push_str(&table(
        &[
            "PROTO",
            "SERVICE",
            "CLIENT",
            "FRONTEND",
            "SOURCE SEEN BY BACKEND",
            "BACKEND",
            "STATE",
            "EXPIRES(S)",
        ],
        &rows(
            &flows,
            &[
                "protocol",
                "service",
                "client",
                "frontend",
                "translated_source",
                "backend",
                "state",
                "expires_in_seconds",
            ],
        ),
    ));
    if !dsr_replies.is_empty() {
        out.push_str(
            "\n# Direct Server Return replies (endpoints on this node answer the client from the frontend)\n",
        );
        out.push_str(&table(
            &["PROTO", "CLIENT", "FRONTEND", "BACKEND", "EXPIRES(S)"],
            &rows(
                &dsr_replies,
                &[
                    "protocol",
                    "client",
                    "frontend",
                    "backend",
                    "expires_in_seconds",
                ],
            ),
        ));
    }
    out
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
            let mut out = table(
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
            );
            let skipped = not_programmed(inspection);
            if !skipped.is_empty() {
                out.push_str("\nNOT PROGRAMMED (the agent could not write these Services; the others are unaffected)\n");
                out.push_str(&table(
                    &["SERVICE", "REASON", "MESSAGE"],
                    &rows(&skipped, &["service", "reason", "message"]),
                ));
            }
            out
        }
        "backends" => table(
            &["ID", "ADDRESS", "STATE", "SERVICES"],
            &rows(
                &backends(inspection),
                &["backend_id", "address", "state", "services"],
            ),
        ),
        "conntrack" => conntrack_table(inspection),
        _ => stats_table(inspection),
    }
}

/// Reason counters, then every map's fill, as two tables.
fn stats_table(inspection: &Inspection) -> String {
    let value = stats(inspection);
    let reasons: Vec<Vec<String>> = value["datapath"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, count)| vec![name.clone(), text(count)])
        .collect();
    let maps: Vec<Vec<String>> = value["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|map| {
            let fill = map["fill_percent"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |percent| format!("{percent:.1}%"));
            let preallocated = match map["preallocated"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            vec![
                text(&map["map"]),
                text(&map["kind"]),
                text(&map["entries"]),
                text(&map["capacity"]),
                fill,
                preallocated.to_owned(),
                memory_text(&map["memory_bytes"]),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        table(&["REASON", "COUNT"], &reasons),
        table(
            &[
                "MAP",
                "KIND",
                "ENTRIES",
                "CAPACITY",
                "FILL",
                "PREALLOCATED",
                "MEMORY"
            ],
            &maps
        )
    )
}

/// The JSON form of one inspection target.
pub fn render_json(target: &str, inspection: &Inspection) -> String {
    let value = match target {
        // Frontends first, then the Services that could not be programmed
        // (`"programmed": false`).
        "services" => Value::Array(
            services(inspection)
                .into_iter()
                .chain(not_programmed(inspection))
                .collect(),
        ),
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
        plan::op::{Master, Op},
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
            flows: Vec::new(),
            dsr_replies: Vec::new(),
            maps: Vec::new(),
        }
    }

    #[test]
    fn services_the_agent_could_not_program_are_listed_with_their_reason() {
        let mut inspection = inspection(&[]);
        inspection.image.apply(crate::maps::encode::status_write(
            "shop/huge",
            Some(("too_large", "it needs 70000 more entries in map SVC4_V1")),
        ));
        let table = render_table("services", &inspection);
        assert!(table.contains("NOT PROGRAMMED"), "{table}");
        assert!(table.contains("shop/huge"), "{table}");
        assert!(table.contains("too_large"), "{table}");
        let json: Value = serde_json::from_str(&render_json("services", &inspection)).unwrap();
        assert_eq!(
            json[0],
            json!({"service": "shop/huge", "programmed": false, "reason": "too_large", "message": "it needs 70000 more entries in map SVC4_V1"})
        );
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
            maglev_table: 0,
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
    fn stats_show_each_map_against_its_capacity_with_allocation_and_memory() {
        let mut inspection = inspection(&[]);
        inspection.maps = vec![
            PinnedMap {
                name: map_names::SERVICES4,
                kind: MapKind::Hash,
                entries: Some(3),
                capacity: Some(1024),
                preallocated: Some(false),
                memory_bytes: Some(16_648),
            },
            PinnedMap {
                name: map_names::CT4,
                kind: MapKind::LruHash,
                entries: Some(0),
                capacity: Some(131_072),
                preallocated: Some(true),
                memory_bytes: Some(14_680_064),
            },
            PinnedMap {
                name: map_names::METRICS,
                kind: MapKind::PerCpuArray,
                entries: None,
                capacity: Some(32),
                preallocated: Some(true),
                memory_bytes: None,
            },
        ];
        let value = stats(&inspection);
        let services = &value["maps"][0];
        assert_eq!(services["map"], "SVC4_V1");
        assert_eq!(services["kind"], "hash");
        assert_eq!(services["entries"], 3);
        assert_eq!(services["capacity"], 1024);
        assert_eq!(services["fill_percent"], 0.3);
        assert_eq!(services["preallocated"], false);
        assert_eq!(value["maps"][2]["fill_percent"], Value::Null);
        let table = render_table("stats", &inspection);
        let row = |name: &str| {
            table
                .lines()
                .find(|line| line.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row in\n{table}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(row("SVC4_V1"), "SVC4_V1 hash 3 1024 0.3% no 17 KiB");
        assert_eq!(row("CT4_V1"), "CT4_V1 lru_hash 0 131072 0.0% yes 14.0 MiB");
        assert_eq!(row("METRICS_V1"), "METRICS_V1 percpu_array - 32 - yes -");
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

    #[test]
    fn conntrack_lists_socket_translations_and_tc_flows_by_service() {
        let mut inspection = inspection(&[Op::UpsertName {
            id: 7,
            name: "web/front:http".into(),
        }]);
        inspection.sockets.push(SocketTranslation {
            cookie: 42,
            backend: "10.240.1.2:8080".into(),
            rev_nat_id: 7,
        });
        inspection.flows.push(TrackedFlow {
            protocol: proxy_common::protocol::TCP,
            client: "192.0.2.9:40000".parse().unwrap(),
            frontend: "192.0.2.1:30080".parse().unwrap(),
            translated_source: "10.240.1.1:61001".parse().unwrap(),
            backend: "10.240.1.2:8080".parse().unwrap(),
            rev_nat_id: 7,
            flags: proxy_common::ct_flags::SNAT | proxy_common::ct_flags::SEEN_REPLY,
            expires_in_ns: 86_399_500_000_000,
        });
        let items = conntrack(&inspection);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["kind"], "socket");
        assert_eq!(items[0]["socket_cookie"], 42);
        assert_eq!(items[0]["service"], "web/front:http");
        let flow = &items[1];
        assert_eq!(flow["kind"], "tc");
        assert_eq!(flow["protocol"], "tcp");
        assert_eq!(flow["service"], "web/front:http");
        assert_eq!(flow["client"], "192.0.2.9:40000");
        assert_eq!(flow["frontend"], "192.0.2.1:30080");
        assert_eq!(flow["translated_source"], "10.240.1.1:61001");
        assert_eq!(flow["backend"], "10.240.1.2:8080");
        assert_eq!(flow["masqueraded"], true);
        assert_eq!(flow["direct_server_return"], false);
        assert_eq!(flow["state"], "established");
        assert_eq!(flow["expires_in_seconds"], 86_399);
        let table = render_table("conntrack", &inspection);
        let flow_line = table
            .lines()
            .find(|line| line.starts_with("tcp"))
            .unwrap_or_else(|| panic!("no TC flow row in\n{table}"));
        for cell in [
            "web/front:http",
            "192.0.2.9:40000",
            "10.240.1.1:61001",
            "established",
        ] {
            assert!(flow_line.contains(cell), "{cell} missing from {flow_line}");
        }
    }

    #[test]
    fn conntrack_lists_dsr_flows_on_both_nodes_distinguishably() {
        let mut inspection = inspection(&[]);
        inspection.flows.push(TrackedFlow {
            protocol: proxy_common::protocol::TCP,
            client: "192.0.2.9:40000".parse().unwrap(),
            frontend: "192.0.2.1:30080".parse().unwrap(),
            translated_source: "192.0.2.9:40000".parse().unwrap(),
            backend: "10.240.2.2:8080".parse().unwrap(),
            rev_nat_id: 7,
            flags: proxy_common::ct_flags::DSR | proxy_common::ct_flags::SEEN_REPLY,
            expires_in_ns: 10_000_000_000,
        });
        inspection
            .dsr_replies
            .push(crate::datapath::conntrack::DsrReply {
                protocol: proxy_common::protocol::UDP,
                client: "192.0.2.8:41000".parse().unwrap(),
                pod: "10.240.1.3:8080".parse().unwrap(),
                frontend: "192.0.2.7:30081".parse().unwrap(),
                expires_in_ns: 120_000_000_000,
            });
        let items = conntrack(&inspection);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["direct_server_return"], true);
        assert_eq!(items[0]["masqueraded"], false);
        assert_eq!(items[1]["kind"], "dsr-reply");
        assert_eq!(items[1]["frontend"], "192.0.2.7:30081");
        assert_eq!(items[1]["backend"], "10.240.1.3:8080");
        assert_eq!(items[1]["expires_in_seconds"], 120);
        let table = render_table("conntrack", &inspection);
        let reply_line = table
            .lines()
            .skip_while(|line| !line.starts_with("# Direct Server Return"))
            .find(|line| line.starts_with("udp"))
            .unwrap_or_else(|| panic!("no DSR reply row in\n{table}"));
        assert!(reply_line.contains("192.0.2.7:30081"), "{reply_line}");
    }
}
