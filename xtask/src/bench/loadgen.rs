//! Typed front end to the `sy-loadgen` binary: backend servers, and bounded client runs that
//! return their JSON summary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use switchyard_tests::env::process::{ChildGuard, LineCollector, run_bounded};

use super::services::BACKEND_PORT;

const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of a client's own bound before it is considered hung.
const CLIENT_SLACK: Duration = Duration::from_secs(20);
/// Per connect, read and write.
const OPERATION_TIMEOUT_MS: u64 = 1000;

pub fn binary() -> PathBuf {
    crate::workspace_root().join("target/release/sy-loadgen")
}

/// What a client run does; every variant is bounded in count or bytes and in time.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    Latency {
        connections: u64,
        max: Duration,
    },
    /// New connections from `concurrency` loops for `duration`, or until `count` connections
    /// were made when given (the duration then only bounds the run).
    Cps {
        concurrency: usize,
        duration: Duration,
        count: Option<u64>,
    },
    Throughput {
        bytes: u64,
        duration: Duration,
    },
    Udp {
        datagrams: u64,
        max: Duration,
    },
}

impl Load {
    fn args(&self) -> Vec<String> {
        let ms = |d: &Duration| d.as_millis().to_string();
        match self {
            Self::Latency { connections, max } => vec![
                "latency".into(),
                "--count".into(),
                connections.to_string(),
                "--max-ms".into(),
                ms(max),
            ],
            Self::Cps {
                concurrency,
                duration,
                count,
            } => {
                let mut args = vec![
                    "cps".into(),
                    "--concurrency".into(),
                    concurrency.to_string(),
                    "--duration-ms".into(),
                    ms(duration),
                ];
                if let Some(count) = count {
                    args.extend(["--count".into(), count.to_string()]);
                }
                args
            }
            Self::Throughput { bytes, duration } => vec![
                "throughput".into(),
                "--bytes".into(),
                bytes.to_string(),
                "--duration-ms".into(),
                ms(duration),
            ],
            Self::Udp { datagrams, max } => vec![
                "udp".into(),
                "--count".into(),
                datagrams.to_string(),
                "--max-ms".into(),
                ms(max),
            ],
        }
    }

    fn bound(&self) -> Duration {
        match *self {
            Self::Latency { max, .. } | Self::Udp { max, .. } => max,
            Self::Cps { duration, .. } | Self::Throughput { duration, .. } => duration,
        }
    }
}

/// The JSON line a client run prints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub samples_us: Vec<u32>,
    pub conn_per_s: Option<f64>,
    pub bytes: u64,
    pub gbps: Option<f64>,
}

/// Runs one client in `netns` (and `cgroup`, joined first) against `targets`.
pub fn run(
    netns: &str,
    cgroup: Option<&Path>,
    targets: &[SocketAddr],
    load: &Load,
) -> Result<Summary> {
    let mut command = Command::new(binary());
    command.args(load.args());
    command.args(["--netns", netns]);
    command.args(["--timeout-ms", &OPERATION_TIMEOUT_MS.to_string()]);
    if let Some(cgroup) = cgroup {
        command.arg("--cgroup").arg(cgroup);
    }
    for target in targets {
        command.args(["--target", &target.to_string()]);
    }
    let output = run_bounded(&mut command, load.bound() + CLIENT_SLACK)?;
    if !output.status.success() {
        bail!(
            "sy-loadgen {load:?} in {netns} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .context("sy-loadgen printed no summary")?;
    serde_json::from_str(line).with_context(|| format!("parsing the sy-loadgen summary {line:?}"))
}

/// A backend server, killed on drop.
#[derive(Debug)]
pub struct Server {
    _guard: ChildGuard,
    _stdout: LineCollector,
}

/// Starts a server on [`BACKEND_PORT`] in `netns` and waits until it listens.
pub fn serve(netns: &str) -> Result<Server> {
    serve_on(netns, BACKEND_PORT)
}

/// Starts a server on `port` (TCP and UDP) in `netns` and waits until it listens.
pub fn serve_on(netns: &str, port: u16) -> Result<Server> {
    let mut command = Command::new(binary());
    command
        .args(["serve", "--netns", netns, "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard = ChildGuard::spawn(&mut command, format!("bench server in {netns}"))?;
    let stdout = LineCollector::start(guard.child_mut().stdout.take().expect("piped"));
    if stdout
        .wait_for_line(SERVER_START_TIMEOUT, |line| line == "ready")
        .is_none()
    {
        bail!("the bench server in {netns} did not become ready");
    }
    Ok(Server {
        _guard: guard,
        _stdout: stdout,
    })
}
