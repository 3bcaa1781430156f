//! End-to-end tests of IP fragments and path MTU discovery through the north-south (TC)
//! datapath, in the topology of `switchyard_tests::world::north_south` (client → node with the agent
//! → local backend, or → node2 → remote backend), with veth checksum offloads off so that a
//! wrong checksum shows as a drop. Every loop is bounded in count and time.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::netns::run_in;
use switchyard_tests::k8s::external_service::ExternalService;
use switchyard_tests::k8s::external_service::{ServiceType, manifests};
use switchyard_tests::world::north_south::{
    LOCAL_BACKEND, NODE_EXT4, NODE_EXT6, NorthSouth, Offloads, REMOTE_BACKEND,
};
use switchyard_tests::{require_root, testkit};

/// The datagram size the issue names: more than two 1500-byte fragments' worth.
const DATAGRAM: usize = 3_000;
/// Echo exchanges per family at most (each from a new socket, so a new backend choice): both
/// backends are reached unless one of two choices came up every time (2^-39).
const MAX_EXCHANGES: usize = 40;
/// Exchanges per family at least.
const MIN_EXCHANGES: usize = 10;
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Sends of one datagram before the exchange counts as lost.
const TRIES: usize = 3;
/// Bulk data sent through the step-down path.
const BULK_BYTES: usize = 2_000_000;
const BULK_TIMEOUT: Duration = Duration::from_secs(20);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid IP literal")
}

fn node_port(v6: bool, port: u16) -> SocketAddr {
    let node = if v6 {
        IpAddr::from(NODE_EXT6)
    } else {
        IpAddr::from(NODE_EXT4)
    };
    SocketAddr::new(node, port)
}

/// A dual-stack NodePort (eTP Cluster) served by the local and the remote backend.
fn both_backends() -> ExternalService {
    ExternalService::new(
        "big",
        ServiceType::NodePort,
        &[ip("10.96.50.30"), ip("fd00:96::50:30")],
        80,
    )
    .node_port(30090)
    .local_endpoints()
    .remote_endpoints()
}

/// A dual-stack NodePort served by the remote backend only (behind node2).
fn remote_only() -> ExternalService {
    ExternalService::new(
        "bulk",
        ServiceType::NodePort,
        &[ip("10.96.50.31"), ip("fd00:96::50:31")],
        80,
    )
    .node_port(30091)
    .remote_endpoints()
}

/// Starts the agent on `service` and waits until the outside client is answered through its
/// NodePort over IPv4 and IPv6.
fn start(ns: &mut NorthSouth, service: &ExternalService) {
    ns.write_manifests(&manifests(&[service]));
    ns.start_agent(&[]);
    let port = service.node_port.expect("a NodePort");
    for v6 in [false, true] {
        let target = node_port(v6, port);
        ns.wait_outside(
            &ClientRequest::new(ClientProto::Tcp, target).timeout(Duration::from_secs(1)),
            &format!("an answer through {target}"),
            |a| {
                a.ok && [LOCAL_BACKEND, REMOTE_BACKEND]
                    .contains(&a.backend.as_deref().unwrap_or(""))
            },
        );
    }
}

fn counter(ns: &NorthSouth, name: &str) -> u64 {
    ns.datapath_counters().get(name).copied().unwrap_or(0)
}

/// The datagram of exchange `n`: the echo request marker and a pattern that differs per byte
/// and per exchange, `DATAGRAM` bytes in all.
fn datagram(n: usize) -> Vec<u8> {
    let mut bytes = b"ECHO".to_vec();
    bytes.extend((0..DATAGRAM - 4).map(|i| u8::try_from((i * 31 + n * 7) % 251).expect("< 251")));
    bytes
}

/// One echo exchange from a new connected socket: the backend's name, once the whole datagram
/// came back unchanged (a short, corrupted or missing answer is an error).
fn echo(target: SocketAddr, n: usize) -> Result<String> {
    let local: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    let sent = datagram(n);
    let mut buffer = vec![0_u8; 65_536];
    for _ in 0..TRIES {
        socket.send(&sent)?;
        let Ok(received) = socket.recv(&mut buffer) else {
            continue;
        };
        let answer = &buffer[..received];
        let space = answer
            .iter()
            .position(|&b| b == b' ')
            .context("an answer without the backend's name")?;
        let (name, echoed) = (&answer[..space], &answer[space + 1..]);
        ensure!(
            echoed == sent.as_slice(),
            "the echo of {} bytes came back as {} different bytes",
            sent.len(),
            echoed.len()
        );
        return Ok(String::from_utf8_lossy(name).into_owned());
    }
    anyhow::bail!("no answer to a {DATAGRAM}-byte datagram to {target} in {TRIES} tries")
}

/// A 3 000-byte UDP datagram from the outside client through a NodePort, on 1500-byte links (so
/// the client sends it as fragments and the backend answers in fragments), reaches the local
/// and the remote backend and comes back whole, over IPv4 and IPv6: the later fragments take
/// their first fragment's translation both ways.
#[test]
fn a_3000_byte_udp_datagram_crosses_a_node_port_both_ways_whole() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::Off);
    let service = both_backends();
    start(&mut ns, &service);
    let before = counter(&ns, "tc_fragment_translated");
    for v6 in [false, true] {
        let target = node_port(v6, service.node_port.expect("a NodePort"));
        let reached = run_in(ns.client_namespace(), move || {
            let mut reached = Vec::new();
            for n in 0..MAX_EXCHANGES {
                reached.push(echo(target, n)?);
                let both = [LOCAL_BACKEND, REMOTE_BACKEND]
                    .iter()
                    .all(|b| reached.iter().any(|r| r == b));
                if both && n + 1 >= MIN_EXCHANGES {
                    break;
                }
            }
            Ok(reached)
        })
        .unwrap_or_else(|e| panic!("echo of {DATAGRAM} bytes through {target}: {e:#}"));
        for backend in [LOCAL_BACKEND, REMOTE_BACKEND] {
            assert!(
                reached.iter().any(|r| r == backend),
                "{target}: the {backend} backend never answered in {} exchanges: {reached:?}",
                reached.len()
            );
        }
    }
    let translated = counter(&ns, "tc_fragment_translated") - before;
    eprintln!(
        "fragments translated: {translated}; untracked (dropped): {}",
        counter(&ns, "tc_fragment_untracked")
    );
    assert!(translated > 0, "later fragments were counted as translated");
    for netns in [
        ns.client_namespace().to_owned(),
        ns.local_backend_namespace().to_owned(),
        ns.remote_backend_namespace().to_owned(),
    ] {
        let errors = ns.checksum_errors(&netns);
        assert!(
            errors.values().all(|&n| n == 0),
            "checksum errors in {netns}: {errors:?}"
        );
    }
}

/// Sends `BULK_BYTES` over one TCP connection (DF set, as Linux TCP does) and returns the
/// backend's report `<name> <bytes received>`.
fn bulk(target: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    stream.set_write_timeout(Some(BULK_TIMEOUT))?;
    stream.set_read_timeout(Some(BULK_TIMEOUT))?;
    writeln!(stream, "SINK {BULK_BYTES}")?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut left = BULK_BYTES;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).context("sending bulk data")?;
        left -= n;
    }
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the backend's report")?;
    Ok(answer.trim().to_owned())
}

/// An MTU step down on the path: the node ↔ node2 link at 1280 while the client's link and the
/// remote backend's are at 1500 (so both ends agree on a 1460-byte MSS). The node answers
/// full-size segments with ICMP "fragmentation needed" / ICMPv6 "packet too big" through the
/// NodePort translation, the client lowers its path MTU, and a DF bulk transfer completes,
/// over IPv4 and IPv6. Run with veth offloads off and on (TSO/GSO: the node then meets
/// segments aggregated beyond the MTU and judges them per segment).
#[test]
fn an_mtu_step_down_behind_a_node_port_is_discovered_and_bulk_tcp_completes() {
    require_root!();
    for offloads in [Offloads::Off, Offloads::On] {
        let mut ns = NorthSouth::new(testkit!(), offloads);
        let service = remote_only();
        start(&mut ns, &service);
        ns.set_node2_link_mtu(1280);
        for v6 in [false, true] {
            let before = counter(&ns, "tc_frag_needed_sent");
            let target = node_port(v6, service.node_port.expect("a NodePort"));
            let report = run_in(ns.client_namespace(), move || bulk(target))
                .unwrap_or_else(|e| panic!("offloads {offloads:?}: bulk TCP to {target}: {e:#}"));
            assert_eq!(
                report,
                format!("{REMOTE_BACKEND} {BULK_BYTES}"),
                "offloads {offloads:?}: the backend's report of the bulk transfer to {target}"
            );
            let sent = counter(&ns, "tc_frag_needed_sent") - before;
            eprintln!("offloads {offloads:?}, {target}: {sent} MTU answers");
            assert!(
                sent > 0,
                "offloads {offloads:?}: {target}: the node never told the client the MTU (the \
                 transfer did not take the 1280 path?)"
            );
        }
    }
}
