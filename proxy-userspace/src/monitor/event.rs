//! One datapath decision as `switchyard monitor` shows it: decoded from the ring buffer's
//! [`MonitorEvent`], named (the Service, the reason in words), filtered, and rendered as a table
//! row or a JSON line.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use proxy_common::{MonitorEvent, WireAddr, monitor_hook, monitor_kind, protocol, reason};
use serde_json::json;

use crate::cli::Verdict;

/// A decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub time: SystemTime,
    pub verdict: Verdict,
    /// The reason code's name (`no_backend`, `guard_dropped`, ...).
    pub reason: &'static str,
    pub hook: &'static str,
    pub protocol: &'static str,
    /// `namespace/name:port` of the frontend's Service, when the destination is one.
    pub service: Option<String>,
    /// What the client addressed.
    pub frontend: SocketAddr,
    /// TC: the client as the packet arrived.
    pub client: Option<SocketAddr>,
    /// TC: the source the backend sees (a node address when masqueraded).
    pub translated_source: Option<SocketAddr>,
    pub backend: Option<SocketAddr>,
    /// Socket hooks: the calling process and its network namespace.
    pub process: Option<Process>,
}

/// The caller of a socket hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
}

fn address(family: u8, words: [u32; 4], port_be: u16) -> SocketAddr {
    if family == 6 {
        words.socket(port_be)
    } else {
        words[0].socket(port_be)
    }
}

fn verdict(kind: u8) -> Option<Verdict> {
    Some(match kind {
        monitor_kind::SOCK_TRANSLATED => Verdict::Translated,
        monitor_kind::TC_NEW_FLOW => Verdict::NewFlow,
        monitor_kind::SOCK_REFUSED | monitor_kind::TC_REJECTED => Verdict::Refused,
        monitor_kind::SOCK_DROPPED | monitor_kind::TC_DROPPED => Verdict::Dropped,
        monitor_kind::SOCK_UNTRANSLATED => Verdict::Untranslated,
        _ => return None,
    })
}

/// The verdict's name, as `--verdict` spells it.
pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Translated => "translated",
        Verdict::NewFlow => "new-flow",
        Verdict::Refused => "refused",
        Verdict::Dropped => "dropped",
        Verdict::Untranslated => "untranslated",
    }
}

/// Converts the datapath's monotonic clock to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub wall: SystemTime,
    pub monotonic_ns: u64,
}

impl Clock {
    fn at(&self, monotonic_ns: u64) -> SystemTime {
        if monotonic_ns >= self.monotonic_ns {
            self.wall + Duration::from_nanos(monotonic_ns - self.monotonic_ns)
        } else {
            self.wall - Duration::from_nanos(self.monotonic_ns - monotonic_ns)
        }
    }
}

/// Decodes an event; `None` for a kind this monitor does not know (a newer datapath).
pub fn decode(
    event: &MonitorEvent,
    clock: &Clock,
    service: impl FnOnce(u32) -> Option<String>,
) -> Option<Record> {
    let verdict = verdict(event.kind)?;
    let socket = event.hook != monitor_hook::TC_INGRESS;
    let family = event.family;
    let backend = (event.backend_port_be != 0 || event.backend != [0; 4])
        .then(|| address(family, event.backend, event.backend_port_be));
    let comm_len = event
        .comm
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(event.comm.len());
    Some(Record {
        time: clock.at(event.timestamp_ns),
        verdict,
        reason: reason::NAMES
            .get(usize::from(event.reason))
            .copied()
            .unwrap_or("unknown"),
        hook: match event.hook {
            monitor_hook::CONNECT => "connect",
            monitor_hook::SENDMSG => "sendmsg",
            monitor_hook::TC_INGRESS => "tc",
            _ => "unknown",
        },
        protocol: match event.protocol {
            protocol::TCP => "TCP",
            protocol::UDP => "UDP",
            _ => "other",
        },
        service: (event.rev_nat_id != 0)
            .then(|| service(event.rev_nat_id))
            .flatten(),
        frontend: address(family, event.dst, event.dst_port_be),
        client: (!socket).then(|| address(family, event.src, event.src_port_be)),
        translated_source: (event.kind == monitor_kind::TC_NEW_FLOW)
            .then(|| address(family, event.nat_src, event.nat_src_port_be)),
        backend,
        process: socket.then(|| Process {
            pid: u32::try_from(event.pid_tgid >> 32).unwrap_or(0),
            comm: String::from_utf8_lossy(&event.comm[..comm_len]).into_owned(),
            netns_cookie: event.netns_cookie,
            socket_cookie: event.socket_cookie,
        }),
    })
}

/// Why the datapath decided so, in words (the question "why was my connection refused"
/// answered from the monitor's output alone).
pub fn explanation(record: &Record) -> String {
    let port = record.frontend.port();
    match record.reason {
        "translated" => "sent to a backend of the Service".into(),
        "tc_new_flow" => "new flow tracked and translated to a backend".into(),
        "no_backend" => "the Service has no usable endpoint anywhere (kube-proxy's REJECT)".into(),
        "no_local_endpoint" | "tc_dropped_no_local_endpoint" => {
            "the Service has endpoints, but its traffic policy (Local) leaves none on this node (kube-proxy's DROP)".into()
        }
        "guard_rejected" | "tc_guard_rejected" => format!(
            "{} is an active ClusterIP, but port {port}/{} is none of its Service's (nftables mode's REJECT)",
            record.frontend.ip(),
            record.protocol
        ),
        "guard_dropped" | "tc_guard_dropped" => format!(
            "{} is inside a ServiceCIDR but no Service holds it (nftables mode's DROP)",
            record.frontend.ip()
        ),
        "tc_dropped_source_range" | "sock_source_range_dropped" => {
            "the client is outside the Service's loadBalancerSourceRanges".into()
        }
        "host_external_ip_bypassed" => format!(
            "{} is an externalIP equal to this node's or the API server's address: not translated for the node's own processes (CVE-2020-8554)",
            record.frontend.ip()
        ),
        "tc_snat_exhausted" => "no free port in --snat-port-range to masquerade the flow".into(),
        "tc_ct_store_failed" => "the conntrack map is full or refused the entry".into(),
        other => other.replace('_', " "),
    }
}

/// What `monitor` shows (filters from its flags).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `namespace/name` or `namespace/name:port`.
    pub service: Option<String>,
    pub address: Option<IpAddr>,
    /// Empty: every verdict.
    pub verdicts: Vec<Verdict>,
}

impl Filter {
    pub fn accepts(&self, record: &Record) -> bool {
        if !self.verdicts.is_empty() && !self.verdicts.contains(&record.verdict) {
            return false;
        }
        if let Some(wanted) = &self.service {
            let Some(service) = &record.service else {
                return false;
            };
            let matches = service == wanted
                || service
                    .strip_prefix(wanted.as_str())
                    .is_some_and(|rest| rest.starts_with(':'));
            if !matches {
                return false;
            }
        }
        if let Some(ip) = self.address {
            let addresses = [
                Some(record.frontend),
                record.client,
                record.translated_source,
                record.backend,
            ];
            if !addresses.iter().flatten().any(|address| address.ip() == ip) {
                return false;
            }
        }
        true
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn caller(record: &Record) -> String {
    match (&record.process, record.client) {
        (Some(process), _) => format!(
            "pid {} ({}) netns {}",
            process.pid, process.comm, process.netns_cookie
        ),
        (None, Some(client)) => client.to_string(),
        (None, None) => "-".into(),
    }
}

/// The table's header line.
pub const TABLE_HEADER: &str = "TIME                      VERDICT       HOOK     PROTO  CLIENT                              FRONTEND                    SERVICE                   BACKEND                     WHY";

/// One table row.
pub fn table_row(record: &Record) -> String {
    let mut backend = record
        .backend
        .map_or_else(|| "-".to_owned(), |backend| backend.to_string());
    if let Some(source) = record.translated_source
        && Some(source) != record.client
    {
        let _ = write!(backend, " (from {source})");
    }
    format!(
        "{:<25} {:<13} {:<8} {:<6} {:<35} {:<27} {:<25} {:<27} {}",
        rfc3339(record.time),
        verdict_name(record.verdict),
        record.hook,
        record.protocol,
        caller(record),
        record.frontend.to_string(),
        record.service.as_deref().unwrap_or("-"),
        backend,
        explanation(record)
    )
}

/// One JSON line.
pub fn json_line(record: &Record) -> String {
    let process = record.process.as_ref();
    json!({
        "time": rfc3339(record.time),
        "verdict": verdict_name(record.verdict),
        "reason": record.reason,
        "why": explanation(record),
        "hook": record.hook,
        "protocol": record.protocol,
        "service": record.service,
        "frontend": record.frontend.to_string(),
        "client": record.client.map(|client| client.to_string()),
        "translated_source": record.translated_source.map(|source| source.to_string()),
        "backend": record.backend.map(|backend| backend.to_string()),
        "pid": process.map(|p| p.pid),
        "comm": process.map(|p| p.comm.clone()),
        "netns_cookie": process.map(|p| p.netns_cookie),
        "socket_cookie": process.map(|p| p.socket_cookie),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(ip: [u8; 4]) -> u32 {
        u32::from_ne_bytes(ip)
    }

    fn clock() -> Clock {
        Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            monotonic_ns: 5_000_000_000,
        }
    }

    fn refused_connect() -> MonitorEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        MonitorEvent {
            timestamp_ns: 6_000_000_000,
            socket_cookie: 77,
            netns_cookie: 4099,
            pid_tgid: (1234u64 << 32) | 0x04d2,
            rev_nat_id: 0,
            kind: monitor_kind::SOCK_REFUSED,
            reason: u8::try_from(reason::GUARD_REJECTED).unwrap(),
            family: 4,
            protocol: protocol::TCP,
            hook: monitor_hook::CONNECT,
            dst: [word([10, 96, 0, 10]), 0, 0, 0],
            dst_port_be: 81u16.to_be(),
            comm,
            ..MonitorEvent::default()
        }
    }

    #[test]
    fn a_refused_connect_says_which_process_what_and_why() {
        let record = decode(&refused_connect(), &clock(), |_| None).expect("known kind");
        assert_eq!(record.verdict, Verdict::Refused);
        assert_eq!(record.hook, "connect");
        assert_eq!(record.frontend.to_string(), "10.96.0.10:81");
        assert_eq!(record.time, clock().wall + Duration::from_secs(1));
        let process = record.process.as_ref().expect("a socket event");
        assert_eq!((process.pid, process.comm.as_str()), (1234, "curl"));
        let why = explanation(&record);
        assert!(
            why.contains("active ClusterIP") && why.contains("port 81/TCP"),
            "{why}"
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&record)).unwrap();
        assert_eq!(json["verdict"], "refused");
        assert_eq!(json["reason"], "guard_rejected");
        assert_eq!(json["pid"], 1234);
        assert!(table_row(&record).contains("pid 1234 (curl)"));
    }

    #[test]
    fn a_tc_flow_shows_client_translated_source_and_backend() {
        let event = MonitorEvent {
            timestamp_ns: 5_000_000_000,
            rev_nat_id: 9,
            backend_id: 3,
            kind: monitor_kind::TC_NEW_FLOW,
            reason: u8::try_from(reason::TC_NEW_FLOW).unwrap(),
            family: 6,
            protocol: protocol::UDP,
            hook: monitor_hook::TC_INGRESS,
            src: [0x0db8_0120, 0, 0, 0x0200_0000],
            src_port_be: 4000u16.to_be(),
            dst: [0x0db8_0120, 0, 0, 0x0100_0000],
            dst_port_be: 30053u16.to_be(),
            nat_src: [0x0db8_0120, 0, 0, 0x0300_0000],
            nat_src_port_be: 61000u16.to_be(),
            backend: [0x0db8_0120, 0, 0, 0x0400_0000],
            backend_port_be: 53u16.to_be(),
            ..MonitorEvent::default()
        };
        let record = decode(&event, &clock(), |id| {
            (id == 9).then(|| "dns/resolver:dns".to_owned())
        })
        .unwrap();
        assert_eq!(record.verdict, Verdict::NewFlow);
        assert_eq!(record.service.as_deref(), Some("dns/resolver:dns"));
        assert!(record.client.is_some() && record.process.is_none());
        assert_eq!(record.backend.unwrap().port(), 53);
        assert_eq!(record.translated_source.unwrap().port(), 61000);
        let filter = |service: Option<&str>, address: Option<IpAddr>, verdicts: Vec<Verdict>| {
            Filter {
                service: service.map(str::to_owned),
                address,
                verdicts,
            }
            .accepts(&record)
        };
        assert!(filter(Some("dns/resolver"), None, vec![]));
        assert!(filter(Some("dns/resolver:dns"), None, vec![]));
        assert!(
            !filter(Some("dns/resolve"), None, vec![]),
            "no prefix match"
        );
        assert!(filter(None, Some(record.backend.unwrap().ip()), vec![]));
        assert!(!filter(None, Some("10.0.0.1".parse().unwrap()), vec![]));
        assert!(filter(None, None, vec![Verdict::NewFlow, Verdict::Dropped]));
        assert!(!filter(None, None, vec![Verdict::Refused]));
    }

    #[test]
    fn an_unknown_kind_is_skipped() {
        let event = MonitorEvent {
            kind: 200,
            ..refused_connect()
        };
        assert!(decode(&event, &clock(), |_| None).is_none());
    }
}
