//! The single-node world: one node namespace wired to N backend namespaces, each serving its
//! name, and the node's [`AgentHost`], torn down in a safe order. Its methods panic on
//! infrastructure errors so that a failing test unwinds through the agent's Drop, which prints
//! the agent log.

use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crate::client::report::Attempt;
use crate::client::testkit::{ClientProto, ClientRequest, RunningClient, Server, Testkit};
use crate::env::netns::{Backend, Topology};
use crate::world::agent_host::AgentHost;

/// The port every backend server listens on (TCP and UDP).
pub use crate::client::testkit::BACKEND_PORT;
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Fields drop in declaration order: the agent (with its cgroup, bpffs and files) goes
/// first, then the servers, and the namespaces go last. The harness dereferences to its
/// [`AgentHost`] for the agent, the cgroup, the bpffs and the manifests file.
pub struct Harness {
    host: AgentHost,
    _servers: Vec<Server>,
    topology: Topology,
    testkit: Testkit,
}

impl Harness {
    /// Builds the topology with `backends` backends, each serving its name on [`BACKEND_PORT`].
    pub fn new(testkit: Testkit, backends: usize) -> Self {
        let topology = Topology::new(backends).expect("creating the test topology");
        let host = AgentHost::new(topology.node_namespace())
            .expect("preparing cgroup, bpffs and files for the agent");
        let servers = topology
            .backends()
            .iter()
            .map(|backend| {
                testkit
                    .serve(
                        &backend.namespace,
                        &backend_name(backend.index),
                        &[BACKEND_PORT],
                    )
                    .expect("starting a backend server")
            })
            .collect();
        Self {
            host,
            _servers: servers,
            topology,
            testkit,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn backends(&self) -> &[Backend] {
        self.topology.backends()
    }

    pub fn backend_ipv4s(&self) -> Vec<IpAddr> {
        self.backends().iter().map(|b| IpAddr::V4(b.ipv4)).collect()
    }

    pub fn backend_ipv6s(&self) -> Vec<IpAddr> {
        self.backends().iter().map(|b| IpAddr::V6(b.ipv6)).collect()
    }

    /// Names of all backends, as their servers answer.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends()
            .iter()
            .map(|b| backend_name(b.index))
            .collect()
    }

    /// Runs a client in the hooked cgroup inside the node namespace, to completion.
    pub fn client(&self, request: &ClientRequest) -> Vec<Attempt> {
        self.client_in(self.topology.node_namespace(), request)
    }

    /// Runs a client in the hooked cgroup inside another test namespace (a "pod": its own
    /// network namespace, not the node's), to completion.
    pub fn client_in(&self, netns: &str, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .client(netns, self.cgroup().path(), request)
            .unwrap_or_else(|e| panic!("running client {request:?} in {netns}: {e:#}"))
    }

    pub fn spawn_client(&self, request: &ClientRequest) -> RunningClient {
        self.testkit
            .spawn_client(
                self.topology.node_namespace(),
                self.cgroup().path(),
                request,
            )
            .unwrap_or_else(|e| panic!("starting client {request:?}: {e:#}"))
    }

    pub fn hold(&self, target: SocketAddr, duration: Duration, every: Duration) -> RunningClient {
        self.testkit
            .hold(
                self.topology.node_namespace(),
                self.cgroup().path(),
                target,
                duration,
                every,
            )
            .unwrap_or_else(|e| panic!("starting hold to {target}: {e:#}"))
    }

    /// Holds one connected UDP socket to `target` (replaced only when it fails).
    pub fn hold_udp(
        &self,
        target: SocketAddr,
        duration: Duration,
        every: Duration,
    ) -> RunningClient {
        self.testkit
            .hold_udp(
                self.topology.node_namespace(),
                self.cgroup().path(),
                target,
                duration,
                every,
            )
            .unwrap_or_else(|e| panic!("starting a UDP hold to {target}: {e:#}"))
    }

    /// Polls until an exchange with `target` succeeds (the agent is up and translating).
    pub fn wait_until_translated(&mut self, proto: ClientProto, target: SocketAddr) -> Attempt {
        self.wait_for(proto, target, "a successful exchange", |a| a.ok)
    }

    /// Polls until an attempt on `target` fails with `errno` (e.g. the agent refuses a
    /// service without endpoints).
    pub fn wait_until_errno(
        &mut self,
        proto: ClientProto,
        target: SocketAddr,
        errno: i32,
    ) -> Attempt {
        self.wait_for(proto, target, &format!("errno {errno}"), |a| {
            a.errno == Some(errno)
        })
    }

    fn wait_for(
        &mut self,
        proto: ClientProto,
        target: SocketAddr,
        what: &str,
        accept: impl Fn(&Attempt) -> bool,
    ) -> Attempt {
        let request = ClientRequest::new(proto, target).timeout(PROBE_TIMEOUT);
        let Self {
            host,
            topology,
            testkit,
            ..
        } = self;
        host.wait_for(
            &format!("{what} from {target} ({proto:?})"),
            |host| {
                testkit
                    .client(topology.node_namespace(), host.cgroup().path(), &request)
                    .unwrap_or_else(|e| panic!("running client {request:?}: {e:#}"))
                    .pop()
            },
            accept,
        )
    }
}

impl Deref for Harness {
    type Target = AgentHost;

    fn deref(&self) -> &AgentHost {
        &self.host
    }
}

impl DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut AgentHost {
        &mut self.host
    }
}

/// The name backend `index` answers with.
pub fn backend_name(index: usize) -> String {
    format!("backend-{index}")
}
