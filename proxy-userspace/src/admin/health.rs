//! Health as kube-proxy reports it on `--healthz-bind-address`.
//!
//! - The proxy is *fresh* once it has synced, while its last successful sync is recent and
//!   no change has waited for a sync longer than the health timeout (kube-proxy's
//!   `QueuedUpdate`/`Updated`: a queued change that is not programmed in time means the
//!   dataplane is stuck).
//! - `/livez` is that freshness alone (kube-proxy's livez).
//! - `/healthz` also needs this node to be eligible for load-balanced traffic (KEP-3836): not
//!   while its Node object is being deleted or carries the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint, so load balancers drain it before it goes away.
//! - `/readyz` is 200 once the first complete sync is done, and while no interface that needs
//!   the TC program lacks it.
//!
//! The bodies are kube-proxy's JSON; every answer is counted by status code
//! (`kubeproxy_proxy_healthz_total{code}`, `kubeproxy_proxy_livez_total{code}`).
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::{http::Response, stats::SyncStats};

/// The health timeout: how stale the last successful sync, or how old a change still waiting
/// for one, may be before the agent is unhealthy. kube-proxy uses twice its sync period.
pub fn stale_after(sync_period: Duration) -> Duration {
    (sync_period * 2).max(Duration::from_secs(10))
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn age(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default()
}

/// Whether the proxy is fresh (see the module documentation): what `/livez` and the
/// health-check node ports' `serviceProxyHealthy` report.
pub fn fresh(stats: &SyncStats, now: SystemTime, timeout: Duration) -> bool {
    let synced_recently = stats
        .last_sync_at
        .is_some_and(|last| age(last, now) <= timeout);
    let queue_moving = stats
        .queued_since
        .is_none_or(|queued| age(queued, now) <= timeout);
    synced_recently && queue_moving
}

fn last_updated(stats: &SyncStats) -> String {
    stats
        .last_sync_at
        .map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339)
}

fn status(healthy: bool) -> u16 {
    if healthy { 200 } else { 503 }
}

/// `/healthz`: fresh and this node eligible; kube-proxy's body.
pub fn healthz(stats: &SyncStats, now: SystemTime, timeout: Duration) -> Response {
    let eligible = stats.node_eligible;
    let body = format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": {eligible}}}",
        last_updated(stats),
        rfc3339(now)
    );
    let healthy = fresh(stats, now, timeout) && eligible;
    Response::new(status(healthy), "application/json", body)
}

/// `/livez`: fresh, whatever the Node says; kube-proxy's body (no `nodeEligible`).
pub fn livez(stats: &SyncStats, now: SystemTime, timeout: Duration) -> Response {
    let body = format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
        last_updated(stats),
        rfc3339(now)
    );
    Response::new(status(fresh(stats, now, timeout)), "application/json", body)
}

/// `/readyz`: 200 once the first complete sync is done and every interface that needs the
/// TC program has it.
pub fn readyz(stats: &SyncStats) -> Response {
    if !stats.tc_missing.is_empty() {
        let mut body = String::from("TC ingress is missing on:\n");
        for (interface, reason) in &stats.tc_missing {
            let _ = writeln!(body, "  {interface}: {reason}");
        }
        return Response::new(503, "text/plain; charset=utf-8", body);
    }
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

    const TIMEOUT: Duration = Duration::from_mins(1);

    fn json(response: &Response) -> serde_json::Value {
        serde_json::from_str(&response.body).expect("kube-proxy's body is JSON")
    }

    #[test]
    fn not_ready_while_a_needed_tc_attachment_is_missing() {
        let mut stats = SyncStats::default();
        stats.record_sync(0, Duration::from_millis(1), None);
        stats
            .tc_missing
            .insert("eth1".to_owned(), "does not exist (yet)".to_owned());
        let answer = readyz(&stats);
        assert_eq!(answer.status, 503);
        assert!(
            answer.body.contains("eth1: does not exist (yet)"),
            "{}",
            answer.body
        );
        stats.tc_missing.clear();
        assert_eq!(readyz(&stats).status, 200);
    }

    #[test]
    fn healthy_only_while_syncs_are_recent() {
        let mut stats = SyncStats::default();
        let now = SystemTime::now();
        assert_eq!(healthz(&stats, now, TIMEOUT).status, 503, "never synced");
        assert_eq!(livez(&stats, now, TIMEOUT).status, 503);
        assert_eq!(readyz(&stats).status, 503);
        stats.record_sync(0, Duration::from_millis(1), None);
        let fresh = healthz(&stats, now + Duration::from_secs(1), TIMEOUT);
        assert_eq!(fresh.status, 200);
        assert_eq!(json(&fresh)["nodeEligible"], true);
        assert_eq!(readyz(&stats).status, 200);
        let later = now + Duration::from_mins(2);
        assert_eq!(healthz(&stats, later, TIMEOUT).status, 503);
        assert_eq!(livez(&stats, later, TIMEOUT).status, 503);
    }

    #[test]
    fn a_change_queued_longer_than_the_timeout_makes_both_unhealthy() {
        let mut stats = SyncStats::default();
        let now = SystemTime::now();
        stats.record_sync(0, Duration::from_millis(1), None);
        stats.queued_since = Some(now);
        let soon = now + Duration::from_secs(30);
        assert_eq!(healthz(&stats, soon, TIMEOUT).status, 200, "still in time");
        // The last sync stays recent (e.g. full recomputations that keep failing to take the
        // change), yet the change waits: stuck.
        stats.last_sync_at = Some(now + Duration::from_secs(90));
        let late = now + Duration::from_secs(91);
        assert_eq!(healthz(&stats, late, TIMEOUT).status, 503);
        assert_eq!(livez(&stats, late, TIMEOUT).status, 503);
        stats.queued_since = None;
        assert_eq!(healthz(&stats, late, TIMEOUT).status, 200, "programmed");
    }

    #[test]
    fn a_draining_node_fails_healthz_but_not_livez() {
        let mut stats = SyncStats::default();
        let now = SystemTime::now();
        stats.record_sync(0, Duration::from_millis(1), None);
        stats.node_eligible = false;
        let healthz = healthz(&stats, now, TIMEOUT);
        assert_eq!(healthz.status, 503);
        assert_eq!(json(&healthz)["nodeEligible"], false);
        assert!(json(&healthz)["lastUpdated"].is_string());
        assert!(json(&healthz)["currentTime"].is_string());
        let livez = livez(&stats, now, TIMEOUT);
        assert_eq!(livez.status, 200);
        assert!(
            json(&livez).get("nodeEligible").is_none(),
            "kube-proxy's livez body: {}",
            livez.body
        );
    }
}
