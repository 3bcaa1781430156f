//! The Services of a scale point served by the test API server, the way production feeds the
//! agent (`switchyard run --kubeconfig`): a kube-apiserver look-alike speaking list/watch on
//! the loopback of the node namespace, so nothing of it is reachable from outside that
//! namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::apiserver::ApiServer;
use switchyard_tests::k8s::objects;

use super::services::{NAMESPACE, SERVICE_PORT, ServiceSet};

/// Fields drop in order: the server stops before its kubeconfig goes.
pub struct ApiFeed {
    api: ApiServer,
    kubeconfig: PathBuf,
    _dir: TempDir,
}

impl ApiFeed {
    /// Starts an empty API server on 127.0.0.1 inside `node_namespace`.
    pub fn start(node_namespace: &str) -> Result<Self> {
        let api = ApiServer::start_in_netns(node_namespace)?;
        let dir = TempDir::new()?;
        let kubeconfig = api.write_kubeconfig(dir.path());
        Ok(Self {
            api,
            kubeconfig,
            _dir: dir,
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Stores every Service of `set` with its EndpointSlice (no watch is open yet, so this
    /// is what the agent's first list finds).
    pub fn populate(&self, set: &ServiceSet) {
        let endpoints = ips(&set.endpoints);
        for index in 0..set.count {
            let name = ServiceSet::name(index);
            self.api.apply(&objects::cluster_ip_service(
                NAMESPACE,
                &name,
                SocketAddr::from((ServiceSet::vip(index), SERVICE_PORT)),
            ));
            self.api
                .apply(&objects::endpoint_slice(NAMESPACE, &name, &endpoints));
        }
    }

    /// Replaces the EndpointSlice of Service `index` with one listing `endpoints`, traced;
    /// returns the change's resourceVersion.
    pub fn set_endpoints(&self, index: usize, endpoints: &[Ipv4Addr]) -> u64 {
        let slice = objects::endpoint_slice(NAMESPACE, &ServiceSet::name(index), &ips(endpoints));
        self.api.apply_traced(&slice)
    }

    /// When the watch event of change `rv` left the server, once it has.
    pub fn event_sent_at(&self, rv: u64) -> Option<Instant> {
        self.api.event_sent_at(rv)
    }
}

fn ips(endpoints: &[Ipv4Addr]) -> Vec<IpAddr> {
    endpoints.iter().copied().map(IpAddr::V4).collect()
}
