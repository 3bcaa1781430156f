//! The `kube` source: follows an API server the way kube-proxy does, with kube-rs watchers on
//! Services, EndpointSlices, this Node and ServiceCIDRs.
//!
//! Every watch event becomes a delta at once — the object cut down to what the model reads —
//! so the agent never holds whole Kubernetes objects and a change costs what it changes. A
//! (re)list is sent as one complete list per kind, which the runner diffs against what it
//! holds: that is how deletions missed while disconnected are noticed. Nothing is marked
//! listed before every watcher finished its first list, so a restart against a slow API
//! server never prunes the dataplane; a dropped watch, a 410 Gone or an outage leave the
//! dataplane as it was. Retries back off like client-go's reflector (see [`ApiBackoff`]) and
//! honour the server's `Retry-After`, so thousands of nodes do not hammer an API server that
//! is down or throttling; the state converges at the first attempt after it returns.
use std::{
    fmt::Debug,
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Config, Resource,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        utils::Backoff,
        watcher::{self, DefaultBackoff},
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
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found (not in a cluster, no KUBECONFIG): {0}; pass --kubeconfig PATH or --manifests PATH"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
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

async fn client(
    kubeconfig: Option<&Path>,
    server_hint: Arc<ServerHint>,
) -> Result<(Client, Vec<IpAddr>), KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |source| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(fail)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(fail)?
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    // The client's own retry of 429/503/504 would hide an outage from the watchers (and
    // multiply their requests); the watchers' backoff paces every retry instead.
    let mut config = config;
    config.default_retry = false;
    let addresses = api_server_addresses(&config).await;
    let builder = ClientBuilder::try_from(config).map_err(KubeSourceError::Client)?;
    // Every response passes by the server hint, which keeps the latest Retry-After.
    let layer = tower::util::MapResponseLayer::new(move |response: http::Response<_>| {
        server_hint.observe(response.status().as_u16(), response.headers());
        response
    });
    Ok((builder.with_layer(&layer).build(), addresses))
}

/// The longest `Retry-After` honoured (a broken server must not silence the agent for hours).
const MAX_RETRY_AFTER: Duration = Duration::from_mins(5);

/// The API server's last word on when to come back: the `Retry-After` of a 429 (too many
/// requests) or 503 (unavailable) response, shared by every watcher of the client.
#[derive(Debug)]
pub struct ServerHint {
    origin: Instant,
    /// Milliseconds after `origin` before which no watcher retries (0: no hint).
    not_before_ms: AtomicU64,
}

impl Default for ServerHint {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            not_before_ms: AtomicU64::new(0),
        }
    }
}

impl ServerHint {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records the `Retry-After` (seconds) of a throttling or unavailable response.
    pub fn observe(&self, status: u16, headers: &http::HeaderMap) {
        if status != 429 && status != 503 {
            return;
        }
        let Some(seconds) = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
        else {
            return;
        };
        let wait = Duration::from_secs(seconds).min(MAX_RETRY_AFTER);
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        self.not_before_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// How long the server asked us to stay away from now on.
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(
            self.not_before_ms
                .load(Ordering::Relaxed)
                .saturating_sub(self.now_ms()),
        )
    }
}

/// A watcher's retry delays: client-go's reflector backoff (800 ms doubling to 30 s, jittered
/// by up to the delay again, reset after two minutes without a failure; kube-rs's
/// `DefaultBackoff`), never shorter than what the server asked for with `Retry-After`. A
/// watcher that succeeds again starts over from 800 ms.
pub struct ApiBackoff {
    exponential: DefaultBackoff,
    hint: Arc<ServerHint>,
    last_prompt_relist: Option<Instant>,
}

/// How often a watcher may relist at once after 410 Gone instead of backing off.
const PROMPT_RELIST_EVERY: Duration = Duration::from_mins(1);

impl ApiBackoff {
    pub fn new(hint: Arc<ServerHint>) -> Self {
        Self {
            exponential: DefaultBackoff::default(),
            hint,
            last_prompt_relist: None,
        }
    }

    /// The wait before the next attempt after `error`. A 410 Gone comes from a server that
    /// answers again but no longer holds our resourceVersion, typically right after an
    /// outage: the relist it needs starts at once (once a minute at most, so a server that
    /// keeps answering 410 is still paced), instead of a backoff grown during the outage.
    pub fn after(&mut self, error: &watcher::Error) -> Duration {
        let gone = matches!(error, watcher::Error::WatchError(status) if status.code == 410);
        let now = Instant::now();
        let prompt_allowed = self
            .last_prompt_relist
            .is_none_or(|last| now.duration_since(last) >= PROMPT_RELIST_EVERY);
        if gone && prompt_allowed {
            self.last_prompt_relist = Some(now);
            self.exponential.reset();
            return self.hint.remaining();
        }
        self.next().unwrap_or(Duration::from_secs(30))
    }
}

impl Iterator for ApiBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.exponential.next()?;
        Some(delay.max(self.hint.remaining()))
    }
}

impl Backoff for ApiBackoff {
    fn reset(&mut self) {
        self.exponential.reset();
    }
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
    hint: Arc<ServerHint>,
) {
    let stream = watcher::watcher(api, config);
    tokio::spawn(follow(stream, ApiBackoff::new(hint), sender, first_lists));
}

async fn follow<K: Watched>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    mut backoff: ApiBackoff,
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
    // The wait after a failure comes before the next attempt, after the failure was handled.
    let mut pause = None;
    loop {
        if let Some(wait) = pause.take() {
            tokio::time::sleep(wait).await;
        }
        let Some(event) = stream.next().await else {
            return;
        };
        match &event {
            Ok(_) => backoff.reset(),
            Err(error) => pause = Some(backoff.after(error)),
        }
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
    let hint = Arc::new(ServerHint::default());
    let (client, api_server_addresses) = client(kubeconfig, hint.clone()).await?;
    let (sender, receiver) = mpsc::unbounded_channel();
    let first_lists = Arc::new(FirstLists(AtomicUsize::new(
        3 + usize::from(node_name.is_some()),
    )));
    spawn_watcher(
        Api::<ServiceCIDR>::all(client.clone()),
        watcher::Config::default(),
        sender.clone(),
        first_lists.clone(),
        hint.clone(),
    );
    spawn_watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        sender.clone(),
        first_lists.clone(),
        hint.clone(),
    );
    spawn_watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        sender.clone(),
        first_lists.clone(),
        hint.clone(),
    );
    if let Some(name) = node_name {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        spawn_watcher(Api::<Node>::all(client), config, sender, first_lists, hint);
    }
    Ok(Started {
        deltas: receiver,
        api_server_addresses,
    })
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn headers(retry_after: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            retry_after.parse().expect("a header value"),
        );
        headers
    }

    #[test]
    fn delays_grow_like_client_go_from_under_a_second_to_thirty_seconds() {
        let mut backoff = ApiBackoff::new(Arc::new(ServerHint::default()));
        let delays: Vec<Duration> = backoff.by_ref().take(12).collect();
        assert!(
            delays[0] >= Duration::from_millis(800) && delays[0] <= Duration::from_millis(1600)
        );
        for delay in &delays {
            assert!(*delay <= Duration::from_mins(1), "{delay:?}");
        }
        assert!(
            delays[8..]
                .iter()
                .all(|delay| *delay >= Duration::from_secs(30)),
            "capped at 30 s (plus jitter): {delays:?}"
        );
        backoff.reset();
        assert!(backoff.next().expect("a delay") <= Duration::from_millis(1600));
    }

    #[test]
    fn a_410_relists_at_once_but_only_once_a_minute() {
        let mut backoff = ApiBackoff::new(Arc::new(ServerHint::default()));
        let refused = watcher::Error::NoResourceVersion;
        let gone = watcher::Error::WatchError(
            Status::failure("too old", "Expired").with_code(410).boxed(),
        );
        for _ in 0..4 {
            assert!(backoff.after(&refused) >= Duration::from_millis(800));
        }
        assert_eq!(
            backoff.after(&gone),
            Duration::ZERO,
            "the relist starts at once"
        );
        let next = backoff.after(&refused);
        assert!(
            next <= Duration::from_millis(1600),
            "the outage's backoff starts over: {next:?}"
        );
        assert!(
            backoff.after(&gone) >= Duration::from_millis(800),
            "a second 410 within a minute backs off"
        );
    }

    #[test]
    fn retry_after_of_throttling_responses_is_honoured_and_bounded() {
        let hint = Arc::new(ServerHint::default());
        let mut backoff = ApiBackoff::new(hint.clone());
        hint.observe(200, &headers("120"));
        hint.observe(500, &headers("120"));
        assert_eq!(hint.remaining(), Duration::ZERO, "only 429 and 503 count");
        hint.observe(429, &headers("not a number"));
        assert_eq!(hint.remaining(), Duration::ZERO);
        hint.observe(429, &headers("20"));
        let first = backoff.next().expect("a delay");
        assert!(
            first > Duration::from_secs(19) && first <= Duration::from_secs(20),
            "{first:?}"
        );
        hint.observe(503, &headers("86400"));
        assert!(hint.remaining() <= MAX_RETRY_AFTER);
        assert!(hint.remaining() + Duration::from_secs(1) > MAX_RETRY_AFTER);
    }
}
