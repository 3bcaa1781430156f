//! The HTTP side: listener, routing, list and watch answers shaped like kube-apiserver's.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::selector::{FieldSelector, Filter, LabelSelector};
use super::{ApiServerConfig, Frame, Kind, OutageMode, Shared, Snapshot, State, WatcherEntry};

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The real server picks 30–60 minutes when a watch names no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);
const MIN_BOOKMARK_INTERVAL: Duration = Duration::from_millis(10);

/// The server thread's body: binds, reports the addresses (or the error) on `ready`, then
/// serves until `shutdown` fires.
pub(super) fn run(
    config: &ApiServerConfig,
    shared: Arc<Shared>,
    ready: &std::sync::mpsc::Sender<Result<Vec<SocketAddr>>>,
    shutdown: oneshot::Receiver<()>,
) {
    let started = bind_all(config).and_then(|listeners| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-apiserver-rt")
            .enable_all()
            .build()
            .context("building the test API server runtime")?;
        Ok((listeners, runtime))
    });
    let (listeners, runtime) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async {
        let mut registered = Vec::with_capacity(listeners.len());
        for listener in listeners {
            match TcpListener::from_std(listener).context("registering the listener") {
                Ok(listener) => registered.push(listener),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        let addrs = registered
            .iter()
            .map(|listener| {
                listener
                    .local_addr()
                    .expect("a bound listener has an address")
            })
            .collect();
        tokio::spawn(bookmarks(Arc::clone(&shared)));
        let mut listeners = registered.into_iter();
        let main = listeners.next().expect("bind_all binds at least one");
        // The other namespaces' listeners serve until the runtime goes (below).
        for extra in listeners {
            tokio::spawn(serve(
                extra,
                Arc::clone(&shared),
                std::future::pending::<()>(),
            ));
        }
        let _ = ready.send(Ok(addrs));
        serve(main, shared, shutdown).await;
    });
    // Open connections (watch streams) are cut when the runtime goes.
    runtime.shutdown_timeout(Duration::from_secs(2));
}

/// The main listener (in `config.netns` or the caller's namespace), then one per
/// `config.extra_netns`, in that order.
fn bind_all(config: &ApiServerConfig) -> Result<Vec<StdListener>> {
    let mut listeners = vec![bind(config.netns.as_deref())?];
    for netns in &config.extra_netns {
        listeners.push(bind(Some(netns))?);
    }
    Ok(listeners)
}

fn bind(netns: Option<&str>) -> Result<StdListener> {
    if let Some(netns) = netns {
        // Only this thread moves; sockets keep the namespace they were created in.
        let path = std::path::Path::new(crate::env::netns::NETNS_DIR).join(netns);
        let handle =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("joining netns {netns}"))?;
    }
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0))
        .with_context(|| format!("binding 127.0.0.1:0 in netns {netns:?}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("test API server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        {
            let mut state = shared.lock();
            if state.outage == Some(OutageMode::Refuse) {
                state.refused_requests += 1;
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(Arc::clone(&shared), request));
            // Errors here are clients going away or requests refused during an outage.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn bookmarks(shared: Arc<Shared>) {
    loop {
        let interval = shared.lock().bookmark_interval.max(MIN_BOOKMARK_INTERVAL);
        tokio::time::sleep(interval).await;
        shared.lock().send_bookmarks();
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> io::Result<Response<Body>> {
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    {
        let mut state = shared.lock();
        if state.outage.is_some() {
            state.refused_requests += 1;
        }
        match state.outage {
            // An error from the service makes hyper drop the connection without an answer.
            Some(OutageMode::Refuse) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "test API server outage",
                ));
            }
            Some(OutageMode::Unavailable) => {
                return Ok(status_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ));
            }
            Some(OutageMode::Throttled { retry_after_secs }) => {
                let mut response = status_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later",
                );
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from(retry_after_secs),
                );
                return Ok(response);
            }
            None => {}
        }
        state.log_request(format!("{} {target}", request.method()));
    }
    if request.method() != Method::GET {
        return Ok(status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server only serves GET",
        ));
    }
    let query = Query::parse(request.uri().query().unwrap_or_default());
    let path = request.uri().path();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if !shared.service_cidr_api && segments.get(1) == Some(&"networking.k8s.io") {
        return Ok(not_found());
    }
    Ok(match segments.as_slice() {
        ["version"] => json_response(StatusCode::OK, &version()),
        ["healthz" | "livez" | "readyz"] => text_response(StatusCode::OK, "ok"),
        ["api"] => json_response(
            StatusCode::OK,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [],
            }),
        ),
        ["apis"] => json_response(StatusCode::OK, &api_group_list(shared.service_cidr_api)),
        ["apis", group @ ("discovery.k8s.io" | "networking.k8s.io")] => {
            json_response(StatusCode::OK, &api_group(group))
        }
        ["api", "v1"] => json_response(StatusCode::OK, &resource_list("", "v1")),
        ["apis", "discovery.k8s.io", "v1"] => json_response(
            StatusCode::OK,
            &resource_list("discovery.k8s.io", "discovery.k8s.io/v1"),
        ),
        ["api", "v1", rest @ ..] => resource(&shared, "", rest, &query).await,
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => {
            resource(&shared, "discovery.k8s.io", rest, &query).await
        }
        ["apis", "networking.k8s.io", "v1"] => json_response(
            StatusCode::OK,
            &resource_list("networking.k8s.io", "networking.k8s.io/v1"),
        ),
        ["apis", "networking.k8s.io", "v1", rest @ ..] => {
            resource(&shared, "networking.k8s.io", rest, &query).await
        }
        _ => not_found(),
    })
}

/// Query parameters (last one wins, as Go's `url.Values.Get` takes the first; kube-rs never
/// repeats one).
struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: &str) -> Self {
        Self(
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Go's strconv.ParseBool, which the apiserver uses for `watch` and friends.
    fn flag(&self, name: &str) -> bool {
        matches!(
            self.get(name),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }
}

async fn resource(
    shared: &Arc<Shared>,
    group: &str,
    rest: &[&str],
    query: &Query,
) -> Response<Body> {
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return not_found(),
    };
    let Some(kind) = Kind::ALL
        .into_iter()
        .find(|kind| kind.group() == group && kind.plural() == plural)
    else {
        return not_found();
    };
    if kind.namespaced() != namespace.is_some() && (name.is_some() || namespace.is_some()) {
        // A Node under a namespace, or a namespaced object named without one.
        return not_found();
    }
    if let Some(name) = name {
        return get(shared, kind, namespace.unwrap_or_default(), name);
    }
    let labels = match LabelSelector::parse(query.get("labelSelector").unwrap_or_default()) {
        Ok(labels) => labels,
        Err(e) => return bad_request(&format!("unable to parse labelSelector: {e}")),
    };
    let fields = match FieldSelector::parse(query.get("fieldSelector").unwrap_or_default()) {
        Ok(fields) => fields,
        Err(e) => return bad_request(&format!("unable to parse fieldSelector: {e}")),
    };
    let filter = Filter {
        namespace: namespace.map(str::to_owned),
        labels,
        fields,
    };
    if query.flag("watch") {
        watch(shared, kind, filter, query)
    } else {
        list(shared, kind, &filter, query).await
    }
}

fn get(shared: &Shared, kind: Kind, namespace: &str, name: &str) -> Response<Body> {
    let mut state = shared.lock();
    state.counters[kind.index()].gets += 1;
    let key = (kind, namespace.to_owned(), name.to_owned());
    if let Some(object) = state.objects.get(&key) {
        return json_response(StatusCode::OK, object);
    }
    let mut status = status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.plural()),
    );
    status["details"] = json!({"name": name, "group": kind.group(), "kind": kind.plural()});
    json_response(StatusCode::NOT_FOUND, &status)
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter.";

async fn list(shared: &Shared, kind: Kind, filter: &Filter, query: &Query) -> Response<Body> {
    let (delay, fail) = {
        let mut state = shared.lock();
        state.counters[kind.index()].lists += 1;
        let fail = state.failing_lists > 0;
        state.failing_lists = state.failing_lists.saturating_sub(1);
        (state.list_delay, fail)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fail {
        return status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: injected list failure",
        );
    }
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None | Some(Ok(0)) => None,
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => return bad_request("invalid limit"),
    };
    let mut state = shared.lock();
    let (rv, all, offset, snapshot) = if let Some(token) = query.get("continue") {
        let parsed = token
            .split_once(':')
            .and_then(|(id, offset)| Some((id.parse::<u64>().ok()?, offset.parse().ok()?)));
        let Some((id, offset)) = parsed else {
            return bad_request("continue key is not valid");
        };
        let Some(snapshot) = state.snapshots.get(&id) else {
            return status_response(StatusCode::GONE, "Expired", CONTINUE_EXPIRED);
        };
        (snapshot.rv, snapshot.items.clone(), offset, Some(id))
    } else {
        let current = state.rv;
        let asked = query.get("resourceVersion").unwrap_or_default();
        if !asked.is_empty() && asked != "0" {
            let Ok(asked) = asked.parse::<u64>() else {
                return bad_request(&format!("invalid resourceVersion {asked:?}"));
            };
            if asked > current {
                return too_large(asked, current);
            }
            if query.get("resourceVersionMatch") == Some("Exact") && asked != current {
                return status_response(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {asked} ({current})"),
                );
            }
        }
        let items: Vec<_> = state
            .objects
            .range((kind, String::new(), String::new())..)
            .take_while(|((k, _, _), _)| *k == kind)
            .filter(|(_, object)| filter.matches(object))
            .map(|(_, object)| Arc::clone(object))
            .collect();
        (current, items, 0, None)
    };
    let offset = offset.min(all.len());
    let end = limit.map_or(all.len(), |limit| (offset + limit).min(all.len()));
    let remaining = all.len() - end;
    // Like the real server: items carry no kind/apiVersion, the list does.
    let items: Vec<Value> = all[offset..end]
        .iter()
        .map(|object| {
            let mut item = (**object).clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if remaining > 0 {
        let id = snapshot.unwrap_or_else(|| state.store_snapshot(Snapshot { rv, items: all }));
        metadata["continue"] = format!("{id}:{end}").into();
        metadata["remainingItemCount"] = remaining.into();
    } else if let Some(id) = snapshot {
        state.snapshots.remove(&id);
    }
    drop(state);
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn watch(shared: &Arc<Shared>, kind: Kind, filter: Filter, query: &Query) -> Response<Body> {
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial_events = query.flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds").map(str::parse::<u64>) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(seconds)) => Duration::from_secs(seconds),
        Some(Err(_)) => return bad_request("invalid timeoutSeconds"),
    };
    if send_initial_events
        && (!bookmarks || query.get("resourceVersionMatch") != Some("NotOlderThan"))
    {
        return status_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "sendInitialEvents requires allowWatchBookmarks=true and \
             resourceVersionMatch=NotOlderThan",
        );
    }
    let asked = query.get("resourceVersion").unwrap_or_default();
    let asked = match asked {
        "" | "0" => None,
        other => match other.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(&format!("invalid resourceVersion {other:?}")),
        },
    };
    let filter = Arc::new(filter);
    let mut state = shared.lock();
    state.counters[kind.index()].watches += 1;
    let (mut prefix, live) = watch_start(&state, kind, &filter, asked, send_initial_events);
    // This request passed the outage check just before an outage began: cut it like the rest.
    let cut = state.outage.is_some();
    if cut {
        prefix.clear();
    }
    let live = (live || cut).then(|| {
        let (tx, rx) = mpsc::channel(state.watch_buffer);
        let abort = Arc::new(AtomicBool::new(cut));
        let id = state.next_watcher;
        state.next_watcher += 1;
        if !cut {
            state.watchers.insert(
                id,
                WatcherEntry {
                    kind,
                    filter,
                    bookmarks,
                    tx,
                    abort: Arc::clone(&abort),
                },
            );
        }
        Live {
            rx,
            abort,
            _registration: Registration {
                shared: Arc::clone(shared),
                id,
            },
        }
    });
    drop(state);
    stream_response(WatchStream {
        shared: Arc::clone(shared),
        kind,
        prefix,
        live,
        deadline: tokio::time::Instant::now() + timeout,
    })
}

/// What a new watch sends before live events, and whether it goes on to live events at all.
fn watch_start(
    state: &State,
    kind: Kind,
    filter: &Filter,
    asked: Option<u64>,
    send_initial_events: bool,
) -> (VecDeque<Frame>, bool) {
    let current = state.rv;
    let mut prefix = VecDeque::new();
    let mut live = true;
    match asked {
        Some(asked) if asked > current => {
            prefix.push_back(Frame::Error(too_large_status(asked, current)));
            live = false;
        }
        Some(asked) if !send_initial_events && asked < state.history_floor => {
            prefix.push_back(Frame::Error(status(
                StatusCode::GONE,
                "Expired",
                &format!(
                    "too old resource version: {asked} ({})",
                    state.history_floor + 1
                ),
            )));
            live = false;
        }
        Some(asked) if !send_initial_events => {
            prefix.extend(
                state
                    .history
                    .iter()
                    .filter(|change| change.rv > asked && change.kind == kind)
                    .filter_map(|change| change.event_for(filter)),
            );
        }
        // No resourceVersion, "0", or a streaming list: the current state as ADDED events.
        _ => {
            prefix.extend(
                state
                    .objects
                    .range((kind, String::new(), String::new())..)
                    .take_while(|((k, _, _), _)| *k == kind)
                    .filter(|(_, object)| filter.matches(object))
                    .map(|(_, object)| Frame::Event {
                        event: "ADDED",
                        object: Arc::clone(object),
                    }),
            );
            if send_initial_events {
                prefix.push_back(Frame::Bookmark {
                    rv: current,
                    initial_events_end: true,
                });
            }
        }
    }
    (prefix, live)
}

/// The chunked 200 answer of a watch: the prefix, then live events until the deadline.
fn stream_response(stream: WatchStream) -> Response<Body> {
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        if let Some(frame) = stream.prefix.pop_front() {
            return Some((Ok(stream.send(&frame)), stream));
        }
        let deadline = stream.deadline;
        let live = stream.live.as_mut()?;
        let next = tokio::select! {
            frame = live.rx.recv() => frame,
            () = tokio::time::sleep_until(deadline) => None,
        };
        if live.abort.load(Ordering::SeqCst) {
            stream.live = None;
            // An error from the body makes hyper cut the connection mid-stream.
            let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped by test");
            return Some((Err(cut), stream));
        }
        let frame = next?;
        Some((Ok(stream.send(&frame)), stream))
    });
    let mut response = Response::new(StreamBody::new(body).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

struct WatchStream {
    shared: Arc<Shared>,
    kind: Kind,
    prefix: VecDeque<Frame>,
    live: Option<Live>,
    deadline: tokio::time::Instant,
}

impl WatchStream {
    /// Encodes `frame` for the connection, noting when a traced event leaves.
    fn send(&self, frame: &Frame) -> hyper::body::Frame<Bytes> {
        let encoded = encode(self.kind, frame);
        if let Frame::Event { object, .. } = frame {
            self.shared.note_sent(object);
        }
        encoded
    }
}

struct Live {
    rx: mpsc::Receiver<Frame>,
    abort: Arc<AtomicBool>,
    _registration: Registration,
}

/// Unregisters a watcher when its stream goes (client gone, timeout, server closed it).
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.lock().watchers.remove(&self.id);
    }
}

fn encode(kind: Kind, frame: &Frame) -> hyper::body::Frame<Bytes> {
    let (event, object) = match frame {
        Frame::Event { event, object } => (*event, serde_json::to_string(&**object)),
        Frame::Bookmark {
            rv,
            initial_events_end,
        } => {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if *initial_events_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let object = json!({
                "kind": kind.name(),
                "apiVersion": kind.api_version(),
                "metadata": metadata,
            });
            ("BOOKMARK", serde_json::to_string(&object))
        }
        Frame::Error(status) => ("ERROR", serde_json::to_string(status)),
    };
    let object = object.expect("JSON values serialize");
    hyper::body::Frame::data(Bytes::from(format!(
        "{{\"type\":\"{event}\",\"object\":{object}}}\n"
    )))
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn too_large_status(asked: u64, current: u64) -> Value {
    let mut status = status(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        &format!("Too large resource version: {asked}, current: {current}"),
    );
    status["details"] = json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    });
    status
}

fn too_large(asked: u64, current: u64) -> Response<Body> {
    json_response(
        StatusCode::GATEWAY_TIMEOUT,
        &too_large_status(asked, current),
    )
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code, reason, message))
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found() -> Response<Body> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    let mut response = Response::new(full(body));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text_response(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "gitVersion": "v1.33.0+switchyard-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_group(name: &str) -> Value {
    let group_version = format!("{name}/v1");
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": [{"groupVersion": group_version, "version": "v1"}],
        "preferredVersion": {"groupVersion": group_version, "version": "v1"},
    })
}

fn api_group_list(service_cidr_api: bool) -> Value {
    let groups: Vec<Value> = ["discovery.k8s.io", "networking.k8s.io"]
        .into_iter()
        .filter(|name| service_cidr_api || *name != "networking.k8s.io")
        .map(|name| {
            let mut group = api_group(name);
            if let Some(map) = group.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            group
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, group_version: &str) -> Value {
    let resources: Vec<Value> = Kind::ALL
        .into_iter()
        .filter(|kind| kind.group() == group)
        .map(|kind| {
            json!({
                "name": kind.plural(),
                "singularName": kind.name().to_lowercase(),
                "namespaced": kind.namespaced(),
                "kind": kind.name(),
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}
