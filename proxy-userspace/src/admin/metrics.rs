//! Prometheus text exposition of the agent's work (kube-proxy's metric names where the meaning
//! matches) and of the datapath's reason counters.
use std::{fmt::Write as _, time::UNIX_EPOCH};

use proxy_common::map_names;

use super::{
    healthcheck::HealthCheckCounters,
    stats::{Histogram, SyncStats},
};
use crate::datapath::fill::MapFill;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    header(out, name, "histogram", help);
    for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(out, "{name}_sum {}", histogram.sum);
    let _ = writeln!(out, "{name}_count {}", histogram.count);
}

fn simple(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// What the datapath reports at scrape time.
#[derive(Clone, Debug, Default)]
pub struct DatapathView<'a> {
    /// Reason counters summed over CPUs.
    pub reasons: &'a [(&'a str, u64)],
    /// Every tracked map's fill (datapath-written maps as last counted by the upkeep task).
    pub maps: &'a [MapFill],
}

/// Renders every metric.
pub fn render(stats: &SyncStats, datapath: &DatapathView<'_>) -> String {
    let mut out = String::new();
    histogram(
        &mut out,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds",
        &stats.sync_duration,
    );
    histogram(
        &mut out,
        "kubeproxy_network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds",
        &stats.programming_latency,
    );
    let last = stats
        .last_sync_at
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |since| since.as_secs_f64());
    simple(
        &mut out,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        "The last time proxy rules were successfully synced",
        last,
    );
    simple(
        &mut out,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        "Cumulative proxy rules EndpointSlice changes",
        stats.endpoint_changes_total,
    );
    simple(
        &mut out,
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        "Cumulative proxy rules Service changes",
        stats.service_changes_total,
    );
    header(
        &mut out,
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        "Number of services with a Local traffic policy and no endpoints",
    );
    let _ = writeln!(
        out,
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"internal\"}} {}",
        stats.no_local_endpoints
    );

    render_own(&mut out, stats, datapath);
    render_programming(&mut out, stats);
    render_sockets(&mut out, datapath);
    out
}

/// What the incremental control plane could not do: Services skipped (by reason; the others
/// are programmed) and full recomputations that disagreed with it.
fn render_programming(out: &mut String, stats: &SyncStats) {
    header(
        out,
        "switchyard_services_not_programmed",
        "gauge",
        "Services whose entries could not be written (map_full, too_large, kernel, ...); every other Service is programmed",
    );
    for reason in ["map_full", "too_large", "kernel", "missing_map"] {
        let count = stats.not_programmed.get(reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "switchyard_services_not_programmed{{reason=\"{reason}\"}} {count}"
        );
    }
    simple(
        out,
        "switchyard_model_divergences_total",
        "counter",
        "Full recomputations that disagreed with the incremental model (repaired; should stay 0)",
        stats.model_divergences_total,
    );
}

/// The healthCheckNodePort listeners; the agent appends this to [`render`]'s output (the
/// listener set keeps its own counters, read at scrape time).
pub fn render_health_checks(out: &mut String, counters: &HealthCheckCounters) {
    simple(
        out,
        "switchyard_health_check_node_ports",
        "gauge",
        "healthCheckNodePort listeners open",
        counters.listeners(),
    );
    simple(
        out,
        "switchyard_health_check_node_port_bind_failures_total",
        "counter",
        "Attempts to open a healthCheckNodePort that failed (port in use, no permission); retried at each sync",
        counters.bind_failures_total(),
    );
}

/// The socket load balancer's per-connection state (the TC path's flows: `inspect conntrack`),
/// as last counted by the upkeep task.
fn render_sockets(out: &mut String, datapath: &DatapathView<'_>) {
    header(
        out,
        "switchyard_socket_translations",
        "gauge",
        "Socket translations held for getpeername/recvmsg (the socket load balancer's connection tracking), counted every 10 s",
    );
    for (family, map) in [
        ("ipv4", map_names::SOCK_REV_NAT4),
        ("ipv6", map_names::SOCK_REV_NAT6),
    ] {
        if let Some(entries) = entries_of(datapath.maps, map) {
            let _ = writeln!(
                out,
                "switchyard_socket_translations{{family=\"{family}\"}} {entries}"
            );
        }
    }
}

fn entries_of(maps: &[MapFill], name: &str) -> Option<u64> {
    maps.iter()
        .find(|map| map.spec.name == name)
        .and_then(|map| map.entries)
}

/// Switchyard's own metrics: syncs, failures, bad input, map fill and datapath reasons.
fn render_own(out: &mut String, stats: &SyncStats, datapath: &DatapathView<'_>) {
    simple(
        out,
        "switchyard_syncs_total",
        "counter",
        "Successful syncs of the BPF maps",
        stats.syncs_total,
    );
    header(
        out,
        "switchyard_sync_errors_total",
        "counter",
        "Failed syncs by reason",
    );
    for reason in ["map_full", "kernel", "read", "injected"] {
        let count = stats.sync_errors_total.get(reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "switchyard_sync_errors_total{{reason=\"{reason}\"}} {count}"
        );
    }
    simple(
        out,
        "switchyard_invalid_object_parts_total",
        "counter",
        "Parts of Services or EndpointSlices skipped as invalid",
        stats.invalid_object_parts_total,
    );
    simple(
        out,
        "switchyard_skipped_documents_total",
        "counter",
        "Documents of the manifests file that could not be used",
        stats.skipped_documents_total,
    );
    header(
        out,
        "switchyard_bpf_map_entries",
        "gauge",
        "Entries in each BPF map (agent-written maps after each sync, datapath-written ones counted every 10 s)",
    );
    for map in datapath.maps {
        if let Some(entries) = map.entries {
            let name = map.spec.name;
            let _ = writeln!(
                out,
                "switchyard_bpf_map_entries{{map=\"{name}\"}} {entries}"
            );
        }
    }
    header(
        out,
        "switchyard_bpf_map_capacity",
        "gauge",
        "Capacity of each BPF map, as the kernel created it",
    );
    for map in datapath.maps {
        let (name, capacity) = (map.spec.name, map.capacity);
        let _ = writeln!(
            out,
            "switchyard_bpf_map_capacity{{map=\"{name}\"}} {capacity}"
        );
    }
    header(
        out,
        "switchyard_datapath_events_total",
        "counter",
        "Socket-hook outcomes by reason, from the datapath",
    );
    for (reason, count) in datapath.reasons {
        let _ = writeln!(
            out,
            "switchyard_datapath_events_total{{reason=\"{reason}\"}} {count}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn renders_kube_proxy_names_and_datapath_reasons() {
        let mut stats = SyncStats::default();
        stats.record_sync(2, Duration::from_millis(3), Some(Duration::from_millis(40)));
        stats.endpoint_changes_total = 5;
        stats.map_entries.insert(map_names::BACKENDS4, 7);
        stats.not_programmed.insert("map_full", 2);
        let fill = |name: &str, entries: Option<u64>, capacity: u32| MapFill {
            spec: proxy_common::map_table::spec(name).expect("a table map"),
            entries,
            capacity,
        };
        let maps = [
            fill(map_names::BACKENDS4, Some(7), 1024),
            fill(map_names::SOCK_REV_NAT4, Some(2), 4096),
            fill(map_names::SOCK_REV_NAT6, None, 4096),
        ];
        let text = render(
            &stats,
            &DatapathView {
                reasons: &[("translated", 11)],
                maps: &maps,
            },
        );
        for line in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.05\"} 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
            "switchyard_invalid_object_parts_total 2",
            "switchyard_bpf_map_entries{map=\"BACKEND4_V1\"} 7",
            "switchyard_datapath_events_total{reason=\"translated\"} 11",
            "switchyard_socket_translations{family=\"ipv4\"} 2",
            "switchyard_services_not_programmed{reason=\"map_full\"} 2",
            "switchyard_services_not_programmed{reason=\"too_large\"} 0",
            "switchyard_model_divergences_total 0",
            "switchyard_bpf_map_capacity{map=\"BACKEND4_V1\"} 1024",
            "switchyard_bpf_map_capacity{map=\"SOCK_NAT6_V1\"} 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // A map not counted yet has a capacity but no entries (rather than a false 0).
        for series in [
            "switchyard_bpf_map_entries{map=\"SOCK_NAT6_V1\"}",
            "switchyard_socket_translations{family=\"ipv6\"}",
        ] {
            assert!(!text.contains(series), "{series} in\n{text}");
        }
    }

    #[test]
    fn renders_health_check_listeners() {
        let mut text = String::new();
        render_health_checks(&mut text, &HealthCheckCounters::default());
        for line in [
            "# TYPE switchyard_health_check_node_ports gauge",
            "switchyard_health_check_node_ports 0",
            "switchyard_health_check_node_port_bind_failures_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
