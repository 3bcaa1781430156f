//! The agent's side of the bench's contract: every sync that writes logs an info line
//! `dataplane synced operations=N elapsed_ms=M elapsed_us=U` (text format; agents before
//! `elapsed_us` give milliseconds only). Nothing else of the agent's log is read.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

const MARKER: &str = "dataplane synced";

/// One `dataplane synced` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sync {
    pub operations: Option<u64>,
    /// The agent's own measure of the sync, µs-precise when it logs `elapsed_us`.
    pub elapsed: Duration,
}

impl Sync {
    /// The sync a log line reports, if it is a `dataplane synced` line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find(MARKER)? + MARKER.len()..];
        let elapsed = field(rest, "elapsed_us=").map_or_else(
            || field(rest, "elapsed_ms=").map_or(Duration::ZERO, Duration::from_millis),
            Duration::from_micros,
        );
        Some(Self {
            operations: field(rest, "operations="),
            elapsed,
        })
    }
}

/// The number after `key` in a log line (`operations=12 elapsed_ms=3`).
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line
        .match_indices(key)
        .find(|(at, _)| *at == 0 || line[..*at].ends_with([' ', '\t', '{', ',']))?
        .0;
    let digits: String = line[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Follows a log file as it grows: each call returns only the complete lines written since.
pub struct LogTail {
    file: File,
    partial: Vec<u8>,
}

impl LogTail {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            partial: Vec::new(),
        })
    }

    pub fn new_lines(&mut self) -> Result<Vec<String>> {
        let mut read = Vec::new();
        self.file
            .read_to_end(&mut read)
            .context("reading the agent's log")?;
        self.partial.extend_from_slice(&read);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        Ok(String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The `dataplane synced` lines among the new lines.
    pub fn new_syncs(&mut self) -> Result<Vec<Sync>> {
        Ok(self
            .new_lines()?
            .iter()
            .filter_map(|line| Sync::parse(line))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn reads_sync_lines_with_and_without_microseconds() {
        let old = "2026-01-01T00:00:00Z  INFO switchyard::sync: dataplane synced operations=120 elapsed_ms=37";
        assert_eq!(
            Sync::parse(old),
            Some(Sync {
                operations: Some(120),
                elapsed: Duration::from_millis(37)
            })
        );
        let new = "2026-01-01T00:00:00Z  INFO switchyard::runner: dataplane synced operations=3 \
                   elapsed_ms=0 elapsed_us=412";
        assert_eq!(
            Sync::parse(new),
            Some(Sync {
                operations: Some(3),
                elapsed: Duration::from_micros(412)
            })
        );
        assert_eq!(Sync::parse("INFO dataplane already in sync"), None);
        // A key is matched only as a whole field name.
        assert_eq!(field("xelapsed_ms=5 elapsed_ms=7", "elapsed_ms="), Some(7));
        assert_eq!(field("operations=1", "missing="), None);
    }

    #[test]
    fn a_tail_returns_each_complete_line_once() {
        let dir = switchyard_tests::env::tempdir::TempDir::new().unwrap();
        let path = dir.path().join("agent.log");
        let mut log = File::create(&path).unwrap();
        write!(
            log,
            "first\ndataplane synced operations=2 elapsed_ms=1\npart"
        )
        .unwrap();
        let mut tail = LogTail::open(&path).unwrap();
        assert_eq!(
            tail.new_lines().unwrap(),
            ["first", "dataplane synced operations=2 elapsed_ms=1"]
        );
        assert!(tail.new_lines().unwrap().is_empty());
        writeln!(log, "ial dataplane synced operations=5 elapsed_us=90").unwrap();
        assert_eq!(
            tail.new_syncs().unwrap(),
            [Sync {
                operations: Some(5),
                elapsed: Duration::from_micros(90)
            }]
        );
    }
}
