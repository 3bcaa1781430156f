//! The TC path under hostile traffic, end to end in network namespaces: spoofed SYNs and RSTs
//! against a live NodePort flow, a SYN on the reversed tuple of a masqueraded flow, a bounded
//! SYN flood while an idle established flow waits, refusals that never answer a RST and stay
//! rate-limited, no RST ping-pong between two nodes' agents, and SNAT ports that return in
//! the datapath with the agent dead.
//!
//! Every crafted segment goes from the test's client namespace to the test's node namespace
//! (a raw socket in `sy-testkit spoof`); floods are bounded in count and time.
//!
//! Run as root after `cargo xtask build`, with `SWITCHYARD_BIN` set:
//! `cargo test --release -p switchyard-tests --test hostile_traffic_e2e`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{Ct4Entry, Ct4Key, ct_seq, map_names, reject_limit};
use switchyard_tests::client::report::Attempt;
use switchyard_tests::client::testkit::{ClientProto, ClientRequest, Spoof};
use switchyard_tests::datapath::packet::tcp_flags::{ACK, RST, SYN};
use switchyard_tests::k8s::external_service::{ExternalService, ServiceType, manifests};
use switchyard_tests::world::north_south::{
    NODE_EXT4, NODE_TO_NODE2_4, NODE2_4, Node2Agent, NorthSouth, Offloads,
};
use switchyard_tests::{require_root, testkit};

const SERVICE_PORT: u16 = 80;
const NODE_PORT: u16 = 30080;

fn web() -> ExternalService {
    ExternalService::new(
        "web",
        ServiceType::NodePort,
        &[IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))],
        SERVICE_PORT,
    )
    .node_port(NODE_PORT)
    .local_endpoints()
    .remote_endpoints()
}

fn nodeport() -> SocketAddrV4 {
    SocketAddrV4::new(NODE_EXT4, NODE_PORT)
}

/// Sources no namespace routes back to: answers to them die at the node (no route).
fn unrouted_source(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), port)
}

fn start(ns: &mut NorthSouth, service: &ExternalService, extra_args: &[&str]) {
    ns.write_manifests(&manifests(&[service]));
    ns.start_agent(extra_args);
}

fn wait_for_service(ns: &mut NorthSouth) {
    ns.wait_outside(
        &ClientRequest::new(ClientProto::Tcp, SocketAddr::V4(nodeport())),
        "an answer through the NodePort",
        |a| a.ok,
    );
}

fn counter(ns: &NorthSouth, name: &str) -> u64 {
    ns.datapath_counters().get(name).copied().unwrap_or(0)
}

#[track_caller]
fn assert_all_ok(attempts: &[Attempt], what: &str) {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} attempts failed: {failed:?}",
        failed.len(),
        attempts.len()
    );
}

/// The TC flow of the hold: (client, translated source, backend).
fn held_flow(ns: &NorthSouth) -> (SocketAddrV4, SocketAddrV4, SocketAddrV4) {
    let listed = ns.inspect_json("conntrack");
    let flow = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| {
            f["kind"] == "tc"
                && f["protocol"] == "tcp"
                && f["frontend"] == nodeport().to_string()
                && f["state"] == "established"
        })
        .unwrap_or_else(|| panic!("no established TCP flow to {} in {listed:#}", nodeport()))
        .clone();
    let field = |name: &str| -> SocketAddrV4 {
        flow[name]
            .as_str()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("{name} of {flow}"))
    };
    (
        field("client"),
        field("translated_source"),
        field("backend"),
    )
}

/// The client's highest sequence end, read from the flow's reply entry in the pinned maps.
fn client_sequence_end(ns: &NorthSouth, masq: SocketAddrV4, backend: SocketAddrV4) -> u32 {
    let key = Ct4Key {
        saddr: u32::from_ne_bytes(backend.ip().octets()),
        daddr: u32::from_ne_bytes(masq.ip().octets()),
        sport_be: backend.port().to_be(),
        dport_be: masq.port().to_be(),
        protocol: proxy_common::protocol::TCP,
        pad: [0; 3],
    };
    let maps = ns.bpffs().agent_dir().join("v1/maps");
    for name in [map_names::CT4, map_names::CT4_UNREPLIED] {
        let data = MapData::from_pin(maps.join(name)).expect("opening a pinned conntrack map");
        let map: HashMap<MapData, Ct4Key, Ct4Entry> =
            HashMap::try_from(Map::LruHashMap(data)).expect("a conntrack map");
        if let Ok(entry) = map.get(&key, 0) {
            return ct_seq::split(entry.expires_ns).0;
        }
    }
    panic!("no reply entry for {backend} -> {masq}");
}

/// A live NodePort connection keeps working through a spoofed SYN on its tuple, RSTs outside
/// its sequence space, and a SYN on the reversed tuple of its masqueraded side.
#[test]
fn spoofed_syn_rst_and_reversed_syn_never_break_a_live_node_port_flow() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    start(&mut ns, &web(), &[]);
    wait_for_service(&mut ns);
    let hold = ns.outside_hold(
        SocketAddr::V4(nodeport()),
        Duration::from_secs(6),
        Duration::from_millis(100),
        false,
    );
    hold.wait_for_attempts(3, Duration::from_secs(3))
        .expect("the held connection answers");
    let (client, masq, backend) = held_flow(&ns);
    let end = client_sequence_end(&ns, masq, backend);
    let before = ns.datapath_counters();

    let client_ns = ns.client_namespace().to_owned();
    let kit = ns.testkit();
    // A SYN with the live flow's tuple.
    kit.spoof(
        &client_ns,
        &Spoof::one(client, nodeport(), SYN, end ^ 0x5a5a_5a5a, 0),
    )
    .expect("spoofed SYN");
    // RSTs far outside the client's sequence space (the real end is known here, so they are
    // outside the window for sure).
    for offset in [1u32 << 31, (1 << 31) + (1 << 26), 3 << 30] {
        kit.spoof(
            &client_ns,
            &Spoof::one(client, nodeport(), RST | ACK, end.wrapping_add(offset), 0),
        )
        .expect("spoofed RST");
    }
    // A SYN on the reversed tuple of the masqueraded side (the node's own address as source).
    kit.spoof(&client_ns, &Spoof::one(masq, backend, SYN, 1, 0))
        .expect("spoofed reversed SYN");

    let attempts = hold.finish().expect("hold");
    assert!(attempts.len() >= 30, "only {} requests", attempts.len());
    assert_all_ok(&attempts, "the held NodePort connection");
    let seen: BTreeSet<_> = attempts.iter().map(|a| a.seen_as).collect();
    assert_eq!(seen.len(), 1, "the translated source changed: {seen:?}");
    let after = ns.datapath_counters();
    let moved = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    assert_eq!(moved("tc_syn_ignored"), 1, "{after:?}");
    assert_eq!(moved("tc_rst_out_of_window"), 3, "{after:?}");
    assert_eq!(moved("tc_ct_collision"), 1, "{after:?}");
    assert_eq!(moved("tc_syn_restarted"), 0, "{after:?}");
}

/// A bounded SYN flood from spoofed sources (five times the unconfirmed-flow map, ten times
/// the main map) while an established connection idles: the connection survives.
#[test]
fn an_idle_established_flow_survives_a_syn_flood() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    start(
        &mut ns,
        &web(),
        &[
            "--bpf-ct-global-max",
            "2048",
            "--bpf-ct-unreplied-max",
            "4096",
        ],
    );
    wait_for_service(&mut ns);
    // One request at once, one after the flood: idle in between.
    let hold = ns.outside_hold(
        SocketAddr::V4(nodeport()),
        Duration::from_secs(7),
        Duration::from_millis(3_500),
        false,
    );
    hold.wait_for_attempts(1, Duration::from_secs(3))
        .expect("the held connection answers");
    let flood = Spoof {
        count: 20_000,
        vary_source: true,
        max: Duration::from_secs(3),
        ..Spoof::one(unrouted_source(10_000), nodeport(), SYN, 1, 0)
    };
    let started = Instant::now();
    let sent = ns
        .testkit()
        .spoof(ns.client_namespace(), &flood)
        .expect("flood");
    eprintln!("flood: {sent} SYNs in {:?}", started.elapsed());
    assert!(sent >= 10_000, "only {sent} SYNs sent");
    let attempts = hold.finish().expect("hold");
    assert!(attempts.len() >= 2, "{attempts:?}");
    assert_all_ok(&attempts, "the idle connection after the flood");
    let new_flows = counter(&ns, "tc_new_flow");
    assert!(
        new_flows >= 10_000,
        "the flood did not make flows: {new_flows}"
    );
}

/// A NodePort without endpoints refuses, but never answers a RST, and its refusals stay
/// within the per-CPU token buckets under a flood.
#[test]
fn refusals_never_answer_a_rst_and_stay_rate_limited() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let service = web().without_endpoints();
    start(&mut ns, &service, &[]);
    // The node's own stack refuses too (nothing listens there): wait until the datapath did.
    let pins = ns
        .bpffs()
        .agent_dir()
        .join("v1/maps")
        .join(map_names::SERVICES4);
    let mut refused_by_the_datapath = false;
    for _ in 0..50 {
        let attempts = ns.outside(&ClientRequest::new(
            ClientProto::Tcp,
            SocketAddr::V4(nodeport()),
        ));
        assert!(
            attempts.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)),
            "{attempts:?}"
        );
        if pins.exists() && counter(&ns, "tc_rejected") > 0 {
            refused_by_the_datapath = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(refused_by_the_datapath, "the datapath never refused");
    let client_ns = ns.client_namespace().to_owned();
    let before = ns.datapath_counters();
    // A RST from "another node's" NodePort: answering it would start a ping-pong.
    let peer = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), NODE_PORT);
    ns.testkit()
        .spoof(&client_ns, &Spoof::one(peer, nodeport(), RST | ACK, 1, 1))
        .expect("spoofed RST");
    let after = ns.datapath_counters();
    let moved = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    assert_eq!(moved("tc_reject_suppressed"), 1, "{after:?}");
    assert_eq!(moved("tc_rejected"), 0, "a RST was answered: {after:?}");

    let flood = Spoof {
        count: 5_000,
        vary_source: true,
        max: Duration::from_secs(3),
        ..Spoof::one(unrouted_source(20_000), nodeport(), SYN, 1, 0)
    };
    let started = Instant::now();
    let sent = ns.testkit().spoof(&client_ns, &flood).expect("flood");
    let elapsed = started.elapsed();
    let after_flood = ns.datapath_counters();
    let moved = |name: &str| after_flood.get(name).unwrap_or(&0) - after.get(name).unwrap_or(&0);
    let cpus = u64::try_from(std::thread::available_parallelism().map_or(1, usize::from)).unwrap();
    let allowed = cpus
        * (reject_limit::BURST
            + reject_limit::PER_SEC * u64::try_from(elapsed.as_millis()).unwrap() / 1000
            + 1);
    eprintln!(
        "refusal flood: {sent} SYNs in {elapsed:?}: {} refused, {} rate-limited (allowed {allowed})",
        moved("tc_rejected"),
        moved("tc_reject_rate_limited")
    );
    assert!(
        moved("tc_rejected") <= allowed,
        "{} refusals sent in {elapsed:?} (at most {allowed})",
        moved("tc_rejected")
    );
    assert_eq!(
        moved("tc_rejected") + moved("tc_reject_rate_limited"),
        u64::from(sent),
        "every SYN is refused or rate-limited: {after_flood:?}"
    );
}

/// Two nodes, each with its own agent, and a NodePort without endpoints on both: a SYN from
/// node B's NodePort port to node A's NodePort is refused by A once, and B's agent drops that
/// RST instead of refusing it in turn, so no RST ping-pong starts between the nodes.
#[test]
fn two_nodes_agents_never_ping_pong_refusals() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    let service = web().without_endpoints();
    start(&mut ns, &service, &[]);
    let node_b = ns.start_node2_agent(&manifests(&[&service]), &[]);
    let node_a_ns = ns.node_namespace().to_owned();
    // Both datapaths refuse (not the nodes' own stacks): A from outside, B from node A.
    let pins_a = ns.bpffs().agent_dir();
    let pins_b = node_b.pins_dir().to_owned();
    for (what, netns, target, refusals, pins) in [
        (
            "node A",
            ns.client_namespace().to_owned(),
            nodeport(),
            None,
            pins_a,
        ),
        (
            "node B",
            node_a_ns,
            SocketAddrV4::new(NODE2_4, NODE_PORT),
            Some(&node_b),
            pins_b,
        ),
    ] {
        let services = pins.join("v1/maps").join(map_names::SERVICES4);
        let refused_by_the_datapath = (0..50).any(|_| {
            let attempts = ns.unhooked_in(
                &netns,
                &ClientRequest::new(ClientProto::Tcp, SocketAddr::V4(target)),
            );
            assert!(
                attempts.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)),
                "{what}: {attempts:?}"
            );
            // The node's own stack refuses too until the agent has programmed its maps.
            let refused = services.exists() && {
                let counters =
                    refusals.map_or_else(|| ns.datapath_counters(), Node2Agent::datapath_counters);
                counters.get("tc_rejected").copied().unwrap_or(0) > 0
            };
            if !refused {
                std::thread::sleep(Duration::from_millis(200));
            }
            refused
        });
        assert!(
            refused_by_the_datapath,
            "{what}: the datapath never refused"
        );
    }

    let (a_before, b_before) = (ns.datapath_counters(), node_b.datapath_counters());
    // A SYN from B's NodePort port (as a B process bound there, or a spoofer, would send).
    ns.testkit()
        .spoof(
            ns.node2_namespace(),
            &Spoof::one(
                SocketAddrV4::new(NODE2_4, NODE_PORT),
                SocketAddrV4::new(NODE_TO_NODE2_4, NODE_PORT),
                SYN,
                7,
                0,
            ),
        )
        .expect("a SYN from node B");
    // Long enough for many rounds of a ping-pong to show.
    std::thread::sleep(Duration::from_millis(500));
    let (a_after, b_after) = (ns.datapath_counters(), node_b.datapath_counters());
    let moved =
        |after: &std::collections::BTreeMap<String, u64>,
         before: &std::collections::BTreeMap<String, u64>,
         name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    assert_eq!(
        moved(&a_after, &a_before, "tc_rejected"),
        1,
        "node A refuses the SYN once: {a_after:?}"
    );
    assert_eq!(
        moved(&b_after, &b_before, "tc_reject_suppressed"),
        1,
        "node B drops A's RST: {b_after:?}"
    );
    assert_eq!(
        moved(&b_after, &b_before, "tc_rejected"),
        0,
        "node B answered A's RST: {b_after:?}"
    );
    assert_eq!(
        moved(&a_after, &a_before, "tc_reject_suppressed"),
        0,
        "nothing came back to node A: {a_after:?}"
    );
}

/// With the agent dead, a burst of short connections through a 50-port SNAT range (six times
/// what the range holds per backend) all succeed: ports of ended flows come back in the
/// datapath. The agent reserved the range in the node's `ip_local_reserved_ports`.
#[test]
fn snat_ports_return_in_the_datapath_with_the_agent_dead() {
    require_root!();
    let mut ns = NorthSouth::new(testkit!(), Offloads::On);
    start(&mut ns, &web(), &["--snat-port-range", "62000-62049"]);
    wait_for_service(&mut ns);
    let reserved = std::process::Command::new("ip")
        .args(["netns", "exec", ns.node_namespace(), "cat"])
        .arg("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .output()
        .expect("reading the reserved ports");
    let reserved = String::from_utf8_lossy(&reserved.stdout);
    assert!(
        reserved.contains("62000-62049"),
        "the range is not reserved in the node namespace: {reserved:?}"
    );
    ns.agent().kill().expect("SIGKILL the agent");
    let before = ns.datapath_counters();
    let attempts = ns.outside(
        &ClientRequest::new(ClientProto::Tcp, SocketAddr::V4(nodeport()))
            .count(300)
            .timeout(Duration::from_secs(2)),
    );
    assert_eq!(attempts.len(), 300);
    assert_all_ok(
        &attempts,
        "short connections through 50 SNAT ports, agent dead",
    );
    let after = ns.datapath_counters();
    let moved = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    eprintln!(
        "SNAT reuse with the agent dead: reused {}, exhausted {}",
        moved("tc_snat_port_reused"),
        moved("tc_snat_exhausted")
    );
    assert!(moved("tc_snat_port_reused") >= 200, "{after:?}");
    assert_eq!(moved("tc_snat_exhausted"), 0, "{after:?}");
}
