//! The fault matrix: SIGKILL at seeded random moments during a large sync, during the
//! follow-up reaping and during attach, 20 times each, then a restart; and the agent down for a
//! minute under load. After every restart the dataplane converges to exactly what a clean agent
//! writes for the same file (the `dump`, ids renumbered), the UDP socket aimed at a removed
//! backend is destroyed, the changed Services reach only their new backend, and a connection
//! loop to Services that never changed sees no failure from the first kill to the last.
//! (An API server outage of a minute is in kube_source_e2e.rs.)

use std::collections::BTreeSet;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use switchyard_tests::client::report::{assert_all_ok, backend_counts, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest, RunningClient};
use switchyard_tests::env::process::wait_until;
use switchyard_tests::k8s::manifests::{Manifests, Protocol};
use switchyard_tests::world::harness::{Harness, backend_name};
use switchyard_tests::{require_root, testkit};

/// Services whose backend flips at every step: a large sync each time.
const CHURNED: usize = 2000;
/// Services that never change; a connection loop runs against them throughout.
const STABLE: usize = 2;
const ITERATIONS: usize = 20;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// Errors of a connected UDP socket that the agent destroyed.
const DESTROYED: [i32; 3] = [libc::ECONNABORTED, libc::ENOTCONN, libc::EDESTADDRREQ];

fn churned_vip(index: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        97,
        u8::try_from(index / 200).expect("few Services"),
        u8::try_from(index % 200 + 10).expect("below 255"),
    ))
}

fn stable_vip(index: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        96,
        7,
        u8::try_from(index + 10).expect("few Services"),
    ))
}

fn at(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 80)
}

fn service(manifests: Manifests, name: &str, vip: IpAddr, backends: &[IpAddr]) -> Manifests {
    manifests.backed_service(
        name,
        &[vip],
        &[("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 80)],
        backends,
    )
}

/// The stable Services on every backend, and the churned ones on backend `churned_to` only.
fn state(backends: &[IpAddr], churned_to: usize) -> Manifests {
    let mut manifests = Manifests::new();
    for index in 0..STABLE {
        manifests = service(
            manifests,
            &format!("stable-{index}"),
            stable_vip(index),
            backends,
        );
    }
    for index in 0..CHURNED {
        manifests = service(
            manifests,
            &format!("churn-{index}"),
            churned_vip(index),
            &backends[churned_to..=churned_to],
        );
    }
    manifests
}

/// A small deterministic generator (splitmix64): the kill moments are random but the same on
/// every run.
struct Moments(u64);

impl Moments {
    fn below(&mut self, bound: Duration) -> Duration {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let micros = u64::try_from(bound.as_micros().max(1)).unwrap_or(u64::MAX);
        Duration::from_micros(z % micros)
    }
}

/// Follows the agent's log from where it was, counting lines that contain a needle.
struct LogWatch {
    path: PathBuf,
    offset: u64,
}

impl LogWatch {
    fn at_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map_or(0, |m| m.len());
        Self {
            path: path.to_owned(),
            offset,
        }
    }

    /// Waits for a line containing `needle` written after the last wait; the line.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let found = wait_until(timeout, Duration::from_millis(2), || {
            let mut file = std::fs::File::open(&self.path).ok()?;
            file.seek(SeekFrom::Start(self.offset)).ok()?;
            let mut text = String::new();
            file.read_to_string(&mut text).ok()?;
            let mut consumed = 0;
            for line in text.split_inclusive('\n') {
                if !line.ends_with('\n') {
                    break;
                }
                consumed += line.len();
                if line.contains(needle) {
                    self.offset += u64::try_from(consumed).expect("a length");
                    return Some(line.to_owned());
                }
            }
            self.offset += u64::try_from(consumed).expect("a length");
            None
        });
        found.unwrap_or_else(|| panic!("no log line with {needle:?} within {timeout:?}"))
    }
}

/// The agent's `dump` without the counters (which differ from run to run): frontends, slots
/// and backends with ids renumbered in order of use, the reverse-NAT entries and the guard.
fn dump(harness: &mut Harness) -> String {
    let output = harness.agent().offline(&["dump"]).expect("running dump");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split("counters:")
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn difference(expected: &str, found: &str) -> String {
    let expected: BTreeSet<&str> = expected.lines().collect();
    let found: BTreeSet<&str> = found.lines().collect();
    let missing: Vec<&&str> = expected.difference(&found).take(10).collect();
    let extra: Vec<&&str> = found.difference(&expected).take(10).collect();
    format!("missing {missing:?}, unexpected {extra:?}")
}

/// Polls the dump until it equals `expected`; panics with the difference otherwise.
fn converge(harness: &mut Harness, expected: &str, what: &str) {
    let mut last = String::new();
    let equal = wait_until(CONVERGE_TIMEOUT, Duration::from_millis(100), || {
        harness
            .agent()
            .ensure_running()
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        last = dump(harness);
        (last == expected).then_some(())
    });
    assert!(
        equal.is_some(),
        "{what}: the maps differ from a clean agent's: {}",
        difference(expected, &last)
    );
}

/// What a clean agent (no pins at all) writes for `manifests`.
fn clean_dump(harness: &mut Harness, manifests: &Manifests) -> String {
    harness.agent().stop().expect("stopping the agent");
    let cleaned = harness.agent().cleanup().expect("running cleanup");
    assert!(cleaned.status.success(), "cleanup failed");
    harness.write_manifests(manifests);
    harness.agent().restart().expect("starting a clean agent");
    harness.wait_until_translated(ClientProto::Tcp, at(churned_vip(CHURNED - 1)));
    let mut stable_dump = String::new();
    // Settled: two equal dumps in a row.
    let settled = wait_until(CONVERGE_TIMEOUT, Duration::from_millis(200), || {
        let now = dump(harness);
        let same = now == stable_dump;
        stable_dump = now;
        same.then_some(())
    });
    assert!(settled.is_some(), "the clean agent's maps never settled");
    stable_dump
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target).count(count)
}

/// A new TCP connection to each stable Service every 20 ms, for as long as the test needs
/// (the clients are stopped early by dropping them).
fn stable_loops(harness: &Harness, within: Duration) -> Vec<RunningClient> {
    let every = Duration::from_millis(20);
    let count = u32::try_from(within.as_millis() / every.as_millis()).expect("a count");
    (0..STABLE)
        .map(|index| {
            harness.spawn_client(
                &tcp(at(stable_vip(index)), count)
                    .interval(every)
                    .timeout(Duration::from_secs(2)),
            )
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Killed while a large sync writes the maps.
    Sync,
    /// Killed right after a sync, while the stale UDP sockets are reaped.
    Reaping,
    /// Killed while a starting agent loads, attaches and retires links.
    Attach,
}

/// The matrix's world: the harness, both states of the file, a clean agent's dump of each,
/// and how long a start and a large sync take (which bound the random kill moments).
struct Matrix {
    harness: Harness,
    states: [Manifests; 2],
    references: [String; 2],
    attach_time: Duration,
    sync_time: Duration,
    moments: Moments,
}

impl Matrix {
    fn new() -> Self {
        let mut harness = Harness::new(testkit!(), 3);
        let backends = harness.backend_ipv4s();
        let states = [state(&backends, 0), state(&backends, 1)];
        harness.write_manifests(&states[0]);
        let spawned = Instant::now();
        harness.start_agent(&[]);
        LogWatch::at_end(harness.agent().log_path()).wait_for("switchyard running", LOG_TIMEOUT);
        let attach_time = spawned.elapsed();
        let reference_b = clean_dump(&mut harness, &states[1]);
        let mut log = LogWatch::at_end(harness.agent().log_path());
        harness.write_manifests(&states[0]);
        log.wait_for("read manifests", LOG_TIMEOUT);
        let read = Instant::now();
        // From the file read to the end of the sync and of the reaping that follows it.
        log.wait_for("dataplane synced", LOG_TIMEOUT);
        let sync_time = read.elapsed();
        let reference_a = clean_dump(&mut harness, &states[0]);
        assert_ne!(reference_a, reference_b);
        eprintln!(
            "MEASURED: agent start {attach_time:?}, file read → synced for {CHURNED} changed Services {sync_time:?}"
        );
        Self {
            harness,
            states,
            references: [reference_a, reference_b],
            attach_time,
            sync_time,
            moments: Moments(12),
        }
    }

    /// Moves the churned Services from backend `from` to the other one, SIGKILLs the agent at
    /// a moment of `fault`, restarts it and checks the outcome.
    fn kill_and_check(&mut self, iteration: usize, fault: Fault, from: usize) {
        let to = 1 - from;
        let what = format!("iteration {iteration} ({fault:?})");
        // A connected UDP socket, translated to the backend the churned Service is leaving.
        let udp = self.harness.hold_udp(
            at(churned_vip(0)),
            Duration::from_mins(1),
            Duration::from_millis(20),
        );
        udp.wait_for_attempts(2, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{what}: the UDP socket: {e:#}"));
        let delay = self.change_and_pick_moment(fault, to);
        std::thread::sleep(delay);
        self.harness.agent().kill().expect("SIGKILL");
        self.harness.agent().restart().expect("restarting");

        converge(&mut self.harness, &self.references[to], &what);
        let destroyed = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            udp.attempts_so_far()
                .iter()
                .any(|a| a.errno.is_some_and(|errno| DESTROYED.contains(&errno)))
                .then_some(())
        });
        assert!(
            destroyed.is_some(),
            "{what} (killed after {delay:?}): the UDP socket aimed at {} was never destroyed: {:?}",
            backend_name(from),
            backend_counts(&udp.attempts_so_far())
        );
        drop(udp);
        for index in [0, CHURNED / 2, CHURNED - 1] {
            let attempts = self.harness.client(&tcp(at(churned_vip(index)), 4));
            assert_all_ok(&attempts, &format!("{what}: churn-{index}"));
            assert_eq!(
                reached(&attempts),
                BTreeSet::from([backend_name(to)]),
                "{what}: churn-{index}"
            );
        }
    }

    /// Applies state `to` the way `fault` needs; how long after that to kill the agent.
    fn change_and_pick_moment(&mut self, fault: Fault, to: usize) -> Duration {
        let mut log = LogWatch::at_end(self.harness.agent().log_path());
        match fault {
            Fault::Sync => {
                self.harness.write_manifests(&self.states[to]);
                log.wait_for("read manifests", LOG_TIMEOUT);
                self.moments.below(self.sync_time)
            }
            Fault::Reaping => {
                // The reaping ends the sync step, just before its `dataplane synced` line:
                // around the end of the measured read → synced time.
                self.harness.write_manifests(&self.states[to]);
                log.wait_for("read manifests", LOG_TIMEOUT);
                self.sync_time * 4 / 5
                    + self
                        .moments
                        .below(self.sync_time * 2 / 5 + Duration::from_millis(20))
            }
            Fault::Attach => {
                self.harness.agent().kill().expect("SIGKILL");
                self.harness.write_manifests(&self.states[to]);
                self.harness.agent().restart().expect("starting");
                self.moments.below(self.attach_time)
            }
        }
    }
}

#[test]
fn sigkill_during_sync_reaping_and_attach_always_converges() {
    require_root!();
    let mut matrix = Matrix::new();
    let loops = stable_loops(&matrix.harness, Duration::from_mins(10));
    let faults = [Fault::Sync, Fault::Reaping, Fault::Attach];
    let kills = ITERATIONS * faults.len();
    for iteration in 0..kills {
        // The churned Services start on backend 0 and flip at every iteration.
        matrix.kill_and_check(iteration, faults[iteration % faults.len()], iteration % 2);
    }
    for (index, running) in loops.iter().enumerate() {
        let attempts = running.attempts_so_far();
        assert!(attempts.len() > 100, "the loop to stable-{index} ran");
        assert_all_ok(&attempts, &format!("stable-{index} across {kills} kills"));
        eprintln!(
            "MEASURED: stable-{index}: {} connections across {kills} kills, none failed",
            attempts.len()
        );
    }
}

#[test]
fn a_minute_without_the_agent_fails_no_connection() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let backends = harness.backend_ipv4s();
    let manifests = Manifests::new();
    let manifests = service(manifests, "web", stable_vip(0), &backends);
    harness.write_manifests(&manifests);
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at(stable_vip(0)));
    let every = Duration::from_millis(20);
    let tcp_loop = harness.spawn_client(
        &tcp(at(stable_vip(0)), 3500)
            .interval(every)
            .timeout(Duration::from_secs(2)),
    );
    let udp_loop = harness.spawn_client(
        &ClientRequest::new(ClientProto::UdpConnected, at(stable_vip(0)))
            .count(700)
            .interval(Duration::from_millis(100))
            .timeout(Duration::from_secs(2)),
    );
    std::thread::sleep(Duration::from_secs(1));
    harness.agent().kill().expect("SIGKILL");
    std::thread::sleep(Duration::from_mins(1));
    let mut log = LogWatch::at_end(harness.agent().log_path());
    harness.agent().restart().expect("restarting");
    log.wait_for("dataplane synced", LOG_TIMEOUT);
    std::thread::sleep(Duration::from_secs(1));
    for (name, running) in [("TCP", tcp_loop), ("UDP", udp_loop)] {
        let attempts = running.attempts_so_far();
        assert!(
            attempts.len() > 500,
            "{name}: only {} attempts",
            attempts.len()
        );
        assert_all_ok(&attempts, &format!("{name} with the agent down for 60 s"));
        assert_eq!(
            reached(&attempts),
            BTreeSet::from([backend_name(0), backend_name(1)]),
            "{name}: both backends served"
        );
        eprintln!(
            "MEASURED: {name}: {} exchanges across 60 s without the agent, none failed",
            attempts.len()
        );
    }
}
