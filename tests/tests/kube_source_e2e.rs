//! End-to-end tests of the `kube` source: the real agent follows the test API server (which
//! speaks the Kubernetes list/watch protocol on the loopback of the test's node namespace)
//! through kube-rs, and the datapath follows it. Faults: outage, dropped watches, compaction
//! (410 Gone) with changes missed while disconnected, a slow first list after a restart, and a
//! flood of endpoint updates.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::thread::sleep;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointHints, EndpointSlice, ForZone};
use switchyard_tests::client::report::{Attempt, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::apiserver::{ApiServer, Kind, OutageMode};
use switchyard_tests::k8s::objects;
use switchyard_tests::world::harness::{Harness, backend_name};
use switchyard_tests::{require_root, testkit};

const NAMESPACE: &str = "shop";
/// How soon the dataplane must follow the API server once it is reachable.
const CONVERGE: Duration = Duration::from_secs(2);
/// After an outage the watchers come back at their next attempt: client-go's backoff (800 ms
/// doubling to 30 s, jittered by up to the delay again) puts it a few seconds after a short
/// outage, up to a minute after a long one.
const AFTER_SHORT_OUTAGE: Duration = Duration::from_secs(15);
const AFTER_LONG_OUTAGE: Duration = Duration::from_secs(65);
const ENETUNREACH: i32 = 101;

fn vip(text: &str) -> SocketAddr {
    SocketAddr::new(text.parse().expect("valid VIP"), 80)
}

fn service(name: &str, cluster_ip: SocketAddr) -> Service {
    objects::cluster_ip_service(NAMESPACE, name, cluster_ip)
}

fn slice(service: &str, backends: &[IpAddr]) -> EndpointSlice {
    objects::endpoint_slice(NAMESPACE, service, backends)
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target)
        .count(count)
        .timeout(Duration::from_secs(1))
}

fn names(indexes: &[usize]) -> BTreeSet<String> {
    indexes.iter().map(|i| backend_name(*i)).collect()
}

/// An API server in the harness's node namespace and the agent following it.
struct Cluster {
    harness: Harness,
    api: ApiServer,
    _kubeconfig_dir: TempDir,
}

impl Cluster {
    fn start(backends: usize, objects: impl FnOnce(&ApiServer, &[IpAddr])) -> Self {
        let mut harness = Harness::new(testkit!(), backends);
        let api = ApiServer::start_in_netns(harness.topology().node_namespace())
            .expect("test API server");
        objects(&api, &harness.backend_ipv4s());
        let kubeconfig_dir = TempDir::new().expect("temp dir");
        let kubeconfig = api.write_kubeconfig(kubeconfig_dir.path());
        harness.start_agent_with_kubeconfig(&kubeconfig, &["--node-name", "node-a"]);
        Self {
            harness,
            api,
            _kubeconfig_dir: kubeconfig_dir,
        }
    }

    fn ips(&self) -> Vec<IpAddr> {
        self.harness.backend_ipv4s()
    }

    /// Polls (bounded by `within`) until `check` accepts a burst of connections to `target`.
    fn converges(
        &self,
        target: SocketAddr,
        within: Duration,
        what: &str,
        check: impl Fn(&[Attempt]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        let mut last;
        loop {
            last = self.harness.client(&tcp(target, 12));
            if check(&last) || Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(50));
        }
        assert!(
            check(&last),
            "{what}: not within {within:?}; last burst {last:?}"
        );
    }

    fn serves_exactly(&self, target: SocketAddr, backends: &[usize], within: Duration) {
        let expected = names(backends);
        self.converges(
            target,
            within,
            &format!("{target} served by {expected:?}"),
            |attempts| attempts.iter().all(|a| a.ok) && reached(attempts) == expected,
        );
    }

    fn untranslated(&self, target: SocketAddr, within: Duration) {
        self.converges(
            target,
            within,
            &format!("{target} no longer a service"),
            |attempts| attempts.iter().all(|a| a.errno == Some(ENETUNREACH)),
        );
    }
}

#[test]
fn the_dataplane_follows_services_and_endpoint_slices_from_the_api_server() {
    require_root!();
    let web = vip("10.96.2.10");
    let cluster = Cluster::start(3, |api, ips| {
        api.apply(&service("web", web));
        api.apply(&slice("web", ips));
    });
    cluster.harness.client(&tcp(web, 1));
    cluster.serves_exactly(web, &[0, 1, 2], Duration::from_secs(10));

    cluster.api.apply(&slice("web", &cluster.ips()[..1]));
    cluster.serves_exactly(web, &[0], CONVERGE);

    let late = vip("10.96.2.11");
    cluster.api.apply(&service("late", late));
    cluster.api.apply(&slice("late", &cluster.ips()[2..]));
    cluster.serves_exactly(late, &[2], CONVERGE);

    assert!(cluster.api.delete(Kind::Service, NAMESPACE, "web"));
    cluster.untranslated(web, CONVERGE);
}

/// `slice` with each endpoint hinted to the zone at the same index (as the EndpointSlice
/// controller writes hints for `trafficDistribution: PreferSameZone`).
fn zone_hinted_slice(service: &str, backends: &[IpAddr], zones: &[&str]) -> EndpointSlice {
    let mut slice = slice(service, backends);
    for (endpoint, zone) in slice.endpoints.iter_mut().zip(zones) {
        endpoint.zone = Some((*zone).to_owned());
        endpoint.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone {
                name: (*zone).to_owned(),
            }]),
            ..EndpointHints::default()
        });
    }
    slice
}

/// Zone hints narrow the backends to this node's zone, read from its Node object, and a change
/// of the Node's zone label alone (no Service or slice event) moves the choice to the other
/// zone's endpoints.
#[test]
fn zone_hints_follow_the_zone_label_of_this_nodes_node_object() {
    require_root!();
    let near = vip("10.96.2.30");
    let cluster = Cluster::start(3, |api, ips| {
        api.apply(&objects::node("node-a", Some("zone-a"), &[]));
        api.apply(&service("near", near));
        api.apply(&zone_hinted_slice(
            "near",
            ips,
            &["zone-a", "zone-b", "zone-b"],
        ));
    });
    cluster.serves_exactly(near, &[0], Duration::from_secs(10));

    cluster
        .api
        .apply(&objects::node("node-a", Some("zone-b"), &[]));
    cluster.serves_exactly(near, &[1, 2], CONVERGE);

    // A zone no endpoint is hinted for: every endpoint (kube-proxy's fallback).
    cluster
        .api
        .apply(&objects::node("node-a", Some("zone-c"), &[]));
    cluster.serves_exactly(near, &[0, 1, 2], CONVERGE);
}

#[test]
fn api_faults_leave_the_dataplane_as_it_was_and_it_converges_after() {
    require_root!();
    let (a, b, c) = (vip("10.96.3.10"), vip("10.96.3.11"), vip("10.96.3.12"));
    let cluster = Cluster::start(3, |api, ips| {
        api.apply(&service("a", a));
        api.apply(&slice("a", ips));
        api.apply(&service("b", b));
        api.apply(&slice("b", &ips[1..2]));
    });
    cluster.serves_exactly(a, &[0, 1, 2], Duration::from_secs(10));
    cluster.serves_exactly(b, &[1], CONVERGE);

    // Outage: every request fails and open watches are cut. The dataplane stays as it was.
    cluster.api.set_outage(true);
    let outage_ends = Instant::now() + Duration::from_secs(3);
    while Instant::now() < outage_ends {
        let burst = cluster.harness.client(&tcp(a, 12));
        assert!(
            burst.iter().all(|x| x.ok),
            "traffic failed during the outage: {burst:?}"
        );
        assert_eq!(reached(&cluster.harness.client(&tcp(b, 4))), names(&[1]));
        sleep(Duration::from_millis(200));
    }

    // Changes the agent cannot see, including a deletion, then the history is compacted so
    // the agent's resourceVersion is gone (410): it must relist to notice them.
    cluster.api.apply(&slice("a", &cluster.ips()[2..]));
    assert!(cluster.api.delete(Kind::Service, NAMESPACE, "b"));
    cluster.api.apply(&service("c", c));
    cluster.api.apply(&slice("c", &cluster.ips()[..1]));
    cluster.api.compact();
    cluster.api.set_outage(false);
    // Each watcher comes back at its own next attempt.
    cluster.serves_exactly(a, &[2], AFTER_SHORT_OUTAGE);
    cluster.untranslated(b, AFTER_SHORT_OUTAGE);
    cluster.serves_exactly(c, &[0], AFTER_SHORT_OUTAGE);

    // A watch reset mid-stream: the agent re-watches and keeps following.
    cluster.api.drop_watches();
    cluster.api.apply(&slice("a", &cluster.ips()[..2]));
    cluster.serves_exactly(a, &[0, 1], CONVERGE);
}

#[test]
fn a_restart_against_a_slow_api_server_never_empties_the_dataplane() {
    require_root!();
    let web = vip("10.96.4.10");
    let mut cluster = Cluster::start(3, |api, ips| {
        api.apply(&service("web", web));
        api.apply(&slice("web", ips));
    });
    cluster.serves_exactly(web, &[0, 1, 2], Duration::from_secs(10));

    cluster.harness.agent().kill().expect("SIGKILL the agent");
    cluster.api.set_list_delay(Duration::from_secs(3));
    cluster
        .harness
        .agent()
        .restart()
        .expect("restart the agent");
    // While the first lists are slow, the restarted agent must not prune anything.
    let loop_ends = Instant::now() + Duration::from_secs(4);
    while Instant::now() < loop_ends {
        let burst = cluster.harness.client(&tcp(web, 6));
        assert!(
            burst.iter().all(|x| x.ok),
            "traffic failed during the slow relist: {burst:?}"
        );
        sleep(Duration::from_millis(100));
    }
    cluster.api.set_list_delay(Duration::ZERO);
    cluster.api.apply(&slice("web", &cluster.ips()[1..2]));
    cluster.serves_exactly(web, &[1], Duration::from_secs(5));
}

#[test]
fn a_flood_of_endpoint_updates_converges_to_the_last_one() {
    require_root!();
    let web = vip("10.96.5.10");
    let cluster = Cluster::start(3, |api, ips| {
        api.apply(&service("web", web));
        api.apply(&slice("web", ips));
    });
    cluster.serves_exactly(web, &[0, 1, 2], Duration::from_secs(10));
    let ips = cluster.ips();
    for round in 0..1_000 {
        let set = match round % 3 {
            0 => &ips[..1],
            1 => &ips[..2],
            _ => &ips[1..],
        };
        cluster.api.apply(&slice("web", set));
    }
    cluster.api.apply(&slice("web", &ips[2..]));
    cluster.serves_exactly(web, &[2], CONVERGE);
}

/// ServiceCIDRs from the API server feed the service-CIDR guard as they change; an API server
/// without `networking.k8s.io/v1` (Kubernetes < 1.33) answers 404, which must not keep the
/// agent from syncing: the guard then covers active ClusterIPs only.
#[test]
fn service_cidrs_follow_the_api_server_and_an_older_server_without_them_still_syncs() {
    require_root!();
    for served in [true, false] {
        let mut harness = Harness::new(testkit!(), 1);
        let api = ApiServer::start_with(switchyard_tests::k8s::apiserver::ApiServerConfig {
            netns: Some(harness.topology().node_namespace().to_owned()),
            service_cidr_api: served,
            ..switchyard_tests::k8s::apiserver::ApiServerConfig::default()
        })
        .expect("test API server");
        let web = vip("10.96.70.10");
        api.apply(&service("web", web));
        api.apply(&slice("web", &harness.backend_ipv4s()));
        if served {
            api.apply(&objects::service_cidr("kubernetes", &["10.96.70.0/24"]));
        }
        let dir = TempDir::new().expect("temp dir");
        let kubeconfig = api.write_kubeconfig(dir.path());
        harness.start_agent_with_kubeconfig(&kubeconfig, &[]);
        harness.wait_until_translated(ClientProto::Tcp, web);
        // An active ClusterIP's other port is refused either way.
        harness.wait_until_errno(
            ClientProto::Tcp,
            vip_port("10.96.70.10", 81),
            libc::ECONNREFUSED,
        );
        let unallocated = vip("10.96.70.99");
        if served {
            harness.wait_until_errno(ClientProto::Tcp, unallocated, libc::EPERM);
            // The ServiceCIDR goes: its unallocated addresses are no longer the guard's.
            api.delete(Kind::ServiceCidr, "", "kubernetes");
            harness.wait_until_errno(ClientProto::Tcp, unallocated, ENETUNREACH);
        } else {
            let attempt = harness
                .client(&tcp(unallocated, 1))
                .pop()
                .expect("one attempt");
            assert_eq!(attempt.errno, Some(ENETUNREACH), "not guarded: {attempt:?}");
        }
    }
}

fn vip_port(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("valid VIP"), port)
}

#[test]
fn a_minute_long_api_outage_costs_a_few_requests_per_watcher_and_no_traffic() {
    require_root!();
    let a = vip("10.96.6.10");
    let cluster = Cluster::start(2, |api, ips| {
        api.apply(&service("a", a));
        api.apply(&slice("a", ips));
    });
    cluster.serves_exactly(a, &[0, 1], Duration::from_secs(10));
    // Three watchers: Services, EndpointSlices, this Node.
    let watchers = 3.0;

    // 60 s of 503s: every request the watchers make fails; traffic must not notice.
    cluster.api.set_outage_to(Some(OutageMode::Unavailable));
    let before = cluster.api.refused_requests();
    let started = Instant::now();
    let mut connections = 0;
    while started.elapsed() < Duration::from_mins(1) {
        let burst = cluster.harness.client(&tcp(a, 10));
        assert!(
            burst.iter().all(|x| x.ok),
            "traffic failed during the outage: {burst:?}"
        );
        connections += burst.len();
        sleep(Duration::from_millis(500));
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let refused = cluster.api.refused_requests() - before;
    let per_watcher_per_minute =
        f64::from(u32::try_from(refused).unwrap_or(u32::MAX)) / watchers / minutes;
    eprintln!(
        "MEASURED: {refused} requests during a {:.0} s API outage: {per_watcher_per_minute:.1} per watcher per minute; {connections} connections, all served",
        minutes * 60.0
    );
    assert!(
        refused >= 3,
        "the watchers kept trying ({refused} requests)"
    );
    assert!(
        per_watcher_per_minute <= 10.0,
        "{per_watcher_per_minute:.1} requests per watcher per minute: the backoff does not grow"
    );

    // A change made during the outage is picked up at the next attempt after it ends.
    cluster.api.apply(&slice("a", &cluster.ips()[..1]));
    cluster.api.set_outage_to(None);
    cluster.serves_exactly(a, &[0], AFTER_LONG_OUTAGE);

    // A throttling server (429 with Retry-After: 20) is left alone for 20 s.
    cluster.api.drop_watches();
    cluster.api.set_outage_to(Some(OutageMode::Throttled {
        retry_after_secs: 20,
    }));
    let before = cluster.api.refused_requests();
    sleep(Duration::from_secs(15));
    let throttled = cluster.api.refused_requests() - before;
    eprintln!("MEASURED: {throttled} requests in 15 s of 429 with Retry-After: 20");
    assert!(
        f64::from(u32::try_from(throttled).unwrap_or(u32::MAX)) <= watchers * 2.0,
        "{throttled} requests in 15 s despite Retry-After: 20"
    );
    cluster.api.apply(&slice("a", &cluster.ips()[1..]));
    cluster.api.set_outage_to(None);
    cluster.serves_exactly(a, &[1], AFTER_LONG_OUTAGE);
}
