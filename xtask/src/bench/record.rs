//! The vocabulary of results: what is measured ([`Metric`]) and one measured quantity
//! ([`Record`]). The report and the plots both read it; neither owns it.

use serde::Serialize;

use super::modes::Mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    ConnectLatency,
    ConnPerS,
    /// Connections per second of one run of the profile's sustained connection count.
    SustainedConnPerS,
    /// Connections that failed over every connections-per-second run, the sustained one
    /// included.
    ConnFailed,
    Throughput,
    /// From empty to everything programmed, as the mode's user waits for it (the agent: from
    /// its start to its first `dataplane synced` line).
    ProgramAll,
    /// One endpoint change, wall time (kube-proxy: the partial-sync restore; the agent on a
    /// manifests file: from rewriting the file to the next `dataplane synced` line).
    UpdateOne,
    AgentRss,
    MapMemory,
    /// The agent's own duration of the sync that programs everything from empty.
    ProgramSync,
    /// The agent's own duration of the sync that applies one endpoint change.
    ChangeSync,
    /// Agent CPU time (all threads, user + system) spent on one endpoint change.
    ChangeCpu,
    /// From the API server sending the watch event of an endpoint change to the new backend
    /// set being readable in the pinned services map.
    EventToMaps,
    /// Latency of GET /healthz while endpoints change ten times a second.
    HealthzChurn,
    /// The agent's Maglev table build for one backend set (1 000 backends, M = 16381), run
    /// on its own: one record per run, not per scale point.
    MaglevRebuild,
}

impl Metric {
    pub const ALL: [Self; 15] = [
        Self::ConnectLatency,
        Self::ConnPerS,
        Self::SustainedConnPerS,
        Self::ConnFailed,
        Self::Throughput,
        Self::ProgramAll,
        Self::UpdateOne,
        Self::AgentRss,
        Self::MapMemory,
        Self::ProgramSync,
        Self::ChangeSync,
        Self::ChangeCpu,
        Self::EventToMaps,
        Self::HealthzChurn,
        Self::MaglevRebuild,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectLatency => "connect_latency_us",
            Self::ConnPerS => "conn_per_s",
            Self::SustainedConnPerS => "sustained_conn_per_s",
            Self::ConnFailed => "conn_failed",
            Self::Throughput => "throughput_gbps",
            Self::ProgramAll => "program_all_s",
            Self::UpdateOne => "update_one_s",
            Self::AgentRss => "agent_rss_mb",
            Self::MapMemory => "map_memory_mb",
            Self::ProgramSync => "program_sync_s",
            Self::ChangeSync => "change_sync_ms",
            Self::ChangeCpu => "change_cpu_ms",
            Self::EventToMaps => "event_to_maps_ms",
            Self::HealthzChurn => "healthz_churn_ms",
            Self::MaglevRebuild => "maglev_rebuild_ms",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::ConnectLatency => "us",
            Self::ConnPerS | Self::SustainedConnPerS => "1/s",
            Self::ConnFailed => "connections",
            Self::Throughput => "Gbit/s",
            Self::ProgramAll | Self::UpdateOne | Self::ProgramSync => "s",
            Self::ChangeSync
            | Self::ChangeCpu
            | Self::EventToMaps
            | Self::HealthzChurn
            | Self::MaglevRebuild => "ms",
            Self::AgentRss | Self::MapMemory => "MiB",
        }
    }

    /// Whether `mode` has a record of this metric at all (a record may still lack a value,
    /// with a note saying why).
    pub fn applies_to(self, mode: Mode) -> bool {
        // The two-node modes are programmed once by agents following the API server: only
        // their connections are measured.
        if mode.is_two_node() {
            return matches!(
                self,
                Self::ConnectLatency
                    | Self::ConnPerS
                    | Self::SustainedConnPerS
                    | Self::ConnFailed
                    | Self::Throughput
            );
        }
        match self {
            Self::ConnectLatency
            | Self::ConnPerS
            | Self::SustainedConnPerS
            | Self::ConnFailed
            | Self::Throughput
            | Self::UpdateOne => mode != Mode::SwitchyardApi,
            Self::ProgramAll | Self::AgentRss | Self::MapMemory => true,
            Self::ProgramSync | Self::ChangeSync | Self::ChangeCpu => mode.is_switchyard(),
            Self::EventToMaps | Self::HealthzChurn | Self::MaglevRebuild => {
                mode == Mode::SwitchyardApi
            }
        }
    }

    /// Whether the metric is measured at every scale point (all but the Maglev rebuild,
    /// which does not depend on the number of Services).
    pub fn per_scale_point(self) -> bool {
        self != Self::MaglevRebuild
    }

    /// Whether a record of this metric for `mode` must carry a value when nothing failed
    /// (the smoke's completeness check).
    pub fn expected_for(self, mode: Mode) -> bool {
        if !self.applies_to(mode) {
            return false;
        }
        match self {
            Self::ProgramAll | Self::UpdateOne => mode != Mode::Direct,
            Self::AgentRss | Self::MapMemory => mode.is_switchyard(),
            _ => true,
        }
    }
}

/// One measured quantity; `None` values are written as JSON null.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub mode: &'static str,
    pub services: usize,
    pub endpoints_per_service: usize,
    pub metric: &'static str,
    pub unit: &'static str,
    pub value: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub reps: usize,
    pub ratio_to_direct: Option<f64>,
    pub ratio_min: Option<f64>,
    pub ratio_max: Option<f64>,
    /// For `switchyard-dsr`: median over repetitions of its value / `switchyard-tc-2node`'s
    /// in the same repetition (same path, masqueraded), and the range.
    pub ratio_to_masquerade: Option<f64>,
    pub ratio_to_masquerade_min: Option<f64>,
    pub ratio_to_masquerade_max: Option<f64>,
    pub note: Option<String>,
}

impl Record {
    pub fn new(mode: Mode, services: usize, endpoints: usize, metric: Metric) -> Self {
        Self {
            mode: mode.name(),
            services,
            endpoints_per_service: endpoints,
            metric: metric.name(),
            unit: metric.unit(),
            value: None,
            p50: None,
            p99: None,
            reps: 0,
            ratio_to_direct: None,
            ratio_min: None,
            ratio_max: None,
            ratio_to_masquerade: None,
            ratio_to_masquerade_min: None,
            ratio_to_masquerade_max: None,
            note: None,
        }
    }

    pub fn is(&self, mode: Mode, metric: Metric) -> bool {
        self.mode == mode.name() && self.metric == metric.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_expects_only_what_it_measures() {
        assert!(Metric::ConnectLatency.expected_for(Mode::Direct));
        assert!(!Metric::ProgramAll.expected_for(Mode::Direct));
        assert!(Metric::UpdateOne.expected_for(Mode::Nftables));
        assert!(!Metric::AgentRss.expected_for(Mode::Nftables));
        assert!(!Metric::ChangeSync.applies_to(Mode::IptablesNft));
        assert!(Metric::MapMemory.expected_for(Mode::SwitchyardSocket));
        assert!(Metric::ConnectLatency.expected_for(Mode::SwitchyardTc));
        assert!(Metric::ChangeCpu.expected_for(Mode::SwitchyardTc));
        assert!(!Metric::EventToMaps.applies_to(Mode::SwitchyardSocket));
        for metric in [
            Metric::ProgramAll,
            Metric::ProgramSync,
            Metric::ChangeSync,
            Metric::ChangeCpu,
            Metric::EventToMaps,
            Metric::HealthzChurn,
            Metric::AgentRss,
            Metric::MapMemory,
        ] {
            assert!(metric.expected_for(Mode::SwitchyardApi), "{metric:?}");
        }
        assert!(!Metric::ConnectLatency.applies_to(Mode::SwitchyardApi));
        assert!(!Metric::UpdateOne.applies_to(Mode::SwitchyardApi));
        for mode in Mode::TWO_NODE {
            assert!(Metric::ConnectLatency.expected_for(mode));
            assert!(Metric::SustainedConnPerS.expected_for(mode));
            assert!(Metric::Throughput.expected_for(mode));
            assert!(!Metric::ProgramAll.applies_to(mode));
            assert!(!Metric::AgentRss.applies_to(mode));
            assert!(!Metric::ChangeSync.applies_to(mode));
        }
    }

    #[test]
    fn metric_names_are_distinct() {
        let mut names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
    }
}
