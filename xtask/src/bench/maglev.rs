//! The agent-side Maglev rebuild figure: how long the agent's own table builder
//! (`proxy_userspace::maglev::table`, what a sync runs for each changed backend set of a
//! Maglev Service) takes for [`BACKENDS`] backends at M = [`TABLE_SIZE`]. It runs in the
//! release example `maglev_rebuild` (the optimised builder; xtask itself is a debug build),
//! [`Plan::maglev_rounds`] times after one untimed build.

use anyhow::{Context, Result, ensure};

use super::modes::Mode;
use super::profile::Plan;
use super::progress::Progress;
use super::record::{Metric, Record};
use super::stats;

/// Backends of the measured Service (the figure).
pub const BACKENDS: usize = 1_000;
/// The default `--maglev-table-size`.
pub const TABLE_SIZE: u32 = 16_381;

/// Builds and runs the example; one record (mean, p50, p99 in ms over the builds).
pub fn run(plan: &Plan, progress: &Progress) -> Result<Record> {
    progress.say(&format!(
        "Maglev rebuild: {BACKENDS} backends, M = {TABLE_SIZE}, {} builds",
        plan.maglev_rounds
    ));
    let output = crate::cargo(&[
        "run",
        "--release",
        "--quiet",
        "-p",
        "proxy-userspace",
        "--example",
        "maglev_rebuild",
        "--",
        &BACKENDS.to_string(),
        &TABLE_SIZE.to_string(),
        &plan.maglev_rounds.to_string(),
    ])
    .output()
    .context("running the maglev_rebuild example")?;
    ensure!(
        output.status.success(),
        "the maglev_rebuild example failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let nanos: Vec<u64> = serde_json::from_slice(&output.stdout)
        .context("the maglev_rebuild example's output is not a JSON array of nanoseconds")?;
    let record = record(&nanos);
    progress.say(&format!(
        "Maglev rebuild: p50 {} ms, p99 {} ms",
        record
            .p50
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
        record
            .p99
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
    ));
    Ok(record)
}

/// The record of build times given in nanoseconds (services = 1: one backend set).
fn record(nanos: &[u64]) -> Record {
    #[allow(clippy::cast_precision_loss)] // build times far below 2^52 ns
    let ms: Vec<f64> = nanos.iter().map(|&n| n as f64 / 1e6).collect();
    let mut record = Record::new(Mode::SwitchyardApi, 1, BACKENDS, Metric::MaglevRebuild);
    record.value = stats::mean(&ms);
    record.p50 = stats::median(&ms);
    record.p99 = stats::percentile(&ms, 99.0);
    record.reps = ms.len();
    record
}

/// The method line of report.md.
pub fn method(plan: &Plan) -> String {
    format!(
        "Maglev rebuild: the agent's table builder (`proxy_userspace::maglev::table`, release \
         build, through the `maglev_rebuild` example) for {BACKENDS} backends at M = \
         {TABLE_SIZE}, {} timed builds after one untimed; p50 and p99 over the builds. It is \
         the agent's CPU cost per changed backend set of a Maglev Service (the map write comes \
         on top, as for any table of that size).",
        plan.maglev_rounds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_times_become_milliseconds_with_percentiles() {
        let nanos: Vec<u64> = (1..=100).map(|i| i * 100_000).collect();
        let record = record(&nanos);
        assert_eq!(record.metric, "maglev_rebuild_ms");
        assert_eq!(record.reps, 100);
        assert_eq!(record.p50, Some(5.0));
        assert_eq!(record.p99, Some(9.9));
        assert!((record.value.unwrap() - 5.05).abs() < 1e-9);
        assert_eq!(record.endpoints_per_service, BACKENDS);
    }
}
