//! End-to-end tests of the map capacities: pinned maps left with another capacity or
//! allocation are migrated while traffic flows (entries kept, no moment without translation,
//! the old maps released), pinned maps of another layout or too full for a smaller capacity
//! are refused by name and left alone, and each map's fill shows against its capacity with a
//! warning before it is full. Every map lives on a private bpffs of the test.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use proxy_common::{BPF_F_NO_PREALLOC, RevNat4, Service4Key, ServiceName, ServiceValue, map_names};
use switchyard_tests::client::http::get_in_netns;
use switchyard_tests::client::report::{assert_all_ok, backend_counts};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::datapath::pinned_maps::{self, Shape};
use switchyard_tests::env::bpffs::pinned_objects;
use switchyard_tests::env::process::wait_until;
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::apiserver::ApiServer;
use switchyard_tests::k8s::manifests::Manifests;
use switchyard_tests::k8s::objects;
use switchyard_tests::world::harness::{BACKEND_PORT, Harness, backend_name};
use switchyard_tests::{require_root, testkit};

const NAMESPACE: &str = "sizing";
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const METRICS: &str = "127.0.0.1:10249";

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target)
        .count(count)
        .timeout(Duration::from_secs(1))
}

/// The Service `web`: TCP port `http` and UDP port `dns`, both to [`BACKEND_PORT`].
fn web_service(vip: IpAddr) -> Service {
    let mut service = objects::cluster_ip_service(NAMESPACE, "web", SocketAddr::new(vip, 80));
    if let Some(ports) = service.spec.as_mut().and_then(|spec| spec.ports.as_mut()) {
        ports.push(ServicePort {
            name: Some("dns".into()),
            port: 53,
            protocol: Some("UDP".into()),
            ..ServicePort::default()
        });
    }
    service
}

fn web_slice(backends: &[IpAddr]) -> EndpointSlice {
    let mut slice = objects::endpoint_slice(NAMESPACE, "web", backends);
    if let Some(ports) = slice.ports.as_mut() {
        ports.push(EndpointPort {
            name: Some("dns".into()),
            port: Some(i32::from(BACKEND_PORT)),
            protocol: Some("UDP".into()),
            ..EndpointPort::default()
        });
    }
    slice
}

/// The Service `web` (TCP port 80 on `vip`) with `backends`, as a manifests file.
fn web_manifests(vip: IpAddr, backends: &[IpAddr]) -> Manifests {
    let endpoints = backends
        .iter()
        .map(|ip| format!("{{addresses: ['{ip}']}}"))
        .collect::<Vec<_>>()
        .join(", ");
    Manifests::new().raw(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NAMESPACE}}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}}}]\nendpoints: [{endpoints}]\n"
    ))
}

/// A harness whose agent follows a test API server (so a test can hold back the agent's first
/// sync after a restart with a slow list, and see what the pinned maps alone do).
struct Cluster {
    harness: Harness,
    api: ApiServer,
    kubeconfig: PathBuf,
    _kubeconfig_dir: TempDir,
}

impl Cluster {
    fn new(backends: usize) -> Self {
        let harness = Harness::new(testkit!(), backends);
        let api = ApiServer::start_in_netns(harness.topology().node_namespace())
            .expect("test API server");
        let kubeconfig_dir = TempDir::new().expect("temp dir");
        let kubeconfig = api.write_kubeconfig(kubeconfig_dir.path());
        Self {
            harness,
            api,
            kubeconfig,
            _kubeconfig_dir: kubeconfig_dir,
        }
    }

    fn start_agent(&mut self, extra_args: &[&str]) {
        let kubeconfig = self.kubeconfig.clone();
        self.harness
            .start_agent_with_kubeconfig(&kubeconfig, extra_args);
    }

    fn pin(&mut self, map: &str) -> PathBuf {
        self.harness.agent().bpffs_dir().join("v1/maps").join(map)
    }

    fn shape(&mut self, map: &str) -> Shape {
        let pin = self.pin(map);
        pinned_maps::shape(&pin).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits (bounded) until the agent's log has `text`.
    fn wait_for_log(&mut self, text: &str, within: Duration) {
        let agent = self.harness.agent();
        let found = wait_until(within, Duration::from_millis(50), || {
            agent.log().contains(text).then_some(())
        });
        assert!(
            found.is_some(),
            "no {text:?} in the agent's log within {within:?}"
        );
    }

    /// Connections to `target` reach exactly the backends `indexes` (bounded wait).
    fn serves(&self, target: SocketAddr, indexes: &[usize], within: Duration) {
        let expected: std::collections::BTreeSet<String> =
            indexes.iter().map(|i| backend_name(*i)).collect();
        let found = wait_until(within, Duration::from_millis(50), || {
            let burst = self.harness.client(&tcp(target, 12));
            let reached: std::collections::BTreeSet<String> =
                backend_counts(&burst).into_keys().collect();
            (burst.iter().all(|a| a.ok) && reached == expected).then_some(())
        });
        assert!(
            found.is_some(),
            "{target} not served by {expected:?} within {within:?}"
        );
    }
}

/// New connections through the pinned maps alone succeed, and the agent had no chance to
/// write (its first list is held back for `held_back` after `restarted`).
fn assert_served_by_the_pins_alone(
    cluster: &Cluster,
    target: SocketAddr,
    restarted: Instant,
    held_back: Duration,
) {
    let deadline = restarted + held_back.saturating_sub(Duration::from_millis(500));
    let burst = cluster.harness.client(&tcp(target, 10));
    assert!(
        Instant::now() < deadline,
        "too slow: the agent may have synced already, the test proves nothing"
    );
    assert_all_ok(&burst, "connections before the agent's first sync");
}

/// A capacity too small for what the agent wrote is refused, and nothing changes.
fn refuses_a_capacity_too_small_for_the_services(cluster: &mut Cluster, before: Shape) {
    cluster
        .harness
        .agent()
        .restart_with(&["--bpf-lb-map-max", "2"])
        .expect("restart with a tiny capacity");
    let status = cluster
        .harness
        .agent()
        .wait_for_exit(Duration::from_secs(10))
        .expect("the agent gives up");
    assert!(!status.success(), "{status}");
    let log = cluster.harness.agent().log();
    assert!(
        log.contains("map SVC4_V1")
            && log.contains("it holds 6 entries, more than the 2 configured (--bpf-lb-map-max)"),
        "{log}"
    );
    assert_eq!(cluster.shape(map_names::SERVICES4), before, "left alone");
}

/// The pins are new maps of the configured capacities, and the old ones are released.
fn check_migrated(cluster: &mut Cluster, before: Shape, sockets_before: Shape) {
    let after = cluster.shape(map_names::SERVICES4);
    assert_eq!(
        (after.map_type, after.max_entries, after.flags),
        (HASH, 4096, BPF_F_NO_PREALLOC)
    );
    assert_ne!(after.id, before.id, "a new map");
    for (map, capacity) in [
        (map_names::BACKENDS4, 4096),
        (map_names::REV_NAT6, 4096),
        (map_names::SERVICE_NAMES, 4096),
        (map_names::SOCK_REV_NAT4, 8192),
        (map_names::CT4, 8192),
        (map_names::CT6, 8192),
        (map_names::AFFINITY, 1024),
    ] {
        assert_eq!(cluster.shape(map).max_entries, capacity, "{map}");
    }
    let log = cluster.harness.agent().log();
    assert!(
        log.contains(
            "migrating map SVC4_V1 (6 entries copied): it holds up to 262144 entries, 4096 are configured"
        ),
        "{log}"
    );
    // The old maps go with the old programs.
    for (map, old) in [
        (map_names::SERVICES4, before.id),
        (map_names::SOCK_REV_NAT4, sockets_before.id),
    ] {
        let gone = wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
            (!pinned_maps::map_alive(old)).then_some(())
        });
        assert!(gone.is_some(), "the old {map} (id {old}) is still alive");
    }
    assert!(
        pinned_objects(&cluster.harness.agent().bpffs_dir().join("v1/migrating"))
            .expect("listing")
            .is_empty(),
        "staging pins left behind"
    );
}

#[test]
fn a_capacity_change_migrates_the_pinned_maps_with_their_entries_while_traffic_flows() {
    require_root!();
    let mut cluster = Cluster::new(2);
    let vip: IpAddr = "10.96.11.10".parse().unwrap();
    let (web, dns) = (SocketAddr::new(vip, 80), SocketAddr::new(vip, 53));
    cluster.api.apply(&web_service(vip));
    cluster
        .api
        .apply(&web_slice(&cluster.harness.backend_ipv4s()));
    cluster.start_agent(&[]);
    cluster.serves(web, &[0, 1], Duration::from_secs(10));
    let before = cluster.shape(map_names::SERVICES4);
    assert_eq!(
        (before.max_entries, before.flags),
        (262_144, BPF_F_NO_PREALLOC),
        "the defaults"
    );
    let sockets_before = cluster.shape(map_names::SOCK_REV_NAT4);

    // One connected UDP socket held across everything (getpeername on every exchange needs
    // its socket reverse-NAT entry, which the datapath wrote), and a stream of new
    // connections.
    let held = cluster
        .harness
        .hold_udp(dns, Duration::from_secs(14), Duration::from_millis(100));
    held.wait_for_attempts(3, Duration::from_secs(3))
        .expect("the held UDP socket answers");
    let stream = cluster.harness.spawn_client(
        &tcp(web, 500)
            .interval(Duration::from_millis(20))
            .timeout(Duration::from_secs(2)),
    );
    stream
        .wait_for_attempts(20, Duration::from_secs(5))
        .expect("the connection loop got going");

    refuses_a_capacity_too_small_for_the_services(&mut cluster, before);

    // Other capacities: migrated. The first list is held back, so for a while the maps are
    // exactly what the migration copied.
    let held_back = Duration::from_secs(6);
    cluster.api.set_list_delay(held_back);
    let restarted = Instant::now();
    cluster
        .harness
        .agent()
        .restart_with(&[
            "--bpf-lb-map-max",
            "4096",
            "--bpf-sock-rev-map-max",
            "8192",
            "--bpf-ct-global-max",
            "8192",
            "--bpf-affinity-map-max",
            "1024",
        ])
        .expect("restart with other capacities");
    cluster.wait_for_log("map migration complete", Duration::from_secs(5));
    assert_served_by_the_pins_alone(&cluster, web, restarted, held_back);
    check_migrated(&mut cluster, before, sockets_before);

    // The agent is in charge once it lists: it programs a new Service (and leaves web's
    // endpoints alone, so the held socket's backend stays).
    cluster.api.set_list_delay(Duration::ZERO);
    let late = SocketAddr::new("10.96.11.11".parse().unwrap(), 80);
    cluster
        .api
        .apply(&objects::cluster_ip_service(NAMESPACE, "late", late));
    cluster.api.apply(&objects::endpoint_slice(
        NAMESPACE,
        "late",
        &cluster.harness.backend_ipv4s()[1..],
    ));
    cluster.serves(late, &[1], Duration::from_secs(10));

    let attempts = stream.finish().expect("the connection loop finished");
    assert_eq!(attempts.len(), 500);
    assert_all_ok(
        &attempts,
        "new connections across the refusal and the migration",
    );
    let held = held.finish().expect("the held socket finished");
    assert!(held.len() >= 100, "only {} exchanges", held.len());
    assert_all_ok(&held, "the held UDP socket");
    for attempt in &held {
        assert_eq!(
            attempt.peer,
            Some(dns),
            "getpeername must show the Service across the migration: {attempt:?}"
        );
    }
    let backends = backend_counts(&held);
    assert_eq!(
        backends.len(),
        1,
        "the held socket changed backend: {backends:?}"
    );
}

#[test]
fn maps_an_older_agent_preallocated_are_migrated_with_their_entries() {
    require_root!();
    let mut cluster = Cluster::new(2);
    let vip: IpAddr = "10.96.12.10".parse().unwrap();
    let web = SocketAddr::new(vip, 80);
    cluster.api.apply(&web_service(vip));
    cluster
        .api
        .apply(&web_slice(&cluster.harness.backend_ipv4s()));
    cluster.start_agent(&[]);
    cluster.serves(web, &[0, 1], Duration::from_secs(10));
    cluster.harness.agent().kill().expect("SIGKILL the agent");

    // What an agent before this layout left: the same maps, preallocated.
    let services = cluster.pin(map_names::SERVICES4);
    let backends = cluster.pin(map_names::BACKENDS4);
    let rev_nat = cluster.pin(map_names::REV_NAT4);
    let names = cluster.pin(map_names::SERVICE_NAMES);
    let copied = [
        pinned_maps::replace_hash::<Service4Key, ServiceValue>(&services, 262_144, 0),
        pinned_maps::replace_hash::<u32, proxy_common::Backend4>(&backends, 262_144, 0),
        pinned_maps::replace_hash::<u32, RevNat4>(&rev_nat, 262_144, 0),
        pinned_maps::replace_hash::<u32, ServiceName>(&names, 262_144, 0),
    ]
    .map(|copied| copied.expect("replacing a pin with a preallocated copy"));
    // Two frontends (TCP and UDP) of three entries; a backend per address and protocol.
    assert_eq!(copied, [6, 4, 2, 2]);
    assert_eq!(cluster.shape(map_names::SERVICES4).flags, 0);

    let held_back = Duration::from_secs(6);
    cluster.api.set_list_delay(held_back);
    let restarted = Instant::now();
    cluster.harness.agent().restart().expect("restart");
    cluster.wait_for_log("map migration complete", Duration::from_secs(5));
    assert_served_by_the_pins_alone(&cluster, web, restarted, held_back);
    for map in [
        map_names::SERVICES4,
        map_names::BACKENDS4,
        map_names::REV_NAT4,
        map_names::SERVICE_NAMES,
    ] {
        let shape = cluster.shape(map);
        assert_eq!(
            (shape.max_entries, shape.flags),
            (262_144, BPF_F_NO_PREALLOC),
            "{map}"
        );
    }
    let log = cluster.harness.agent().log();
    assert!(
        log.contains("migrating map SVC4_V1 (6 entries copied): it is preallocated (flags 0), this agent creates it not preallocated (BPF_F_NO_PREALLOC)"),
        "{log}"
    );
    // A map that already matched (another group) was adopted, not migrated.
    assert!(!log.contains("migrating map CT4_V1"), "{log}");
    cluster.api.set_list_delay(Duration::ZERO);
    cluster
        .api
        .apply(&web_slice(&cluster.harness.backend_ipv4s()[..1]));
    cluster.serves(web, &[0], Duration::from_secs(10));
}

#[test]
fn pinned_maps_of_another_layout_are_refused_by_name_and_left_alone() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 1);
    let vip: IpAddr = "10.96.13.10".parse().unwrap();
    let maps_dir = harness.bpffs().agent_dir().join("v1/maps");
    std::fs::create_dir_all(&maps_dir).expect("creating the pin directory");
    // Services keyed by a 4-byte id, and backends in an array: maps of another layout.
    let services = maps_dir.join(map_names::SERVICES4);
    let backends = maps_dir.join(map_names::BACKENDS4);
    pinned_maps::pin_hash::<u32, ServiceValue>(&services, 1024, BPF_F_NO_PREALLOC)
        .expect("pinning a foreign services map");
    pinned_maps::pin_array::<proxy_common::Backend4>(&backends, 64)
        .expect("pinning a foreign backends map");
    // A map with only another capacity alone would be migrated: it stays as it is too.
    let rev_nat = maps_dir.join(map_names::REV_NAT4);
    pinned_maps::pin_hash::<u32, RevNat4>(&rev_nat, 64, BPF_F_NO_PREALLOC)
        .expect("pinning a reverse-NAT map");
    let foreign = [&services, &backends, &rev_nat]
        .map(|path| pinned_maps::shape(path).expect("reading a pinned map"));
    assert_eq!(foreign[1].map_type, ARRAY);

    harness.write_manifests(&web_manifests(vip, &harness.backend_ipv4s()));
    harness.start_agent(&[]);
    let status = harness
        .agent()
        .wait_for_exit(Duration::from_secs(10))
        .expect("the agent refuses and exits");
    assert!(!status.success(), "{status}");
    let log = harness.agent().log();
    for expected in [
        "refusing to adopt pinned maps",
        "map SVC4_V1",
        "its keys are 4 bytes, this agent's are 12 bytes (another map layout",
        "map BACKEND4_V1",
        "its type is array, this agent's is hash (another map layout",
        "nothing was loaded or attached",
    ] {
        assert!(log.contains(expected), "no {expected:?} in\n{log}");
    }
    assert!(
        !log.contains("map REV_NAT4_V1"),
        "only the incompatible maps are named: {log}"
    );
    // Nothing attached, nothing pinned, the foreign maps untouched.
    let pins = pinned_objects(&harness.bpffs().agent_dir()).expect("listing pins");
    let mut expected = vec![backends.clone(), rev_nat.clone(), services.clone()];
    expected.sort();
    assert_eq!(pins, expected);
    for (path, shape) in [&services, &backends, &rev_nat].into_iter().zip(foreign) {
        assert_eq!(pinned_maps::shape(path).expect("still pinned"), shape);
    }
    let attempt = harness
        .client(&tcp(SocketAddr::new(vip, 80), 1))
        .pop()
        .expect("an attempt");
    assert_eq!(
        attempt.errno,
        Some(libc::ENETUNREACH),
        "no hook translates the VIP: {attempt:?}"
    );
}

/// `inspect stats` reads the fill from the pins, with allocation and memory.
fn inspect_shows_fill_allocation_and_memory(harness: &mut Harness) {
    let output = std::process::Command::new(switchyard_tests::agent::switchyard_bin())
        .args(["inspect", "stats", "-o", "json", "--bpffs"])
        .arg(harness.agent().bpffs_dir())
        .output()
        .expect("running inspect");
    assert!(output.status.success(), "{output:?}");
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let map = |name: &str| {
        stats["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["map"] == name).cloned())
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    let services = map("SVC4_V1");
    assert_eq!(
        (
            &services["entries"],
            &services["capacity"],
            &services["fill_percent"],
            &services["preallocated"]
        ),
        (&4.into(), &5.into(), &80.0.into(), &false.into()),
        "{services}"
    );
    let conntrack = map("CT4_V1");
    assert_eq!(conntrack["preallocated"], true, "{conntrack}");
    assert!(
        conntrack["memory_bytes"]
            .as_u64()
            .is_some_and(|bytes| bytes >= 131_072 * 96),
        "a preallocated LRU is charged for every entry: {conntrack}"
    );
}

/// The value of an integer metric series, if present.
fn series(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn each_maps_fill_shows_against_its_capacity_and_warns_before_it_is_full() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 3);
    let vip: IpAddr = "10.96.14.10".parse().unwrap();
    let web = SocketAddr::new(vip, 80);
    harness.write_manifests(&web_manifests(vip, &harness.backend_ipv4s()));
    // Five service entries: the master and three slots take 80 %.
    harness.start_agent(&["--bpf-lb-map-max", "5", "--bpf-sock-rev-map-max", "64"]);
    harness.wait_until_translated(ClientProto::Tcp, web);
    let warned = wait_until(Duration::from_secs(6), Duration::from_millis(100), || {
        harness
            .agent()
            .log()
            .contains("map SVC4_V1 is over 80% full (4 of 5 entries)")
            .then_some(())
    });
    assert!(
        warned.is_some(),
        "no fill warning:\n{}",
        harness.agent().log()
    );
    assert!(
        !harness.agent().log().contains("map BACKEND4_V1 is over"),
        "3 of 5 backends is below 80 %"
    );

    // A held connection is one socket translation, counted by the upkeep (every 10 s), never
    // at scrape time; capacities are the maps' own.
    let hold = harness.hold(web, Duration::from_secs(16), Duration::from_millis(200));
    hold.wait_for_attempts(1, Duration::from_secs(3))
        .expect("the held connection answers");
    let node = harness.topology().node_namespace().to_owned();
    let scrape = || {
        get_in_netns(&node, METRICS.parse().unwrap(), "/metrics")
            .unwrap_or_else(|e| panic!("scraping: {e:#}"))
            .1
    };
    let counted = wait_until(Duration::from_secs(13), Duration::from_millis(250), || {
        let text = scrape();
        (series(&text, "switchyard_socket_translations{family=\"ipv4\"}") == Some(1))
            .then_some(text)
    })
    .unwrap_or_else(|| panic!("the held socket was never counted:\n{}", scrape()));
    for (name, value) in [
        ("switchyard_bpf_map_entries{map=\"SOCK_NAT4_V1\"}", 1),
        ("switchyard_bpf_map_capacity{map=\"SOCK_NAT4_V1\"}", 64),
        ("switchyard_bpf_map_entries{map=\"SVC4_V1\"}", 4),
        ("switchyard_bpf_map_capacity{map=\"SVC4_V1\"}", 5),
        ("switchyard_bpf_map_capacity{map=\"CT4_V1\"}", 131_072),
    ] {
        assert_eq!(series(&counted, name), Some(value), "{name} in\n{counted}");
    }

    inspect_shows_fill_allocation_and_memory(&mut harness);

    // Back below the level: the warning is re-armed.
    harness.write_manifests(&web_manifests(vip, &harness.backend_ipv4s()[..1]));
    let cleared = wait_until(Duration::from_secs(6), Duration::from_millis(100), || {
        harness
            .agent()
            .log()
            .contains("map SVC4_V1 is back below 80% full (2 of 5 entries)")
            .then_some(())
    });
    assert!(
        cleared.is_some(),
        "no all-clear:\n{}",
        harness.agent().log()
    );
    hold.finish().expect("the held connection finished");
}

#[test]
fn leftovers_of_an_interrupted_migration_are_removed_at_start() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 1);
    let vip: IpAddr = "10.96.15.10".parse().unwrap();
    // An agent killed while it filled new maps leaves their staging pins behind.
    let staging = harness.bpffs().agent_dir().join("v1/migrating");
    std::fs::create_dir_all(&staging).expect("creating the staging directory");
    let leftover = staging.join(map_names::SERVICES4);
    pinned_maps::pin_hash::<Service4Key, ServiceValue>(&leftover, 16, BPF_F_NO_PREALLOC)
        .expect("pinning a leftover");
    let leftover_id = pinned_maps::shape(&leftover).expect("a pin").id;

    harness.write_manifests(&web_manifests(vip, &harness.backend_ipv4s()));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, SocketAddr::new(vip, 80));
    assert!(
        pinned_objects(&staging).expect("listing").is_empty(),
        "the staging pin is still there"
    );
    let adopted = pinned_maps::shape(&harness.bpffs().agent_dir().join("v1/maps/SVC4_V1"))
        .expect("the services map is pinned");
    assert_ne!(adopted.id, leftover_id, "a leftover is never adopted");
    let gone = wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        (!pinned_maps::map_alive(leftover_id)).then_some(())
    });
    assert!(gone.is_some(), "the leftover map was not released");
}
