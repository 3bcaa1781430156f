//! Unique names for everything a test creates on the host.
//!
//! Every name starts with `syt<pid>` so that resources left behind by a test process that died
//! without unwinding (SIGKILL, abort) can be recognised and swept by later runs, while the
//! resources of live test processes are never touched.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every host resource this crate creates.
pub const PREFIX: &str = "syt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique on this host among live processes: `syt<pid><kind><n>`.
///
/// `kind` is a single letter telling what the resource is (`n` namespace, `c` cgroup, `t` temp
/// directory); it must not be a digit, or the pid could not be parsed back.
pub fn unique(kind: char) -> String {
    debug_assert!(!kind.is_ascii_digit());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}{kind}{n}", std::process::id())
}

/// The pid of the process that created the resource called `name`, if `name` is one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits_end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..digits_end].parse().ok()
}

/// Whether `name` is one of ours and its creator is gone, so nobody else will remove it.
pub fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| {
        pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_round_trip_their_owner() {
        let a = unique('n');
        let b = unique('n');
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert!(!is_stale(&a));
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("syt123"), None);
        assert_eq!(owner_pid("syt4294967294c1"), Some(4_294_967_294));
        assert!(is_stale("syt4294967294c1"));
    }
}
