//! Prometheus exposition of the agent's work (kube-proxy's metric names where the meaning
//! matches) and of the datapath's reason counters, through the `prometheus-client` crate.
//!
//! The agent keeps its own statistics ([`SyncStats`], the datapath's maps, the health-check
//! listeners' counters); a scrape takes a snapshot of them and a [`Collector`] encodes it in
//! the OpenMetrics text format. Counters are declared under their base name and exposed with
//! the `_total` suffix OpenMetrics requires, so every series keeps the name it always had.
use std::{fmt, time::UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use proxy_common::map_names;

use super::{
    healthcheck::HealthCheckCounters,
    stats::{Histogram, SyncStats},
};
use crate::datapath::fill::MapFill;

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the datapath reports at scrape time.
#[derive(Clone, Debug, Default)]
pub struct DatapathView {
    /// Reason counters summed over CPUs.
    pub reasons: Vec<(&'static str, u64)>,
    /// Every tracked map's fill (datapath-written maps as last counted by the upkeep task).
    pub maps: Vec<MapFill>,
}

impl DatapathView {
    /// The entries of a map, if they were counted.
    fn entries_of(&self, name: &str) -> Option<u64> {
        self.maps
            .iter()
            .find(|map| map.spec.name == name)
            .and_then(|map| map.entries)
    }
}

/// The health-check listeners' counters at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct HealthCheckView {
    pub listeners: u64,
    pub bind_failures_total: u64,
}

impl From<&HealthCheckCounters> for HealthCheckView {
    fn from(counters: &HealthCheckCounters) -> Self {
        Self {
            listeners: counters.listeners(),
            bind_failures_total: counters.bind_failures_total(),
        }
    }
}

/// Everything one scrape exposes.
#[derive(Debug)]
struct Scrape {
    stats: SyncStats,
    datapath: DatapathView,
    health_checks: Option<HealthCheckView>,
}

/// Renders every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn render(
    stats: SyncStats,
    datapath: DatapathView,
    health_checks: Option<HealthCheckView>,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        stats,
        datapath,
        health_checks,
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Encodes one metric family after another.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    /// A counter, declared under `name` (exposed as `name_total`).
    fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = ConstCounter::new(value);
        metric.encode(
            self.0
                .encode_descriptor(name, help, None, metric.metric_type())?,
        )
    }

    fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + fmt::Debug>(
        &mut self,
        name: &str,
        help: &str,
        value: N,
    ) -> fmt::Result
    where
        ConstGauge<N>: EncodeMetric,
    {
        let metric = ConstGauge::new(value);
        metric.encode(
            self.0
                .encode_descriptor(name, help, None, metric.metric_type())?,
        )
    }

    /// Series of one family, one per value of `label`.
    fn labelled<V: Copy>(
        &mut self,
        name: &str,
        help: &str,
        metric_type: MetricType,
        label: &str,
        series: &[(&str, V)],
        encode: impl Fn(V, prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result,
    ) -> fmt::Result {
        let mut family = self.0.encode_descriptor(name, help, None, metric_type)?;
        for (value, sample) in series {
            let labels = [(label, *value)];
            encode(*sample, family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn labelled_counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, u64)],
    ) -> fmt::Result {
        self.labelled(name, help, MetricType::Counter, label, series, |v, e| {
            ConstCounter::new(v).encode(e)
        })
    }

    fn labelled_gauges(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, u64)],
    ) -> fmt::Result {
        self.labelled(name, help, MetricType::Gauge, label, series, |v, e| {
            ConstGauge::new(v).encode(e)
        })
    }

    /// A histogram per label set.
    fn labelled_histograms(
        &mut self,
        name: &str,
        help: &str,
        series: &[(&[(&str, &str)], &Histogram)],
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, histogram) in series {
            family
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(
                    histogram.sum,
                    histogram.count,
                    &per_bucket(histogram),
                    None,
                )?;
        }
        Ok(())
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) -> fmt::Result {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        metric.encode_histogram::<NoLabelSet>(
            histogram.sum,
            histogram.count,
            &per_bucket(histogram),
            None,
        )
    }
}

/// The per-bucket counts (with the `+Inf` bucket) of a histogram that keeps cumulative ones.
fn per_bucket(histogram: &Histogram) -> Vec<(f64, u64)> {
    let mut previous = 0;
    let mut buckets: Vec<(f64, u64)> = histogram
        .bounds
        .iter()
        .zip(&histogram.counts)
        .map(|(bound, cumulative)| {
            let in_bucket = cumulative - previous;
            previous = *cumulative;
            (*bound, in_bucket)
        })
        .collect();
    buckets.push((f64::INFINITY, histogram.count - previous));
    buckets
}

/// Label values of a status-code counter: 200 and 503 always, others when seen.
fn by_code(counts: &std::collections::BTreeMap<u16, u64>) -> Vec<(String, u64)> {
    let mut codes: std::collections::BTreeMap<u16, u64> = [(200, 0), (503, 0)].into();
    for (code, count) in counts {
        codes.insert(*code, *count);
    }
    codes
        .into_iter()
        .map(|(code, count)| (code.to_string(), count))
        .collect()
}

fn borrowed(series: &[(String, u64)]) -> Vec<(&str, u64)> {
    series
        .iter()
        .map(|(label, value)| (label.as_str(), *value))
        .collect()
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let mut out = Out(encoder);
        self.kube_proxy(&mut out)?;
        self.own(&mut out)?;
        self.programming(&mut out)?;
        if let Some(health_checks) = &self.health_checks {
            out.gauge(
                "switchyard_health_check_node_ports",
                "healthCheckNodePort listeners open",
                health_checks.listeners,
            )?;
            out.counter(
                "switchyard_health_check_node_port_bind_failures",
                "Attempts to open a healthCheckNodePort that failed (port in use, no permission); retried at each sync",
                health_checks.bind_failures_total,
            )?;
        }
        self.sockets(&mut out)
    }
}

impl Scrape {
    /// kube-proxy's own metrics.
    fn kube_proxy(&self, out: &mut Out<'_>) -> fmt::Result {
        let stats = &self.stats;
        out.histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &stats.sync_duration,
        )?;
        out.histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &stats.programming_latency,
        )?;
        let last = stats
            .last_sync_at
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |since| since.as_secs_f64());
        out.gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last,
        )?;
        out.counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules EndpointSlice changes",
            stats.endpoint_changes_total,
        )?;
        out.counter(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            stats.service_changes_total,
        )?;
        // kube-proxy's name ends in _total although it is a gauge.
        out.labelled_gauges(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            "traffic_policy",
            &[("internal", stats.no_local_endpoints)],
        )?;
        out.labelled_counters(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            "code",
            &borrowed(&by_code(&stats.healthz_total)),
        )?;
        out.labelled_counters(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            "code",
            &borrowed(&by_code(&stats.livez_total)),
        )?;
        self.conntrack_reconciler(out)
    }

    /// kube-proxy's UDP conntrack reconciler metrics, for the TC path's own conntrack,
    /// labelled by IP family and protocol.
    fn conntrack_reconciler(&self, out: &mut Out<'_>) -> fmt::Result {
        let stats = &self.stats;
        let labels: [[(&str, &str); 2]; 2] = [
            [("ip_family", "IPv4"), ("protocol", "UDP")],
            [("ip_family", "IPv6"), ("protocol", "UDP")],
        ];
        out.labelled_histograms(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            &[
                (&labels[0], &stats.conntrack_reconcile_duration[0]),
                (&labels[1], &stats.conntrack_reconcile_duration[1]),
            ],
        )?;
        let mut deleted = out.0.encode_descriptor(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            None,
            MetricType::Counter,
        )?;
        for (family, labels) in labels.iter().enumerate() {
            ConstCounter::new(stats.conntrack_reconcile_deleted[family])
                .encode(deleted.encode_family(labels)?)?;
        }
        Ok(())
    }

    /// Switchyard's own metrics: syncs, failures, bad input, map fill and datapath reasons.
    fn own(&self, out: &mut Out<'_>) -> fmt::Result {
        let stats = &self.stats;
        out.counter(
            "switchyard_syncs",
            "Successful syncs of the BPF maps",
            stats.syncs_total,
        )?;
        let errors: Vec<(&str, u64)> = ["map_full", "kernel", "read", "injected"]
            .into_iter()
            .map(|reason| {
                (
                    reason,
                    stats.sync_errors_total.get(reason).copied().unwrap_or(0),
                )
            })
            .collect();
        out.labelled_counters(
            "switchyard_sync_errors",
            "Failed syncs by reason",
            "reason",
            &errors,
        )?;
        out.counter(
            "switchyard_invalid_object_parts",
            "Parts of Services or EndpointSlices skipped as invalid",
            stats.invalid_object_parts_total,
        )?;
        out.counter(
            "switchyard_skipped_documents",
            "Documents of the manifests file that could not be used",
            stats.skipped_documents_total,
        )?;
        let maps = &self.datapath.maps;
        let entries: Vec<(&str, u64)> = maps
            .iter()
            .filter_map(|map| Some((map.spec.name, map.entries?)))
            .collect();
        out.labelled_gauges(
            "switchyard_bpf_map_entries",
            "Entries in each BPF map (agent-written maps after each sync, datapath-written ones counted every 10 s)",
            "map",
            &entries,
        )?;
        let capacities: Vec<(&str, u64)> = maps
            .iter()
            .map(|map| (map.spec.name, u64::from(map.capacity)))
            .collect();
        out.labelled_gauges(
            "switchyard_bpf_map_capacity",
            "Capacity of each BPF map, as the kernel created it",
            "map",
            &capacities,
        )?;
        out.labelled_counters(
            "switchyard_datapath_events",
            "Socket-hook and TC outcomes by reason, from the datapath",
            "reason",
            &self.datapath.reasons,
        )
    }

    /// What the incremental control plane could not do: Services skipped (by reason; the
    /// others are programmed) and full recomputations that disagreed with it.
    fn programming(&self, out: &mut Out<'_>) -> fmt::Result {
        let stats = &self.stats;
        let skipped: Vec<(&str, u64)> = ["map_full", "too_large", "kernel", "missing_map"]
            .into_iter()
            .map(|reason| {
                (
                    reason,
                    stats.not_programmed.get(reason).copied().unwrap_or(0),
                )
            })
            .collect();
        out.labelled_gauges(
            "switchyard_services_not_programmed",
            "Services whose entries could not be written (map_full, too_large, kernel, ...); every other Service is programmed",
            "reason",
            &skipped,
        )?;
        out.counter(
            "switchyard_model_divergences",
            "Full recomputations that disagreed with the incremental model (repaired; should stay 0)",
            stats.model_divergences_total,
        )
    }

    /// The socket load balancer's per-connection state (the TC path's flows: `inspect
    /// conntrack`).
    fn sockets(&self, out: &mut Out<'_>) -> fmt::Result {
        let series: Vec<(&str, u64)> = [
            ("ipv4", map_names::SOCK_REV_NAT4),
            ("ipv6", map_names::SOCK_REV_NAT6),
        ]
        .into_iter()
        .filter_map(|(family, map)| Some((family, self.datapath.entries_of(map)?)))
        .collect();
        out.labelled_gauges(
            "switchyard_socket_translations",
            "Socket translations held for getpeername/recvmsg (the socket load balancer's connection tracking), counted every 10 s",
            "family",
            &series,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn renders_kube_proxy_names_and_datapath_reasons() {
        let mut stats = SyncStats::default();
        stats.record_sync(2, Duration::from_millis(3), Some(Duration::from_millis(40)));
        stats.endpoint_changes_total = 5;
        stats.not_programmed.insert("map_full", 2);
        stats.healthz_total.insert(503, 4);
        let fill = |name: &str, entries: Option<u64>, capacity: u32| MapFill {
            spec: proxy_common::map_table::spec(name).expect("a table map"),
            entries,
            capacity,
        };
        let text = render(
            stats,
            DatapathView {
                reasons: vec![("translated", 11)],
                maps: vec![
                    fill(map_names::BACKENDS4, Some(7), 1024),
                    fill(map_names::SERVICES4, Some(0), 262_144),
                    fill(map_names::SOCK_REV_NAT4, Some(2), 4096),
                    fill(map_names::SOCK_REV_NAT6, None, 4096),
                ],
            },
            None,
        );
        assert_lines(
            &text,
            &[
                "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
                "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.05\"} 1",
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.01\"} 0",
                "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
                "kubeproxy_sync_proxy_rules_service_changes_total 0",
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
                "kubeproxy_proxy_healthz_total{code=\"200\"} 0",
                "kubeproxy_proxy_healthz_total{code=\"503\"} 4",
                "kubeproxy_proxy_livez_total{code=\"200\"} 0",
                "switchyard_syncs_total 1",
                "switchyard_sync_errors_total{reason=\"map_full\"} 0",
                "switchyard_invalid_object_parts_total 2",
                "switchyard_bpf_map_entries{map=\"BACKEND4_V1\"} 7",
                "switchyard_bpf_map_capacity{map=\"SVC4_V1\"} 262144",
                "switchyard_datapath_events_total{reason=\"translated\"} 11",
                "switchyard_socket_translations{family=\"ipv4\"} 2",
                "switchyard_services_not_programmed{reason=\"map_full\"} 2",
                "switchyard_services_not_programmed{reason=\"too_large\"} 0",
                "switchyard_model_divergences_total 0",
                "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\",protocol=\"UDP\"} 0",
                "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv6\",protocol=\"UDP\"} 0",
                "# EOF",
            ],
        );
        assert!(
            !text.contains("switchyard_health_check_node_ports"),
            "listeners only when asked for"
        );
    }

    #[test]
    fn histogram_buckets_stay_cumulative() {
        let mut stats = SyncStats::default();
        for millis in [1, 3, 3, 5000] {
            stats.record_sync(0, Duration::from_millis(millis), None);
        }
        let text = render(stats, DatapathView::default(), None);
        assert_lines(
            &text,
            &[
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 1",
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 1",
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 3",
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 4",
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 4",
                "kubeproxy_sync_proxy_rules_duration_seconds_count 4",
            ],
        );
    }

    #[test]
    fn renders_health_check_listeners() {
        let text = render(
            SyncStats::default(),
            DatapathView::default(),
            Some(HealthCheckView {
                listeners: 1,
                bind_failures_total: 3,
            }),
        );
        assert_lines(
            &text,
            &[
                "# TYPE switchyard_health_check_node_ports gauge",
                "switchyard_health_check_node_ports 1",
                "switchyard_health_check_node_port_bind_failures_total 3",
            ],
        );
    }
}
