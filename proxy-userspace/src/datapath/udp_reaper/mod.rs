//! The cure for kube-proxy's stale-UDP class of bugs: when a backend leaves a UDP service,
//! connected UDP sockets still aimed at it are destroyed, so no client keeps sending into a
//! backend that is gone (or no longer serves that service).
//!
//! A connected UDP socket talks straight to its backend once the connect hook translated it;
//! only its socket reverse-NAT entry (socket cookie, backend) → (service, rev-NAT id) remembers
//! for which service. After a sync that removed (service, backend) pairs of UDP frontends, and
//! at every full sync (the first after a start included), the reaper lists connected UDP
//! sockets in every network namespace (NETLINK_SOCK_DIAG), keeps those whose entry names a pair
//! the programmed state no longer serves, and destroys them (SOCK_DESTROY): the application
//! sees ECONNABORTED and reconnects, through the hook, to a current backend. Being
//! level-triggered (the datapath's state against the programmed state, not a list of
//! removals), it repairs what an agent killed between a sync and its reaping left behind.
mod sock_diag;

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use nix::sched::{CloneFlags, setns};
use proxy_common::{
    Addr4, Addr6, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, WireAddr, map_names,
};
use tracing::{debug, info, warn};

use super::conntrack::{ReconcileReport, UdpServing};
use crate::{
    maps::{WriteError, take},
    plan::mirror::UdpPair,
};
use sock_diag::UdpSocketId;

/// Destroys connected UDP sockets aimed at backends that left their service, and reconciles
/// the TC path's UDP flows.
pub trait SocketReaper: Send {
    /// Destroys connected UDP sockets aimed at a (frontend, backend) pair outside `served`;
    /// returns how many.
    fn reap(&mut self, served: &HashSet<UdpPair>) -> usize;

    /// Removes the TC path's UDP flows whose backend is not a serving endpoint of their
    /// frontend (`None`: there is no TC conntrack here).
    fn reconcile_flows(&mut self, _serving: &UdpServing) -> Option<ReconcileReport> {
        None
    }
}

/// Both cures together: connected UDP sockets of the socket hooks (east-west) aimed at
/// backends that left their service, and the TC path's tracked UDP flows (north-south),
/// reconciled against the serving endpoints.
pub struct SocketsAndFlows {
    pub sockets: NetlinkReaper,
    /// Shared with the conntrack garbage collector.
    pub flows: std::sync::Arc<std::sync::Mutex<super::conntrack::Conntrack>>,
}

impl SocketReaper for SocketsAndFlows {
    fn reap(&mut self, served: &HashSet<UdpPair>) -> usize {
        self.sockets.reap(served)
    }

    fn reconcile_flows(&mut self, serving: &UdpServing) -> Option<ReconcileReport> {
        let report = self
            .flows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reconcile_udp(serving);
        let deleted: u64 = report.families.iter().map(|family| family.deleted).sum();
        if deleted > 0 {
            info!(
                flows = deleted,
                "removed tracked UDP flows whose backend is not a serving endpoint"
            );
        }
        Some(report)
    }
}

/// A reaper that does nothing (tests of the runner).
pub struct NoReaper;

impl SocketReaper for NoReaper {
    fn reap(&mut self, _served: &HashSet<UdpPair>) -> usize {
        0
    }
}

/// The real reaper: sock_diag in every network namespace, judged by the socket reverse-NAT maps.
pub struct NetlinkReaper {
    sock_nat4: HashMap<MapData, SockRevNat4Key, SockRevNat4>,
    sock_nat6: HashMap<MapData, SockRevNat6Key, SockRevNat6>,
}

/// One path per network namespace on the machine: those of all processes, and the named ones
/// under /run/netns (which may have no process).
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    let proc_entries = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok);
    let candidates = proc_entries
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|entry| entry.path().join("ns/net"))
        .chain(
            std::fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|entry| entry.path()),
        );
    for path in candidates {
        if let Ok(stat) = nix::sys::stat::stat(&path)
            && seen.insert((stat.st_dev, stat.st_ino))
        {
            paths.push(path);
        }
    }
    paths
}

/// Runs `work` on a thread that joined the network namespace at `path` (setns affects only the
/// calling thread, so the agent's own threads stay where they are).
fn in_namespace<T: Send>(path: &PathBuf, work: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let namespace = File::open(path).ok()?;
                setns(namespace, CloneFlags::CLONE_NEWNET).ok()?;
                Some(work())
            })
            .join()
            .ok()
            .flatten()
    })
}

impl NetlinkReaper {
    /// Takes the socket reverse-NAT maps out of the loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, WriteError> {
        Ok(Self {
            sock_nat4: take(ebpf, map_names::SOCK_REV_NAT4)?,
            sock_nat6: take(ebpf, map_names::SOCK_REV_NAT6)?,
        })
    }

    /// The frontend (rev-NAT id) this socket was translated for, if our hooks translated it.
    fn translated_for(&self, socket: &UdpSocketId) -> Option<u32> {
        let destination = socket.destination();
        let port_be = destination.port().to_be();
        match destination.ip() {
            IpAddr::V4(ip) => {
                let key = SockRevNat4Key {
                    cookie: socket.cookie(),
                    address: Addr4::from_ip(ip),
                    port_be,
                    pad: 0,
                };
                self.sock_nat4.get(&key, 0).ok().map(|nat| nat.rev_nat_id)
            }
            IpAddr::V6(ip) => {
                let key = SockRevNat6Key {
                    cookie: socket.cookie(),
                    address: Addr6::from_ip(ip),
                    port_be,
                    pad: [0; 3],
                };
                self.sock_nat6.get(&key, 0).ok().map(|nat| nat.rev_nat_id)
            }
        }
    }

    /// The backend address as the pairs name it (IPv4-mapped destinations of dual-stack
    /// sockets are IPv4 backends).
    fn backend_of(socket: &UdpSocketId) -> SocketAddr {
        let destination = socket.destination();
        match destination.ip() {
            IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(destination, |v4| {
                SocketAddr::new(IpAddr::V4(v4), destination.port())
            }),
            IpAddr::V4(_) => destination,
        }
    }
}

impl SocketReaper for NetlinkReaper {
    fn reap(&mut self, served: &HashSet<UdpPair>) -> usize {
        let mut destroyed = 0;
        for namespace in network_namespaces() {
            let listed = in_namespace(&namespace, || {
                let mut sockets = Vec::new();
                for family in [libc::AF_INET, libc::AF_INET6] {
                    match sock_diag::connected_udp_sockets(u8::try_from(family).expect("small")) {
                        Ok(found) => sockets.extend(found),
                        Err(error) => debug!("listing UDP sockets: {error}"),
                    }
                }
                sockets
            });
            let stale: Vec<UdpSocketId> = listed
                .unwrap_or_default()
                .into_iter()
                .filter(|socket| {
                    self.translated_for(socket).is_some_and(|rev_nat_id| {
                        !served.contains(&(rev_nat_id, Self::backend_of(socket)))
                    })
                })
                .collect();
            if stale.is_empty() {
                continue;
            }
            let outcome = in_namespace(&namespace, || {
                stale.iter().map(sock_diag::destroy).collect::<Vec<_>>()
            });
            for result in outcome.unwrap_or_default() {
                match result {
                    Ok(()) => destroyed += 1,
                    Err(error) => {
                        warn!(namespace = %namespace.display(), "cannot destroy a stale UDP socket: {error}");
                    }
                }
            }
        }
        if destroyed > 0 {
            info!(
                destroyed,
                "destroyed connected UDP sockets whose backend left the service"
            );
        }
        destroyed
    }
}
