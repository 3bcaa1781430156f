//! The load balancer in front of the nodes, as a cloud's (or MetalLB's) works for an
//! `externalTrafficPolicy: Local` Service: it probes every node's health-check node port and
//! routes the LoadBalancer IP to the nodes that answer 200, as equal-cost next hops (packets
//! keep the client's address and the LB IP as destination: `ipMode: VIP`).
//!
//! One thread, inside the balancer's namespace, probes every [`PROBE_INTERVAL`] with short
//! timeouts and rewrites the route only when the healthy set changes. A node is taken out
//! once its probes have failed for [`UNHEALTHY_AFTER`] in a row and put back at its first
//! answer of 200, as clouds' unhealthy thresholds do (Google's and AWS's are several probes
//! of seconds each): a proxy restarting on a node closes its health-check port for a moment,
//! and a balancer that rehashed at the first failed probe would move established flows to
//! another node. It stops on drop.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::network::{node_balancer_address, steer};
use crate::env::netns::NETNS_DIR;
use crate::env::process::wait_until;

pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a node's probes must fail in a row before the balancer stops using it.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct State {
    /// The nodes the route points at now (ascending).
    healthy: Vec<usize>,
    /// Every healthy set the route took, in order.
    history: Vec<Vec<usize>>,
    /// Completed probe rounds.
    rounds: u64,
    /// The last failure to steer, if any (reported by [`Balancer::healthy`]).
    error: Option<String>,
}

/// A running load balancer for the LoadBalancer IPs (IPv4 and IPv6) of one Service.
pub struct Balancer {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    thread: Option<JoinHandle<()>>,
    pub addresses: Vec<IpAddr>,
    pub health_check_port: u16,
}

impl Balancer {
    /// Starts probing `nodes`' health-check node port `health_check_port` (on their IPv4
    /// address) from namespace `netns` and steering `addresses` to the healthy ones.
    pub fn start(
        netns: &str,
        addresses: Vec<IpAddr>,
        health_check_port: u16,
        nodes: Vec<usize>,
    ) -> Result<Self> {
        for address in &addresses {
            steer(netns, *address, &[])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State::default()));
        let handle = std::fs::File::open(format!("{NETNS_DIR}/{netns}"))
            .with_context(|| format!("opening netns {netns}"))?;
        let thread = {
            let (stop, state, netns) = (Arc::clone(&stop), Arc::clone(&state), netns.to_owned());
            let addresses = addresses.clone();
            std::thread::Builder::new()
                .name("cluster-balancer".into())
                .spawn(move || {
                    if let Err(e) = nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)
                    {
                        lock(&state).error = Some(format!("joining netns {netns}: {e}"));
                        return;
                    }
                    probe_loop(&netns, &addresses, health_check_port, &nodes, &stop, &state);
                })
                .context("spawning the balancer thread")?
        };
        Ok(Self {
            stop,
            state,
            thread: Some(thread),
            addresses,
            health_check_port,
        })
    }

    /// The nodes the balancer sends to now; panics if steering failed.
    pub fn healthy(&self) -> Vec<usize> {
        let state = lock(&self.state);
        if let Some(error) = &state.error {
            panic!("the load balancer failed: {error}");
        }
        state.healthy.clone()
    }

    /// Every healthy set the route took so far, in order.
    pub fn history(&self) -> Vec<Vec<usize>> {
        lock(&self.state).history.clone()
    }

    /// Waits (at most `timeout`) until the balancer sends to exactly `nodes`.
    pub fn wait_for(&self, nodes: &[usize], timeout: Duration) -> Result<()> {
        let mut expected = nodes.to_vec();
        expected.sort_unstable();
        wait_until(timeout, Duration::from_millis(20), || {
            (self.healthy() == expected).then_some(())
        })
        .with_context(|| {
            format!(
                "the load balancer did not settle on nodes {expected:?} within {timeout:?}; \
                 it sends to {:?} (history {:?})",
                self.healthy(),
                self.history()
            )
        })
    }

    /// Waits for `n` more complete probe rounds (at most `timeout`).
    pub fn wait_rounds(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = lock(&self.state).rounds + n;
        wait_until(timeout, Duration::from_millis(20), || {
            (lock(&self.state).rounds >= target).then_some(())
        })
        .context("the load balancer stopped probing")
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the balancer thread panicked");
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn probe_loop(
    netns: &str,
    addresses: &[IpAddr],
    port: u16,
    nodes: &[usize],
    stop: &AtomicBool,
    state: &Mutex<State>,
) {
    // Since when each node's probes have failed without a success in between.
    let mut failing_since: Vec<Option<Instant>> = vec![None; nodes.len()];
    while !stop.load(Ordering::SeqCst) {
        let was_healthy = lock(state).healthy.clone();
        let mut healthy = Vec::new();
        for (node, since) in nodes.iter().copied().zip(failing_since.iter_mut()) {
            if answers_ok(SocketAddr::from((node_balancer_address(node), port))) {
                *since = None;
                healthy.push(node);
                continue;
            }
            let first_failure = *since.get_or_insert_with(Instant::now);
            if was_healthy.contains(&node) && first_failure.elapsed() < UNHEALTHY_AFTER {
                healthy.push(node);
            }
        }
        let changed = lock(state).healthy != healthy;
        if changed {
            let steered = addresses
                .iter()
                .try_for_each(|address| steer(netns, *address, &healthy));
            let mut state = lock(state);
            match steered {
                Ok(()) => {
                    state.history.push(healthy.clone());
                    state.healthy = healthy;
                }
                Err(e) => state.error = Some(format!("{e:#}")),
            }
        }
        lock(state).rounds += 1;
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// Whether a health check `GET /` on `target` answers 200.
fn answers_ok(target: SocketAddr) -> bool {
    let exchange = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        write!(
            stream,
            "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0_u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    exchange().unwrap_or(false)
}
