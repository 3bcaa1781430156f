//! What every world gives a node namespace that runs an agent: the hooked test cgroup, a
//! private bpffs, a directory for the agent's source (the manifests file, a kubeconfig) and the
//! agent itself, with the polling every world does while the agent comes up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::agent::Agent;
use crate::client::report::Attempt;
use crate::env::bpffs::PrivateBpffs;
use crate::env::cgroup::TestCgroup;
use crate::env::process::wait_until;
use crate::env::tempdir::TempDir;
use crate::k8s::manifests::Manifests;

/// How long the agent may take to serve a frontend after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// One node's agent with everything it owns. Fields drop in declaration order: the agent stops
/// first, the cgroup (and any client left in it) goes before the bpffs holding the pins.
pub struct AgentHost {
    agent: Option<Agent>,
    cgroup: TestCgroup,
    bpffs: PrivateBpffs,
    files: TempDir,
    netns: String,
}

impl AgentHost {
    /// Prepares cgroup, bpffs and files for an agent in network namespace `netns` (the agent
    /// is not started).
    pub fn new(netns: &str) -> Result<Self> {
        Ok(Self {
            agent: None,
            cgroup: TestCgroup::new()?,
            bpffs: PrivateBpffs::new()?,
            files: TempDir::new()?,
            netns: netns.to_owned(),
        })
    }

    /// The directory for the agent's source files.
    pub fn files_dir(&self) -> &Path {
        self.files.path()
    }

    pub fn manifests_path(&self) -> PathBuf {
        self.files.path().join("manifests.yaml")
    }

    pub fn write_manifests(&self, manifests: &Manifests) {
        manifests
            .write_atomic(&self.manifests_path())
            .expect("writing the manifests file");
    }

    /// Starts `switchyard run` on the manifests file (write it first) with `args`.
    pub fn start_agent(&mut self, args: &[&str]) {
        self.start_agent_with_source("--manifests", &self.manifests_path(), args)
            .expect("starting the agent");
    }

    /// Starts the agent following the API server described by `kubeconfig`.
    pub fn start_agent_with_kubeconfig(&mut self, kubeconfig: &Path, args: &[&str]) {
        self.start_agent_with_source("--kubeconfig", kubeconfig, args)
            .expect("starting the agent");
    }

    /// Starts the agent with its Services from `source_flag source` (`--manifests PATH` or
    /// `--kubeconfig PATH`).
    pub fn start_agent_with_source(
        &mut self,
        source_flag: &str,
        source: &Path,
        args: &[&str],
    ) -> Result<()> {
        let agent = Agent::start_in_netns(
            &self.netns,
            &self.cgroup,
            &self.bpffs,
            source_flag,
            source,
            args,
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the agent was started")
    }

    /// The agent, if it was started.
    pub fn started_agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// The agent, if it was started, for changes.
    pub fn started_agent_mut(&mut self) -> Option<&mut Agent> {
        self.agent.as_mut()
    }

    /// Takes the agent out (to stop it for good, or before starting another).
    pub fn take_agent(&mut self) -> Option<Agent> {
        self.agent.take()
    }

    pub fn bpffs(&self) -> &PrivateBpffs {
        &self.bpffs
    }

    /// The cgroup the test's hooked clients join (and the agent's hooks attach to).
    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }

    /// Polls `probe` (bounded by [`READY_TIMEOUT`]) until an attempt satisfies `accept`;
    /// fails the test with the last attempt otherwise, and at once if the agent exited.
    /// `what` names the awaited outcome and its target for the messages.
    pub fn wait_for(
        &mut self,
        what: &str,
        probe: impl Fn(&Self) -> Option<Attempt>,
        accept: impl Fn(&Attempt) -> bool,
    ) -> Attempt {
        let mut last = None;
        let found = wait_until(READY_TIMEOUT, PROBE_INTERVAL, || {
            if let Some(agent) = self.agent.as_mut() {
                agent
                    .ensure_running()
                    .unwrap_or_else(|e| panic!("waiting for {what}: {e:#}"));
            }
            let attempt = probe(self)?;
            let done = accept(&attempt);
            last = Some(attempt.clone());
            done.then_some(attempt)
        });
        found
            .unwrap_or_else(|| panic!("no {what} within {READY_TIMEOUT:?}; last attempt: {last:?}"))
    }
}
