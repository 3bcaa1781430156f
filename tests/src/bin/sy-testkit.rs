//! Test helper: backend servers and clients for the Switchyard end-to-end tests.
//!
//! It joins network namespaces with setns(2) rather than being started by `ip netns exec`,
//! because the latter remounts /sys and would hide the cgroup2 hierarchy a client must join.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, SockaddrStorage, bind, connect,
    listen, setsockopt, socket, sockopt,
};
use switchyard_tests::client::report::Attempt;
use switchyard_tests::client::testkit::{ClientProto, READY_LINE};

const REQUEST: &[u8] = b"hi\n";
/// A request asking the server to add the client address it saw to its answer.
const PEER_REQUEST: &[u8] = b"peer\n";
/// A UDP datagram starting with this is echoed whole after the server's name and a space.
const ECHO_REQUEST: &[u8] = b"ECHO";
/// `SINK <n>` on a TCP connection: `n` bytes follow, answered with `<name> <n received>`.
const SINK_REQUEST: &str = "SINK ";
/// A server connection idle this long is dropped, so forgotten connections cannot pile up.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_mins(1);

#[derive(Parser)]
#[command(about = "Servers and clients for Switchyard end-to-end tests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer every TCP line and every UDP datagram with NAME (with `NAME ADDRESS:PORT`, the
    /// client address the server saw, when the line or datagram is `peer`).
    Serve(ServeArgs),
    /// Make COUNT bounded attempts against TARGET, one JSON line each.
    Client(ClientArgs),
    /// Keep one TCP connection open and send a request on it every `--every-ms`.
    Hold(HoldArgs),
    /// Send crafted IPv4 TCP segments (any source address, flags and numbers) through a raw
    /// socket: spoofed SYNs and RSTs, and bounded SYN floods, between test namespaces only.
    Spoof(SpoofArgs),
    /// Send one UDP datagram from each of COUNT source ports (from `--first-port` up) of each
    /// `--source-ip` to TARGET, without waiting for answers: many one-shot flows with distinct
    /// tuples, e.g. to compare the backends two nodes choose for them.
    Scatter(ScatterArgs),
}

#[derive(Args)]
struct ScatterArgs {
    /// Network namespace (a name under /run/netns) to send from.
    #[arg(long)]
    netns: String,
    #[arg(long)]
    target: SocketAddr,
    /// Local addresses to send from (each must be configured in the namespace).
    #[arg(long = "source-ip", required = true)]
    source_ips: Vec<IpAddr>,
    #[arg(long)]
    first_port: u16,
    /// Source ports per address.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    count: u32,
    /// Stop after this long even if not every datagram was sent.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    max_ms: u64,
}

#[derive(Args)]
struct SpoofArgs {
    /// Network namespace (a name under /run/netns) to send from.
    #[arg(long)]
    netns: String,
    #[arg(long)]
    target: std::net::SocketAddrV4,
    #[arg(long)]
    source: std::net::SocketAddrV4,
    /// TCP flags byte (SYN 2, RST 4, ACK 16).
    #[arg(long)]
    flags: u8,
    #[arg(long, default_value_t = 0)]
    seq: u32,
    #[arg(long, default_value_t = 0)]
    ack: u32,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    count: u32,
    /// Vary the source: host 1-250 of the source's /24 and ports from the source port up,
    /// and the sequence number, segment by segment (a flood from many spoofed clients).
    #[arg(long)]
    vary_source: bool,
    /// Stop after this long even if not every segment was sent.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    max_ms: u64,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    name: String,
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    #[arg(long)]
    netns: Option<String>,
    /// Exit after this long even if nobody stops the server.
    #[arg(long, default_value_t = 600_000)]
    max_lifetime_ms: u64,
}

#[derive(Args)]
struct Placement {
    /// Network namespace (a name under /run/netns) to join.
    #[arg(long)]
    netns: String,
    /// Cgroup directory to join before anything else, so the agent's hooks see our sockets.
    /// Without it the process stays where it was started: an outside client the hooks ignore.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long)]
    target: SocketAddr,
}

#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    placement: Placement,
    #[arg(long, value_enum)]
    proto: ClientProto,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Bind every socket to this local port (TCP with SO_REUSEADDR) before connecting.
    #[arg(long)]
    source_port: Option<u16>,
    /// Bind every socket to this local address before connecting.
    #[arg(long)]
    source_ip: Option<IpAddr>,
    /// Ask the server for the client address it saw (reported as `seen_as`).
    #[arg(long)]
    ask_peer: bool,
}

#[derive(Args)]
struct HoldArgs {
    #[command(flatten)]
    placement: Placement,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    duration_ms: u64,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    every_ms: u64,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Hold a connected UDP socket instead of a TCP connection. When the socket fails (e.g. the
    /// agent destroyed it because its backend left), report that and connect a new one, as a
    /// resilient client would.
    #[arg(long)]
    udp: bool,
    /// Ask the server for the client address it saw (reported as `seen_as`).
    #[arg(long)]
    ask_peer: bool,
}

fn main() -> Result<()> {
    // Die with the test that started us, even if it is killed before its guards run.
    set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Client(args) => client(&args),
        Command::Hold(args) => hold(&args),
        Command::Spoof(args) => spoof(&args),
        Command::Scatter(args) => scatter(&args),
    }
}

fn join_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let handle = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&handle, CloneFlags::CLONE_NEWNET).with_context(|| format!("joining netns {name}"))
}

/// Joins the cgroup first (its path is only visible from the root mount namespace we start in),
/// then the network namespace.
fn place(placement: &Placement) -> Result<()> {
    if let Some(cgroup) = &placement.cgroup {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, format!("{}\n", std::process::id()))
            .with_context(|| format!("joining cgroup {}", procs.display()))?;
    }
    join_netns(&placement.netns)
}

// ---------------------------------------------------------------------------------------------
// serve

fn serve(args: &ServeArgs) -> Result<()> {
    if let Some(netns) = &args.netns {
        join_netns(netns)?;
    }
    // Bind everything before announcing readiness, and before spawning threads: threads
    // inherit the namespace the process joined above.
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &port in &args.ports {
        tcp.push(TcpListener::from(dual_stack_socket(
            SockType::Stream,
            port,
        )?));
        udp.push(UdpSocket::from(dual_stack_socket(
            SockType::Datagram,
            port,
        )?));
    }
    for listener in tcp {
        let name = args.name.clone();
        std::thread::spawn(move || accept_loop(&listener, &name));
    }
    for socket in udp {
        let name = args.name.clone();
        std::thread::spawn(move || answer_datagrams(&socket, &name));
    }
    println!("{READY_LINE}");
    std::thread::sleep(Duration::from_millis(args.max_lifetime_ms));
    Ok(())
}

/// An `[::]:port` socket that also accepts IPv4 (as mapped addresses), whatever the
/// `net.ipv6.bindv6only` default of the namespace.
fn dual_stack_socket(kind: SockType, port: u16) -> Result<OwnedFd> {
    let fd = socket(AddressFamily::Inet6, kind, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let address = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(fd.as_raw_fd(), &address).with_context(|| format!("binding [::]:{port} ({kind:?})"))?;
    if kind == SockType::Stream {
        listen(&fd, Backlog::new(256)?)?;
    }
    Ok(fd)
}

fn accept_loop(listener: &TcpListener, name: &str) {
    for stream in listener.incoming().flatten() {
        let name = name.to_owned();
        std::thread::spawn(move || {
            let _ = answer_lines(stream, &name);
        });
    }
}

fn answer_lines(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if let Some(count) = sink_request(&line) {
            // Bulk data: take exactly `count` bytes, then say how many arrived.
            let mut rest = (&mut reader).take(count);
            let received = std::io::copy(&mut rest, &mut std::io::sink())?;
            writer.write_all(format!("{name} {received}\n").as_bytes())?;
            line.clear();
            continue;
        }
        let answer = answer_for(line.as_bytes(), name, peer);
        writer.write_all(format!("{answer}\n").as_bytes())?;
        line.clear();
    }
    Ok(())
}

/// `SINK <bytes>`: the client sends that many bytes of bulk data next (at most 1 GiB).
fn sink_request(line: &str) -> Option<u64> {
    let count: u64 = line.trim_ascii().strip_prefix(SINK_REQUEST)?.parse().ok()?;
    (count <= 1 << 30).then_some(count)
}

fn answer_datagrams(socket: &UdpSocket, name: &str) {
    // Large enough for any UDP datagram (big ones arrive as IP fragments).
    let mut buffer = vec![0_u8; 65_536];
    loop {
        if let Ok((n, sender)) = socket.recv_from(&mut buffer) {
            let request = &buffer[..n];
            if request.starts_with(ECHO_REQUEST) {
                // `name ` and the whole datagram back.
                let mut answer = format!("{name} ").into_bytes();
                answer.extend_from_slice(request);
                let _ = socket.send_to(&answer, sender);
                continue;
            }
            let answer = answer_for(request, name, sender);
            let _ = socket.send_to(answer.as_bytes(), sender);
        }
    }
}

/// `name`, or `name address:port` (IPv4 peers of the dual-stack sockets shown as IPv4) when
/// the request asks for the peer.
fn answer_for(request: &[u8], name: &str, peer: SocketAddr) -> String {
    if request.trim_ascii() == PEER_REQUEST.trim_ascii() {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        format!("{name} {peer}")
    } else {
        name.to_owned()
    }
}

/// The request to send, and how to read its answer into (backend name, address seen).
fn request_bytes(ask_peer: bool) -> &'static [u8] {
    if ask_peer { PEER_REQUEST } else { REQUEST }
}

fn parse_answer(answer: &str, ask_peer: bool) -> Result<(String, Option<SocketAddr>), Failure> {
    if !ask_peer {
        return Ok((answer.to_owned(), None));
    }
    let bad = || Failure {
        step: "parse answer",
        error: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected `NAME ADDRESS:PORT`, got {answer:?}"),
        ),
    };
    let (name, seen) = answer.split_once(' ').ok_or_else(bad)?;
    let seen = seen.trim().parse().map_err(|_| bad())?;
    Ok((name.to_owned(), Some(seen)))
}

// ---------------------------------------------------------------------------------------------
// client

/// How a client's sockets are set up and what it asks.
#[derive(Clone, Copy)]
struct Options {
    timeout: Duration,
    source_port: Option<u16>,
    source_ip: Option<IpAddr>,
    ask_peer: bool,
}

fn client(args: &ClientArgs) -> Result<()> {
    place(&args.placement)?;
    let options = Options {
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        source_port: args.source_port,
        source_ip: args.source_ip,
        ask_peer: args.ask_peer,
    };
    for i in 0..args.count {
        if i > 0 && args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let started = Instant::now();
        let target = args.placement.target;
        let result = match args.proto {
            ClientProto::Tcp => tcp_exchange(target, options),
            ClientProto::UdpConnected => udp_connected_exchange(target, options),
            ClientProto::UdpUnconnected => udp_unconnected_exchange(target, options),
        };
        println!("{}", to_attempt(result, started).to_json_line());
    }
    Ok(())
}

/// What one successful exchange observed.
struct Exchange {
    backend: String,
    peer: Option<SocketAddr>,
    source: Option<SocketAddr>,
    seen_as: Option<SocketAddr>,
}

/// The failing step and its error.
struct Failure {
    step: &'static str,
    error: std::io::Error,
}

trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, Failure>;
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, step: &'static str) -> Result<T, Failure> {
        self.map_err(|error| Failure { step, error })
    }
}

fn to_attempt(result: Result<Exchange, Failure>, started: Instant) -> Attempt {
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(exchange) => Attempt {
            ok: true,
            backend: Some(exchange.backend),
            peer: exchange.peer,
            source: exchange.source,
            seen_as: exchange.seen_as,
            errno: None,
            error: None,
            elapsed_ms,
        },
        Err(failure) => Attempt {
            ok: false,
            errno: Some(errno_of(&failure.error)),
            error: Some(format!("{}: {}", failure.step, failure.error)),
            elapsed_ms,
            ..Attempt::default()
        },
    }
}

/// The errno of a failure; timeouts (which std reports as EAGAIN or without an errno) become
/// ETIMEDOUT so callers need only one code for "no answer in time".
fn errno_of(error: &std::io::Error) -> i32 {
    match error.raw_os_error() {
        Some(libc::EAGAIN) | None if is_timeout(error) => libc::ETIMEDOUT,
        Some(errno) => errno,
        None => libc::EIO,
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

fn tcp_exchange(target: SocketAddr, options: Options) -> Result<Exchange, Failure> {
    let stream = match (options.source_port, options.source_ip) {
        (None, None) => TcpStream::connect_timeout(&target, options.timeout).step("connect")?,
        (port, ip) => tcp_connect_from(target, port.unwrap_or(0), ip, options.timeout)?,
    };
    let peer = stream.peer_addr().step("getpeername")?;
    let answer = request_on(&stream, options.timeout, request_bytes(options.ask_peer))?;
    let (backend, seen_as) = parse_answer(&answer, options.ask_peer)?;
    // Dropping the stream here makes the client close first.
    Ok(Exchange {
        backend,
        peer: Some(peer),
        source: None,
        seen_as,
    })
}

/// A TCP connection from local port `port` (SO_REUSEADDR, so a TIME_WAIT of an earlier
/// connection from that port to another destination does not stop the bind).
fn tcp_connect_from(
    target: SocketAddr,
    port: u16,
    ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, Failure> {
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(std::io::Error::from)
        .step("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)
        .map_err(std::io::Error::from)
        .step("setsockopt")?;
    // A blocking connect() gives up after SO_SNDTIMEO (with EINPROGRESS).
    let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(micros / 1_000_000, micros % 1_000_000),
    )
    .map_err(std::io::Error::from)
    .step("setsockopt")?;
    let mut local = unspecified_for(target);
    local.set_port(port);
    if let Some(ip) = ip {
        local.set_ip(ip);
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))
        .map_err(std::io::Error::from)
        .step("bind")?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => {
            return Err(Failure {
                step: "connect",
                error: std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            });
        }
        Err(errno) => {
            return Err(Failure {
                step: "connect",
                error: errno.into(),
            });
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(None).step("setsockopt")?;
    Ok(stream)
}

/// Sends one request on an established connection and reads the one-line answer.
fn request_on(stream: &TcpStream, timeout: Duration, request: &[u8]) -> Result<String, Failure> {
    stream.set_read_timeout(Some(timeout)).step("setsockopt")?;
    stream.set_write_timeout(Some(timeout)).step("setsockopt")?;
    let mut writer = stream;
    writer.write_all(request).step("send")?;
    // One byte at a time so nothing past the answer's newline is consumed and lost.
    let mut answer = Vec::new();
    let mut reader = stream;
    let mut byte = [0_u8; 1];
    loop {
        let n = std::io::Read::read(&mut reader, &mut byte).step("recv")?;
        if n == 0 {
            return Err(Failure {
                step: "recv",
                error: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a full answer",
                ),
            });
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&answer).into_owned());
        }
        answer.push(byte[0]);
    }
}

fn unspecified_for(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn udp_socket(target: SocketAddr, options: Options) -> Result<UdpSocket, Failure> {
    let mut local = unspecified_for(target);
    local.set_port(options.source_port.unwrap_or(0));
    if let Some(ip) = options.source_ip {
        local.set_ip(ip);
    }
    let socket = UdpSocket::bind(local).step("bind")?;
    socket
        .set_read_timeout(Some(options.timeout))
        .step("setsockopt")?;
    Ok(socket)
}

fn receive_answer(
    socket: &UdpSocket,
    ask_peer: bool,
) -> Result<(String, Option<SocketAddr>, SocketAddr), Failure> {
    let mut buffer = [0_u8; 2048];
    let (n, source) = socket.recv_from(&mut buffer).step("recvfrom")?;
    let (backend, seen_as) = parse_answer(&String::from_utf8_lossy(&buffer[..n]), ask_peer)?;
    Ok((backend, seen_as, source))
}

fn udp_connected_exchange(target: SocketAddr, options: Options) -> Result<Exchange, Failure> {
    let socket = udp_socket(target, options)?;
    socket.connect(target).step("connect")?;
    exchange_on(&socket, options.ask_peer)
}

fn udp_unconnected_exchange(target: SocketAddr, options: Options) -> Result<Exchange, Failure> {
    let socket = udp_socket(target, options)?;
    socket
        .send_to(request_bytes(options.ask_peer), target)
        .step("sendto")?;
    let (backend, seen_as, source) = receive_answer(&socket, options.ask_peer)?;
    Ok(Exchange {
        backend,
        peer: Some(source),
        source: Some(source),
        seen_as,
    })
}

// ---------------------------------------------------------------------------------------------
// hold

fn hold(args: &HoldArgs) -> Result<()> {
    place(&args.placement)?;
    if args.udp {
        hold_udp(args);
        return Ok(());
    }
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let every = Duration::from_millis(args.every_ms);
    let started = Instant::now();
    let end = started + Duration::from_millis(args.duration_ms);
    let stream = match TcpStream::connect_timeout(&args.placement.target, timeout).step("connect") {
        Ok(stream) => stream,
        Err(failure) => {
            println!("{}", to_attempt(Err(failure), started).to_json_line());
            return Ok(());
        }
    };
    let peer = stream.peer_addr().ok();
    let mut next = started;
    while next < end {
        let attempt_started = Instant::now();
        let result =
            request_on(&stream, timeout, request_bytes(args.ask_peer)).and_then(|answer| {
                let (backend, seen_as) = parse_answer(&answer, args.ask_peer)?;
                Ok(Exchange {
                    backend,
                    peer,
                    source: None,
                    seen_as,
                })
            });
        println!("{}", to_attempt(result, attempt_started).to_json_line());
        next += every;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

fn connected_udp(target: SocketAddr, options: Options) -> Result<UdpSocket, Failure> {
    let socket = udp_socket(target, options)?;
    socket.connect(target).step("connect")?;
    Ok(socket)
}

fn exchange_on(socket: &UdpSocket, ask_peer: bool) -> Result<Exchange, Failure> {
    let peer = socket.peer_addr().step("getpeername")?;
    socket.send(request_bytes(ask_peer)).step("send")?;
    let (backend, seen_as, source) = receive_answer(socket, ask_peer)?;
    Ok(Exchange {
        backend,
        peer: Some(peer),
        source: Some(source),
        seen_as,
    })
}

/// One connected UDP socket kept for the whole duration, replaced only after it failed.
fn hold_udp(args: &HoldArgs) {
    let options = Options {
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        source_port: None,
        source_ip: None,
        ask_peer: args.ask_peer,
    };
    let every = Duration::from_millis(args.every_ms);
    let started = Instant::now();
    let end = started + Duration::from_millis(args.duration_ms);
    let mut socket = None;
    let mut next = started;
    while next < end {
        let attempt_started = Instant::now();
        let result = match socket.take() {
            Some(open) => Ok(open),
            None => connected_udp(args.placement.target, options),
        }
        .and_then(|open| {
            let exchange = exchange_on(&open, options.ask_peer);
            // A timeout is not a broken socket; any other failure is.
            if exchange.as_ref().is_ok() || exchange.as_ref().is_err_and(|f| is_timeout(&f.error)) {
                socket = Some(open);
            }
            exchange
        });
        println!("{}", to_attempt(result, attempt_started).to_json_line());
        next += every;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

// ---------------------------------------------------------------------------------------------
// spoof

fn spoof(args: &SpoofArgs) -> Result<()> {
    use nix::sys::socket::{MsgFlags, SockProtocol, SockaddrIn, sendto};
    use switchyard_tests::datapath::packet::Packet;
    join_netns(&args.netns)?;
    // IPPROTO_RAW: we write the IP header ourselves (IP_HDRINCL is implied).
    let raw = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )
    .context("opening a raw IPv4 socket")?;
    let deadline = Instant::now() + Duration::from_millis(args.max_ms);
    let destination = SockaddrIn::from(args.target);
    let mut sent: u32 = 0;
    while sent < args.count && Instant::now() < deadline {
        let (source, seq) = if args.vary_source {
            let [a, b, c, _] = args.source.ip().octets();
            let host = u8::try_from(sent % 250).expect("below 250") + 1;
            let port = args
                .source
                .port()
                .wrapping_add(u16::try_from(sent % 20_000).expect("below 20000"));
            let seq = args.seq.wrapping_add(sent.wrapping_mul(7919));
            (
                std::net::SocketAddrV4::new(Ipv4Addr::new(a, b, c, host), port),
                seq,
            )
        } else {
            (args.source, args.seq)
        };
        let packet = Packet::tcp(source.into(), args.target.into(), args.flags, seq, args.ack);
        match sendto(
            raw.as_raw_fd(),
            &packet.to_ip(),
            &destination,
            MsgFlags::empty(),
        ) {
            Ok(_) => sent += 1,
            // The neighbour queue may be full for a moment during a flood.
            Err(Errno::ENOBUFS | Errno::EAGAIN) => std::thread::sleep(Duration::from_micros(200)),
            Err(error) => return Err(error).context("sending a crafted segment"),
        }
    }
    println!("{sent}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// scatter

/// Sends the datagrams of `sy-testkit scatter` and prints how many went out. A socket per
/// tuple, closed at once: the flows are one-shot, their answers (if any) meet a closed port.
fn scatter(args: &ScatterArgs) -> Result<()> {
    join_netns(&args.netns)?;
    let last_port = u16::try_from(u32::from(args.first_port) + args.count - 1)
        .ok()
        .with_context(|| format!("{} ports from {} do not fit", args.count, args.first_port))?;
    let deadline = Instant::now() + Duration::from_millis(args.max_ms);
    let mut sent: u32 = 0;
    'all: for &ip in &args.source_ips {
        for port in args.first_port..=last_port {
            if Instant::now() >= deadline {
                break 'all;
            }
            let socket = UdpSocket::bind(SocketAddr::new(ip, port))
                .with_context(|| format!("binding {ip} port {port}"))?;
            loop {
                match socket.send_to(REQUEST, args.target) {
                    Ok(_) => break,
                    // The neighbour queue may be full for a moment.
                    Err(error)
                        if error.kind() == std::io::ErrorKind::WouldBlock
                            || error.raw_os_error() == Some(Errno::ENOBUFS as i32) =>
                    {
                        if Instant::now() >= deadline {
                            break 'all;
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(error) => {
                        return Err(error).with_context(|| format!("sending from {ip}:{port}"));
                    }
                }
            }
            sent += 1;
        }
    }
    println!("{sent}");
    Ok(())
}
