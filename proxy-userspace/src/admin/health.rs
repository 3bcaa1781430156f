//! Health as kube-proxy reports it on `--healthz-bind-address`: `/healthz` and `/livez` are
//! healthy while syncs are recent, `/readyz` once the first complete sync is done.
use std::time::{Duration, SystemTime};

use super::{http::Response, stats::SyncStats};

/// How stale the last successful sync may be before the agent is unhealthy: kube-proxy uses
/// twice its sync period.
pub fn stale_after(sync_period: Duration) -> Duration {
    (sync_period * 2).max(Duration::from_secs(10))
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// `/healthz` and `/livez`: 200 while the last sync is recent, 503 before the first sync or
/// when syncs stopped succeeding. The body is kube-proxy's JSON.
pub fn healthz(stats: &SyncStats, now: SystemTime, stale: Duration) -> Response {
    let healthy = stats
        .last_sync_at
        .is_some_and(|last| now.duration_since(last).unwrap_or_default() <= stale);
    let last_updated = stats
        .last_sync_at
        .map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339);
    let body = format!(
        "{{\"lastUpdated\": \"{last_updated}\",\"currentTime\": \"{}\", \"nodeEligible\": true}}",
        rfc3339(now)
    );
    Response::new(if healthy { 200 } else { 503 }, "application/json", body)
}

/// `/readyz`: 200 once the first complete sync is done.
pub fn readyz(stats: &SyncStats) -> Response {
    if stats.syncs_total > 0 {
        Response::new(200, "text/plain; charset=utf-8", "ok\n")
    } else {
        Response::new(
            503,
            "text/plain; charset=utf-8",
            "waiting for the first sync\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_while_syncs_are_recent() {
        let mut stats = SyncStats::default();
        let now = SystemTime::now();
        assert_eq!(
            healthz(&stats, now, Duration::from_mins(1)).status,
            503,
            "before the first sync"
        );
        assert_eq!(readyz(&stats).status, 503);
        stats.record_sync(0, Duration::from_millis(1), None);
        let fresh = healthz(&stats, now + Duration::from_secs(1), Duration::from_mins(1));
        assert_eq!(fresh.status, 200);
        assert!(
            fresh.body.contains("\"nodeEligible\": true"),
            "{}",
            fresh.body
        );
        assert_eq!(readyz(&stats).status, 200);
        assert_eq!(
            healthz(&stats, now + Duration::from_mins(2), Duration::from_mins(1)).status,
            503
        );
    }
}
