//! A child cgroup of the cgroup v2 root that test clients join so the agent's hooks apply to
//! them and to nothing else on the host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::env::names;
use crate::env::process::wait_until;

const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// A uniquely named cgroup directly under the cgroup2 mount; on drop every process still in it
/// is killed and the directory removed.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Result<Self> {
        crate::env::stale::sweep_once();
        let path = crate::env::mounts::cgroup2_root()?.join(names::unique('c'));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// The cgroup directory as seen from the root mount namespace.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pids(&self) -> Result<Vec<Pid>> {
        pids_in(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("warning: {e:#}");
        }
    }
}

pub fn pids_in(cgroup: &Path) -> Result<Vec<Pid>> {
    let procs = cgroup.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .map(Pid::from_raw)
        .collect())
}

/// Kills everything in `cgroup`, waits (bounded) for it to empty, and removes it.
pub fn remove(cgroup: &Path) -> Result<()> {
    let emptied = wait_until(EMPTY_TIMEOUT, Duration::from_millis(10), || {
        let pids = pids_in(cgroup).ok()?;
        for pid in &pids {
            // Processes exiting meanwhile give ESRCH, which is what we want anyway.
            let _ = kill(*pid, Signal::SIGKILL);
        }
        pids.is_empty().then_some(())
    });
    if emptied.is_none() {
        eprintln!(
            "warning: cgroup {} still has processes after {EMPTY_TIMEOUT:?}",
            cgroup.display()
        );
    }
    std::fs::remove_dir(cgroup).with_context(|| format!("removing cgroup {}", cgroup.display()))
}
