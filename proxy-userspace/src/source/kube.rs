//! The `kube` source: follows an API server the way kube-proxy does, with kube-rs watchers on
//! Services, EndpointSlices, this Node and ServiceCIDRs.
//!
//! Every watch event becomes a delta at once — the object cut down to what the model reads —
//! so the agent never holds whole Kubernetes objects and a change costs what it changes. A
//! (re)list is sent as one complete list per kind, which the runner diffs against what it
//! holds: that is how deletions missed while disconnected are noticed. Nothing is marked
//! listed before every watcher finished its first list, so a restart against a slow API
//! server never prunes the dataplane; a dropped watch, a 410 Gone or an outage leave the
//! dataplane as it was. Retries back off quickly (at most about 1 s apart, jittered) so the
//! state converges soon after the API server returns.
use std::{
    fmt::Debug,
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        watcher::{self, ExponentialBackoff},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Delta, DeltaReceiver, DeltaSender, Relist};
use crate::model::{
    cluster::Change,
    input::{NodeInput, ServiceCidrInput, ServiceInput, SliceInput},
};

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

/// The API server's addresses, from the client's URL (a name is resolved once): an externalIP
/// equal to one is not translated for the node's own processes (CVE-2020-8554).
async fn api_server_addresses(config: &Config) -> Vec<IpAddr> {
    let url = &config.cluster_url;
    let Some(host) = url.host() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip];
    }
    let port = url.port_u16().unwrap_or(443);
    match tokio::net::lookup_host((host, port)).await {
        Ok(found) => {
            let mut ips: Vec<IpAddr> = found.map(|address| address.ip()).collect();
            ips.sort_unstable();
            ips.dedup();
            ips
        }
        Err(error) => {
            warn!(
                "cannot resolve the API server {host}: {error}; externalIPs equal to its address are not recognised"
            );
            Vec::new()
        }
    }
}

async fn client(kubeconfig: Option<&Path>) -> Result<(Client, Vec<IpAddr>), KubeSourceError> {
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
    let addresses = api_server_addresses(&config).await;
    let client =
        Client::try_from(config).map_err(|error| KubeSourceError::Client(error.to_string()))?;
    Ok((client, addresses))
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

/// ServiceCIDRs are `networking.k8s.io/v1` from Kubernetes 1.33 on; an older API server
/// answers 404, and is asked again this rarely (the service-CIDR guard then covers active
/// ClusterIPs only).
fn optional_backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_mins(1))
        .with_jitter()
        .without_max_times()
        .into()
}

/// A watched kind: how its objects become the model's input and deltas.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: &'static str;
    /// Whether an API server may not serve the kind at all (404): it then counts as listed
    /// empty, so the agent does not wait for it.
    const OPTIONAL: bool = false;
    type Input: Send + Sync;
    fn input(&self) -> Arc<Self::Input>;
    fn changed(input: Arc<Self::Input>) -> Change;
    fn deleted(&self) -> Change;
    fn relist(inputs: Vec<Arc<Self::Input>>) -> Relist;
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    type Input = ServiceInput;

    fn input(&self) -> Arc<ServiceInput> {
        Arc::new(ServiceInput::from(self))
    }

    fn changed(input: Arc<ServiceInput>) -> Change {
        Change::Service(input.id.clone(), Some(input))
    }

    fn deleted(&self) -> Change {
        Change::Service(ServiceInput::from(self).id, None)
    }

    fn relist(inputs: Vec<Arc<ServiceInput>>) -> Relist {
        Relist::Services(inputs)
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    type Input = SliceInput;

    fn input(&self) -> Arc<SliceInput> {
        Arc::new(SliceInput::from(self))
    }

    fn changed(input: Arc<SliceInput>) -> Change {
        Change::Slice(input.key.clone(), Some(input))
    }

    fn deleted(&self) -> Change {
        Change::Slice(SliceInput::from(self).key, None)
    }

    fn relist(inputs: Vec<Arc<SliceInput>>) -> Relist {
        Relist::Slices(inputs)
    }
}

impl Watched for Node {
    const KIND: &'static str = "Node";
    type Input = NodeInput;

    fn input(&self) -> Arc<NodeInput> {
        Arc::new(NodeInput::from(self))
    }

    fn changed(input: Arc<NodeInput>) -> Change {
        Change::Node(input.name.clone(), Some(input))
    }

    fn deleted(&self) -> Change {
        Change::Node(NodeInput::from(self).name, None)
    }

    fn relist(inputs: Vec<Arc<NodeInput>>) -> Relist {
        Relist::Nodes(inputs)
    }
}

impl Watched for ServiceCIDR {
    const KIND: &'static str = "ServiceCIDR";
    const OPTIONAL: bool = true;
    type Input = ServiceCidrInput;

    fn input(&self) -> Arc<ServiceCidrInput> {
        Arc::new(ServiceCidrInput::from(self))
    }

    fn changed(input: Arc<ServiceCidrInput>) -> Change {
        Change::ServiceCidr(input.name.clone(), Some(input))
    }

    fn deleted(&self) -> Change {
        Change::ServiceCidr(ServiceCidrInput::from(self).name, None)
    }

    fn relist(inputs: Vec<Arc<ServiceCidrInput>>) -> Relist {
        Relist::ServiceCidrs(inputs)
    }
}

/// Whether a watcher error says the API server does not serve the kind.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

/// Counts down the first lists; the last one to finish says the view is complete.
struct FirstLists(AtomicUsize);

impl FirstLists {
    fn done(&self, sender: &DeltaSender) {
        if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = sender.send(Delta::Listed);
        }
    }
}

/// Runs one watcher, sending its events as deltas.
fn spawn_watcher<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    sender: DeltaSender,
    first_lists: Arc<FirstLists>,
) {
    let backoff = if K::OPTIONAL {
        optional_backoff()
    } else {
        backoff()
    };
    let stream = watcher::watcher(api, config).backoff(backoff);
    tokio::spawn(follow(stream, sender, first_lists));
}

async fn follow<K: Watched>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    sender: DeltaSender,
    first_lists: Arc<FirstLists>,
) {
    let what = K::KIND;
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    let mut listed_once = false;
    // Objects of a (re)list in progress (already cut down); the runner sees them only once
    // the list is complete.
    let mut relist: Vec<Arc<K::Input>> = Vec::new();
    while let Some(event) = stream.next().await {
        let delta = match event {
            Ok(watcher::Event::Init) => {
                relist.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                relist.push(object.input());
                continue;
            }
            Ok(watcher::Event::InitDone) => Delta::Relisted(K::relist(std::mem::take(&mut relist))),
            Ok(watcher::Event::Apply(object)) => Delta::Change(K::changed(object.input())),
            Ok(watcher::Event::Delete(object)) => Delta::Change(object.deleted()),
            Err(error) if K::OPTIONAL && not_served(&error) => {
                if listed_once {
                    continue;
                }
                warn!(
                    "the API server does not serve {what}s (Kubernetes < 1.33?): the service-CIDR guard covers active ClusterIPs only; asking again every minute"
                );
                Delta::Relisted(K::relist(Vec::new()))
            }
            Err(error) => {
                if !failing {
                    warn!(
                        "{what} watch failed: {error}; the dataplane stays as it is while retrying"
                    );
                }
                failing = true;
                continue;
            }
        };
        if failing {
            info!("{what} watch recovered");
            failing = false;
        }
        let first_list_done = matches!(delta, Delta::Relisted(_)) && !listed_once;
        if sender.send(delta).is_err() {
            return;
        }
        if first_list_done {
            listed_once = true;
            info!("{what}: initial list complete");
            first_lists.done(&sender);
        }
    }
}

/// A started source: its deltas, and the API server's addresses.
pub struct Started {
    pub deltas: DeltaReceiver,
    pub api_server_addresses: Vec<IpAddr>,
}

/// Connects and starts the watchers; deltas follow on the returned channel, the first lists
/// first, then [`Delta::Listed`], then changes.
pub async fn start(
    kubeconfig: Option<&Path>,
    node_name: Option<&str>,
) -> Result<Started, KubeSourceError> {
    let (client, api_server_addresses) = client(kubeconfig).await?;
    let (sender, receiver) = mpsc::unbounded_channel();
    let first_lists = Arc::new(FirstLists(AtomicUsize::new(
        3 + usize::from(node_name.is_some()),
    )));
    spawn_watcher(
        Api::<ServiceCIDR>::all(client.clone()),
        watcher::Config::default(),
        sender.clone(),
        first_lists.clone(),
    );
    spawn_watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        sender.clone(),
        first_lists.clone(),
    );
    spawn_watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        sender.clone(),
        first_lists.clone(),
    );
    if let Some(name) = node_name {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        spawn_watcher(Api::<Node>::all(client), config, sender, first_lists);
    }
    Ok(Started {
        deltas: receiver,
        api_server_addresses,
    })
}
