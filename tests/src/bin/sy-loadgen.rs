//! Load generator and backend server of `cargo xtask bench`.
//!
//! `serve` runs in a backend namespace: a tiny HTTP/1.1 answer, a bulk download
//! (`GET /bulk?bytes=N`) and a UDP echo. `latency`, `cps`, `throughput` and `udp` run in a
//! client namespace and print one JSON summary line. Like sy-testkit, clients join the cgroup
//! (if any) and then the network namespace with setns(2), because `ip netns exec` remounts /sys
//! and would hide the cgroup2 hierarchy. Every loop is bounded in count and in time, and the
//! client always closes first so that backends never hold TIME_WAIT for a reused 4-tuple.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Args, Parser, Subcommand};
use nix::sched::{CloneFlags, setns};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use serde::Serialize;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
/// A request head longer than this is refused (the server only ever gets the two above).
const MAX_HEAD: usize = 8192;
const BULK_CHUNK: usize = 64 * 1024;
/// A server connection idle this long is dropped, so a lost client cannot pin a worker.
const SERVER_IDLE: Duration = Duration::from_secs(30);
/// Hard caps on top of the caller's bounds.
const MAX_CONNECTIONS: u64 = 10_000_000;
const MAX_DURATION: Duration = Duration::from_mins(10);

#[derive(Parser)]
#[command(about = "Backend server and load generator of the Switchyard benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP/1.1 on TCP (tiny answer or bulk download) and a UDP echo on PORT.
    Serve(ServeArgs),
    /// Sequential new connections (connect, request, full response, close), each timed.
    Latency(LatencyArgs),
    /// New connections from a fixed number of concurrent workers, for a fixed time (or until
    /// `--count` connections were made, whichever comes first).
    Cps(CpsArgs),
    /// One long download.
    Throughput(ThroughputArgs),
    /// Sequential UDP datagrams, each waiting for its echo.
    Udp(LatencyArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    netns: String,
    #[arg(long)]
    port: u16,
    /// Threads accepting and serving connections (one connection each at a time).
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Exit after this long even if nobody stops the server.
    #[arg(long, default_value_t = 4 * 3600 * 1000)]
    max_lifetime_ms: u64,
}

#[derive(Args)]
struct Placement {
    /// Network namespace (a name under /run/netns) to join.
    #[arg(long)]
    netns: String,
    /// Cgroup directory to join first, so socket hooks attached there see our sockets.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where to connect; several are used in turn (the direct baseline spreads over backends).
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    /// Per-operation timeout (connect, each read and write).
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    placement: Placement,
    #[arg(long)]
    count: u64,
    /// Stop early after this long, whatever the count.
    #[arg(long)]
    max_ms: u64,
}

#[derive(Args)]
struct CpsArgs {
    #[command(flatten)]
    placement: Placement,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    duration_ms: u64,
    /// Stop after this many connections in all (spread over the workers).
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    placement: Placement,
    /// Bytes to download at most.
    #[arg(long)]
    bytes: u64,
    #[arg(long)]
    duration_ms: u64,
}

/// The one JSON line every client subcommand prints.
#[derive(Debug, Default, Serialize)]
struct Summary {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed_s: f64,
    /// Per successful exchange, in microseconds (latency and udp).
    samples_us: Vec<u32>,
    conn_per_s: Option<f64>,
    bytes: u64,
    gbps: Option<f64>,
}

impl Summary {
    fn error(&mut self, error: &std::io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

fn main() -> Result<()> {
    // Die with the bench that started us, even if it is killed before its guards run.
    set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    let summary = match Cli::parse().command {
        Command::Serve(args) => return serve(&args),
        Command::Latency(args) => latency(&args)?,
        Command::Cps(args) => cps(&args)?,
        Command::Throughput(args) => throughput(&args)?,
        Command::Udp(args) => udp(&args)?,
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn join_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let handle = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&handle, CloneFlags::CLONE_NEWNET).with_context(|| format!("joining netns {name}"))
}

/// Joins the cgroup (only visible from the root mount namespace we start in), then the netns.
/// Threads spawned afterwards inherit both.
fn place(placement: &Placement) -> Result<Duration> {
    if let Some(cgroup) = &placement.cgroup {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, format!("{}\n", std::process::id()))
            .with_context(|| format!("joining cgroup {}", procs.display()))?;
    }
    join_netns(&placement.netns)?;
    Ok(Duration::from_millis(placement.timeout_ms.max(1)))
}

fn bounded(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_DURATION)
}

// ---------------------------------------------------------------------------------------------
// serve

fn serve(args: &ServeArgs) -> Result<()> {
    join_netns(&args.netns)?;
    let listener = Arc::new(
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, args.port))
            .with_context(|| format!("binding TCP port {}", args.port))?,
    );
    let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, args.port))
        .with_context(|| format!("binding UDP port {}", args.port))?;
    for _ in 0..args.workers.max(1) {
        let listener = Arc::clone(&listener);
        std::thread::spawn(move || {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve_connection(stream);
                    }
                    // E.g. EMFILE: back off instead of spinning.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
    std::thread::spawn(move || echo(&udp));
    println!("ready");
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_millis(args.max_lifetime_ms));
    Ok(())
}

/// Answers requests until the client closes (the client always closes first).
fn serve_connection(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_IDLE))?;
    stream.set_write_timeout(Some(SERVER_IDLE))?;
    let mut buffer = Vec::with_capacity(1024);
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buffer)? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end);
        match bulk_size(&head) {
            Some(bytes) => send_bulk(&mut stream, bytes)?,
            None => stream.write_all(RESPONSE)?,
        }
    }
}

/// The size asked for by `GET /bulk?bytes=N`.
fn bulk_size(head: &str) -> Option<u64> {
    let path = head.lines().next()?.split(' ').nth(1)?;
    path.strip_prefix("/bulk?bytes=")?.parse().ok()
}

fn send_bulk(stream: &mut TcpStream, bytes: u64) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {bytes}\r\n\r\n"
    )?;
    let chunk = vec![0_u8; BULK_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(BULK_CHUNK, |left| left.min(BULK_CHUNK));
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn echo(socket: &UdpSocket) {
    let mut buffer = [0_u8; 2048];
    loop {
        if let Ok((n, sender)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&buffer[..n], sender);
        }
    }
}

/// Reads until `buffer` holds a whole head (ending in an empty line); returns its length
/// including the empty line, or `None` on a clean end of stream before any byte of a head.
fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0_u8; 2048];
    loop {
        if let Some(end) = find_head_end(buffer) {
            return Ok(Some(end));
        }
        if buffer.len() > MAX_HEAD {
            return Err(std::io::Error::new(ErrorKind::InvalidData, "head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(ErrorKind::UnexpectedEof.into())
            };
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| at + 4)
}

// ---------------------------------------------------------------------------------------------
// clients

/// The response to one request: the status line is checked and the body consumed in full (or
/// until `deadline`); returns the body bytes read.
fn read_response(stream: &mut TcpStream, deadline: Option<Instant>) -> std::io::Result<u64> {
    let mut buffer = Vec::with_capacity(256);
    let head_end = read_head(stream, &mut buffer)?.ok_or(ErrorKind::UnexpectedEof)?;
    let head = String::from_utf8_lossy(&buffer[..head_end]);
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("unexpected status: {}", head.lines().next().unwrap_or("")),
        ));
    }
    let length: u64 = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "no Content-Length"))?;
    let mut received = (buffer.len() - head_end) as u64;
    let mut chunk = vec![0_u8; BULK_CHUNK];
    while received < length {
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        received += n as u64;
    }
    Ok(received)
}

/// One new connection: connect, request, full response, close (client first).
fn exchange(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(REQUEST)?;
    read_response(&mut stream, None)?;
    Ok(())
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

fn latency(args: &LatencyArgs) -> Result<Summary> {
    let timeout = place(&args.placement)?;
    let targets = &args.placement.targets;
    let started = Instant::now();
    let end = started + bounded(args.max_ms);
    let mut summary = Summary::default();
    for i in 0..args.count.min(MAX_CONNECTIONS) {
        if Instant::now() >= end {
            break;
        }
        let target = targets[usize::try_from(i).unwrap_or(0) % targets.len()];
        let begin = Instant::now();
        match exchange(target, timeout) {
            Ok(()) => {
                summary.samples_us.push(micros(begin.elapsed()));
                summary.ok += 1;
            }
            Err(error) => summary.error(&error),
        }
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn cps(args: &CpsArgs) -> Result<Summary> {
    let timeout = place(&args.placement)?;
    ensure!(
        (1..=256).contains(&args.concurrency),
        "concurrency must be 1..=256"
    );
    let targets = Arc::new(args.placement.targets.clone());
    let started = Instant::now();
    let end = started + bounded(args.duration_ms);
    let connections = args.count.unwrap_or(MAX_CONNECTIONS).min(MAX_CONNECTIONS);
    let per_worker = connections.div_ceil(args.concurrency as u64);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            let targets = Arc::clone(&targets);
            std::thread::spawn(move || {
                let mut summary = Summary::default();
                for i in 0..per_worker {
                    if Instant::now() >= end {
                        break;
                    }
                    let index = (worker + usize::try_from(i).unwrap_or(0)) % targets.len();
                    match exchange(targets[index], timeout) {
                        Ok(()) => summary.ok += 1,
                        Err(error) => summary.error(&error),
                    }
                }
                summary
            })
        })
        .collect();
    let mut total = Summary::default();
    for worker in workers {
        let summary = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a cps worker panicked"))?;
        total.ok += summary.ok;
        total.errors += summary.errors;
        total.first_error = total.first_error.or(summary.first_error);
    }
    total.elapsed_s = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let rate = total.ok as f64 / total.elapsed_s;
    total.conn_per_s = Some(rate);
    Ok(total)
}

fn throughput(args: &ThroughputArgs) -> Result<Summary> {
    let timeout = place(&args.placement)?;
    let target = args.placement.targets[0];
    let mut summary = Summary::default();
    let started = Instant::now();
    let deadline = started + bounded(args.duration_ms);
    let result = (|| {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET /bulk?bytes={} HTTP/1.1\r\nHost: bench\r\n\r\n",
            args.bytes
        )?;
        // Closing with unread data sends a reset: still the client closing first.
        read_response(&mut stream, Some(deadline))
    })();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    match result {
        Ok(bytes) => {
            summary.ok = 1;
            summary.bytes = bytes;
            #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
            let gbps = bytes as f64 * 8.0 / summary.elapsed_s / 1e9;
            summary.gbps = Some(gbps);
        }
        Err(error) => summary.error(&error),
    }
    Ok(summary)
}

fn udp(args: &LatencyArgs) -> Result<Summary> {
    let timeout = place(&args.placement)?;
    let targets = &args.placement.targets;
    let started = Instant::now();
    let end = started + bounded(args.max_ms);
    let mut summary = Summary::default();
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buffer = [0_u8; 64];
    for i in 0..args.count.min(MAX_CONNECTIONS) {
        if Instant::now() >= end {
            break;
        }
        let target = targets[usize::try_from(i).unwrap_or(0) % targets.len()];
        let payload = i.to_be_bytes();
        let begin = Instant::now();
        let result = socket.send_to(&payload, target).and_then(|_| {
            loop {
                // A late echo of an earlier, timed-out datagram is skipped.
                let (n, _) = socket.recv_from(&mut buffer)?;
                if buffer[..n] == payload {
                    return Ok(());
                }
            }
        });
        match result {
            Ok(()) => {
                summary.samples_us.push(micros(begin.elapsed()));
                summary.ok += 1;
            }
            Err(error) => summary.error(&error),
        }
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    Ok(summary)
}
