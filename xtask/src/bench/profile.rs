//! How much a run measures: the scale points, repetitions and bounds of each profile.

use std::path::PathBuf;
use std::time::Duration;

/// Service-slot capacity of the BPF maps: a frontend with M endpoints needs M + 1 slots. N
/// services have N ClusterIP frontends plus one NodePort frontend per service with a
/// nodePort (the NodePort mode opens them on one node address).
const MAP_SLOTS: usize = 262_144;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// N = 10, a few connections and changes, every mode and the API server path: checks the
    /// harness (run by `cargo xtask test`).
    Smoke,
    /// Data plane N up to 10 000, control plane up to 100 000: under 10 minutes on 2 cores.
    Quick,
    /// N up to 100 000 for both phases, where time allows.
    Full,
}

/// Which phases a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The data-plane scale points (every mode's lane), then the control-plane phase.
    All,
    /// Only the control-plane phase (the agent fed by the test API server).
    ControlPlane,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub scale: Vec<usize>,
    /// Endpoints per service where the maps allow it (and backend namespaces created).
    pub max_endpoints: usize,
    pub latency_connections: u64,
    pub latency_reps: usize,
    pub cps_reps: usize,
    pub cps_concurrency: usize,
    pub cps_duration: Duration,
    /// One run of this many connections at `cps_concurrency` loops per mode and N: no
    /// connection may fail (masquerade ports must never run dry).
    pub sustained_connections: u64,
    pub throughput_reps: usize,
    pub throughput_duration: Duration,
    pub throughput_bytes: u64,
    pub warmup_connections: u64,
    /// Longest a single program-everything step may take before the mode is reported as
    /// timed out at that scale (and skipped at larger ones).
    pub program_timeout: Duration,
    /// A mode whose next programming is predicted (from the last two points) to exceed this
    /// is skipped at that scale, with a note.
    pub program_budget: Duration,
    /// The control-plane phase's N (the agent fed by the test API server).
    pub control_scale: Vec<usize>,
    /// Endpoint changes per control-plane point, each to a different Service where N allows.
    pub control_changes: usize,
    /// A control-plane point predicted (from the smaller ones) to take longer than this is
    /// skipped, with a note.
    pub control_budget: Duration,
    /// How long /healthz is probed at each control-plane point while endpoints churn.
    pub healthz_churn: Duration,
    /// Timed builds of the Maglev rebuild figure (`maglev`).
    pub maglev_rounds: usize,
    pub out_dir: PathBuf,
    /// What the run is expected to take, printed at the start.
    pub expected: &'static str,
}

impl Plan {
    pub fn new(profile: Profile) -> Self {
        let root = crate::workspace_root().join("target");
        match profile {
            Profile::Smoke => Self {
                scale: vec![10],
                max_endpoints: 2,
                latency_connections: 40,
                latency_reps: 2,
                cps_reps: 1,
                cps_concurrency: 2,
                cps_duration: Duration::from_millis(300),
                sustained_connections: 200,
                throughput_reps: 1,
                throughput_duration: Duration::from_millis(300),
                throughput_bytes: 1 << 30,
                warmup_connections: 10,
                program_timeout: Duration::from_mins(1),
                program_budget: Duration::from_mins(1),
                control_scale: vec![10],
                control_changes: 5,
                control_budget: Duration::from_mins(1),
                healthz_churn: Duration::from_secs(2),
                maglev_rounds: 20,
                out_dir: root.join("bench-smoke"),
                expected: "about 20 seconds",
            },
            Profile::Quick => Self {
                scale: vec![1, 100, 1_000, 10_000],
                max_endpoints: 10,
                latency_connections: 3_000,
                latency_reps: 10,
                cps_reps: 3,
                cps_concurrency: 8,
                cps_duration: Duration::from_secs(1),
                sustained_connections: 50_000,
                throughput_reps: 3,
                throughput_duration: Duration::from_secs(1),
                throughput_bytes: 1 << 40,
                warmup_connections: 300,
                program_timeout: Duration::from_mins(4),
                program_budget: Duration::from_mins(4),
                control_scale: vec![100, 1_000, 10_000, 100_000],
                control_changes: 50,
                control_budget: Duration::from_mins(2),
                healthz_churn: Duration::from_secs(10),
                maglev_rounds: 200,
                out_dir: root.join("bench"),
                expected: "about 8 to 10 minutes on 2 cores, the control plane 1 to 2 of them",
            },
            Profile::Full => Self {
                scale: vec![1, 100, 1_000, 10_000, 30_000, 100_000],
                max_endpoints: 10,
                latency_connections: 5_000,
                latency_reps: 10,
                cps_reps: 6,
                cps_concurrency: 8,
                cps_duration: Duration::from_secs(2),
                sustained_connections: 50_000,
                throughput_reps: 6,
                throughput_duration: Duration::from_secs(2),
                throughput_bytes: 1 << 40,
                warmup_connections: 500,
                program_timeout: Duration::from_mins(30),
                program_budget: Duration::from_mins(20),
                control_scale: vec![100, 1_000, 10_000, 30_000, 100_000],
                control_changes: 100,
                control_budget: Duration::from_mins(20),
                healthz_churn: Duration::from_secs(30),
                maglev_rounds: 500,
                out_dir: root.join("bench"),
                expected: "40 to 90 minutes on 2 cores for the data plane (nftables programming \
                           grows super-linearly and is skipped at a scale where it is predicted \
                           to exceed 20 minutes), then the control plane: a few minutes with an \
                           incremental agent, up to 20 minutes per point otherwise",
            },
        }
    }

    /// Endpoints per service at `services`: the profile's number, fewer where the BPF maps
    /// could not hold every frontend's M + 1 slots (every mode uses the same M, so they stay
    /// comparable).
    pub fn endpoints_at(&self, services: usize) -> usize {
        (MAP_SLOTS / frontends(services) - 1).clamp(1, self.max_endpoints)
    }
}

fn frontends(services: usize) -> usize {
    services + super::services::node_port_count(services)
}

/// A quantity at `n` extrapolated from its values at smaller N (the last two points; the
/// growth exponent between them, clamped to 1..2.5, is carried on; one point: linear).
pub fn predict(history: &[(usize, f64)], n: usize) -> Option<f64> {
    let &(n2, t2) = history.last()?;
    #[allow(clippy::cast_precision_loss)] // service counts are small
    let growth = n as f64 / n2 as f64;
    let exponent = match history.len() {
        0 | 1 => 1.0,
        len => {
            let (n1, t1) = history[len - 2];
            #[allow(clippy::cast_precision_loss)]
            let span = (n2 as f64 / n1 as f64).ln();
            if t1 > 0.0 && span > 0.0 {
                ((t2 / t1).ln() / span).clamp(1.0, 2.5)
            } else {
                1.0
            }
        }
    };
    Some(t2 * growth.powf(exponent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extrapolates_from_the_last_two_points() {
        assert_eq!(predict(&[], 10), None);
        assert_eq!(predict(&[(100, 1.0)], 1_000), Some(10.0));
        // Quadratic growth between the last two points is carried on.
        let quadratic = predict(&[(1_000, 1.0), (10_000, 100.0)], 30_000).unwrap();
        assert!((quadratic - 900.0).abs() < 1e-6);
        // Flat (start-up dominated) history is taken as at least linear.
        let flat = predict(&[(1, 0.01), (100, 0.01)], 1_000).unwrap();
        assert!((flat - 0.1).abs() < 1e-9);
    }

    #[test]
    fn endpoints_shrink_where_the_maps_would_overflow() {
        let plan = Plan::new(Profile::Full);
        assert_eq!(plan.endpoints_at(1), 10);
        assert_eq!(plan.endpoints_at(10_000), 10);
        assert_eq!(plan.endpoints_at(30_000), 7);
        assert_eq!(plan.endpoints_at(100_000), 1);
        for &n in &plan.scale {
            assert!(frontends(n) * (plan.endpoints_at(n) + 1) <= MAP_SLOTS);
        }
    }
}
