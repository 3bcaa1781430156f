//! One test's whole world: topology, backend servers, cgroup, bpffs, manifests and agent, torn
//! down in a safe order. Its methods panic on infrastructure errors so that a failing test
//! unwinds through the agent's Drop, which prints the agent log.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::Agent;
use crate::client::report::Attempt;
use crate::client::testkit::{ClientProto, ClientRequest, RunningClient, Server, Testkit};
use crate::env::bpffs::PrivateBpffs;
use crate::env::cgroup::TestCgroup;
use crate::env::netns::{Backend, Topology};
use crate::env::process::wait_until;
use crate::env::tempdir::TempDir;
use crate::k8s::manifests::Manifests;

/// The port every backend server listens on (TCP and UDP).
pub const BACKEND_PORT: u16 = 8080;
/// How long the agent may take to translate traffic after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Fields drop in declaration order: the agent stops first, the cgroup (and any client left in
/// it) goes before the bpffs holding the pins, and the namespaces go last.
pub struct Harness {
    agent: Option<Agent>,
    _servers: Vec<Server>,
    manifests_dir: TempDir,
    cgroup: TestCgroup,
    bpffs: PrivateBpffs,
    topology: Topology,
    testkit: Testkit,
}

impl Harness {
    /// Builds the topology with `backends` backends, each serving its name on [`BACKEND_PORT`].
    pub fn new(testkit: Testkit, backends: usize) -> Self {
        let topology = Topology::new(backends).expect("creating the test topology");
        let bpffs = PrivateBpffs::new().expect("mounting a private bpffs");
        let cgroup = TestCgroup::new().expect("creating the test cgroup");
        let manifests_dir = TempDir::new().expect("creating the manifests directory");
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
            agent: None,
            _servers: servers,
            manifests_dir,
            cgroup,
            bpffs,
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

    pub fn manifests_path(&self) -> PathBuf {
        self.manifests_dir.path().join("manifests.yaml")
    }

    pub fn write_manifests(&self, manifests: &Manifests) {
        manifests
            .write_atomic(&self.manifests_path())
            .expect("writing the manifests file");
    }

    /// Starts the agent on the manifests file (write it first).
    pub fn start_agent(&mut self, extra_args: &[&str]) {
        let agent = Agent::start(
            &self.topology,
            &self.cgroup,
            &self.bpffs,
            &self.manifests_path(),
            extra_args,
        )
        .expect("starting the agent");
        self.agent = Some(agent);
    }

    /// Starts the agent following the API server described by `kubeconfig`.
    pub fn start_agent_with_kubeconfig(&mut self, kubeconfig: &Path, extra_args: &[&str]) {
        let agent = Agent::start_with_source(
            &self.topology,
            &self.cgroup,
            &self.bpffs,
            "--kubeconfig",
            kubeconfig,
            extra_args,
        )
        .expect("starting the agent");
        self.agent = Some(agent);
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the agent was started")
    }

    pub fn bpffs(&self) -> &PrivateBpffs {
        &self.bpffs
    }

    /// The cgroup the test's clients join (and the agent's hooks attach to).
    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }

    /// Runs a client in the hooked cgroup inside the node namespace, to completion.
    pub fn client(&self, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .client(self.topology.node_namespace(), self.cgroup.path(), request)
            .unwrap_or_else(|e| panic!("running client {request:?}: {e:#}"))
    }

    /// Runs a client in the hooked cgroup inside another test namespace (a "pod": its own
    /// network namespace, not the node's), to completion.
    pub fn client_in(&self, netns: &str, request: &ClientRequest) -> Vec<Attempt> {
        self.testkit
            .client(netns, self.cgroup.path(), request)
            .unwrap_or_else(|e| panic!("running client {request:?} in {netns}: {e:#}"))
    }

    pub fn spawn_client(&self, request: &ClientRequest) -> RunningClient {
        self.testkit
            .spawn_client(self.topology.node_namespace(), self.cgroup.path(), request)
            .unwrap_or_else(|e| panic!("starting client {request:?}: {e:#}"))
    }

    pub fn hold(&self, target: SocketAddr, duration: Duration, every: Duration) -> RunningClient {
        self.testkit
            .hold(
                self.topology.node_namespace(),
                self.cgroup.path(),
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
                self.cgroup.path(),
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
        let mut last = None;
        let found = wait_until(READY_TIMEOUT, PROBE_INTERVAL, || {
            if let Some(agent) = self.agent.as_mut() {
                agent
                    .ensure_running()
                    .unwrap_or_else(|e| panic!("waiting for {what} from {target}: {e:#}"));
            }
            let attempt = self.client(&request).pop()?;
            let done = accept(&attempt);
            last = Some(attempt.clone());
            done.then_some(attempt)
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {what} from {target} ({proto:?}) within {READY_TIMEOUT:?}; last attempt: {last:?}"
            )
        })
    }
}

/// The name backend `index` answers with.
pub fn backend_name(index: usize) -> String {
    format!("backend-{index}")
}
