//! Checks the test API server against the real kube-rs client (kube 5 / kube-runtime 5): the
//! wire format, watchers and reflectors following changes, selectors, pagination, and recovery
//! from every injected fault. Loopback only; every test is bounded by `TEST_TIMEOUT`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use serde_json::Value;
use switchyard_tests::env::netns::{NETNS_DIR, Topology};
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::apiserver::{ApiServer, ApiServerConfig, Kind, OutageMode};
use switchyard_tests::k8s::objects::meta;

const TEST_TIMEOUT: Duration = Duration::from_mins(1);
const CONVERGE: Duration = Duration::from_secs(15);

/// Runs a test body under the global time bound.
async fn bounded(body: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("test exceeded its time bound");
}

/// Polls `check` until it holds; panics with `what` after `CONVERGE`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client built the way the agent builds one: from the kubeconfig the server writes.
async fn client(server: &ApiServer) -> Client {
    Client::try_from(client_config(server).await).unwrap()
}

async fn client_config(server: &ApiServer) -> Config {
    let dir = TempDir::new().unwrap();
    let path = server.write_kubeconfig(dir.path());
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    assert_eq!(config.default_namespace, "default");
    config
}

/// A short fixed backoff, so recovery is quick but a dead server is not hammered.
struct Quick;

impl Iterator for Quick {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}

impl Backoff for Quick {
    fn reset(&mut self) {}
}

/// Runs a reflector over `watcher(api, config)` in the background; the store is its view.
fn reflect<K>(api: Api<K>, config: watcher::Config) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).backoff(Quick);
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

/// Records a watcher's events as short strings ("apply default/a@7", "init-done", ...).
fn record<K, S>(stream: S) -> Arc<Mutex<Vec<String>>>
where
    K: kube::Resource + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    tokio::spawn(stream.backoff(Quick).for_each(move |event| {
        let line = match event {
            Ok(watcher::Event::Init) => "init".to_owned(),
            Ok(watcher::Event::InitApply(o)) => format!("init-apply {}", key(&o)),
            Ok(watcher::Event::InitDone) => "init-done".to_owned(),
            Ok(watcher::Event::Apply(o)) => format!("apply {}@{}", key(&o), rv(&o)),
            Ok(watcher::Event::Delete(o)) => format!("delete {}@{}", key(&o), rv(&o)),
            Err(e) => format!("error {e}"),
        };
        sink.lock().unwrap().push(line);
        async {}
    }));
    log
}

fn lines(log: &Mutex<Vec<String>>) -> Vec<String> {
    log.lock().unwrap().clone()
}

fn key<K: kube::Resource>(object: &K) -> String {
    let meta = object.meta();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{}", meta.name.clone().unwrap_or_default()),
        None => meta.name.clone().unwrap_or_default(),
    }
}

fn rv<K: kube::Resource>(object: &K) -> String {
    object.meta().resource_version.clone().unwrap_or_default()
}

fn keys<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> BTreeSet<String> {
    store.state().iter().map(|o| key(&**o)).collect()
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)], port: i32) -> Service {
    Service {
        metadata: meta(Some(namespace), name, labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".to_owned()),
            ports: Some(vec![ServicePort {
                port,
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn service_port(service: &Service) -> i32 {
    service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
}

fn slice(namespace: &str, name: &str, address: &str, port: i32) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            name,
            &[("kubernetes.io/service-name", "web")],
        ),
        address_type: "IPv4".to_owned(),
        endpoints: vec![Endpoint {
            addresses: vec![address.to_owned()],
            ..Endpoint::default()
        }],
        ports: Some(vec![EndpointPort {
            port: Some(port),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

fn node(name: &str, label: &str) -> Node {
    Node {
        metadata: meta(None, name, &[("switchyard.test/mark", label)]),
        ..Node::default()
    }
}

/// Services by key with their port: the part of the content these tests change.
fn service_ports(services: impl IntoIterator<Item = Service>) -> BTreeMap<String, i32> {
    services
        .into_iter()
        .map(|s| (key(&s), service_port(&s)))
        .collect()
}

fn store_ports(store: &Store<Service>) -> BTreeMap<String, i32> {
    service_ports(store.state().iter().map(|s| (**s).clone()))
}

fn api_error_code(error: &kube::Error) -> Option<(u16, String)> {
    match error {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_initial_list_then_added_modified_deleted() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        for name in ["a", "b", "c"] {
            server.apply(&service("default", name, &[], 80));
        }
        let api: Api<Service> = Api::all(client(&server).await);
        let log = record(watcher(api, watcher::Config::default()));
        eventually("the initial list", || {
            lines(&log).contains(&"init-done".to_owned())
        })
        .await;
        assert_eq!(
            lines(&log),
            [
                "init",
                "init-apply default/a",
                "init-apply default/b",
                "init-apply default/c",
                "init-done"
            ]
        );
        eventually("the watch", || server.open_watches(Kind::Service) == 1).await;

        let added = server.apply(&service("default", "d", &[], 80));
        let modified = server.apply(&service("default", "a", &[], 81));
        assert!(server.delete(Kind::Service, "default", "b"));
        let deleted = server.resource_version();
        let expected = [
            format!("apply default/d@{added}"),
            format!("apply default/a@{modified}"),
            format!("delete default/b@{deleted}"),
        ];
        eventually("the three events", || lines(&log).len() >= 8).await;
        assert_eq!(lines(&log)[5..], expected);
        assert_eq!(
            service_port(&server.get::<Service>("default", "a").unwrap()),
            81
        );
        // uid and creationTimestamp survive an update, as on a real server.
        let a = server.get_json(Kind::Service, "default", "a").unwrap();
        assert!(a["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(a["metadata"]["creationTimestamp"].is_string());

        // What kube-runtime 5's watcher sends by default.
        let log = server.request_log();
        let list = log.iter().find(|l| !l.contains("watch=")).unwrap();
        let watch = log.iter().find(|l| l.contains("watch=true")).unwrap();
        eprintln!("list request: {list}\nwatch request: {watch}");
        assert!(list.starts_with("GET /api/v1/services?"), "{list}");
        assert!(list.contains("limit=500"), "{list}");
        assert!(!list.contains("resourceVersion"), "{list}");
        for param in [
            "timeoutSeconds=290",
            "allowWatchBookmarks=true",
            "resourceVersion=4",
        ] {
            assert!(watch.contains(param), "{watch} lacks {param}");
        }
        assert!(!watch.contains("sendInitialEvents"), "{watch}");
        assert_eq!(server.list_requests(Kind::Service), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selectors_and_namespaces_filter_lists_and_watches() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        let headless = ("service.kubernetes.io/headless", "");
        let other_proxy = ("service.kubernetes.io/service-proxy-name", "other");
        server.apply(&service("default", "plain", &[("app", "web")], 80));
        server.apply(&service("default", "headless", &[headless], 80));
        server.apply(&service("default", "foreign", &[other_proxy], 80));
        server.apply(&service("prod", "api", &[("app", "api")], 80));
        let client = client(&server).await;
        let selector = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
        let store = reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(selector),
        );
        eventually("the filtered list", || {
            keys(&store) == BTreeSet::from(["default/plain".into(), "prod/api".into()])
        })
        .await;

        // Gaining the label leaves the selection (DELETED), losing it re-enters (ADDED).
        server.apply(&service("prod", "api", &[("app", "api"), headless], 80));
        eventually("api to leave the selection", || {
            keys(&store) == BTreeSet::from(["default/plain".into()])
        })
        .await;
        server.apply(&service("default", "headless", &[], 80));
        server.apply(&service("default", "late", &[other_proxy], 80));
        eventually("headless to enter the selection", || {
            keys(&store) == BTreeSet::from(["default/headless".into(), "default/plain".into()])
        })
        .await;

        // One-shot lists with each operator, and a namespaced path.
        let all = Api::<Service>::all(client.clone());
        for (selector, expected) in [
            ("app=web", vec!["plain"]),
            ("app!=web", vec!["api", "foreign", "headless", "late"]),
            ("app in (web,api)", vec!["api", "plain"]),
            (
                "app notin (web),!service.kubernetes.io/headless",
                vec!["foreign", "headless", "late"],
            ),
            (
                "service.kubernetes.io/service-proxy-name",
                vec!["foreign", "late"],
            ),
        ] {
            let list = all
                .list(&ListParams::default().labels(selector))
                .await
                .unwrap();
            let mut names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
            names.sort();
            assert_eq!(names, expected, "selector {selector}");
        }
        let prod = Api::<Service>::namespaced(client.clone(), "prod");
        let names: Vec<String> = prod
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        assert_eq!(names, ["api"]);
        let bad = all.list(&ListParams::default().labels("a in (b")).await;
        assert_eq!(
            api_error_code(&bad.unwrap_err()),
            Some((400, "BadRequest".into()))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_is_watched_by_field_selector_and_fetched_by_name() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        server.apply(&node("node-a", "1"));
        server.apply(&node("node-b", "1"));
        let api = Api::<Node>::all(client(&server).await);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        tokio::spawn(
            watcher::watch_object(api.clone(), "node-a")
                .backoff(Quick)
                .for_each(move |event| {
                    // Errors (the server going away at the end) are retried by the watcher.
                    if let Ok(node) = event {
                        let mark = node.map(|n| n.labels()["switchyard.test/mark"].clone());
                        sink.lock().unwrap().push(mark);
                    }
                    async {}
                }),
        );
        eventually("node-a", || {
            seen.lock().unwrap().last() == Some(&Some("1".into()))
        })
        .await;
        server.apply(&node("node-b", "2"));
        server.apply(&node("node-a", "3"));
        eventually("node-a's update", || {
            seen.lock().unwrap().last() == Some(&Some("3".into()))
        })
        .await;
        server.delete(Kind::Node, "", "node-a");
        eventually("node-a's deletion", || {
            seen.lock().unwrap().last() == Some(&None)
        })
        .await;
        // node-b's change never reached this watch.
        assert_eq!(
            *seen.lock().unwrap(),
            [Some("1".to_owned()), Some("3".to_owned()), None]
        );
        assert!(
            server
                .request_log()
                .iter()
                .any(|l| l.contains("fieldSelector=metadata.name%3Dnode-a")),
            "{:?}",
            server.request_log()
        );

        let b = api.get("node-b").await.unwrap();
        assert_eq!(b.labels()["switchyard.test/mark"], "2");
        let missing = api.get("node-a").await.unwrap_err();
        assert_eq!(api_error_code(&missing), Some((404, "NotFound".into())));
        assert_eq!(server.get_requests(Kind::Node), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paginated_from_a_consistent_snapshot() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        for i in 0..1_203 {
            server.apply(&slice("default", &format!("s{i:04}"), "10.0.0.1", 80));
        }
        server.apply(&slice("other", "s0000", "10.0.0.2", 80));
        let client = client(&server).await;
        let store = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        );
        eventually("all 1 204 slices", || store.state().len() == 1_204).await;
        let pages: Vec<String> = server
            .request_log()
            .into_iter()
            .filter(|l| l.contains("/endpointslices?") && !l.contains("watch="))
            .collect();
        assert_eq!(pages.len(), 3, "{pages:?}");
        assert!(pages[1].contains("continue=") && pages[2].contains("continue="));

        // Later pages come from the first page's snapshot, whatever changed since.
        let api = Api::<EndpointSlice>::namespaced(client, "default");
        let first = api.list(&ListParams::default().limit(500)).await.unwrap();
        assert_eq!(first.items.len(), 500);
        assert_eq!(first.metadata.remaining_item_count, Some(703));
        let token = first.metadata.continue_.clone().unwrap();
        server.delete(Kind::EndpointSlice, "default", "s0600");
        server.apply(&slice("default", "s0601", "10.9.9.9", 80));
        let second = api
            .list(&ListParams::default().limit(500).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );
        assert_eq!(second.items[100].name_any(), "s0600");
        assert_eq!(
            second.items[101].endpoints[0].addresses,
            ["10.0.0.1".to_owned()]
        );
        // After compaction the token is too old: 410 Expired, as kube-apiserver answers.
        let third_token = second.metadata.continue_.clone().unwrap();
        server.compact();
        let expired = api
            .list(
                &ListParams::default()
                    .limit(500)
                    .continue_token(&third_token),
            )
            .await
            .unwrap_err();
        assert_eq!(api_error_code(&expired), Some((410, "Expired".into())));
        // The store followed the two changes.
        eventually("the store to follow", || {
            store.state().len() == 1_203
                && store
                    .state()
                    .iter()
                    .any(|s| s.endpoints[0].addresses == ["10.9.9.9".to_owned()])
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traced_changes_note_when_their_watch_event_is_sent() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        // Nothing watches yet: a traced change has not been sent.
        let early = server.apply_traced(&service("default", "early", &[], 80));
        assert_eq!(server.event_sent_at(early), None);
        let api: Api<Service> = Api::all(client(&server).await);
        let log = record(watcher(api, watcher::Config::default()));
        eventually("the watch", || server.open_watches(Kind::Service) == 1).await;
        // It came with the initial list, not as a watch event: still unsent.
        assert_eq!(server.event_sent_at(early), None);

        let before = Instant::now();
        let traced = server.apply_traced(&service("default", "a", &[], 80));
        eventually("the traced event", || {
            lines(&log).contains(&format!("apply default/a@{traced}"))
        })
        .await;
        let received = Instant::now();
        let sent = server.event_sent_at(traced).expect("the event was sent");
        assert!(
            before <= sent && sent <= received,
            "{before:?} {sent:?} {received:?}"
        );
        // Noted once: the first sending.
        assert_eq!(server.event_sent_at(traced), Some(sent));
        let untraced = server.apply(&service("default", "b", &[], 80));
        eventually("the untraced event", || {
            lines(&log).contains(&format!("apply default/b@{untraced}"))
        })
        .await;
        assert_eq!(server.event_sent_at(untraced), None);

        // A change made while the watch is cut is sent when the client re-watches from its
        // resourceVersion: that replay is the sending.
        server.set_outage(true);
        let missed = server.apply_traced(&service("default", "c", &[], 80));
        assert_eq!(server.event_sent_at(missed), None);
        server.set_outage(false);
        eventually("the replayed event", || {
            lines(&log).contains(&format!("apply default/c@{missed}"))
        })
        .await;
        assert!(
            server
                .event_sent_at(missed)
                .is_some_and(|sent| sent > received)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_rewatches_without_relisting_after_dropped_or_ended_watches() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        server.apply(&service("default", "a", &[], 80));
        let store = reflect(
            Api::<Service>::all(client(&server).await),
            watcher::Config::default(),
        );
        eventually("the watch", || server.open_watches(Kind::Service) == 1).await;
        for round in 0..3 {
            let watches_before = server.watch_requests(Kind::Service);
            // Cut abruptly, or (round 1) ended cleanly as on a server-side timeout. The watcher
            // may re-watch at once, so whether these changes land before or after its new watch
            // is up to the scheduler: either way the re-watch must replay or stream them.
            if round == 1 {
                server.end_watches();
            } else {
                server.drop_watches();
            }
            server.apply(&service("default", &format!("new{round}"), &[], 80));
            server.apply(&service("default", "a", &[], 81 + round));
            eventually("the re-watch", || {
                server.watch_requests(Kind::Service) > watches_before
                    && server.open_watches(Kind::Service) == 1
                    && store.state().len() == 2 + usize::try_from(round).unwrap()
                    && store_ports(&store)["default/a"] == 81 + round
            })
            .await;
        }
        assert_eq!(server.list_requests(Kind::Service), 1);
        assert!(server.watch_requests(Kind::Service) >= 4);
        assert_eq!(store_ports(&store), service_ports(server.list::<Service>()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_compaction_and_forgets_missed_deletions() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        for name in ["a", "b", "c"] {
            server.apply(&service("default", name, &[], 80));
        }
        let store = reflect(
            Api::<Service>::all(client(&server).await),
            watcher::Config::default(),
        );
        eventually("the watch", || server.open_watches(Kind::Service) == 1).await;
        let seen_rv = server.resource_version();

        // Disconnected: the watcher can neither watch nor list while these happen.
        server.set_outage(true);
        server.apply(&service("default", "a", &[], 8080));
        assert!(server.delete(Kind::Service, "default", "b"));
        server.apply(&service("default", "d", &[], 80));
        server.compact();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            keys(&store),
            BTreeSet::from(["default/a".into(), "default/b".into(), "default/c".into()])
        );
        server.set_outage(false);

        // The re-watch from the old resourceVersion gets 410, so the watcher relists.
        eventually("the store to converge", || {
            store_ports(&store) == service_ports(server.list::<Service>())
        })
        .await;
        assert_eq!(
            store_ports(&store),
            BTreeMap::from([
                ("default/a".to_owned(), 8080),
                ("default/c".to_owned(), 80),
                ("default/d".to_owned(), 80),
            ])
        );
        assert_eq!(server.list_requests(Kind::Service), 2);
        let old_watch = format!("resourceVersion={seen_rv}");
        assert!(
            server
                .request_log()
                .iter()
                .any(|l| l.contains("watch=true") && l.contains(&old_watch)),
            "{:?}",
            server.request_log()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_recover_from_both_outage_modes() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        server.apply(&service("default", "a", &[], 80));
        let client = client(&server).await;
        let store = reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        );
        eventually("the watch", || server.open_watches(Kind::Service) == 1).await;
        for (round, mode) in [OutageMode::Refuse, OutageMode::Unavailable]
            .into_iter()
            .enumerate()
        {
            let port = 90 + i32::try_from(round).unwrap();
            server.set_outage_mode(mode);
            server.set_outage(true);
            assert_eq!(server.open_watches(Kind::Service), 0);
            server.apply(&service("default", "a", &[], port));
            let before = if round == 0 { 80 } else { 90 };
            match mode {
                OutageMode::Refuse => {
                    let failed = Api::<Service>::all(client.clone())
                        .list(&ListParams::default())
                        .await
                        .unwrap_err();
                    assert!(api_error_code(&failed).is_none(), "{failed:?}");
                }
                OutageMode::Unavailable => {
                    // kube-client retries 503 by itself (default_retry) and so hides it from
                    // callers; without that layer the 503 Status comes through.
                    let mut config = client_config(&server).await;
                    config.default_retry = false;
                    let failed = Api::<Service>::all(Client::try_from(config).unwrap())
                        .list(&ListParams::default())
                        .await
                        .unwrap_err();
                    assert_eq!(
                        api_error_code(&failed),
                        Some((503, "ServiceUnavailable".into()))
                    );
                }
                OutageMode::Throttled { .. } => unreachable!("not among the modes tested here"),
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(store_ports(&store)["default/a"], before);
            server.set_outage(false);
            eventually("recovery", || {
                store_ports(&store)["default/a"] == port && server.open_watches(Kind::Service) == 1
            })
            .await;
        }
        // History was kept, so both recoveries resumed the watch without a relist.
        assert_eq!(server.list_requests(Kind::Service), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_slow_lists_are_retried() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        server.apply(&service("default", "a", &[], 80));
        server.fail_next_lists(2);
        server.set_list_delay(Duration::from_millis(300));
        let started = Instant::now();
        let store = reflect(
            Api::<Service>::all(client(&server).await),
            watcher::Config::default(),
        );
        eventually("the list to succeed", || store.state().len() == 1).await;
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(server.list_requests(Kind::Service), 3);
    })
    .await;
}

/// 2 000 updates across 50 slices in one burst reach the store within seconds.
async fn flood(config: ApiServerConfig) -> (ApiServer, Duration) {
    let server = ApiServer::start_with(config).unwrap();
    for i in 0..50 {
        server.apply(&slice("default", &format!("s{i:02}"), "10.0.0.1", 1));
    }
    let store = reflect(
        Api::<EndpointSlice>::all(client(&server).await),
        watcher::Config::default(),
    );
    eventually("the watch", || {
        server.open_watches(Kind::EndpointSlice) == 1
    })
    .await;
    let started = Instant::now();
    for update in 0..2_000 {
        let address = format!("10.1.{}.{}", update / 250, update % 250);
        server.apply(&slice(
            "default",
            &format!("s{:02}", update % 50),
            &address,
            update,
        ));
    }
    let wanted: BTreeMap<String, (i32, Vec<String>)> = server
        .list::<EndpointSlice>()
        .into_iter()
        .map(|s| {
            (
                s.name_any(),
                (
                    s.ports.unwrap()[0].port.unwrap(),
                    s.endpoints[0].addresses.clone(),
                ),
            )
        })
        .collect();
    eventually("the flood to converge", || {
        let seen: BTreeMap<String, (i32, Vec<String>)> = store
            .state()
            .iter()
            .map(|s| {
                (
                    s.name_any(),
                    (
                        s.ports.as_ref().unwrap()[0].port.unwrap(),
                        s.endpoints[0].addresses.clone(),
                    ),
                )
            })
            .collect();
        seen == wanted
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    (server, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_endpoint_updates_converges() {
    bounded(async {
        let (server, took) = flood(ApiServerConfig::default()).await;
        eprintln!(
            "flood converged in {took:?}; slow watchers closed: {}",
            server.slow_watchers_closed()
        );
        assert_eq!(server.list_requests(Kind::EndpointSlice), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_closes_slow_watchers_which_resume_and_converge() {
    bounded(async {
        let (server, took) = flood(ApiServerConfig {
            watch_buffer: 8,
            ..ApiServerConfig::default()
        })
        .await;
        eprintln!(
            "flood with tiny buffers converged in {took:?}; slow watchers closed: {}",
            server.slow_watchers_closed()
        );
        assert!(server.slow_watchers_closed() >= 1);
        // Closed cleanly, so the watcher resumed from its resourceVersion: no relist.
        assert_eq!(server.list_requests(Kind::EndpointSlice), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_and_bookmarks() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        server.set_bookmark_interval(Duration::from_millis(100));
        for name in ["a", "b"] {
            server.apply(&service("default", name, &[], 80));
        }
        let client = client(&server).await;
        let log = record(watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().streaming_lists(),
        ));
        eventually("the streaming list", || {
            lines(&log).contains(&"init-done".to_owned())
        })
        .await;
        assert_eq!(
            lines(&log),
            [
                "init",
                "init-apply default/a",
                "init-apply default/b",
                "init-done"
            ]
        );
        let c = server.apply(&service("default", "c", &[], 80));
        eventually("the live event", || {
            lines(&log).last() == Some(&format!("apply default/c@{c}"))
        })
        .await;
        assert_eq!(server.list_requests(Kind::Service), 0);
        assert!(
            server
                .request_log()
                .iter()
                .any(|l| l.contains("sendInitialEvents=true")
                    && l.contains("resourceVersionMatch=NotOlderThan"))
        );

        // A raw watch gets periodic bookmarks at the current resourceVersion.
        let api = Api::<Service>::all(client);
        let current = server.resource_version().to_string();
        let mut stream = api
            .watch(&WatchParams::default(), &current)
            .await
            .unwrap()
            .boxed();
        match stream.next().await.unwrap().unwrap() {
            WatchEvent::Bookmark(bookmark) => {
                assert_eq!(bookmark.metadata.resource_version, current);
                assert_eq!(bookmark.types.kind, "Service");
            }
            other => panic!("expected a bookmark, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format_matches_kube_apiserver() {
    bounded(async {
        let server = ApiServer::start().unwrap();
        server.apply(&service("default", "a", &[], 80));
        let old = server.resource_version().to_string();
        server.apply(&service("default", "a", &[], 81));
        let client = client(&server).await;
        let get = |path: &str| {
            http::Request::get(path.to_owned())
                .body(Vec::new())
                .unwrap()
        };

        let version: Value =
            serde_json::from_str(&client.request_text(get("/version")).await.unwrap()).unwrap();
        assert_eq!(version["major"], "1");
        assert_eq!(version["minor"], "33");
        let info = client.apiserver_version().await.unwrap();
        assert_eq!(info.git_version, "v1.33.0+switchyard-test");

        let list: Value =
            serde_json::from_str(&client.request_text(get("/api/v1/services")).await.unwrap())
                .unwrap();
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["apiVersion"], "v1");
        assert_eq!(
            list["metadata"]["resourceVersion"],
            server.resource_version().to_string()
        );
        let item = &list["items"][0];
        assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
        assert_eq!(
            item["metadata"]["resourceVersion"],
            server.resource_version().to_string()
        );

        for path in ["/api/v1/pods", "/nope", "/api/v1/namespaces/default/nodes"] {
            let error = client.request_text(get(path)).await.unwrap_err();
            assert_eq!(
                api_error_code(&error),
                Some((404, "NotFound".into())),
                "{path}"
            );
        }

        // A watch from a resourceVersion older than the history: 200, one ERROR 410, end.
        server.compact();
        let api = Api::<Service>::all(client.clone());
        let events: Vec<_> = api
            .watch(&WatchParams::default(), &old)
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(events.len(), 1, "{events:?}");
        match &events[0] {
            Ok(WatchEvent::Error(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!("expected ERROR 410, got {other:?}"),
        }

        // timeoutSeconds closes the stream cleanly.
        let started = Instant::now();
        let current = server.resource_version().to_string();
        let events: Vec<_> = api
            .watch(
                &WatchParams::default().timeout(1).disable_bookmarks(),
                &current,
            )
            .await
            .unwrap()
            .collect()
            .await;
        assert!(events.is_empty(), "{events:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );

        // A watch from "0" starts with the current state as ADDED events.
        let mut stream = api
            .watch(&WatchParams::default().disable_bookmarks(), "0")
            .await
            .unwrap()
            .boxed();
        match stream.next().await.unwrap().unwrap() {
            WatchEvent::Added(service) => assert_eq!(service_port(&service), 81),
            other => panic!("expected ADDED, got {other:?}"),
        }
    })
    .await;
}

/// One HTTP/1.0 request over a plain socket: (status line, body).
fn raw_request(addr: SocketAddr, method_and_target: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "{method_and_target} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

/// Synchronous tests (like the agent e2e tests) drive it without any runtime of their own.
#[test]
fn plain_tests_use_it_without_a_runtime() {
    let server = ApiServer::start().unwrap();
    server.apply(&node("n1", "1"));
    server.apply(&node("n2", "1"));
    let addr = server.addr();

    let (status, body) =
        raw_request(addr, "GET /api/v1/nodes?fieldSelector=metadata.name%3Dn2").unwrap();
    assert_eq!(status, "HTTP/1.0 200 OK");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["metadata"]["name"], "n2");
    let (status, body) = raw_request(addr, "GET /api/v1/nodes/n1").unwrap();
    assert_eq!(status, "HTTP/1.0 200 OK");
    let n1: Node = serde_json::from_str(&body).unwrap();
    assert_eq!(n1.metadata.resource_version.as_deref(), Some("2"));
    let (status, _) = raw_request(addr, "POST /api/v1/nodes").unwrap();
    assert_eq!(status, "HTTP/1.0 405 Method Not Allowed");
    assert!(!server.wait_for_watches(Kind::Node, 1, Duration::from_millis(50)));

    server.set_outage(true);
    match raw_request(addr, "GET /version") {
        Ok((status, _)) => assert!(status.is_empty(), "answered during an outage: {status}"),
        Err(e) => eprintln!("refused during the outage: {e}"),
    }
    server.set_outage_to(Some(OutageMode::Unavailable));
    let (status, body) = raw_request(addr, "GET /version").unwrap();
    assert_eq!(status, "HTTP/1.0 503 Service Unavailable");
    assert!(body.contains("\"reason\":\"ServiceUnavailable\""), "{body}");
    server.set_outage(false);
    let (status, _) = raw_request(addr, "GET /version").unwrap();
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(server.list_requests(Kind::Node), 1);
    assert_eq!(server.get_requests(Kind::Node), 1);
}

/// `start_in_netns` serves on the namespace's own loopback, where an agent run with
/// `ip netns exec` finds it, and not on the test's.
#[test]
fn serves_on_the_loopback_of_a_network_namespace() {
    switchyard_tests::require_root!();
    let topology = Topology::new(0).unwrap();
    let server = ApiServer::start_in_netns(topology.node_namespace()).unwrap();
    let addr = server.addr();
    let netns = Path::new(NETNS_DIR).join(topology.node_namespace());
    let inside = std::thread::spawn(move || {
        let handle = std::fs::File::open(netns).unwrap();
        nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        raw_request(addr, "GET /version").unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(inside.0, "HTTP/1.0 200 OK");
    assert!(inside.1.contains("switchyard-test"));
    let outside = raw_request(addr, "GET /version");
    assert!(
        outside
            .as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
            || !outside.as_ref().unwrap().1.contains("switchyard-test"),
        "{outside:?}"
    );
}
