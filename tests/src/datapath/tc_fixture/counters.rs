//! The datapath's reason counters as a test reads them: summed over CPUs, compared before and
//! after a run, and printed by name.

use std::fmt;

use proxy_common::reason;

/// Reason counters summed over CPUs (index: `proxy_common::reason`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Counters(pub [u64; reason::COUNT as usize]);

impl Counters {
    pub fn get(&self, reason: u32) -> u64 {
        self.0[reason as usize]
    }

    /// The increase since `before`.
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        let mut delta = *self;
        for (value, old) in delta.0.iter_mut().zip(before.0) {
            *value = value.wrapping_sub(old);
        }
        delta
    }
}

/// Reasons that say a packet could not be handled: no test expects them unless it names them.
pub const FAILURE_REASONS: [u32; 5] = [
    reason::TC_FIB_FAILED,
    reason::TC_SNAT_EXHAUSTED,
    reason::TC_CT_STORE_FAILED,
    reason::TC_REWRITE_FAILED,
    reason::BACKEND_LOOKUP_FAILED,
];

impl Counters {
    /// Asserts that each listed reason moved by exactly its count and that no failure reason
    /// (see [`FAILURE_REASONS`]) moved unless listed.
    pub fn assert_moved(&self, expected: &[(u32, u64)], context: &str) {
        for &(reason, count) in expected {
            assert_eq!(
                self.get(reason),
                count,
                "{context}: counter {} moved by {}, expected {count} (all moves: {self})",
                reason_name(reason),
                self.get(reason)
            );
        }
        for reason in FAILURE_REASONS {
            if !expected.iter().any(|(r, _)| *r == reason) {
                assert_eq!(
                    self.get(reason),
                    0,
                    "{context}: failure counter {} moved (all moves: {self})",
                    reason_name(reason)
                );
            }
        }
    }
}

pub fn reason_name(reason: u32) -> &'static str {
    reason::NAMES.get(reason as usize).copied().unwrap_or("?")
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (index, value) in self.0.iter().enumerate() {
            if *value != 0 {
                let name = reason::NAMES.get(index).copied().unwrap_or("?");
                write!(f, "{}{name}={value}", if first { "" } else { ", " })?;
                first = false;
            }
        }
        if first {
            write!(f, "none")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counters({self})")
    }
}
