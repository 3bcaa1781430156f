//! The JSON lines `sy-testkit` prints, one per attempt, and summaries over them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The outcome of one client attempt (a connection, a datagram exchange, or one request on a
/// held connection).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub ok: bool,
    /// The name the backend answered with.
    pub backend: Option<String>,
    /// What the client believes it talks to: getpeername for connected sockets, the recvfrom
    /// source for unconnected UDP.
    pub peer: Option<SocketAddr>,
    /// The recvfrom source address (UDP only).
    #[serde(default)]
    pub source: Option<SocketAddr>,
    /// The client address the backend saw (only when the client asked for it, `--ask-peer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_as: Option<SocketAddr>,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// How long the attempt took, to tell an immediate refusal from a timeout.
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl Attempt {
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("an Attempt always serializes")
    }
}

/// Parses every non-empty line of `lines` as an [`Attempt`].
pub fn parse_attempts(lines: &[String]) -> Result<Vec<Attempt>> {
    lines
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).with_context(|| format!("parsing attempt line {line:?}"))
        })
        .collect()
}

/// How many successful attempts each backend answered.
pub fn backend_counts(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in attempts.iter().filter_map(|a| a.backend.as_ref()) {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

pub fn failures(attempts: &[Attempt]) -> Vec<&Attempt> {
    attempts.iter().filter(|a| !a.ok).collect()
}

/// The backends that answered.
pub fn reached(attempts: &[Attempt]) -> BTreeSet<String> {
    backend_counts(attempts).into_keys().collect()
}

/// Fails the test, naming `what` and the first failure, unless every attempt succeeded.
pub fn assert_all_ok(attempts: &[Attempt], what: &str) {
    let failed = failures(attempts);
    assert!(
        failed.is_empty(),
        "{what}: {} of {} attempts failed, e.g. {:?}",
        failed.len(),
        attempts.len(),
        failed.first()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_round_trip_and_summarise() {
        let ok = Attempt {
            ok: true,
            backend: Some("backend-0".into()),
            peer: Some("10.96.0.10:80".parse().unwrap()),
            ..Attempt::default()
        };
        let refused = Attempt {
            errno: Some(111),
            error: Some("connect: refused".into()),
            ..Attempt::default()
        };
        let lines = vec![ok.to_json_line(), String::new(), refused.to_json_line()];
        let parsed = parse_attempts(&lines).unwrap();
        assert_eq!(parsed, vec![ok.clone(), refused]);
        assert_eq!(backend_counts(&parsed)["backend-0"], 1);
        assert_eq!(failures(&parsed).len(), 1);
        // The minimal shape from the spec parses too.
        let minimal =
            r#"{"ok":false,"backend":null,"peer":"[fd00:96::a]:80","errno":101,"error":"x"}"#;
        let parsed = parse_attempts(&[minimal.to_owned()]).unwrap();
        assert_eq!(parsed[0].peer, Some("[fd00:96::a]:80".parse().unwrap()));
    }
}
