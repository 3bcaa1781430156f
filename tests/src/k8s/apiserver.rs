//! An in-process Kubernetes API server for tests: it speaks kube-apiserver's list/watch HTTP
//! protocol (plain HTTP/1.1, no auth) for Services, EndpointSlices, Nodes and ServiceCIDRs, so
//! the agent's
//! real kube-rs watchers can follow it, and it lets tests change objects and inject faults.
//!
//! It runs on its own thread with its own tokio runtime, so it serves both synchronous tests
//! (that spawn the agent as a child process) and `#[tokio::test]`s. Every control method is
//! synchronous and cheap. It listens on 127.0.0.1 only, in the test's network namespace or in
//! one named with [`ApiServer::start_in_netns`].
//!
//! Faithful to the real server where a client can tell: one global resourceVersion (like
//! etcd's revision); list items without `kind`/`apiVersion`; `limit`/`continue` pages served
//! from a snapshot; watches replaying every change after `resourceVersion` from a bounded
//! history, or answering `ERROR` with a 410 `Expired` Status when it is older; ADDED/DELETED
//! when an update makes an object enter/leave a watch's selector (the watch cache's rule);
//! BOOKMARKs and the `k8s.io/initial-events-end` bookmark of streaming lists
//! (`sendInitialEvents=true`); slow watchers closed instead of blocking writers.
//!
//! Deliberate simplifications: lists always serve the latest state (valid for the
//! `NotOlderThan`/unset semantics every informer uses; `Exact` at an older RV answers 410);
//! every `apply` bumps the resourceVersion even when nothing changed; no `generation`,
//! finalizers or writes over HTTP (only GET; other methods get 405).

mod http;
mod selector;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use self::selector::Filter;

/// The resource kinds the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1 Service`, namespaced.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`, namespaced.
    EndpointSlice,
    /// `v1 Node`, cluster-scoped.
    Node,
    /// `networking.k8s.io/v1 ServiceCIDR`, cluster-scoped.
    ServiceCidr,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 4] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ServiceCidr,
    ];

    /// The `kind` field, e.g. `EndpointSlice`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    /// The `apiVersion` field, e.g. `discovery.k8s.io/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
        }
    }

    /// The resource name in URLs, e.g. `endpointslices`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::ServiceCidr)
    }

    fn group(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::ServiceCidr => "networking.k8s.io",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Service => 0,
            Kind::EndpointSlice => 1,
            Kind::Node => 2,
            Kind::ServiceCidr => 3,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for k8s_openapi::api::core::v1::Service {}
    impl Sealed for k8s_openapi::api::discovery::v1::EndpointSlice {}
    impl Sealed for k8s_openapi::api::core::v1::Node {}
    impl Sealed for k8s_openapi::api::networking::v1::ServiceCIDR {}
}

/// The k8s-openapi types the server stores: [`Service`], [`EndpointSlice`], [`Node`] and
/// [`ServiceCIDR`].
pub trait ApiObject:
    k8s_openapi::Resource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + Clone
    + sealed::Sealed
{
    /// The server's name for this type.
    const API_KIND: Kind;
}

impl ApiObject for Service {
    const API_KIND: Kind = Kind::Service;
}
impl ApiObject for EndpointSlice {
    const API_KIND: Kind = Kind::EndpointSlice;
}
impl ApiObject for Node {
    const API_KIND: Kind = Kind::Node;
}
impl ApiObject for ServiceCIDR {
    const API_KIND: Kind = Kind::ServiceCidr;
}

/// How requests fail during an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutageMode {
    /// Connections are accepted and closed at once without an answer, and requests on
    /// kept-alive connections close them: the client sees a transport error.
    #[default]
    Refuse,
    /// Every request answers HTTP 503 with a `ServiceUnavailable` Status.
    Unavailable,
    /// Every request answers HTTP 429 with a `TooManyRequests` Status and
    /// `Retry-After: <seconds>` (a throttling server).
    Throttled { retry_after_secs: u32 },
}

/// Tunables; [`ApiServerConfig::default`] suits most tests.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Listen on 127.0.0.1 inside this network namespace (a name under /run/netns) instead of
    /// the test's own one. Needs root.
    pub netns: Option<String>,
    /// Also listen on 127.0.0.1 inside each of these network namespaces, for the agents of
    /// several nodes following one server (see [`ApiServer::addr_in`]).
    pub extra_netns: Vec<String>,
    /// How many changes the watch history keeps; a watch from an older resourceVersion gets
    /// 410 Expired.
    pub history_limit: usize,
    /// Events queued per watch stream before the server gives up on that (too slow) watcher
    /// and closes its stream.
    pub watch_buffer: usize,
    /// How often watches that allow bookmarks get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// The resourceVersion of the empty store; raise it to emulate a server that already
    /// served changes (e.g. a "restarted" server that must not go back in time).
    pub initial_resource_version: u64,
    /// Serve `networking.k8s.io/v1` ServiceCIDRs (Kubernetes ≥ 1.33). Off: the group is
    /// absent from discovery and its paths answer 404, as an older server's do.
    pub service_cidr_api: bool,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            netns: None,
            extra_netns: Vec::new(),
            history_limit: 10_000,
            watch_buffer: 1_000,
            bookmark_interval: Duration::from_secs(1),
            initial_resource_version: 1,
            service_cidr_api: true,
        }
    }
}

/// A test Kubernetes API server. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The listeners in named namespaces ([`ApiServerConfig::netns`] and
    /// [`ApiServerConfig::extra_netns`]).
    netns_addrs: Vec<(String, SocketAddr)>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Starts a server with the default configuration on 127.0.0.1:<ephemeral port>.
    pub fn start() -> Result<Self> {
        Self::start_with(ApiServerConfig::default())
    }

    /// Starts a server listening on 127.0.0.1 inside network namespace `netns` (so an agent run
    /// with `ip netns exec` reaches it on its loopback).
    pub fn start_in_netns(netns: &str) -> Result<Self> {
        Self::start_with(ApiServerConfig {
            netns: Some(netns.to_owned()),
            ..ApiServerConfig::default()
        })
    }

    /// Starts a server with `config`; returns once it accepts connections.
    pub fn start_with(config: ApiServerConfig) -> Result<Self> {
        let shared = Arc::new(Shared::new(&config));
        let named: Vec<Option<String>> = std::iter::once(config.netns.clone())
            .chain(config.extra_netns.iter().cloned().map(Some))
            .collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || http::run(&config, thread_shared, &ready_tx, shutdown_rx))
            .context("spawning the test API server thread")?;
        let addrs = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.context("starting the test API server"));
            }
            Err(e) => anyhow::bail!("the test API server did not start: {e}"),
        };
        let addr = *addrs
            .first()
            .context("the test API server reported no address")?;
        let netns_addrs = named
            .into_iter()
            .zip(addrs)
            .filter_map(|(netns, addr)| Some((netns?, addr)))
            .collect();
        Ok(Self {
            shared,
            addr,
            netns_addrs,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The listening address (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening address inside network namespace `netns`, one of
    /// [`ApiServerConfig::extra_netns`] or the main one ([`ApiServerConfig::netns`]).
    pub fn addr_in(&self, netns: &str) -> Option<SocketAddr> {
        self.netns_addrs
            .iter()
            .find(|(name, _)| name == netns)
            .map(|(_, addr)| *addr)
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig`: one cluster at [`Self::url`], one user without credentials and
    /// one context (namespace `default`) set as current. Returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        write_kubeconfig_at(dir, &self.url())
    }

    /// Like [`Self::write_kubeconfig`], for a client in network namespace `netns` (see
    /// [`Self::addr_in`]).
    pub fn write_kubeconfig_in(&self, netns: &str, dir: &Path) -> Result<PathBuf> {
        let addr = self
            .addr_in(netns)
            .with_context(|| format!("the test API server does not listen in netns {netns}"))?;
        Ok(write_kubeconfig_at(dir, &format!("http://{addr}")))
    }

    /// Creates or replaces an object (keyed by kind, namespace and name; a namespaced object
    /// without a namespace goes to `default`). Assigns the next resourceVersion, keeps `uid` and
    /// `creationTimestamp` across updates, and emits ADDED or MODIFIED. Returns the new
    /// resourceVersion.
    pub fn apply<K: ApiObject>(&self, object: &K) -> u64 {
        self.apply_inner(object, false)
    }

    /// Like [`Self::apply`], and notes when a watch stream first sends the resulting event:
    /// [`Self::event_sent_at`] tells. For measuring how fast a client follows a change (the
    /// benchmark's API event → maps written).
    pub fn apply_traced<K: ApiObject>(&self, object: &K) -> u64 {
        self.apply_inner(object, true)
    }

    /// When a watch stream first handed the event of resourceVersion `rv`, a change made with
    /// [`Self::apply_traced`], to its HTTP connection (serialized, right before the write).
    /// `None` while no watch has sent it (none open, or the watcher was closed as too slow).
    /// The last [`TRACE_LIMIT`] traced changes are kept.
    pub fn event_sent_at(&self, rv: u64) -> Option<Instant> {
        self.shared.lock().traced.get(&rv).copied().flatten()
    }

    fn apply_inner<K: ApiObject>(&self, object: &K, traced: bool) -> u64 {
        let value = serde_json::to_value(object).expect("k8s-openapi objects serialize");
        self.apply_value(K::API_KIND, value, traced)
    }

    /// Starts the graceful deletion of an object, as a DELETE of an object that finalizers
    /// (or, for a Node, the cloud's node lifecycle) still hold does: the server sets
    /// `metadata.deletionTimestamp` (and `deletionGracePeriodSeconds` 0), which no later
    /// update can clear, and emits MODIFIED. Returns the new resourceVersion, or `None` when
    /// the object does not exist. [`Self::delete`] removes it for good.
    pub fn mark_for_deletion(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let mut value = self.get_json(kind, namespace, name)?;
        let metadata = value["metadata"].as_object_mut()?;
        if metadata.get("deletionTimestamp").is_none_or(Value::is_null) {
            metadata.insert("deletionTimestamp".into(), now_json());
            metadata.insert("deletionGracePeriodSeconds".into(), 0.into());
        }
        Some(self.apply_value(kind, value, false))
    }

    fn apply_value(&self, kind: Kind, mut value: Value, traced: bool) -> u64 {
        let meta = &value["metadata"];
        let name = meta["name"]
            .as_str()
            .filter(|name| !name.is_empty())
            .expect("apply: metadata.name is required")
            .to_owned();
        let namespace = if kind.namespaced() {
            meta["namespace"]
                .as_str()
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let now = now_json();
        let mut state = self.shared.lock();
        let key = (kind, namespace.clone(), name);
        let previous = state.objects.get(&key).cloned();
        let rv = state.next_rv();
        let uid_seed = rv;
        let metadata = value["metadata"]
            .as_object_mut()
            .expect("k8s-openapi objects serialize metadata");
        if kind.namespaced() {
            metadata.insert("namespace".into(), namespace.into());
        } else {
            metadata.remove("namespace");
        }
        metadata.insert("resourceVersion".into(), rv.to_string().into());
        for (field, fresh) in [
            (
                "uid",
                Value::from(format!("00000000-0000-4000-8000-{uid_seed:012x}")),
            ),
            ("creationTimestamp", now),
        ] {
            // (An update never clears a deletion in progress: see below.)
            let kept = previous
                .as_ref()
                .map(|p| p["metadata"][field].clone())
                .filter(|v| !v.is_null());
            if let Some(kept) = kept {
                metadata.insert(field.into(), kept);
            } else if metadata.get(field).is_none_or(Value::is_null) {
                metadata.insert(field.into(), fresh);
            }
        }
        // Once a graceful deletion started, its timestamp stays (the real server refuses an
        // update that clears it; here the update keeps it).
        for field in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
            if let Some(kept) = previous
                .as_ref()
                .map(|p| p["metadata"][field].clone())
                .filter(|v| !v.is_null())
            {
                metadata.insert(field.into(), kept);
            }
        }
        let value = Arc::new(value);
        state.objects.insert(key, Arc::clone(&value));
        let op = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        if traced {
            // Before the event is queued to any watch, so no stream can send it untraced.
            self.shared.trace(&mut state, rv);
        }
        state.record(Change {
            rv,
            kind,
            op,
            object: value,
            previous,
        });
        rv
    }

    /// Deletes an object (`namespace` is ignored for Nodes) and emits DELETED carrying its last
    /// state at the deletion's resourceVersion. Returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let mut state = self.shared.lock();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(previous) = state.objects.remove(&key) else {
            return false;
        };
        let rv = state.next_rv();
        let object = Arc::new(with_resource_version(&previous, rv));
        state.record(Change {
            rv,
            kind,
            op: ChangeType::Deleted,
            object,
            previous: None,
        });
        true
    }

    /// The stored object, typed (`namespace` is ignored for Nodes).
    pub fn get<K: ApiObject>(&self, namespace: &str, name: &str) -> Option<K> {
        self.get_json(K::API_KIND, namespace, name).map(|value| {
            serde_json::from_value(value).expect("stored objects deserialize to their type")
        })
    }

    /// The stored object as JSON, as a GET would answer it.
    pub fn get_json(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let state = self.shared.lock();
        let key = (kind, namespace.to_owned(), name.to_owned());
        state.objects.get(&key).map(|value| (**value).clone())
    }

    /// Every stored object of type `K`, ordered by namespace and name.
    pub fn list<K: ApiObject>(&self) -> Vec<K> {
        let state = self.shared.lock();
        state
            .objects
            .iter()
            .filter(|((kind, _, _), _)| *kind == K::API_KIND)
            .map(|(_, value)| {
                serde_json::from_value((**value).clone())
                    .expect("stored objects deserialize to their type")
            })
            .collect()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Closes every open watch stream abruptly (the chunked body is cut without its final
    /// chunk, as when a server dies or a proxy drops the connection).
    pub fn drop_watches(&self) {
        self.shared.lock().close_watches(true);
    }

    /// Ends every open watch stream cleanly, as the server does when `timeoutSeconds` expire.
    pub fn end_watches(&self) {
        self.shared.lock().close_watches(false);
    }

    /// Forgets the watch history and all list snapshots: watches from any resourceVersion older
    /// than the current one get an ERROR event with a 410 Expired Status, and `continue` tokens
    /// answer 410. Open watches are not affected (as with etcd compaction behind a watch cache).
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.history.clear();
        state.history_floor = state.rv;
        state.snapshots.clear();
    }

    /// Starts (`true`) or ends an outage in the mode set by [`Self::set_outage_mode`] (default
    /// [`OutageMode::Refuse`]). Starting one also cuts every open watch stream, like a dying
    /// server.
    pub fn set_outage(&self, on: bool) {
        let mode = self.shared.lock().outage_mode;
        self.set_outage_to(on.then_some(mode));
    }

    /// Chooses how requests fail during outages started with [`Self::set_outage`]; applies at
    /// once to an outage under way.
    pub fn set_outage_mode(&self, mode: OutageMode) {
        let mut state = self.shared.lock();
        state.outage_mode = mode;
        if state.outage.is_some() {
            state.outage = Some(mode);
        }
    }

    /// Starts an outage in `mode` (`Some`) or ends it (`None`).
    pub fn set_outage_to(&self, outage: Option<OutageMode>) {
        let mut state = self.shared.lock();
        if outage.is_some() && state.outage.is_none() {
            state.close_watches(true);
        }
        if let Some(mode) = outage {
            state.outage_mode = mode;
        }
        state.outage = outage;
    }

    /// Delays every list answer (not watches, not single GETs) by `delay`.
    pub fn set_list_delay(&self, delay: Duration) {
        self.shared.lock().list_delay = delay;
    }

    /// Makes the next `count` list requests answer HTTP 500 with an `InternalError` Status.
    pub fn fail_next_lists(&self, count: u32) {
        self.shared.lock().failing_lists = count;
    }

    /// Changes how often bookmark-enabled watches get a BOOKMARK.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// List requests of `kind` answered so far (including injected failures; not requests
    /// refused by an outage).
    pub fn list_requests(&self, kind: Kind) -> u64 {
        self.shared.lock().counters[kind.index()].lists
    }

    /// Watch requests of `kind` answered so far (including ones answered with a 410 ERROR).
    pub fn watch_requests(&self, kind: Kind) -> u64 {
        self.shared.lock().counters[kind.index()].watches
    }

    /// Connections (mode `Refuse`) and requests (the other modes) failed by outages so far:
    /// what clients kept trying while the server was down.
    pub fn refused_requests(&self) -> u64 {
        self.shared.lock().refused_requests
    }

    /// Single-object GETs of `kind` answered so far.
    pub fn get_requests(&self, kind: Kind) -> u64 {
        self.shared.lock().counters[kind.index()].gets
    }

    /// Watch streams of `kind` open right now.
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.shared
            .lock()
            .watchers
            .values()
            .filter(|watcher| watcher.kind == kind)
            .count()
    }

    /// Watch streams closed so far because their client fell more than
    /// [`ApiServerConfig::watch_buffer`] events behind.
    pub fn slow_watchers_closed(&self) -> u64 {
        self.shared.lock().slow_watchers_closed
    }

    /// The last requests (method, path and query; at most 1 000), oldest first.
    pub fn request_log(&self) -> Vec<String> {
        self.shared.lock().request_log.iter().cloned().collect()
    }

    /// Blocks until at least `count` watch streams of `kind` are open; false on timeout. (From
    /// async code, poll [`Self::open_watches`] instead.)
    pub fn wait_for_watches(&self, kind: Kind, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.open_watches(kind) >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.lock().close_watches(false);
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the test API server thread panicked");
        }
    }
}

/// Writes `dir/kubeconfig` pointing at `server` (see [`ApiServer::write_kubeconfig`]).
fn write_kubeconfig_at(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: switchyard-test\n  cluster:\n    server: {server}\n\
         users:\n\
         - name: switchyard-test\n  user: {{}}\n\
         contexts:\n\
         - name: switchyard-test\n  context:\n    cluster: switchyard-test\n    user: switchyard-test\n    namespace: default\n\
         current-context: switchyard-test\n\
         preferences: {{}}\n"
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// The current time as the API serializes a `Time`.
fn now_json() -> Value {
    // jiff is built without its `std` clock here, so take the time from std.
    let unix_seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(0));
    let now = k8s_openapi::jiff::Timestamp::from_second(unix_seconds)
        .expect("the clock is within jiff's range");
    serde_json::to_value(Time(now)).expect("a timestamp serializes")
}

fn with_resource_version(object: &Value, rv: u64) -> Value {
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = rv.to_string().into();
    object
}

/// How many traced changes [`ApiServer::event_sent_at`] remembers.
pub const TRACE_LIMIT: usize = 10_000;

/// State shared by the test's controls and the server's tasks.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Traced changes whose event no watch has sent yet: while 0, streams skip the lookup.
    traces_pending: AtomicUsize,
    /// See [`ApiServerConfig::service_cidr_api`].
    service_cidr_api: bool,
}

impl Shared {
    fn new(config: &ApiServerConfig) -> Self {
        let rv = config.initial_resource_version;
        Self {
            traces_pending: AtomicUsize::new(0),
            service_cidr_api: config.service_cidr_api,
            state: Mutex::new(State {
                rv,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_floor: rv,
                history_limit: config.history_limit.max(1),
                watch_buffer: config.watch_buffer.max(1),
                watchers: HashMap::new(),
                next_watcher: 0,
                snapshots: BTreeMap::new(),
                next_snapshot: 0,
                outage: None,
                outage_mode: OutageMode::default(),
                refused_requests: 0,
                list_delay: Duration::ZERO,
                failing_lists: 0,
                bookmark_interval: config.bookmark_interval,
                counters: [Counters::default(); Kind::ALL.len()],
                slow_watchers_closed: 0,
                request_log: VecDeque::new(),
                traced: BTreeMap::new(),
            }),
        }
    }

    /// Starts tracing the change at `rv` (the caller holds the lock).
    fn trace(&self, state: &mut State, rv: u64) {
        state.traced.insert(rv, None);
        self.traces_pending.fetch_add(1, Ordering::SeqCst);
        while state.traced.len() > TRACE_LIMIT {
            if let Some((_, None)) = state.traced.pop_first() {
                self.traces_pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Called by a watch stream as it hands `object`'s event to its connection: the first
    /// sending of a traced change is noted.
    fn note_sent(&self, object: &Value) {
        if self.traces_pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        let now = Instant::now();
        let Some(rv) = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|rv| rv.parse::<u64>().ok())
        else {
            return;
        };
        let mut state = self.lock();
        if let Some(sent @ None) = state.traced.get_mut(&rv) {
            *sent = Some(now);
            self.traces_pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    // Never held across an await; a panicking test thread must not wedge the server.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type Key = (Kind, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the watch history.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    op: ChangeType,
    /// The new state (for deletions: the last state at the deletion's resourceVersion).
    object: Arc<Value>,
    /// The state before an update, to tell when an object enters or leaves a selector.
    previous: Option<Arc<Value>>,
}

impl Change {
    /// The event a watch with `filter` sees for this change, if any (the watch cache's rule).
    fn event_for(&self, filter: &Filter) -> Option<Frame> {
        let now = filter.matches(&self.object);
        let before = self.previous.as_deref().is_some_and(|p| filter.matches(p));
        let (event, object) = match (self.op, before, now) {
            (ChangeType::Added, _, true) | (ChangeType::Modified, false, true) => {
                ("ADDED", Arc::clone(&self.object))
            }
            (ChangeType::Modified, true, true) => ("MODIFIED", Arc::clone(&self.object)),
            (ChangeType::Deleted, _, true) => ("DELETED", Arc::clone(&self.object)),
            // Left the selector: DELETED with the old content at the new resourceVersion.
            (ChangeType::Modified, true, false) => (
                "DELETED",
                Arc::new(with_resource_version(
                    self.previous.as_deref().expect("before implies previous"),
                    self.rv,
                )),
            ),
            _ => return None,
        };
        Some(Frame::Event { event, object })
    }
}

/// What travels down a watch stream.
#[derive(Debug)]
enum Frame {
    Event {
        event: &'static str,
        object: Arc<Value>,
    },
    Bookmark {
        rv: u64,
        initial_events_end: bool,
    },
    Error(Value),
}

#[derive(Debug)]
struct WatcherEntry {
    kind: Kind,
    filter: Arc<Filter>,
    bookmarks: bool,
    tx: mpsc::Sender<Frame>,
    /// Set before the entry is dropped to cut the stream instead of ending it.
    abort: Arc<AtomicBool>,
}

/// A paginated list in progress: the full answer, fixed at its first page.
#[derive(Debug)]
struct Snapshot {
    rv: u64,
    items: Vec<Arc<Value>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    lists: u64,
    watches: u64,
    gets: u64,
}

const MAX_SNAPSHOTS: usize = 64;
const REQUEST_LOG_LIMIT: usize = 1_000;

#[derive(Debug)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Change>,
    /// Every change after this resourceVersion is still in `history`.
    history_floor: u64,
    history_limit: usize,
    watch_buffer: usize,
    watchers: HashMap<u64, WatcherEntry>,
    next_watcher: u64,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    outage: Option<OutageMode>,
    outage_mode: OutageMode,
    /// Connections and requests an outage refused or failed.
    refused_requests: u64,
    list_delay: Duration,
    failing_lists: u32,
    bookmark_interval: Duration,
    counters: [Counters; Kind::ALL.len()],
    slow_watchers_closed: u64,
    request_log: VecDeque<String>,
    /// Changes made with `apply_traced`, by resourceVersion: when a watch first sent them.
    traced: BTreeMap<u64, Option<Instant>>,
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Appends to the history and fans out to the open watches without ever blocking: a
    /// watcher whose buffer is full is closed, as kube-apiserver's cacher does.
    fn record(&mut self, change: Change) {
        let mut gone = Vec::new();
        for (id, watcher) in &self.watchers {
            if watcher.kind != change.kind {
                continue;
            }
            if let Some(frame) = change.event_for(&watcher.filter)
                && let Err(e) = watcher.tx.try_send(frame)
            {
                gone.push((*id, matches!(e, TrySendError::Full(_))));
            }
        }
        self.remove_watchers(gone);
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(evicted) = self.history.pop_front() {
                self.history_floor = evicted.rv;
            }
        }
    }

    /// Drops watchers whose channel is full (`true`: too slow, the stream ends cleanly so the
    /// client resumes from its last resourceVersion) or closed (the client went away).
    fn remove_watchers(&mut self, gone: Vec<(u64, bool)>) {
        for (id, slow) in gone {
            if self.watchers.remove(&id).is_some() && slow {
                self.slow_watchers_closed += 1;
            }
        }
    }

    fn close_watches(&mut self, abort: bool) {
        for (_, watcher) in self.watchers.drain() {
            watcher.abort.store(abort, Ordering::SeqCst);
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allows them. Sent
    /// under the lock, after every earlier event, so the bookmark never overtakes one.
    fn send_bookmarks(&mut self) {
        let rv = self.rv;
        let mut gone = Vec::new();
        for (id, watcher) in &self.watchers {
            let bookmark = Frame::Bookmark {
                rv,
                initial_events_end: false,
            };
            if watcher.bookmarks
                && let Err(e) = watcher.tx.try_send(bookmark)
            {
                gone.push((*id, matches!(e, TrySendError::Full(_))));
            }
        }
        self.remove_watchers(gone);
    }

    fn log_request(&mut self, line: String) {
        if self.request_log.len() == REQUEST_LOG_LIMIT {
            self.request_log.pop_front();
        }
        self.request_log.push_back(line);
    }

    fn store_snapshot(&mut self, snapshot: Snapshot) -> u64 {
        let id = self.next_snapshot;
        self.next_snapshot += 1;
        self.snapshots.insert(id, snapshot);
        while self.snapshots.len() > MAX_SNAPSHOTS {
            self.snapshots.pop_first();
        }
        id
    }
}
