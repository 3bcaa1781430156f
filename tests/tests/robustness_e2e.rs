//! The agent against hostile and failing conditions: a manifests file rewritten in place, slow
//! HTTP clients with few file descriptors left, and SIGKILL while stale UDP sockets are being
//! reaped.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use switchyard_tests::client::http::get_in_netns;
use switchyard_tests::client::report::{assert_all_ok, backend_counts};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::process::wait_until;
use switchyard_tests::k8s::manifests::{Manifests, Protocol};
use switchyard_tests::world::harness::{Harness, backend_name};
use switchyard_tests::{require_root, testkit};

fn vip(index: usize) -> IpAddr {
    format!("10.96.8.{}", 10 + index).parse().expect("an IP")
}

fn at(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 80)
}

/// `count` Services `svc-N` at 10.96.8.(10+N), TCP and UDP port 80, all on `backends`.
fn services(count: usize, backends: &[IpAddr]) -> Manifests {
    let mut manifests = Manifests::new();
    for index in 0..count {
        let name = format!("svc-{index}");
        manifests = manifests.backed_service(
            &name,
            &[vip(index)],
            &[("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 80)],
            backends,
        );
    }
    manifests
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target).count(count)
}

#[test]
fn a_manifests_file_rewritten_in_place_never_loses_services() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    let whole = services(50, &backends);
    harness.write_manifests(&whole);
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at(vip(49)));
    let text = whole.render();
    let path = harness.manifests_path();

    // A writer that truncates the file and stops half-way (as `cat > file` or a crashed
    // generator would): the file stays cut for a second, far longer than a poll.
    for cut in [text.len() / 2, text.len() / 3, text.len() - 7] {
        // Anywhere but right after a line break (which can look whole: see the README).
        let cut = if text[..cut].ends_with('\n') {
            cut - 1
        } else {
            cut
        };
        std::fs::write(&path, &text[..cut]).expect("writing half the file in place");
        std::thread::sleep(Duration::from_secs(1));
        for index in [0, 24, 49] {
            assert_all_ok(
                &harness.client(&tcp(at(vip(index)), 3)),
                &format!("svc-{index} while the file is cut at byte {cut}"),
            );
        }
        std::fs::write(&path, &text).expect("completing the file");
    }
    let log = harness.agent().log();
    assert!(
        log.contains("is incomplete") && log.contains("keeping the last good state"),
        "the agent warns about the cut file"
    );
    // A complete change still applies promptly.
    let fewer = services(49, &backends);
    harness.write_manifests(&fewer);
    let gone = wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        harness.client(&tcp(at(vip(49)), 1))[0]
            .errno
            .filter(|errno| *errno == libc::ENETUNREACH)
    });
    assert!(
        gone.is_some(),
        "svc-49, removed by a complete file, is gone"
    );
}

/// Opens `count` connections to `address` from inside `netns` that send one byte of a request
/// head per second and never finish it, for `hold`.
fn slow_clients(
    netns: &str,
    address: SocketAddr,
    count: usize,
    hold: Duration,
) -> std::thread::JoinHandle<usize> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let namespace = std::fs::File::open(&path).expect("opening the node namespace");
        setns(namespace, CloneFlags::CLONE_NEWNET).expect("entering the node namespace");
        let mut streams: Vec<TcpStream> = (0..count)
            .filter_map(|_| TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok())
            .collect();
        let opened = streams.len();
        let until = Instant::now() + hold;
        let head = b"GET /healthz HTTP/1.1\r\n";
        let mut sent = 0;
        while Instant::now() < until {
            let byte = [head[sent % head.len()]];
            // Connections the agent closed fail here; the others trickle on.
            streams.retain_mut(|stream| stream.write_all(&byte).is_ok());
            sent += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        opened
    })
}

#[test]
fn slow_http_clients_and_few_file_descriptors_do_not_wedge_the_agent() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    harness.write_manifests(&services(2, &backends));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at(vip(1)));
    let pid = harness.agent().pid().expect("the agent runs");
    let limited = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=256:256"])
        .status()
        .expect("running prlimit");
    assert!(limited.success(), "prlimit failed");
    let health: SocketAddr = "127.0.0.1:10256".parse().expect("an address");
    let netns = harness.topology().node_namespace().to_owned();
    let attackers = slow_clients(&netns, health, 300, Duration::from_secs(12));
    std::thread::sleep(Duration::from_secs(3));

    // Fresh requests are answered within a second, again and again.
    for round in 0..5 {
        let started = Instant::now();
        let (status, body) = get_in_netns(&netns, health, "/healthz").expect("GET /healthz");
        let took = started.elapsed();
        assert_eq!(status, 200, "round {round}: {body}");
        assert!(
            took < Duration::from_secs(1),
            "round {round}: /healthz took {took:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The manifests file can still be read and is applied.
    harness.write_manifests(&services(3, &backends));
    harness.wait_until_translated(ClientProto::Tcp, at(vip(2)));
    let opened = attackers.join().expect("the slow clients");
    assert!(opened >= 250, "only {opened} slow connections were opened");
    harness
        .agent()
        .ensure_running()
        .expect("the agent still runs");
    let log = harness.agent().log();
    assert!(!log.contains("panicked"), "the agent panicked");
}

#[test]
fn sigkill_while_reaping_stale_udp_sockets_is_repaired_by_the_next_agent() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    let target = at(vip(0));
    harness.write_manifests(&services(1, &backends[..1]));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, target);
    // Deterministic per-iteration kill delays spread over the sync and the reaping that
    // follows the file change (0 to ~400 ms after the rewrite).
    for iteration in 0..20u64 {
        let (from, to) = if iteration % 2 == 0 { (0, 1) } else { (1, 0) };
        harness.write_manifests(&services(1, &backends[from..=from]));
        harness.wait_until_translated(ClientProto::Tcp, target);
        let udp = harness.hold_udp(target, Duration::from_secs(4), Duration::from_millis(50));
        udp.wait_for_attempts(2, Duration::from_secs(3))
            .expect("the UDP socket answered");
        // The backend leaves the Service; the agent is killed somewhere in the sync and reap.
        harness.write_manifests(&services(1, &backends[to..=to]));
        std::thread::sleep(Duration::from_millis(iteration * 37 % 400));
        harness.agent().kill().expect("SIGKILL");
        harness.agent().restart().expect("restarting");
        let attempts = udp.finish().expect("the UDP socket finished");
        let destroyed = attempts.iter().any(|attempt| {
            attempt.errno.is_some_and(|errno| {
                [libc::ECONNABORTED, libc::ENOTCONN, libc::EDESTADDRREQ].contains(&errno)
            })
        });
        assert!(
            destroyed,
            "iteration {iteration}: the socket aimed at {} was never destroyed: {:?}",
            backend_name(from),
            backend_counts(&attempts)
        );
        // The restarted agent serves the new backend only.
        let reached: BTreeSet<String> = backend_counts(&harness.client(&tcp(target, 10)))
            .into_keys()
            .collect();
        assert_eq!(
            reached,
            BTreeSet::from([backend_name(to)]),
            "iteration {iteration}"
        );
    }
}
