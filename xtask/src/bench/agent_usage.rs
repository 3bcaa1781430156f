//! What the agent process costs, read from /proc: peak resident memory, the memory of the BPF
//! maps it holds, and its CPU time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture.
const USER_HZ: u64 = 100;

#[allow(clippy::cast_precision_loss)] // memory sizes far below 2^52
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// VmHWM (peak resident set) of `pid`, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(mib(kib * 1024))
}

/// Sum of `memlock` over the distinct BPF maps `pid` holds a descriptor of, MiB.
pub fn bpf_map_mib(pid: u32) -> Option<f64> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let value = |key: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (value("map_id:"), value("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    (!seen.is_empty()).then(|| mib(seen.values().sum()))
}

/// The CPU time a process has used so far, two ways: per thread in nanoseconds (the
/// scheduler's run time, `/proc/PID/task/TID/schedstat`) and for the whole process in clock
/// ticks (utime + stime of `/proc/PID/stat`, which also counts threads that have ended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSample {
    threads: BTreeMap<u32, u64>,
    ticks: u64,
}

impl CpuSample {
    pub fn read(pid: u32) -> Option<Self> {
        let ticks = process_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        let mut threads = BTreeMap::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread that ends between the listing and this read is simply not counted:
            // `since` then falls back to the process totals.
            if let Some(ns) = std::fs::read_to_string(entry.path().join("schedstat"))
                .ok()
                .and_then(|text| run_time_ns(&text))
            {
                threads.insert(tid, ns);
            }
        }
        Some(Self { threads, ticks })
    }

    /// CPU time used between `earlier` and this sample: nanosecond-precise when every thread
    /// of `earlier` still exists (threads started since count from zero), else, since an
    /// ended thread's time survives only in the process totals, from the clock ticks
    /// (10 ms resolution).
    pub fn since(&self, earlier: &Self) -> Duration {
        if earlier
            .threads
            .keys()
            .all(|tid| self.threads.contains_key(tid))
        {
            let ns: u64 = self
                .threads
                .iter()
                .map(|(tid, &now)| {
                    now.saturating_sub(earlier.threads.get(tid).copied().unwrap_or(0))
                })
                .sum();
            Duration::from_nanos(ns)
        } else {
            Duration::from_millis(self.ticks.saturating_sub(earlier.ticks) * 1_000 / USER_HZ)
        }
    }
}

/// Samples `pid`'s CPU time every `step` until it stops growing (the process went idle) or
/// `max` passed; returns the last sample.
pub fn wait_until_idle(pid: u32, step: Duration, max: Duration) -> Option<CpuSample> {
    let deadline = Instant::now() + max;
    let mut last = CpuSample::read(pid)?;
    loop {
        std::thread::sleep(step);
        let next = CpuSample::read(pid)?;
        if next == last || Instant::now() >= deadline {
            return Some(next);
        }
        last = next;
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after its closing parenthesis.
fn process_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th and stime the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The first field of `schedstat`: time spent on the CPU, ns.
fn run_time_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_an_awkward_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    730 45 0 0 20 0 6 0 1234 567890 1234 18446744073709551615";
        assert_eq!(process_ticks(stat), Some(775));
        assert_eq!(process_ticks("garbage"), None);
        assert_eq!(run_time_ns("123456789 2000 17\n"), Some(123_456_789));
    }

    #[test]
    fn cpu_time_is_precise_unless_a_thread_ended() {
        let sample = |threads: &[(u32, u64)], ticks| CpuSample {
            threads: threads.iter().copied().collect(),
            ticks,
        };
        let before = sample(&[(1, 1_000_000), (2, 5_000_000)], 100);
        // Thread 3 started in between: all of its time is new.
        let after = sample(&[(1, 1_500_000), (2, 5_000_000), (3, 250_000)], 101);
        assert_eq!(after.since(&before), Duration::from_micros(750));
        // Thread 2 ended: its time is only in the process ticks.
        let after = sample(&[(1, 9_000_000)], 103);
        assert_eq!(after.since(&before), Duration::from_millis(30));
    }

    #[test]
    fn this_process_uses_cpu_time() {
        let pid = std::process::id();
        let before = CpuSample::read(pid).expect("our own /proc entry");
        // Work until the samples show 20 ms of CPU; the wall-time bound only stops a broken
        // reading from spinning forever.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0_u64;
        let mut spent = Duration::ZERO;
        while spent < Duration::from_millis(20) && Instant::now() < deadline {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            spent = CpuSample::read(pid).unwrap().since(&before);
        }
        assert!(spent >= Duration::from_millis(20), "{spent:?}");
        assert!(peak_rss_mib(pid).is_some_and(|mib| mib > 0.0));
    }
}
