//! Typed front end to the `sy-testkit` helper binary: backend servers and clients that run in
//! test namespaces (and, for clients, in the hooked test cgroup).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::client::report::{Attempt, parse_attempts};
use crate::env::process::{ChildGuard, LineCollector};

/// The port the test backends' servers listen on (TCP and UDP) in every world.
pub const BACKEND_PORT: u16 = 8080;

/// The line `serve` prints once all its sockets are bound.
pub const READY_LINE: &str = "ready";

const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of a client's own worst case before it is considered hung.
const CLIENT_SLACK: Duration = Duration::from_secs(5);

/// Builds a [`Testkit`] for the `sy-testkit` binary of this package. Only integration tests and
/// binaries of this package see `CARGO_BIN_EXE_*`, hence a macro expanded in their crate.
#[macro_export]
macro_rules! testkit {
    () => {
        $crate::client::testkit::Testkit::new(env!("CARGO_BIN_EXE_sy-testkit"))
    };
}

/// How a client exchanges one message with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientProto {
    /// A new TCP connection per attempt.
    Tcp,
    /// A new UDP socket per attempt, connect()ed to the target.
    UdpConnected,
    /// A new UDP socket per attempt, `sendto()`/`recvfrom()` without `connect()`.
    UdpUnconnected,
}

impl ClientProto {
    pub const ALL: [Self; 3] = [Self::Tcp, Self::UdpConnected, Self::UdpUnconnected];

    pub fn as_arg(self) -> String {
        self.to_possible_value()
            .expect("no variant is skipped")
            .get_name()
            .to_owned()
    }
}

#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub proto: ClientProto,
    pub target: SocketAddr,
    pub count: u32,
    pub interval: Duration,
    pub timeout: Duration,
    /// Bind to this local port before connecting (TCP with SO_REUSEADDR).
    pub source_port: Option<u16>,
    /// Bind to this local address before connecting.
    pub source_ip: Option<IpAddr>,
    /// Ask the backend for the client address it saw ([`Attempt::seen_as`]).
    pub ask_peer: bool,
}

impl ClientRequest {
    pub fn new(proto: ClientProto, target: SocketAddr) -> Self {
        Self {
            proto,
            target,
            count: 1,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(1),
            source_port: None,
            source_ip: None,
            ask_peer: false,
        }
    }

    #[must_use]
    pub fn source_port(mut self, port: u16) -> Self {
        self.source_port = Some(port);
        self
    }

    /// Binds the client's sockets to `ip` (a source address the socket hooks can see).
    #[must_use]
    pub fn source_ip(mut self, ip: IpAddr) -> Self {
        self.source_ip = Some(ip);
        self
    }

    #[must_use]
    pub fn ask_peer(mut self) -> Self {
        self.ask_peer = true;
        self
    }

    #[must_use]
    pub fn count(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest a well-behaved client can take: every attempt hitting every timeout.
    fn worst_case(&self) -> Duration {
        (self.interval + self.timeout * 3) * self.count + CLIENT_SLACK
    }
}

/// Runs the helper binary.
#[derive(Debug, Clone)]
pub struct Testkit {
    bin: PathBuf,
}

impl Testkit {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    /// Starts a server answering `name` on TCP and UDP, IPv4 and IPv6, on each port, inside
    /// `netns`; returns once it is listening.
    pub fn serve(&self, netns: &str, name: &str, ports: &[u16]) -> Result<Server> {
        let mut command = Command::new(&self.bin);
        command.args(["serve", "--name", name, "--netns", netns]);
        for port in ports {
            command.args(["--port", &port.to_string()]);
        }
        let mut guard = ChildGuard::spawn(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
            format!("server {name}"),
        )?;
        let stdout = LineCollector::start(guard.child_mut().stdout.take().expect("piped"));
        if stdout
            .wait_for_line(SERVER_START_TIMEOUT, |line| line == READY_LINE)
            .is_none()
        {
            bail!("server {name} in {netns} did not become ready");
        }
        Ok(Server {
            name: name.to_owned(),
            _guard: guard,
            _stdout: stdout,
        })
    }

    /// Runs a client to completion and returns its attempts.
    pub fn client(
        &self,
        netns: &str,
        cgroup: &Path,
        request: &ClientRequest,
    ) -> Result<Vec<Attempt>> {
        self.spawn_client(netns, cgroup, request)?.finish()
    }

    /// Starts a client in the background, e.g. to do something to the agent meanwhile.
    pub fn spawn_client(
        &self,
        netns: &str,
        cgroup: &Path,
        request: &ClientRequest,
    ) -> Result<RunningClient> {
        self.spawn_client_placed(netns, Some(cgroup), request)
    }

    /// Runs a client outside the hooked cgroup (a machine outside the cluster, whose traffic
    /// only the node's TC programs see) to completion.
    pub fn outside_client(&self, netns: &str, request: &ClientRequest) -> Result<Vec<Attempt>> {
        self.spawn_client_placed(netns, None, request)?.finish()
    }

    /// Like [`Self::outside_client`], in the background.
    pub fn spawn_outside_client(
        &self,
        netns: &str,
        request: &ClientRequest,
    ) -> Result<RunningClient> {
        self.spawn_client_placed(netns, None, request)
    }

    /// Like [`Self::hold`] (or [`Self::hold_udp`] with `udp`), outside the hooked cgroup; the
    /// backend reports the client address it saw on every request.
    pub fn outside_hold(
        &self,
        netns: &str,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
        udp: bool,
    ) -> Result<RunningClient> {
        let mut command = self.placed("hold", netns, None, target);
        command.args([
            "--duration-ms",
            &millis(duration),
            "--every-ms",
            &millis(every),
            "--ask-peer",
        ]);
        if udp {
            command.arg("--udp");
        }
        RunningClient::spawn(&mut command, duration + CLIENT_SLACK)
    }

    fn spawn_client_placed(
        &self,
        netns: &str,
        cgroup: Option<&Path>,
        request: &ClientRequest,
    ) -> Result<RunningClient> {
        let mut command = self.placed("client", netns, cgroup, request.target);
        if let Some(port) = request.source_port {
            command.args(["--source-port", &port.to_string()]);
        }
        if let Some(ip) = request.source_ip {
            command.args(["--source-ip", &ip.to_string()]);
        }
        if request.ask_peer {
            command.arg("--ask-peer");
        }
        command.args([
            "--proto",
            &request.proto.as_arg(),
            "--count",
            &request.count.to_string(),
            "--interval-ms",
            &millis(request.interval),
            "--timeout-ms",
            &millis(request.timeout),
        ]);
        RunningClient::spawn(&mut command, request.worst_case())
    }

    /// Sends crafted IPv4 TCP segments from `netns` (see `sy-testkit spoof`); returns how many
    /// were sent (a flood stops at `max` whatever the count).
    pub fn spoof(&self, netns: &str, segment: &Spoof) -> Result<u32> {
        let mut command = Command::new(&self.bin);
        command.args([
            "spoof",
            "--netns",
            netns,
            "--target",
            &segment.target.to_string(),
            "--source",
            &segment.source.to_string(),
            "--flags",
            &segment.flags.to_string(),
            "--seq",
            &segment.seq.to_string(),
            "--ack",
            &segment.ack.to_string(),
            "--count",
            &segment.count.to_string(),
            "--max-ms",
            &millis(segment.max),
        ]);
        if segment.vary_source {
            command.arg("--vary-source");
        }
        let output = crate::env::process::run_checked(&mut command, segment.max + CLIENT_SLACK)?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("sy-testkit spoof printed {text:?}"))
    }

    /// Sends one UDP datagram to `target` from each of `ports` source ports (from
    /// `first_port` up) of each of `source_ips`, in `netns` (see `sy-testkit scatter`);
    /// returns how many were sent (fewer when `max` ran out).
    pub fn scatter(
        &self,
        netns: &str,
        target: SocketAddr,
        source_ips: &[IpAddr],
        first_port: u16,
        ports: u32,
        max: Duration,
    ) -> Result<u32> {
        let mut command = Command::new(&self.bin);
        command.args([
            "scatter",
            "--netns",
            netns,
            "--target",
            &target.to_string(),
            "--first-port",
            &first_port.to_string(),
            "--count",
            &ports.to_string(),
            "--max-ms",
            &millis(max),
        ]);
        for ip in source_ips {
            command.args(["--source-ip", &ip.to_string()]);
        }
        let output = crate::env::process::run_checked(&mut command, max + CLIENT_SLACK)?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("sy-testkit scatter printed {text:?}"))
    }

    /// Opens one TCP connection and sends a request on it every `every` for `duration`.
    pub fn hold(
        &self,
        netns: &str,
        cgroup: &Path,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
    ) -> Result<RunningClient> {
        self.hold_with(netns, cgroup, target, duration, every, &[])
    }

    /// Like `hold`, over one connected UDP socket (replaced only when it fails).
    pub fn hold_udp(
        &self,
        netns: &str,
        cgroup: &Path,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
    ) -> Result<RunningClient> {
        self.hold_with(netns, cgroup, target, duration, every, &["--udp"])
    }

    fn hold_with(
        &self,
        netns: &str,
        cgroup: &Path,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
        extra: &[&str],
    ) -> Result<RunningClient> {
        let mut command = self.in_cgroup("hold", netns, cgroup, target);
        command.args([
            "--duration-ms",
            &millis(duration),
            "--every-ms",
            &millis(every),
        ]);
        command.args(extra);
        RunningClient::spawn(&mut command, duration + CLIENT_SLACK)
    }

    fn in_cgroup(
        &self,
        subcommand: &str,
        netns: &str,
        cgroup: &Path,
        target: SocketAddr,
    ) -> Command {
        self.placed(subcommand, netns, Some(cgroup), target)
    }

    fn placed(
        &self,
        subcommand: &str,
        netns: &str,
        cgroup: Option<&Path>,
        target: SocketAddr,
    ) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .arg(subcommand)
            .args(["--netns", netns, "--target", &target.to_string()]);
        if let Some(cgroup) = cgroup {
            command.arg("--cgroup").arg(cgroup);
        }
        command
    }
}

/// A running backend server, killed on drop.
#[derive(Debug)]
pub struct Server {
    pub name: String,
    _guard: ChildGuard,
    _stdout: LineCollector,
}

/// A client running in the background; killed on drop if never finished.
#[derive(Debug)]
pub struct RunningClient {
    guard: ChildGuard,
    stdout: LineCollector,
    stderr: LineCollector,
    worst_case: Duration,
}

impl RunningClient {
    fn spawn(command: &mut Command, worst_case: Duration) -> Result<Self> {
        let mut guard = ChildGuard::spawn(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            "testkit client",
        )?;
        let stdout = LineCollector::start(guard.child_mut().stdout.take().expect("piped"));
        let stderr = LineCollector::start(guard.child_mut().stderr.take().expect("piped"));
        Ok(Self {
            guard,
            stdout,
            stderr,
            worst_case,
        })
    }

    /// Attempts reported so far (lines that fail to parse are skipped here, not in `finish`).
    pub fn attempts_so_far(&self) -> Vec<Attempt> {
        parse_attempts(&self.stdout.snapshot()).unwrap_or_default()
    }

    /// Waits until at least `n` attempts were reported, at most `timeout`.
    pub fn wait_for_attempts(&self, n: usize, timeout: Duration) -> Result<Vec<Attempt>> {
        crate::env::process::wait_until(timeout, Duration::from_millis(5), || {
            let attempts = self.attempts_so_far();
            (attempts.len() >= n).then_some(attempts)
        })
        .with_context(|| format!("client reported fewer than {n} attempts within {timeout:?}"))
    }

    /// Waits for the client to exit (bounded by its worst case) and returns every attempt.
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let status = self.guard.wait_timeout(self.worst_case)?;
        let stderr = || self.stderr.snapshot().join("\n");
        let Some(status) = status else {
            bail!(
                "client hung past {:?}; stderr: {}",
                self.worst_case,
                stderr()
            );
        };
        if !status.success() {
            bail!("client failed with {status}; stderr: {}", stderr());
        }
        parse_attempts(&self.stdout.finish())
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Crafted IPv4 TCP segments for [`Testkit::spoof`].
#[derive(Clone, Debug)]
pub struct Spoof {
    pub source: std::net::SocketAddrV4,
    pub target: std::net::SocketAddrV4,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub count: u32,
    /// Vary the source host, port and sequence number segment by segment (a flood).
    pub vary_source: bool,
    /// The time bound of the whole send.
    pub max: Duration,
}

impl Spoof {
    /// One segment.
    pub fn one(
        source: std::net::SocketAddrV4,
        target: std::net::SocketAddrV4,
        flags: u8,
        seq: u32,
        ack: u32,
    ) -> Self {
        Self {
            source,
            target,
            flags,
            seq,
            ack,
            count: 1,
            vary_source: false,
            max: Duration::from_secs(2),
        }
    }
}
