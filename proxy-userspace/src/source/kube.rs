//! The `kube` source: follows an API server the way kube-proxy does, with kube-rs watchers on
//! Services, EndpointSlices and this Node.
//!
//! Each watcher feeds a reflector store. Nothing is published before every store finished its
//! first complete list, so a restart against a slow API server never prunes the dataplane. A
//! dropped watch, a 410 Gone or an outage leaves the stores (and so the dataplane) as they
//! were: kube-runtime swaps a relist into a store only once the list is complete, which is also
//! how deletions missed while disconnected are noticed. Retries back off quickly (at most about 1 s
//! apart, jittered) so the state converges soon after the API server returns.
use std::{fmt::Debug, path::Path, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher::{self, ExponentialBackoff},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::SnapshotReceiver;
use crate::model::ClusterSnapshot;

/// Bursts of events within this window are published as one snapshot.
const COALESCE: Duration = Duration::from_millis(20);
/// Annotation kubectl writes with a full copy of the object: never needed here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot read kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error(
        "no Kubernetes configuration found (not in a cluster, no KUBECONFIG): {0}; pass --kubeconfig PATH or --manifests PATH"
    )]
    Infer(String),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(String),
}

async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |reason: String| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                reason,
            };
            let file = Kubeconfig::read_from(path).map_err(|error| fail(error.to_string()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|error| fail(error.to_string()))?
        }
        None => Config::infer()
            .await
            .map_err(|error| KubeSourceError::Infer(error.to_string()))?,
    };
    // The client's own retry of 429/503/504 would hide an outage from the watchers for a
    // long while; their own quick backoff is what should pace recovery.
    let mut config = config;
    config.default_retry = false;
    Client::try_from(config).map_err(|error| KubeSourceError::Client(error.to_string()))
}

/// 100 ms doubling to 500 ms; the jitter (up to the delay again) keeps thousands of nodes
/// from hitting a recovering API server in step.
fn backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .into()
}

/// Drops what the model never reads, so the stores stay small.
fn trim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Runs one reflector, waking `changed` whenever its store changed.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: Arc<Notify>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(api, config)
        .modify(trim)
        .backoff(backoff())
        .reflect(writer);
    tokio::spawn(drive(stream, what, changed));
    store
}

async fn drive<K: ResourceExt>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    what: &'static str,
    changed: Arc<Notify>,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                if failing {
                    info!("{what} watch recovered");
                    failing = false;
                }
                changed.notify_one();
            }
            // A relist in progress: the store keeps its old content until InitDone.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => {
                if !failing {
                    warn!(
                        "{what} watch failed: {error}; the dataplane stays as it is while retrying"
                    );
                }
                failing = true;
            }
        }
    }
}

fn snapshot(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    nodes: Option<&Store<Node>>,
) -> ClusterSnapshot {
    ClusterSnapshot {
        services: services.state(),
        endpoint_slices: slices.state(),
        nodes: nodes.map(Store::state).unwrap_or_default(),
    }
}

/// Connects and starts the watchers; snapshots follow on the returned channel once every
/// watcher has completed its first list.
pub async fn start(
    kubeconfig: Option<&Path>,
    node_name: Option<&str>,
) -> Result<SnapshotReceiver, KubeSourceError> {
    let client = client(kubeconfig).await?;
    let changed = Arc::new(Notify::new());
    let services = spawn_reflector(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        "Service",
        changed.clone(),
    );
    let slices = spawn_reflector(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        "EndpointSlice",
        changed.clone(),
    );
    let nodes = node_name.map(|name| {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        spawn_reflector(
            Api::<Node>::all(client.clone()),
            config,
            "Node",
            changed.clone(),
        )
    });
    let (sender, receiver) = watch::channel(None);
    tokio::spawn(async move {
        let lists = async {
            services.wait_until_ready().await?;
            slices.wait_until_ready().await?;
            if let Some(nodes) = &nodes {
                nodes.wait_until_ready().await?;
            }
            Ok::<(), reflector::store::WriterDropped>(())
        };
        if lists.await.is_err() {
            return;
        }
        info!(
            services = services.len(),
            endpoint_slices = slices.len(),
            "initial lists complete"
        );
        loop {
            sender.send_replace(Some(Arc::new(snapshot(&services, &slices, nodes.as_ref()))));
            changed.notified().await;
            if sender.is_closed() {
                return;
            }
            tokio::time::sleep(COALESCE).await;
        }
    });
    Ok(receiver)
}
