//! The Switchyard agent under test, run in the node namespace with its output in a log file.

pub mod layout;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::env::bpffs::PrivateBpffs;
use crate::env::cgroup::TestCgroup;
use crate::env::netns::Topology;
use crate::env::process::{ChildGuard, run_bounded};
use crate::env::tempdir::TempDir;

/// Environment variable naming the agent binary (xtask points it at the release build).
pub const BIN_ENV: &str = "SWITCHYARD_BIN";

const STOP_GRACE: Duration = Duration::from_secs(3);
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the end of the log to print when a test fails.
const LOG_DUMP_LIMIT: usize = 256 * 1024;

/// The agent binary: `$SWITCHYARD_BIN`, else the workspace's release build.
pub fn switchyard_bin() -> PathBuf {
    let path = std::env::var_os(BIN_ENV).map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || {
                    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                        .parent()
                        .expect("the tests package is inside the workspace");
                    workspace.join("target")
                },
                PathBuf::from,
            );
            target.join("release/switchyard")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "agent binary {} not found: build it with `cargo build --release -p proxy-userspace` \
         or set {BIN_ENV}",
        path.display()
    );
    path
}

/// A running (or deliberately killed) agent. Dropping it stops the agent and, when the test is
/// failing, prints its log.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    node_netns: String,
    run_args: Vec<OsString>,
    /// How many of `run_args` come before the test's extra arguments.
    base_args: usize,
    bpffs_dir: PathBuf,
    log_path: PathBuf,
    child: Option<ChildGuard>,
    starts: u32,
    // Last, so the log outlives everything that might still write to it.
    _log_dir: TempDir,
}

impl Agent {
    /// Starts `switchyard run` inside the topology's node namespace. It attaches to `cgroup`
    /// and pins under `<bpffs>/switchyard`.
    pub fn start(
        topology: &Topology,
        cgroup: &TestCgroup,
        bpffs: &PrivateBpffs,
        manifests: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        Self::start_with_source(
            topology,
            cgroup,
            bpffs,
            "--manifests",
            manifests,
            extra_args,
        )
    }

    /// Like `start`, with the Services coming from `--manifests PATH` or `--kubeconfig PATH`
    /// (`source_flag`).
    pub fn start_with_source(
        topology: &Topology,
        cgroup: &TestCgroup,
        bpffs: &PrivateBpffs,
        source_flag: &str,
        source: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        Self::start_in_netns(
            topology.node_namespace(),
            cgroup,
            bpffs,
            source_flag,
            source,
            extra_args,
        )
    }

    /// Like `start_with_source`, in the network namespace `netns` (another node's).
    pub fn start_in_netns(
        netns: &str,
        cgroup: &TestCgroup,
        bpffs: &PrivateBpffs,
        source_flag: &str,
        source: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        let log_dir = TempDir::new()?;
        let bpffs_dir = bpffs.agent_dir();
        let mut run_args: Vec<OsString> = vec![
            "run".into(),
            source_flag.into(),
            source.into(),
            "--cgroup-path".into(),
            cgroup.path().into(),
            "--bpffs".into(),
            bpffs_dir.clone().into(),
            "--log-level".into(),
            "debug".into(),
        ];
        let base_args = run_args.len();
        run_args.extend(extra_args.iter().map(OsString::from));
        let mut agent = Self {
            bin: switchyard_bin(),
            node_netns: netns.to_owned(),
            run_args,
            base_args,
            bpffs_dir,
            log_path: log_dir.path().join("agent.log"),
            child: None,
            starts: 0,
            _log_dir: log_dir,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut log = self.open_log()?;
        writeln!(
            log,
            "===== test harness: start #{} of {} {:?} in netns {} =====",
            self.starts,
            self.bin.display(),
            self.run_args,
            self.node_netns
        )?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.node_netns])
            .arg(&self.bin)
            .args(&self.run_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // `ip netns exec` execs the agent, so this pid is the agent's own.
        self.child = Some(ChildGuard::spawn(&mut command, "switchyard agent")?);
        Ok(())
    }

    fn open_log(&self) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))
    }

    /// SIGKILLs the agent, leaving its pins (and so the dataplane) in place.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = child.kill()?;
            self.note(&format!("killed with SIGKILL ({status})"))?;
        }
        Ok(())
    }

    /// Asks the agent to exit with SIGTERM, SIGKILL after a grace period.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = child.stop(Signal::SIGTERM, STOP_GRACE)?;
            self.note(&format!("stopped ({status})"))?;
        }
        Ok(())
    }

    /// Starts the agent again with the same arguments (killing it first if it still runs).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Starts the agent again (killing it first if it still runs) with other extra arguments.
    pub fn restart_with(&mut self, extra_args: &[&str]) -> Result<()> {
        self.kill()?;
        self.run_args.truncate(self.base_args);
        self.run_args.extend(extra_args.iter().map(OsString::from));
        self.spawn()
    }

    /// Waits (at most `timeout`) for an agent expected to give up on its own; its exit status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running");
        };
        let Some(status) = child.wait_timeout(timeout)? else {
            self.child = Some(child);
            bail!("the agent still runs after {timeout:?}")
        };
        self.note(&format!("exited on its own ({status})"))?;
        Ok(status)
    }

    /// Fails if the agent exited on its own.
    pub fn ensure_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the agent is not running");
        };
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited on its own with {status}");
        }
        Ok(())
    }

    /// Runs the agent from another binary at its next (re)start (e.g. another layout version).
    pub fn set_binary(&mut self, bin: PathBuf) {
        self.bin = bin;
    }

    /// Runs a second agent with exactly this one's command line, in the same node namespace,
    /// to completion (bounded by `timeout`); its output.
    pub fn run_second_instance(&self, timeout: Duration) -> Result<Output> {
        let output = run_bounded(
            Command::new("ip")
                .args(["netns", "exec", &self.node_netns])
                .arg(&self.bin)
                .args(&self.run_args),
            timeout,
        )?;
        self.note(&format!(
            "a second instance exited with {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))?;
        Ok(output)
    }

    /// Runs `switchyard ARGS` (e.g. `inspect services`) against this agent's pins.
    pub fn offline(&self, args: &[&str]) -> Result<Output> {
        run_bounded(
            Command::new(&self.bin)
                .args(args)
                .arg("--bpffs")
                .arg(&self.bpffs_dir),
            CLEANUP_TIMEOUT,
        )
    }

    /// Runs `switchyard cleanup` for this agent's pins.
    pub fn cleanup(&self) -> Result<Output> {
        let output = run_bounded(
            Command::new(&self.bin)
                .arg("cleanup")
                .arg("--bpffs")
                .arg(&self.bpffs_dir),
            CLEANUP_TIMEOUT,
        )?;
        self.note(&format!(
            "cleanup exited with {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))?;
        Ok(output)
    }

    /// The agent's pid while it runs (`ip netns exec` execs the agent, so it is the agent's own).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// The directory the agent pins under.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent (and the harness notes) wrote so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn note(&self, message: &str) -> Result<()> {
        writeln!(self.open_log()?, "===== test harness: {message} =====")?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: stopping the agent: {e:#}");
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail_start = log.len().saturating_sub(LOG_DUMP_LIMIT);
            let tail_start = (tail_start..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            eprintln!(
                "----- agent log {} (last {} bytes) -----\n{}\n----- end of agent log -----",
                self.log_path.display(),
                log.len() - tail_start,
                &log[tail_start..]
            );
        }
    }
}
