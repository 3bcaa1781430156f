//! Table tests of the TC program `sy_tc_ingress` through BPF_PROG_TEST_RUN: crafted frames in,
//! the return code, the rewritten bytes (with every checksum verified), the conntrack entries
//! and the reason counters out. Each test loads the object with fresh maps in a network
//! namespace of its own (see `switchyard_tests::datapath::tc_fixture` for its addresses); nothing is
//! transmitted. IPv4 and IPv6 run the same tables.
//!
//! Run as root after `cargo xtask build`:
//! `cargo test --release -p switchyard-tests --test tc_prog_test_run`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_common::{
    DatapathConfig, WireAddr, config_flags, ct_flags, ct_lifetime, guard_flags, protocol, reason,
    scope, service_flags,
};
use switchyard_tests::datapath::packet::{
    self, L4, Mac, Packet, icmp, tcp_flags, verify_checksums,
};
use switchyard_tests::datapath::tc_fixture::{
    Backend, Counters, CtValue, Frontend, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    TcFixture, Tuple, cluster_config, monotonic_ns, net,
};
use switchyard_tests::require_root;

const SEC: u64 = 1_000_000_000;
/// What the program uses when the configuration entry is all zero.
const DEFAULT_SNAT_PORTS: (u16, u16) = proxy_common::DEFAULT_SNAT_PORTS;
/// The SNAT range the tests configure.
const SNAT_PORTS: (u16, u16) = (45_000, 45_999);
/// Slack between bpf_ktime_get_ns and our clock_gettime readings.
const CLOCK_SLACK_NS: u64 = 1_000_000;

const TCP: u8 = protocol::TCP;
const UDP: u8 = protocol::UDP;
const SYN: u8 = tcp_flags::SYN;
const ACK: u8 = tcp_flags::ACK;
const FIN: u8 = tcp_flags::FIN;
const RST: u8 = tcp_flags::RST;
const PSH: u8 = tcp_flags::PSH;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Self; 2] = [Self::V4, Self::V6];

    fn ip(self, v4: Ipv4Addr, v6: Ipv6Addr) -> IpAddr {
        match self {
            Self::V4 => v4.into(),
            Self::V6 => v6.into(),
        }
    }

    fn is_v6(self) -> bool {
        self == Self::V6
    }

    /// The node's client-side address: the NodePort frontend.
    fn node(self) -> IpAddr {
        self.ip(net::NODE_V4, net::NODE_V6)
    }

    /// The on-link external client.
    fn client(self) -> IpAddr {
        self.ip(net::CLIENT_V4, net::CLIENT_V6)
    }

    /// An external client behind the on-link client.
    fn remote(self, host: u8) -> IpAddr {
        self.ip(net::remote_v4(host), net::remote_v6(host))
    }

    /// The node's backend-side address: the masquerade source.
    fn masq(self) -> IpAddr {
        self.ip(net::NODE_BACKEND_V4, net::NODE_BACKEND_V6)
    }

    /// A host on the backend link (a backend or a pod).
    fn host(self, host: u8) -> IpAddr {
        self.ip(net::backend_v4(host), net::backend_v6(host))
    }

    fn pod(self) -> IpAddr {
        self.host(net::POD_HOST)
    }

    /// A router on the backend link that is neither a backend nor the node.
    fn router(self) -> IpAddr {
        self.host(254)
    }

    fn cluster_ip(self) -> IpAddr {
        self.ip(
            Ipv4Addr::new(10, 96, 0, 10),
            Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10),
        )
    }

    fn lb_ip(self) -> IpAddr {
        self.ip(
            Ipv4Addr::new(192, 0, 2, 10),
            Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10),
        )
    }

    fn external_ip(self) -> IpAddr {
        self.ip(
            Ipv4Addr::new(192, 0, 2, 20),
            Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x20),
        )
    }

    /// An address no route in the fixture namespace reaches.
    fn unrouted(self) -> IpAddr {
        self.ip(
            Ipv4Addr::new(172, 31, 0, 5),
            Ipv6Addr::new(0xfd00, 0x999, 0, 0, 0, 0, 0, 5),
        )
    }

    /// The prefix of the remote networks (source-range tests).
    fn remote_prefix(self) -> (IpAddr, u8) {
        match self {
            Self::V4 => (net::REMOTE_NET_V4.0.into(), net::REMOTE_NET_V4.1),
            Self::V6 => (net::REMOTE_NET_V6.0.into(), net::REMOTE_NET_V6.1),
        }
    }

    /// The prefix of the on-link client's network.
    fn client_prefix(self) -> (IpAddr, u8) {
        match self {
            Self::V4 => (Ipv4Addr::new(203, 0, 113, 0).into(), 24),
            Self::V6 => (Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0).into(), 64),
        }
    }
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The host number of an address on the backend link.
fn backend_link_host(ip: IpAddr) -> Option<u8> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            (o[..3] == [10, 240, 1]).then_some(o[3])
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            (s[..7] == net::backend_v6(0).segments()[..7])
                .then(|| u8::try_from(s[7]).ok())
                .flatten()
        }
    }
}

/// The MACs of a frame arriving at the node from `src` (source, destination).
fn macs_from(src: IpAddr) -> (Mac, Mac) {
    match backend_link_host(src) {
        Some(host) => (net::backend_mac(host), net::NODE_BACKEND_MAC),
        None => (net::CLIENT_MAC, net::NODE_CLIENT_MAC),
    }
}

/// The MACs the node forwards a frame to `dst` with, or `None` where the FIB knows no
/// neighbour (the program then uses bpf_redirect_neigh and leaves the MACs alone).
fn macs_to(dst: IpAddr) -> Option<(Mac, Mac)> {
    match backend_link_host(dst) {
        Some(host) if net::NEIGHBOUR_HOSTS.contains(&host) => {
            Some((net::NODE_BACKEND_MAC, net::backend_mac(host)))
        }
        Some(_) => None,
        None => Some((net::NODE_CLIENT_MAC, net::CLIENT_MAC)),
    }
}

fn fixture() -> TcFixture {
    TcFixture::new().unwrap_or_else(|e| panic!("TC fixture: {e:#}"))
}

/// Backends on the backend link with ids `first_id`, `first_id + 1`, ...
fn backends(family: Family, hosts: &[u8], port: u16, first_id: u32) -> Vec<Backend> {
    (first_id..)
        .zip(hosts)
        .map(|(id, host)| Backend {
            id,
            addr: sa(family.host(*host), port),
        })
        .collect()
}

fn frontend(
    addr: SocketAddr,
    protocol: u8,
    scope: u8,
    rev_nat_id: u32,
    flags: u16,
    backends: &[Backend],
) -> Frontend {
    Frontend {
        addr,
        protocol,
        scope,
        rev_nat_id,
        flags,
        backends: backends.to_vec(),
    }
}

/// Sends `packet` as received from its source (MACs and ingress link follow from the source
/// address); returns the packet as sent, its frame and the outcome.
fn inject(fx: &TcFixture, packet: Packet) -> (Packet, Vec<u8>, Outcome) {
    let (src_mac, dst_mac) = macs_from(packet.src);
    let packet = packet.with_macs(src_mac, dst_mac);
    let frame = packet.to_frame();
    let ingress = if backend_link_host(packet.src).is_some() {
        fx.backend_ifindex()
    } else {
        fx.client_ifindex()
    };
    let outcome = fx
        .run_on(ingress, &frame)
        .unwrap_or_else(|e| panic!("test run of {packet:?}: {e:#}"));
    (packet, frame, outcome)
}

#[track_caller]
fn expect_redirect(out: &Outcome, what: &str) -> Packet {
    assert_eq!(
        out.code,
        TC_ACT_REDIRECT,
        "{what}: return code (output: {:?})",
        Packet::parse(&out.data)
    );
    if let Err(e) = verify_checksums(&out.data) {
        panic!("{what}: {e:#}; output {:?}", Packet::parse(&out.data));
    }
    out.packet()
}

#[track_caller]
fn expect_untouched(out: &Outcome, frame: &[u8], what: &str) {
    assert_eq!(
        out.code,
        TC_ACT_OK,
        "{what}: return code (output: {:?})",
        Packet::parse(&out.data)
    );
    assert!(
        out.data == frame,
        "{what}: the packet was modified\n sent {:?}\n  got {:?}",
        Packet::parse(frame),
        Packet::parse(&out.data)
    );
}

#[track_caller]
fn expect_shot(out: &Outcome, what: &str) {
    assert_eq!(
        out.code,
        TC_ACT_SHOT,
        "{what}: return code (output: {:?})",
        Packet::parse(&out.data)
    );
}

/// Asserts that `got` carries `sent`'s transport content (all but addresses and ports).
#[track_caller]
fn assert_same_content(sent: &Packet, got: &Packet, what: &str) {
    match (&sent.l4, &got.l4) {
        (L4::Tcp(a), L4::Tcp(b)) => assert_eq!(
            (a.seq, a.ack, a.flags, a.window, &a.payload),
            (b.seq, b.ack, b.flags, b.window, &b.payload),
            "{what}: TCP content (seq, ack, flags, window, payload) changed"
        ),
        (L4::Udp(a), L4::Udp(b)) => {
            assert_eq!(a.payload, b.payload, "{what}: UDP payload changed");
        }
        (a, b) => panic!("{what}: transport changed from {a:?} to {b:?}"),
    }
}

/// Asserts `expires_ns` = (a bpf_ktime_get_ns between `t0` and `t1`) + `lifetime_secs`.
#[track_caller]
fn assert_expiry(expires_ns: u64, lifetime_secs: u64, (t0, t1): (u64, u64), what: &str) {
    let low = t0 + lifetime_secs * SEC - CLOCK_SLACK_NS;
    let high = t1 + lifetime_secs * SEC + CLOCK_SLACK_NS;
    assert!(
        (low..=high).contains(&expires_ns),
        "{what}: expires_ns {expires_ns} is not now + {lifetime_secs} s (now was {t0}..{t1}; \
         it is now + {} ns)",
        i128::from(expires_ns) - i128::from(t1)
    );
}

/// The flow's expected conntrack pair.
struct CtExpect {
    /// Forward entry flags (SNAT and state).
    flags: u16,
    rev_nat_id: u32,
    backend_id: u32,
    lifetime_secs: u64,
    /// Monotonic time just before and after the packet that set the lifetime.
    window: (u64, u64),
}

/// Checks the forward entry under `original` and the reply entry under the reversed
/// `rewritten` tuple.
#[track_caller]
fn assert_ct_pair(
    fx: &TcFixture,
    original: Tuple,
    rewritten: Tuple,
    expect: &CtExpect,
    what: &str,
) {
    let v6 = original.src.is_ipv6();
    let dump = || format!("{:#?}", fx.ct_entries(v6));
    let forward = fx
        .ct(&original)
        .expect("CT lookup")
        .unwrap_or_else(|| panic!("{what}: no forward entry {original}; entries {}", dump()));
    let want = CtValue {
        expires_ns: forward.expires_ns,
        src: rewritten.src,
        dst: rewritten.dst,
        rev_nat_id: expect.rev_nat_id,
        backend_id: expect.backend_id,
        flags: expect.flags,
        pad: 0,
    };
    assert_eq!(forward, want, "{what}: forward entry {original}");
    assert_expiry(
        forward.expires_ns,
        expect.lifetime_secs,
        expect.window,
        &format!("{what}: forward entry"),
    );
    let reply_key = rewritten.reversed();
    let reply = fx
        .ct(&reply_key)
        .expect("CT lookup")
        .unwrap_or_else(|| panic!("{what}: no reply entry {reply_key}; entries {}", dump()));
    // A TCP flow's reply entry keeps its sequence ends instead of a lifetime (checked by the
    // sequence tests); a UDP flow's has neither.
    let seq_flags = ct_flags::SEQ_FORWARD | ct_flags::SEQ_REPLY;
    let tcp = original.protocol == TCP;
    assert_eq!(
        (
            reply.src,
            reply.dst,
            reply.flags & !seq_flags,
            if tcp { 0 } else { reply.expires_ns }
        ),
        (
            original.dst,
            original.src,
            ct_flags::REPLY | (expect.flags & ct_flags::SNAT),
            0
        ),
        "{what}: reply entry {reply_key} (src, dst, flags, expires_ns) in {reply:?}"
    );
    if tcp {
        assert_ne!(
            reply.flags & ct_flags::SEQ_FORWARD,
            0,
            "{what}: reply entry {reply_key} without the client's sequence end: {reply:?}"
        );
    } else {
        assert_eq!(reply.flags & seq_flags, 0, "{what}: UDP sequence flags");
    }
}

/// What the first packet of a flow must turn into.
struct NewFlow<'a> {
    /// The chosen backend must be one of these.
    backends: &'a [Backend],
    /// `Some(range)`: masqueraded to the node's backend-side address with a port in range.
    snat: Option<(u16, u16)>,
    rev_nat_id: u32,
    /// Counter moves (besides the failure counters, which must stay still).
    counters: &'a [(u32, u64)],
}

const NEW_FLOW: &[(u32, u64)] = &[(reason::TC_NEW_FLOW, 1)];

/// Sends the first packet of a flow; checks its translation, the conntrack pair and the
/// counters. Returns the chosen backend and the translated packet.
#[track_caller]
fn new_flow(fx: &TcFixture, packet: Packet, expect: &NewFlow, what: &str) -> (Backend, Packet) {
    let family = if packet.is_ipv6() {
        Family::V6
    } else {
        Family::V4
    };
    let before = fx.counters().expect("counters");
    let t0 = monotonic_ns();
    let (sent, _, out) = inject(fx, packet);
    let t1 = monotonic_ns();
    let got = expect_redirect(&out, what);
    let backend = *expect
        .backends
        .iter()
        .find(|b| b.addr == got.dst_socket())
        .unwrap_or_else(|| {
            panic!(
                "{what}: destination {} is none of the backends {:?} (output {got:?})",
                got.dst_socket(),
                expect.backends
            )
        });
    match expect.snat {
        Some((low, high)) => {
            assert_eq!(got.src, family.masq(), "{what}: masquerade address");
            let port = got.src_socket().port();
            assert!(
                (low..=high).contains(&port),
                "{what}: SNAT port {port} outside {low}..={high}"
            );
        }
        None => assert_eq!(
            got.src_socket(),
            sent.src_socket(),
            "{what}: the source must be kept (no SNAT)"
        ),
    }
    assert_same_content(&sent, &got, what);
    assert_eq!(
        got.ttl,
        sent.ttl - 1,
        "{what}: TTL/hop limit not decremented"
    );
    let macs = macs_to(backend.addr.ip()).unwrap_or((sent.src_mac, sent.dst_mac));
    assert_eq!((got.src_mac, got.dst_mac), macs, "{what}: MACs (src, dst)");
    let lifetime_secs = if sent.protocol() == TCP {
        ct_lifetime::TCP_SYN_SECS
    } else {
        ct_lifetime::UDP_UNREPLIED_SECS
    };
    assert_ct_pair(
        fx,
        Tuple::of(&sent),
        Tuple::of(&got),
        &CtExpect {
            flags: if expect.snat.is_some() {
                ct_flags::SNAT
            } else {
                0
            },
            rev_nat_id: expect.rev_nat_id,
            backend_id: backend.id,
            lifetime_secs,
            window: (t0, t1),
        },
        what,
    );
    fx.counters()
        .expect("counters")
        .since(&before)
        .assert_moved(expect.counters, what);
    (backend, got)
}

/// Sends a packet of a tracked flow from the client side; checks it goes to `to` from
/// `from` (the rewritten tuple) with its content, TTL and MACs.
#[track_caller]
fn forward(fx: &TcFixture, packet: Packet, from: SocketAddr, to: SocketAddr, what: &str) {
    let before = fx.counters().expect("counters");
    let (sent, _, out) = inject(fx, packet);
    let got = expect_redirect(&out, what);
    assert_eq!(
        (got.src_socket(), got.dst_socket()),
        (from, to),
        "{what}: rewritten (source, destination)"
    );
    assert_same_content(&sent, &got, what);
    assert_eq!(
        got.ttl,
        sent.ttl - 1,
        "{what}: TTL/hop limit not decremented"
    );
    let macs = macs_to(to.ip()).expect("a neighbour");
    assert_eq!((got.src_mac, got.dst_mac), macs, "{what}: MACs (src, dst)");
    fx.counters()
        .expect("counters")
        .since(&before)
        .assert_moved(&[(reason::TC_CT_FORWARD, 1)], what);
}

/// Sends a backend's reply; checks it comes out from `frontend` to `client` with its content
/// and the MACs towards the client.
#[track_caller]
fn reply(
    fx: &TcFixture,
    packet: Packet,
    frontend: SocketAddr,
    client: SocketAddr,
    what: &str,
) -> Packet {
    let before = fx.counters().expect("counters");
    let (sent, _, out) = inject(fx, packet);
    let got = expect_redirect(&out, what);
    assert_eq!(
        (got.src_socket(), got.dst_socket()),
        (frontend, client),
        "{what}: reverse-translated (source, destination)"
    );
    assert_same_content(&sent, &got, what);
    // Replies are forwarded too.
    assert_eq!(
        got.ttl,
        sent.ttl - 1,
        "{what}: TTL/hop limit not decremented"
    );
    let macs = macs_to(client.ip()).expect("a neighbour");
    assert_eq!((got.src_mac, got.dst_mac), macs, "{what}: MACs (src, dst)");
    fx.counters()
        .expect("counters")
        .since(&before)
        .assert_moved(&[(reason::TC_CT_REPLY, 1)], what);
    got
}

/// The forward entry of a flow (panics if missing).
#[track_caller]
fn forward_entry(fx: &TcFixture, original: Tuple) -> CtValue {
    fx.ct(&original)
        .expect("CT lookup")
        .unwrap_or_else(|| panic!("no forward entry {original}"))
}

/// Sends a packet that must pass untouched; returns the counter moves.
#[track_caller]
fn pass(fx: &TcFixture, packet: Packet, what: &str) -> Counters {
    let before = fx.counters().expect("counters");
    let (_, frame, out) = inject(fx, packet);
    expect_untouched(&out, &frame, what);
    let moved = fx.counters().expect("counters").since(&before);
    moved.assert_moved(&[], what);
    moved
}

/// Sends a packet that must be dropped with `reason`.
#[track_caller]
fn drop_with(fx: &TcFixture, packet: Packet, drop_reason: u32, what: &str) {
    let before = fx.counters().expect("counters");
    let (_, _, out) = inject(fx, packet);
    expect_shot(&out, what);
    fx.counters()
        .expect("counters")
        .since(&before)
        .assert_moved(&[(drop_reason, 1)], what);
}

#[track_caller]
fn assert_no_ct(fx: &TcFixture, family: Family, what: &str) {
    let entries = fx.ct_entries(family.is_v6()).expect("CT dump");
    assert!(
        entries.is_empty(),
        "{what}: conntrack entries were created: {entries:#?}"
    );
}

#[track_caller]
fn assert_ct_count(fx: &TcFixture, family: Family, count: usize, what: &str) {
    let entries = fx.ct_entries(family.is_v6()).expect("CT dump");
    assert_eq!(
        entries.len(),
        count,
        "{what}: conntrack entries: {entries:#?}"
    );
}

/// A NodePort (externalTrafficPolicy Cluster) TCP connection: the SYN is DNAT-ed and
/// masqueraded with a conntrack pair, the SYN-ACK reverse-translated (SEEN_REPLY), and the
/// following client packets keep the backend and the SNAT port.
#[test]
fn nodeport_cluster_tcp_connection() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} NodePort TCP: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30080);
        let pool = backends(family, &[2, 3, 4, 5], 8080, 101);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            10,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let client = sa(family.client(), 40001);
        let syn = Packet::tcp(client, fe, SYN, 1000, 0);
        let expect = NewFlow {
            backends: &pool,
            snat: Some(SNAT_PORTS),
            rev_nat_id: 10,
            counters: NEW_FLOW,
        };
        let (backend, translated) = new_flow(&fx, syn, &expect, &what("SYN"));
        assert_ct_count(&fx, family, 2, &what("after the SYN"));
        let masq = translated.src_socket();
        let original = Tuple::new(client, fe, TCP);

        let synack = Packet::tcp(backend.addr, masq, SYN | ACK, 5000, 1001);
        let t0 = monotonic_ns();
        reply(&fx, synack, fe, client, &what("SYN-ACK"));
        let entry = forward_entry(&fx, original);
        assert_eq!(
            entry.flags,
            ct_flags::SNAT | ct_flags::SEEN_REPLY,
            "{}",
            what("forward entry flags after the SYN-ACK")
        );
        // Whether the SYN-ACK alone makes the flow established is the program's choice.
        let lifetime = (entry.expires_ns.saturating_sub(t0)) / SEC;
        assert!(
            lifetime + 1 >= ct_lifetime::TCP_SYN_SECS,
            "{}: lifetime {lifetime} s",
            what("after the SYN-ACK")
        );

        for i in 0..5u32 {
            let data = Packet::tcp(client, fe, ACK | PSH, 1001 + 5 * i, 5001)
                .with_payload(b"hello")
                .with_ttl(50);
            forward(
                &fx,
                data,
                masq,
                backend.addr,
                &what(&format!("data packet {i}")),
            );
        }
        let t0 = monotonic_ns();
        let data = Packet::tcp(client, fe, ACK, 1026, 5001);
        forward(&fx, data, masq, backend.addr, &what("ACK"));
        let t1 = monotonic_ns();
        let entry = forward_entry(&fx, original);
        assert_eq!(entry.flags, ct_flags::SNAT | ct_flags::SEEN_REPLY);
        assert_expiry(
            entry.expires_ns,
            ct_lifetime::TCP_ESTABLISHED_SECS,
            (t0, t1),
            &what("established forward entry"),
        );
        assert_ct_count(&fx, family, 2, &what("after the data"));

        let ack = Packet::tcp(backend.addr, masq, ACK, 5001, 1031).with_payload(b"world");
        reply(&fx, ack, fe, client, &what("backend data"));
    }
}

/// externalTrafficPolicy Local: external clients use the node-local backends and keep their
/// address; pods short-circuit to the cluster-wide backends, unmasqueraded.
#[test]
fn nodeport_external_traffic_policy_local() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} eTP Local: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30081);
        let cluster = backends(family, &[2, 3], 8080, 201);
        let local = backends(family, &[4], 8080, 203);
        let flags = service_flags::NODE_PORT | service_flags::EXTERNAL_LOCAL;
        fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 20, flags, &cluster))
            .unwrap();
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::LOCAL,
            20,
            service_flags::NODE_PORT,
            &local,
        ))
        .unwrap();

        for client in [sa(family.remote(7), 40002), sa(family.client(), 40003)] {
            let expect = NewFlow {
                backends: &local,
                snat: None,
                rev_nat_id: 20,
                counters: NEW_FLOW,
            };
            let syn = Packet::tcp(client, fe, SYN, 77, 0);
            let (backend, _) = new_flow(&fx, syn, &expect, &what(&format!("SYN from {client}")));
            let synack = Packet::tcp(backend.addr, client, SYN | ACK, 900, 78);
            reply(
                &fx,
                synack,
                fe,
                client,
                &what(&format!("SYN-ACK to {client}")),
            );
        }

        let pod = sa(family.pod(), 40004);
        let expect = NewFlow {
            backends: &cluster,
            snat: None,
            rev_nat_id: 20,
            counters: NEW_FLOW,
        };
        let (backend, _) = new_flow(
            &fx,
            Packet::tcp(pod, fe, SYN, 5, 0),
            &expect,
            &what("pod SYN"),
        );
        let synack = Packet::tcp(backend.addr, pod, SYN | ACK, 9, 6);
        reply(&fx, synack, fe, pod, &what("SYN-ACK to the pod"));
    }
}

/// One row of the masquerade table.
struct MasqCase {
    name: &'static str,
    config: fn() -> DatapathConfig,
    /// Frontend kind: flags and address.
    flags: u16,
    frontend: fn(Family) -> IpAddr,
    backend_hosts: &'static [u8],
    source: fn(Family) -> IpAddr,
    snat: bool,
}

fn cidrs() -> DatapathConfig {
    cluster_config(0, SNAT_PORTS)
}

fn cidrs_masquerade_all() -> DatapathConfig {
    cluster_config(config_flags::MASQUERADE_ALL, SNAT_PORTS)
}

fn no_cidrs() -> DatapathConfig {
    DatapathConfig {
        snat_port_min: SNAT_PORTS.0,
        snat_port_max: SNAT_PORTS.1,
        ..DatapathConfig::default()
    }
}

fn cidr4_only() -> DatapathConfig {
    let mut config = cluster_config(0, SNAT_PORTS);
    config.flags &= !config_flags::CLUSTER_CIDR6;
    config.cluster_cidr6 = [0; 4];
    config.cluster_prefix6 = 0;
    config
}

fn cidr6_only() -> DatapathConfig {
    let mut config = cluster_config(0, SNAT_PORTS);
    config.flags &= !config_flags::CLUSTER_CIDR4;
    config.cluster_cidr4 = 0;
    config.cluster_prefix4 = 0;
    config
}

fn masquerade_cases() -> Vec<MasqCase> {
    vec![
        MasqCase {
            name: "ClusterIP from outside the cluster CIDR",
            config: cidrs,
            flags: service_flags::CLUSTER_IP,
            frontend: Family::cluster_ip,
            backend_hosts: &[2, 3],
            source: Family::client,
            snat: true,
        },
        MasqCase {
            name: "ClusterIP from a pod",
            config: cidrs,
            flags: service_flags::CLUSTER_IP,
            frontend: Family::cluster_ip,
            backend_hosts: &[2, 3],
            source: Family::pod,
            snat: false,
        },
        MasqCase {
            name: "ClusterIP from a pod with --masquerade-all",
            config: cidrs_masquerade_all,
            flags: service_flags::CLUSTER_IP,
            frontend: Family::cluster_ip,
            backend_hosts: &[2, 3],
            source: Family::pod,
            snat: true,
        },
        MasqCase {
            name: "ClusterIP hairpin (a backend reaching itself)",
            config: cidrs,
            flags: service_flags::CLUSTER_IP,
            frontend: Family::cluster_ip,
            backend_hosts: &[2],
            source: |family| family.host(2),
            snat: true,
        },
        MasqCase {
            name: "ClusterIP from outside, no cluster CIDR configured",
            config: no_cidrs,
            flags: service_flags::CLUSTER_IP,
            frontend: Family::cluster_ip,
            backend_hosts: &[2, 3],
            source: Family::client,
            snat: false,
        },
        MasqCase {
            name: "NodePort (eTP Cluster) from a pod",
            config: cidrs,
            flags: service_flags::NODE_PORT,
            frontend: Family::node,
            backend_hosts: &[2, 3],
            source: Family::pod,
            snat: true,
        },
        MasqCase {
            name: "LoadBalancer (eTP Cluster) from outside",
            config: cidrs,
            flags: service_flags::LOAD_BALANCER,
            frontend: Family::lb_ip,
            backend_hosts: &[2, 3],
            source: |family| family.remote(9),
            snat: true,
        },
        MasqCase {
            name: "externalIP (eTP Cluster) from outside",
            config: cidrs,
            flags: service_flags::EXTERNAL_IP,
            frontend: Family::external_ip,
            backend_hosts: &[2, 3],
            source: |family| family.remote(9),
            snat: true,
        },
    ]
}

/// The masquerade decision for new flows, by frontend kind, source and configuration.
#[test]
fn masquerade_decision() {
    require_root!();
    let cases = masquerade_cases();
    for case in &cases {
        for family in Family::ALL {
            let what = format!("{family:?} {}", case.name);
            let mut fx = fixture();
            fx.set_config(&(case.config)()).unwrap();
            let fe = sa((case.frontend)(family), 80);
            let pool = backends(family, case.backend_hosts, 8080, 301);
            fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 30, case.flags, &pool))
                .unwrap();
            let client = sa((case.source)(family), 40010);
            let expect = NewFlow {
                backends: &pool,
                snat: case.snat.then_some(SNAT_PORTS),
                rev_nat_id: 30,
                counters: NEW_FLOW,
            };
            let (backend, translated) =
                new_flow(&fx, Packet::tcp(client, fe, SYN, 1, 0), &expect, &what);
            let synack = Packet::tcp(backend.addr, translated.src_socket(), SYN | ACK, 1, 2);
            reply(&fx, synack, fe, client, &format!("{what}: SYN-ACK"));
        }
    }
    // A cluster CIDR of the other family only: nothing is "outside" in this family.
    for (family, config) in [
        (Family::V4, cidr6_only as fn() -> _),
        (Family::V6, cidr4_only),
    ] {
        let what = format!("{family:?} ClusterIP from outside, only the other family's CIDR");
        let mut fx = fixture();
        fx.set_config(&config()).unwrap();
        let fe = sa(family.cluster_ip(), 80);
        let pool = backends(family, &[2, 3], 8080, 301);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            30,
            service_flags::CLUSTER_IP,
            &pool,
        ))
        .unwrap();
        let expect = NewFlow {
            backends: &pool,
            snat: None,
            rev_nat_id: 30,
            counters: NEW_FLOW,
        };
        let client = sa(family.client(), 40011);
        new_flow(&fx, Packet::tcp(client, fe, SYN, 1, 0), &expect, &what);
    }
}

/// UDP through a NodePort with the all-zero configuration (default SNAT range), including an
/// IPv4 datagram without checksum, and the replies.
#[test]
fn nodeport_udp_with_default_config() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        let fe = sa(family.node(), 30053);
        let pool = backends(family, &[2, 3], 5353, 401);
        fx.add_frontend(&frontend(
            fe,
            UDP,
            scope::EXTERNAL,
            40,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let mut cases = vec![("checksummed", 40020, false)];
        if family == Family::V4 {
            cases.push(("zero checksum", 40021, true));
        }
        for (name, port, zero_checksum) in cases {
            let what = |step: &str| format!("{family:?} UDP {name}: {step}");
            let client = sa(family.client(), port);
            let mut query = Packet::udp(client, fe, b"which backend?");
            if zero_checksum {
                query = query.with_zero_udp_checksum();
            }
            let expect = NewFlow {
                backends: &pool,
                snat: Some(DEFAULT_SNAT_PORTS),
                rev_nat_id: 40,
                counters: NEW_FLOW,
            };
            let (backend, translated) = new_flow(&fx, query, &expect, &what("query"));
            let masq = translated.src_socket();
            let mut answer = Packet::udp(backend.addr, masq, b"this one");
            if zero_checksum {
                answer = answer.with_zero_udp_checksum();
            }
            let t0 = monotonic_ns();
            reply(&fx, answer, fe, client, &what("answer"));
            let t1 = monotonic_ns();
            let entry = forward_entry(&fx, Tuple::new(client, fe, UDP));
            assert_eq!(
                entry.flags,
                ct_flags::SNAT | ct_flags::SEEN_REPLY,
                "{}",
                what("flags after the answer")
            );
            assert_expiry(
                entry.expires_ns,
                ct_lifetime::UDP_SECS,
                (t0, t1),
                &what("replied"),
            );
            let again = Packet::udp(client, fe, b"again");
            forward(&fx, again, masq, backend.addr, &what("second query"));
        }
    }
}

/// (name, flags, seq, ack, payload, expected seq, expected ack)
type RstCase = (&'static str, u8, u32, u32, &'static [u8], u32, u32);

/// A TCP frontend without endpoints answers with a RST from the frontend (RFC 9293 §3.10.7.1,
/// as Linux does): a segment with ACK gets a bare RST whose sequence number is that ACK; any
/// other gets RST|ACK with sequence 0 acknowledging the segment.
#[test]
fn no_endpoints_tcp_is_reset() {
    require_root!();
    let cases: [RstCase; 5] = [
        ("SYN", SYN, 7000, 0, b"", 0, 7001),
        ("SYN with data", SYN, 7000, 0, b"abcd", 0, 7005),
        ("ACK with data", ACK | PSH, 100, 555, b"hello", 555, 0),
        ("bare ACK", ACK, 4_000_000_000, 9, b"", 9, 0),
        ("SYN at the sequence wrap", SYN, u32::MAX, 0, b"", 0, 0),
    ];
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30090);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            50,
            service_flags::NODE_PORT,
            &[],
        ))
        .unwrap();
        for (name, flags, seq, ack, payload, want_seq, want_ack) in cases {
            let what = format!("{family:?} no endpoints, {name}");
            let client = sa(family.client(), 40030);
            let packet = Packet::tcp(client, fe, flags, seq, ack).with_payload(payload);
            let before = fx.counters().unwrap();
            let (sent, _, out) = inject(&fx, packet);
            let got = expect_redirect(&out, &what);
            let tcp = got
                .tcp_header()
                .unwrap_or_else(|| panic!("{what}: not TCP: {got:?}"));
            assert_eq!(
                (got.src_mac, got.dst_mac),
                (sent.dst_mac, sent.src_mac),
                "{what}: MACs not swapped"
            );
            assert_eq!(
                (got.src_socket(), got.dst_socket()),
                (fe, client),
                "{what}: RST (source, destination)"
            );
            let want_flags = if flags & ACK != 0 { RST } else { RST | ACK };
            assert_eq!(tcp.flags, want_flags, "{what}: flags {:#04x}", tcp.flags);
            assert_eq!(
                (tcp.seq, tcp.ack),
                (want_seq, want_ack),
                "{what}: (seq, ack)"
            );
            assert!(
                tcp.payload.is_empty(),
                "{what}: RST carries {:?}",
                tcp.payload
            );
            assert!(got.ttl > 0, "{what}: TTL 0");
            fx.counters()
                .unwrap()
                .since(&before)
                .assert_moved(&[(reason::TC_REJECTED, 1)], &what);
        }
        assert_no_ct(&fx, family, &format!("{family:?} rejected flows"));
    }
}

/// A UDP frontend without endpoints answers with an ICMP port unreachable from the frontend
/// address, quoting the datagram.
#[test]
fn no_endpoints_udp_is_port_unreachable() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30091);
        fx.add_frontend(&frontend(
            fe,
            UDP,
            scope::EXTERNAL,
            51,
            service_flags::NODE_PORT,
            &[],
        ))
        .unwrap();
        let big = vec![0xa5; 1400];
        for (name, payload) in [
            ("small datagram", &b"is anyone there?"[..]),
            ("big datagram", &big),
        ] {
            let what = format!("{family:?} no endpoints, UDP {name}");
            let client = sa(family.client(), 40031);
            let before = fx.counters().unwrap();
            let (sent, _, out) = inject(&fx, Packet::udp(client, fe, payload));
            let got = expect_redirect(&out, &what);
            assert_eq!(
                (got.src_mac, got.dst_mac),
                (sent.dst_mac, sent.src_mac),
                "{what}: MACs not swapped"
            );
            assert_eq!(
                (got.src, got.dst),
                (fe.ip(), client.ip()),
                "{what}: ICMP (source, destination)"
            );
            let message = got
                .icmp_message()
                .unwrap_or_else(|| panic!("{what}: not ICMP: {got:?}"));
            let original = sent.to_ip();
            if family.is_v6() {
                assert_eq!(
                    (message.kind, message.code),
                    (icmp::V6_DEST_UNREACH, icmp::V6_CODE_PORT_UNREACH),
                    "{what}: ICMPv6 type and code"
                );
                assert!(
                    message.body.len() >= 48 && original.starts_with(&message.body),
                    "{what}: the quote ({} bytes) is not a prefix of the datagram of at least \
                     the IPv6 header + 8 bytes",
                    message.body.len()
                );
                let total = 40 + 8 + message.body.len();
                assert!(
                    total <= 1280,
                    "{what}: ICMPv6 error of {total} bytes exceeds 1280"
                );
            } else {
                assert_eq!(
                    (message.kind, message.code),
                    (icmp::V4_DEST_UNREACH, icmp::V4_CODE_PORT_UNREACH),
                    "{what}: ICMP type and code"
                );
                assert_eq!(
                    message.body,
                    original[..28],
                    "{what}: the quote is not the IP header + 8 bytes of the datagram"
                );
            }
            assert_eq!(message.rest, [0; 4], "{what}: unused field not zero");
            fx.counters()
                .unwrap()
                .since(&before)
                .assert_moved(&[(reason::TC_REJECTED, 1)], &what);
        }
        assert_no_ct(&fx, family, &format!("{family:?} rejected datagrams"));
    }
}

/// Endpoints exist but none is local: external traffic under eTP Local, and ClusterIP traffic
/// under iTP Local (count 0 with NO_LOCAL_ENDPOINTS), is dropped, never refused.
#[test]
fn no_local_endpoints_is_dropped() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} no local endpoints: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30082);
        let cluster = backends(family, &[2, 3], 8080, 501);
        let flags = service_flags::NODE_PORT | service_flags::EXTERNAL_LOCAL;
        fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 60, flags, &cluster))
            .unwrap();
        let local_flags = service_flags::NODE_PORT | service_flags::NO_LOCAL_ENDPOINTS;
        fx.add_frontend(&frontend(fe, TCP, scope::LOCAL, 60, local_flags, &[]))
            .unwrap();
        let syn = Packet::tcp(sa(family.remote(7), 40040), fe, SYN, 1, 0);
        drop_with(&fx, syn, reason::TC_DROPPED_NO_LOCAL, &what("external SYN"));
        assert_no_ct(&fx, family, &what("external SYN"));
        // Pods still reach the cluster-wide endpoints.
        let expect = NewFlow {
            backends: &cluster,
            snat: None,
            rev_nat_id: 60,
            counters: NEW_FLOW,
        };
        let pod_syn = Packet::tcp(sa(family.pod(), 40041), fe, SYN, 1, 0);
        new_flow(&fx, pod_syn, &expect, &what("pod SYN"));

        for (proto, port) in [(TCP, 80), (UDP, 53)] {
            let vip = sa(family.cluster_ip(), port);
            let flags = service_flags::CLUSTER_IP | service_flags::NO_LOCAL_ENDPOINTS;
            fx.add_frontend(&frontend(vip, proto, scope::EXTERNAL, 61, flags, &[]))
                .unwrap();
            let pod = sa(family.pod(), 40042);
            let packet = if proto == TCP {
                Packet::tcp(pod, vip, SYN, 1, 0)
            } else {
                Packet::udp(pod, vip, b"query")
            };
            drop_with(
                &fx,
                packet,
                reason::TC_DROPPED_NO_LOCAL,
                &what(&format!("ClusterIP iTP Local, protocol {proto}")),
            );
        }
    }
}

/// loadBalancerSourceRanges: only sources inside the frontend's prefixes reach the LB IP;
/// the same service's NodePort and other services' prefixes are not affected.
#[test]
fn load_balancer_source_ranges() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} source ranges: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let pool = backends(family, &[2, 3], 8080, 601);
        let lb = sa(family.lb_ip(), 80);
        let node_port = sa(family.node(), 30050);
        let lb_flags = service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES;
        fx.add_frontend(&frontend(lb, TCP, scope::EXTERNAL, 70, lb_flags, &pool))
            .unwrap();
        fx.add_frontend(&frontend(
            node_port,
            TCP,
            scope::EXTERNAL,
            71,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let (remote_net, remote_len) = family.remote_prefix();
        fx.add_source_range(70, remote_net, remote_len).unwrap();
        // Another frontend's range covers the on-link client: it must not count for id 70.
        let (client_net, client_len) = family.client_prefix();
        fx.add_source_range(99, client_net, client_len).unwrap();

        let allowed = NewFlow {
            backends: &pool,
            snat: Some(SNAT_PORTS),
            rev_nat_id: 70,
            counters: NEW_FLOW,
        };
        let inside = Packet::tcp(sa(family.remote(7), 40050), lb, SYN, 1, 0);
        new_flow(&fx, inside, &allowed, &what("source inside the range"));

        let outside = Packet::tcp(sa(family.client(), 40051), lb, SYN, 1, 0);
        drop_with(
            &fx,
            outside,
            reason::TC_DROPPED_SOURCE_RANGE,
            &what("source outside the range"),
        );
        assert!(
            fx.ct(&Tuple::new(sa(family.client(), 40051), lb, TCP))
                .unwrap()
                .is_none(),
            "{}",
            what("a dropped flow left a forward entry")
        );

        let via_node_port = NewFlow {
            rev_nat_id: 71,
            ..allowed
        };
        let to_node_port = Packet::tcp(sa(family.client(), 40052), node_port, SYN, 1, 0);
        new_flow(
            &fx,
            to_node_port,
            &via_node_port,
            &what("same source to the NodePort"),
        );
    }
}

/// A UDP datagram's transport bytes (header and `len` bytes of payload), checksummed for
/// `src → dst`.
fn udp_datagram(src: SocketAddr, dst: SocketAddr, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len)
        .map(|i| u8::try_from(i * 7 % 251).expect("below 251"))
        .collect();
    let ip = Packet::udp(src, dst, &payload).to_ip();
    let header = if src.is_ipv6() { 40 } else { 20 };
    ip[header..].to_vec()
}

/// The two fragments of `datagram` (transport bytes), split at `at` (a multiple of 8), with
/// the IPv4 identification / IPv6 fragment identification `ident`.
fn fragments(src: IpAddr, dst: IpAddr, datagram: &[u8], at: usize, ident: u32) -> [Packet; 2] {
    let offset = u16::try_from(at / 8).expect("small offset");
    let mut first = Packet::other(src, dst, UDP, &datagram[..at]).with_fragment(0, true);
    let mut later = Packet::other(src, dst, UDP, &datagram[at..]).with_fragment(offset, false);
    first.ident = ident;
    later.ident = ident;
    [first, later]
}

/// A fragment's bytes after its IP header(s).
#[track_caller]
fn fragment_data(packet: &Packet, what: &str) -> Vec<u8> {
    match &packet.l4 {
        L4::Other { payload, .. } => payload.clone(),
        other => panic!("{what}: not a fragment: {other:?}"),
    }
}

/// The ports in a first fragment's transport header (source, destination).
fn fragment_ports(first: &Packet, what: &str) -> (u16, u16) {
    let data = fragment_data(first, what);
    (
        u16::from_be_bytes([data[0], data[1]]),
        u16::from_be_bytes([data[2], data[3]]),
    )
}

/// Sends a datagram's first and later fragment, in order; both must be forwarded to the same
/// place, unchanged but for addresses (and ports in the first), with their fragment fields,
/// and the datagram they reassemble to must carry a right UDP checksum for its new addresses.
#[track_caller]
fn translate_fragments(fx: &TcFixture, fragments: [Packet; 2], what: &str) -> [Packet; 2] {
    let got = fragments.map(|fragment| {
        let what = format!("{what}, fragment at {:?}", fragment.fragment);
        let (sent, _, out) = inject(fx, fragment);
        let got = expect_redirect(&out, &what);
        assert_eq!(
            (got.fragment, got.ident, got.ttl),
            (sent.fragment, sent.ident, sent.ttl - 1),
            "{what}: fragment fields and TTL"
        );
        (sent, got)
    });
    let [(first_sent, first), (later_sent, later)] = got;
    assert_eq!(
        (first.src, first.dst),
        (later.src, later.dst),
        "{what}: the fragments went different ways"
    );
    assert_eq!(
        fragment_data(&first, what)[8..],
        fragment_data(&first_sent, what)[8..],
        "{what}: the first fragment's data changed"
    );
    assert_eq!(
        fragment_data(&later, what),
        fragment_data(&later_sent, what),
        "{what}: the later fragment's data changed"
    );
    let mut whole = fragment_data(&first, what);
    whole.extend(fragment_data(&later, what));
    assert_eq!(
        packet::pseudo_header_checksum(first.src, first.dst, UDP, &whole),
        0,
        "{what}: the reassembled datagram's UDP checksum is wrong"
    );
    [first, later]
}

/// A fragmented UDP datagram through a NodePort: the first fragment is translated as any
/// datagram (new flow, masqueraded), the later one takes the same translation through the
/// fragment map (addresses only), and so do the fragments of the backend's answer. A later
/// fragment without its first is dropped; fragments not for a service and TCP fragments pass.
#[test]
fn udp_fragments_follow_their_first_fragment() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} fragmented UDP: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30054);
        let pool = backends(family, &[2], 5353, 801);
        let backend = pool[0].addr;
        fx.add_frontend(&frontend(
            fe,
            UDP,
            scope::EXTERNAL,
            82,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let client = sa(family.client(), 40070);

        let before = fx.counters().unwrap();
        let query = udp_datagram(client, fe, 200);
        let [first, _] = translate_fragments(
            &fx,
            fragments(client.ip(), fe.ip(), &query, 64, 0x4242),
            &what("query"),
        );
        fx.counters().unwrap().since(&before).assert_moved(
            &[
                (reason::TC_NEW_FLOW, 1),
                (reason::TC_CT_FORWARD, 1),
                (reason::TC_FRAGMENT_TRANSLATED, 1),
            ],
            &what("query"),
        );
        let (masq_port, backend_port) = fragment_ports(&first, &what("query"));
        assert_eq!(
            (first.src, first.dst, backend_port),
            (family.masq(), backend.ip(), backend.port()),
            "{}",
            what("query translated to the backend, masqueraded")
        );
        assert!(
            (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&masq_port),
            "{}",
            what("SNAT port in range")
        );

        let masq = sa(family.masq(), masq_port);
        let before = fx.counters().unwrap();
        let answer = udp_datagram(backend, masq, 300);
        let [first, _] = translate_fragments(
            &fx,
            fragments(backend.ip(), masq.ip(), &answer, 128, 0x0099),
            &what("answer"),
        );
        fx.counters().unwrap().since(&before).assert_moved(
            &[
                (reason::TC_CT_REPLY, 2),
                (reason::TC_FRAGMENT_TRANSLATED, 1),
            ],
            &what("answer"),
        );
        assert_eq!(
            (
                first.src,
                first.dst,
                fragment_ports(&first, &what("answer"))
            ),
            (fe.ip(), client.ip(), (fe.port(), client.port())),
            "{}",
            what("answer translated back to the client")
        );

        let [_, stray] = fragments(client.ip(), fe.ip(), &query, 64, 0x4343);
        drop_with(
            &fx,
            stray,
            reason::TC_FRAGMENT_UNTRACKED,
            &what("a later fragment whose first was not seen"),
        );

        let elsewhere = sa(family.node(), 9999);
        let datagram = udp_datagram(client, elsewhere, 200);
        for fragment in fragments(client.ip(), elsewhere.ip(), &datagram, 64, 0x5151) {
            let name = what(&format!("not a service, fragment {:?}", fragment.fragment));
            let before = fx.counters().unwrap();
            let (_, frame, out) = inject(&fx, fragment);
            expect_untouched(&out, &frame, &name);
            let moved = fx.counters().unwrap().since(&before);
            moved.assert_moved(&[(reason::TC_FRAGMENT_UNTRACKED, 0)], &name);
        }

        let tcp_fe = sa(family.node(), 30080);
        for (offset, more) in [(0, true), (100, false)] {
            let packet = Packet::tcp(client, tcp_fe, SYN, 1, 0)
                .with_payload(&[7; 64])
                .with_fragment(offset, more);
            let name = what(&format!("TCP fragment at {offset}"));
            let moved = pass(&fx, packet, &name);
            assert_eq!(moved.get(reason::TC_FRAGMENT_PASSED), 1, "{name}: {moved}");
        }
        assert_ct_count(&fx, family, 2, &what("only the datagram's flow is tracked"));
    }
}

#[test]
fn a_packet_cut_short_inside_its_headers_passes_untouched_and_is_counted() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30080);
        let pool = backends(family, &[2, 3], 8080, 101);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            10,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let client = sa(family.client(), 40001);
        let (src_mac, dst_mac) = macs_from(client.ip());
        let frame = Packet::tcp(client, fe, SYN, 1000, 0)
            .with_macs(src_mac, dst_mac)
            .to_frame();
        let ip_header = match family {
            Family::V4 => 20,
            Family::V6 => 40,
        };
        // Ends inside the TCP header, before the ports can be read in full.
        let cut = &frame[..14 + ip_header + 3];
        let what = format!("{family:?}: a SYN to a NodePort cut inside its TCP header");
        let before = fx.counters().expect("counters");
        let out = fx
            .run_on(fx.client_ifindex(), cut)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        expect_untouched(&out, cut, &what);
        let moved = fx.counters().expect("counters").since(&before);
        moved.assert_moved(&[(reason::TC_TRUNCATED_PASSED, 1)], &what);
        assert_no_ct(&fx, family, &what);
    }
}

/// Sets a link's MTU in the fixture's namespace (the calling thread's).
fn set_mtu(link: &str, mtu: u32) {
    let status = std::process::Command::new("ip")
        .args(["link", "set", "dev", link, "mtu", &mtu.to_string()])
        .status()
        .expect("running ip");
    assert!(status.success(), "ip link set {link} mtu {mtu}: {status}");
}

/// A packet larger than its translated route's MTU (the backend link at 1280) is answered
/// with ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big" carrying that
/// MTU and quoting the packet as the client sent it, on a tracked flow and as a new flow
/// (which is then not created). IPv4 without DF is dropped and counted.
#[test]
fn packets_too_big_for_the_route_are_answered_with_the_mtu() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} MTU 1280: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        set_mtu(net::BACKEND_LINK, 1280);
        let fe = sa(family.node(), 30055);
        let pool = backends(family, &[2], 5353, 811);
        fx.add_frontend(&frontend(
            fe,
            UDP,
            scope::EXTERNAL,
            83,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let client = sa(family.client(), 40080);
        let mut fits = Packet::udp(client, fe, &[1; 1000]);
        fits.dont_fragment = true;
        let expect = NewFlow {
            backends: &pool,
            snat: Some(SNAT_PORTS),
            rev_nat_id: 83,
            counters: NEW_FLOW,
        };
        new_flow(&fx, fits, &expect, &what("a datagram that fits"));

        for (name, port) in [("tracked flow", 40080), ("new flow", 40081)] {
            let name = what(name);
            let mut big = Packet::udp(sa(client.ip(), port), fe, &[2; 1400]);
            big.dont_fragment = true;
            let before = fx.counters().unwrap();
            let (sent, _, out) = inject(&fx, big);
            let got = expect_redirect(&out, &name);
            assert_eq!(
                (got.src_mac, got.dst_mac),
                (sent.dst_mac, sent.src_mac),
                "{name}: sent back where it came from"
            );
            assert_eq!(
                (got.src, got.dst),
                (fe.ip(), client.ip()),
                "{name}: ICMP (source, destination)"
            );
            let message = got
                .icmp_message()
                .unwrap_or_else(|| panic!("{name}: not ICMP: {got:?}"));
            let original = sent.to_ip();
            if family.is_v6() {
                assert_eq!(
                    (message.kind, message.code, message.rest),
                    (icmp::V6_PACKET_TOO_BIG, 0, 1280_u32.to_be_bytes()),
                    "{name}: ICMPv6 type, code and MTU"
                );
                assert!(
                    message.body.len() >= 48 && original.starts_with(&message.body),
                    "{name}: the quote is not a prefix of the datagram"
                );
            } else {
                assert_eq!(
                    (message.kind, message.code, message.rest),
                    (
                        icmp::V4_DEST_UNREACH,
                        icmp::V4_CODE_FRAG_NEEDED,
                        [0, 0, 0x05, 0x00]
                    ),
                    "{name}: ICMP type, code and next-hop MTU"
                );
                assert_eq!(
                    message.body,
                    original[..28],
                    "{name}: the quote is not the IP header + 8 bytes"
                );
            }
            fx.counters()
                .unwrap()
                .since(&before)
                .assert_moved(&[(reason::TC_FRAG_NEEDED_SENT, 1)], &name);
        }
        assert_ct_count(&fx, family, 2, &what("the big new flow was not created"));
        if family == Family::V4 {
            let big = Packet::udp(sa(client.ip(), 40082), fe, &[3; 1400]);
            drop_with(
                &fx,
                big,
                reason::TC_MTU_EXCEEDED,
                &what("without DF (the TC path cannot fragment)"),
            );
        }
    }
}

/// Traffic that is not to a service is left alone.
#[test]
fn non_service_traffic_passes_untouched() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30080);
        let pool = backends(family, &[2], 8080, 801);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            90,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let vip = sa(family.cluster_ip(), 80);
        fx.add_frontend(&frontend(
            vip,
            TCP,
            scope::EXTERNAL,
            91,
            service_flags::CLUSTER_IP,
            &pool,
        ))
        .unwrap();
        let client = sa(family.client(), 40070);
        let echo = if family.is_v6() {
            icmp::V6_ECHO_REQUEST
        } else {
            icmp::V4_ECHO_REQUEST
        };
        let cases = [
            (
                "TCP to a port that is no service",
                Packet::tcp(client, sa(family.node(), 22), SYN, 1, 0),
            ),
            ("UDP to a TCP-only frontend", Packet::udp(client, fe, b"x")),
            (
                "TCP to another address",
                Packet::tcp(client, sa(family.cluster_ip(), 81), SYN, 1, 0),
            ),
            (
                "UDP to an unknown address",
                Packet::udp(client, sa(family.remote(3), 53), b"x"),
            ),
            (
                "TCP straight to a backend",
                Packet::tcp(client, pool[0].addr, SYN, 1, 0),
            ),
            (
                "TCP from a backend, untracked",
                Packet::tcp(pool[0].addr, client, SYN | ACK, 1, 2),
            ),
            (
                "ICMP echo to a frontend address",
                Packet::icmp(client.ip(), fe.ip(), echo, 0, [0, 1, 0, 1], b"ping"),
            ),
            (
                "GRE to a frontend address",
                Packet::other(client.ip(), vip.ip(), packet::IPPROTO_GRE, &[0; 8]),
            ),
        ];
        for (name, packet) in cases {
            pass(&fx, packet, &format!("{family:?} {name}"));
        }
        assert_no_ct(&fx, family, &format!("{family:?} non-service traffic"));
    }
    // Not IP at all: an ARP request.
    let fx = fixture();
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&net::CLIENT_MAC);
    arp.extend_from_slice(&packet::ETH_P_ARP.to_be_bytes());
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&net::CLIENT_MAC);
    arp.extend_from_slice(&net::CLIENT_V4.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&net::NODE_V4.octets());
    let out = fx.run(&arp).unwrap();
    expect_untouched(&out, &arp, "ARP request");
}

/// The stale-conntrack trap: a non-service SYN whose reversed tuple is a leftover reply entry
/// of an ended flow removes it, so the answer to that new connection is not rewritten; the
/// reply entry of a live flow is never removed that way.
#[test]
fn non_service_syn_purges_a_stale_reply_entry_never_a_live_one() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} stale conntrack: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30083);
        let local = backends(family, &[4], 8080, 901);
        let flags = service_flags::NODE_PORT | service_flags::EXTERNAL_LOCAL;
        fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 100, flags, &local))
            .unwrap();
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::LOCAL,
            100,
            service_flags::NODE_PORT,
            &local,
        ))
        .unwrap();
        let client = sa(family.remote(7), 40100);
        let expect = NewFlow {
            backends: &local,
            snat: None,
            rev_nat_id: 100,
            counters: NEW_FLOW,
        };
        new_flow(
            &fx,
            Packet::tcp(client, fe, SYN, 1, 0),
            &expect,
            &what("service SYN"),
        );
        let backend = local[0].addr;
        let reply_key = Tuple::new(backend, client, TCP);
        let live_reply = fx.ct(&reply_key).unwrap().expect("reply entry");

        // While the service flow lives, a SYN on its reversed reply tuple (spoofed, or the
        // client reaching the backend directly from the same port) leaves it alone.
        let direct = || Packet::tcp(client, backend, SYN, 555, 0);
        let moved = pass(&fx, direct(), &what("direct SYN on a live flow's tuple"));
        assert_eq!(
            (
                moved.get(reason::TC_CT_COLLISION),
                moved.get(reason::TC_STALE_CT_PURGED)
            ),
            (1, 0),
            "{}: counters {moved}",
            what("direct SYN on a live flow's tuple")
        );
        assert_eq!(
            fx.ct(&reply_key).unwrap(),
            Some(live_reply),
            "{}",
            what("a non-service SYN changed a live flow's reply entry")
        );
        let synack = Packet::tcp(backend, client, SYN | ACK, 9, 2);
        reply(&fx, synack, fe, client, &what("the live flow's SYN-ACK"));

        // The service flow ends (its lifetime runs out): now its reply entry is stale.
        let flow_key = Tuple::new(client, fe, TCP);
        let mut ended = forward_entry(&fx, flow_key);
        ended.expires_ns = 1;
        fx.ct_put(&flow_key, &ended).unwrap();
        let moved = pass(&fx, direct(), &what("direct SYN"));
        assert_eq!(
            moved.get(reason::TC_STALE_CT_PURGED),
            1,
            "{}: counters {moved}",
            what("direct SYN")
        );
        assert!(
            fx.ct(&reply_key).unwrap().is_none(),
            "{}",
            what("the reply entry survived")
        );
        let synack = Packet::tcp(backend, client, SYN | ACK, 9, 556);
        let moved = pass(&fx, synack, &what("the backend's SYN-ACK"));
        assert_eq!(
            moved.get(reason::TC_CT_REPLY),
            0,
            "{}",
            what("counted as a reply")
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// The SYN is retransmitted before any answer.
    Unanswered,
    Established,
    ClientFin,
    BackendFin,
    BothFins,
    ClientRst,
    BackendRst,
}

impl Close {
    /// The forward entry's state flags after the close, and the lifetime it sets.
    fn state(self) -> (u16, u64) {
        use ct_flags::{FIN_FORWARD, FIN_REPLY, RST, SEEN_REPLY};
        match self {
            Self::Unanswered => (0, ct_lifetime::TCP_SYN_SECS),
            Self::Established => (SEEN_REPLY, ct_lifetime::TCP_ESTABLISHED_SECS),
            Self::ClientFin => (SEEN_REPLY | FIN_FORWARD, ct_lifetime::TCP_HALF_CLOSED_SECS),
            Self::BackendFin => (SEEN_REPLY | FIN_REPLY, ct_lifetime::TCP_HALF_CLOSED_SECS),
            Self::BothFins => (
                SEEN_REPLY | FIN_FORWARD | FIN_REPLY,
                ct_lifetime::TCP_CLOSED_SECS,
            ),
            Self::ClientRst | Self::BackendRst => (SEEN_REPLY | RST, ct_lifetime::TCP_CLOSED_SECS),
        }
    }
}

/// One established-or-not flow of the restart test.
struct RestartFlow {
    fe: SocketAddr,
    client: SocketAddr,
    /// The node's side towards the backend (masquerade address and port).
    masq: SocketAddr,
    backend: Backend,
}

/// Drives `flow` to the state `close` through real packets and checks the forward entry.
fn close_flow(fx: &TcFixture, flow: &RestartFlow, close: Close, what: &dyn Fn(&str) -> String) {
    let RestartFlow {
        fe,
        client,
        masq,
        backend,
    } = *flow;
    let b = backend.addr;
    if close == Close::Unanswered {
        return;
    }
    let synack = Packet::tcp(b, masq, SYN | ACK, 9000, 1001);
    reply(fx, synack, fe, client, &what("SYN-ACK"));
    let client_fin = || Packet::tcp(client, fe, FIN | ACK, 1001, 9001);
    let backend_fin = || Packet::tcp(b, masq, FIN | ACK, 9001, 1002);
    let t0 = monotonic_ns();
    match close {
        Close::Unanswered => unreachable!(),
        // Make the flow established for sure (a client ACK after the SYN-ACK).
        Close::Established => {
            forward(
                fx,
                Packet::tcp(client, fe, ACK, 1001, 9001),
                masq,
                b,
                &what("ACK"),
            );
        }
        Close::ClientFin => forward(fx, client_fin(), masq, b, &what("client FIN")),
        Close::BackendFin => {
            reply(fx, backend_fin(), fe, client, &what("backend FIN"));
        }
        Close::BothFins => {
            forward(fx, client_fin(), masq, b, &what("client FIN"));
            reply(fx, backend_fin(), fe, client, &what("backend FIN"));
        }
        Close::ClientRst => {
            let rst = Packet::tcp(client, fe, RST | ACK, 1001, 9001);
            forward(fx, rst, masq, b, &what("client RST"));
        }
        Close::BackendRst => {
            reply(
                fx,
                Packet::tcp(b, masq, RST, 9001, 0),
                fe,
                client,
                &what("backend RST"),
            );
        }
    }
    let t1 = monotonic_ns();
    let (state_flags, lifetime) = close.state();
    let entry = forward_entry(fx, Tuple::new(client, fe, TCP));
    assert_eq!(
        entry.flags,
        ct_flags::SNAT | state_flags,
        "{}",
        what("forward entry flags after the close")
    );
    assert_expiry(
        entry.expires_ns,
        lifetime,
        (t0, t1),
        &what("lifetime after the close"),
    );
}

/// A SYN on the tuple of a closed flow (both FINs or an in-window RST) starts a new flow and
/// picks the backend anew; on an established or half-closed flow it goes to that flow's
/// backend and changes nothing (a spoofed SYN cannot restart a live flow); a retransmitted SYN
/// of an unanswered flow keeps its backend and port. The service's only backend is replaced
/// before the SYN, so the choice is observable.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one table over every way a flow can end, both families"
)]
fn syn_after_close_starts_a_new_flow_and_syn_on_a_live_flow_is_ignored() {
    require_root!();
    let cases = [
        Close::Unanswered,
        Close::Established,
        Close::ClientFin,
        Close::BackendFin,
        Close::BothFins,
        Close::ClientRst,
        Close::BackendRst,
    ];
    for family in Family::ALL {
        for close in cases {
            let what = |step: &str| format!("{family:?} {close:?}: {step}");
            let mut fx = fixture();
            fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
            let fe = sa(family.node(), 30080);
            let old = backends(family, &[2], 8080, 1001);
            let new = backends(family, &[3], 8080, 1002);
            let np = service_flags::NODE_PORT;
            fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 110, np, &old))
                .unwrap();
            let client = sa(family.client(), 40200);
            let expect = NewFlow {
                backends: &old,
                snat: Some(SNAT_PORTS),
                rev_nat_id: 110,
                counters: NEW_FLOW,
            };
            let syn = Packet::tcp(client, fe, SYN, 1000, 0);
            let (backend, translated) = new_flow(&fx, syn, &expect, &what("first SYN"));
            let flow = RestartFlow {
                fe,
                client,
                masq: translated.src_socket(),
                backend,
            };
            close_flow(&fx, &flow, close, &what);

            // The endpoint changes: the old backend leaves this service (it stays in the
            // backends map, as when another service still uses it).
            fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 110, np, &new))
                .unwrap();
            if close == Close::Established {
                let ack = Packet::tcp(client, fe, ACK, 1001, 9001);
                let what = what("established flow after the endpoint change");
                forward(&fx, ack, flow.masq, backend.addr, &what);
            }
            if close == Close::Unanswered {
                let before = fx.counters().unwrap();
                let (_, _, out) = inject(&fx, Packet::tcp(client, fe, SYN, 1000, 0));
                let got = expect_redirect(&out, &what("retransmitted SYN"));
                assert_eq!(
                    (got.src_socket(), got.dst_socket()),
                    (flow.masq, backend.addr),
                    "{}",
                    what("retransmitted SYN must keep its backend and SNAT port")
                );
                let moved = fx.counters().unwrap().since(&before);
                moved.assert_moved(&[(reason::TC_SYN_RESTARTED, 0)], &what("retransmit"));
                let entry = forward_entry(&fx, Tuple::new(client, fe, TCP));
                assert_eq!(entry.backend_id, backend.id, "{}", what("retransmit"));
            } else if matches!(
                close,
                Close::Established | Close::ClientFin | Close::BackendFin
            ) {
                let flow_key = Tuple::new(client, fe, TCP);
                let entry_before = forward_entry(&fx, flow_key);
                let reply_before = fx.ct(&Tuple::new(backend.addr, flow.masq, TCP)).unwrap();
                let before = fx.counters().unwrap();
                let (_, _, out) = inject(&fx, Packet::tcp(client, fe, SYN, 50_000, 0));
                let got = expect_redirect(&out, &what("SYN on a live flow"));
                assert_eq!(
                    (got.src_socket(), got.dst_socket()),
                    (flow.masq, backend.addr),
                    "{}",
                    what("a SYN on a live flow goes to its backend")
                );
                fx.counters().unwrap().since(&before).assert_moved(
                    &[
                        (reason::TC_SYN_IGNORED, 1),
                        (reason::TC_SYN_RESTARTED, 0),
                        (reason::TC_NEW_FLOW, 0),
                    ],
                    &what("SYN on a live flow"),
                );
                assert_eq!(
                    forward_entry(&fx, flow_key),
                    entry_before,
                    "{}",
                    what("the SYN changed the flow's state")
                );
                assert_eq!(
                    fx.ct(&Tuple::new(backend.addr, flow.masq, TCP)).unwrap(),
                    reply_before,
                    "{}",
                    what("the SYN changed the reply entry (sequence ends)")
                );
            } else {
                let expect = NewFlow {
                    backends: &new,
                    snat: Some(SNAT_PORTS),
                    rev_nat_id: 110,
                    counters: &[(reason::TC_SYN_RESTARTED, 1)],
                };
                let syn = Packet::tcp(client, fe, SYN, 50_000, 0);
                let (_, renewed) = new_flow(&fx, syn, &expect, &what("new SYN"));
                let synack = Packet::tcp(new[0].addr, renewed.src_socket(), SYN | ACK, 1, 50_001);
                reply(&fx, synack, fe, client, &what("SYN-ACK of the new flow"));
            }
        }
    }
}

/// A SYN on the tuple of an unanswered flow whose backend was deleted meanwhile (gone from the
/// backends map, or its id given to another endpoint) starts a new flow to a current backend:
/// a client retrying from the same port must not be sent to an endpoint that no longer
/// exists (found by the multi-node node-loss test).
#[test]
fn syn_on_an_unanswered_flow_to_a_deleted_backend_picks_a_current_one() {
    require_root!();
    for family in Family::ALL {
        for id_reused in [false, true] {
            let what = |step: &str| format!("{family:?} id reused {id_reused}: {step}");
            let mut fx = fixture();
            fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
            let fe = sa(family.node(), 30080);
            let old = backends(family, &[2], 8080, 1201);
            let np = service_flags::NODE_PORT;
            fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 130, np, &old))
                .unwrap();
            let client = sa(family.client(), 40400);
            let expect = NewFlow {
                backends: &old,
                snat: Some(SNAT_PORTS),
                rev_nat_id: 130,
                counters: NEW_FLOW,
            };
            let syn = Packet::tcp(client, fe, SYN, 1000, 0);
            new_flow(&fx, syn, &expect, &what("first SYN"));

            // The endpoint is deleted: the Service gets another one, and the old backend's
            // entry goes (or its id now names the new endpoint).
            let new_id = if id_reused { 1201 } else { 1202 };
            let new = backends(family, &[3], 8080, new_id);
            if !id_reused {
                fx.remove_backend(1201, family.is_v6()).unwrap();
            }
            fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 130, np, &new))
                .unwrap();
            let expect = NewFlow {
                backends: &new,
                snat: Some(SNAT_PORTS),
                rev_nat_id: 130,
                counters: &[(reason::TC_SYN_RESTARTED, 1)],
            };
            let syn = Packet::tcp(client, fe, SYN, 1000, 0);
            let (backend, renewed) = new_flow(&fx, syn, &expect, &what("SYN again"));
            assert_eq!(backend.addr, new[0].addr, "{}", what("the new endpoint"));
            let synack = Packet::tcp(new[0].addr, renewed.src_socket(), SYN | ACK, 1, 1001);
            reply(&fx, synack, fe, client, &what("SYN-ACK of the new flow"));
        }
    }
}

/// A reply whose forward entry expired, or is gone, is not rewritten.
#[test]
fn reply_of_expired_or_missing_flow_is_not_rewritten() {
    require_root!();
    for family in Family::ALL {
        for expired in [true, false] {
            let what = |step: &str| {
                let case = if expired { "expired" } else { "missing" };
                format!("{family:?} {case} forward entry: {step}")
            };
            let mut fx = fixture();
            fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
            let fe = sa(family.node(), 30080);
            let pool = backends(family, &[2], 8080, 1101);
            fx.add_frontend(&frontend(
                fe,
                TCP,
                scope::EXTERNAL,
                120,
                service_flags::NODE_PORT,
                &pool,
            ))
            .unwrap();
            let client = sa(family.client(), 40300);
            let expect = NewFlow {
                backends: &pool,
                snat: Some(SNAT_PORTS),
                rev_nat_id: 120,
                counters: NEW_FLOW,
            };
            let (backend, translated) = new_flow(
                &fx,
                Packet::tcp(client, fe, SYN, 1, 0),
                &expect,
                &what("SYN"),
            );
            let original = Tuple::new(client, fe, TCP);
            if expired {
                let mut entry = forward_entry(&fx, original);
                entry.expires_ns = monotonic_ns() - SEC;
                fx.ct_put(&original, &entry).unwrap();
            } else {
                fx.ct_delete(&original).unwrap();
            }
            let synack = Packet::tcp(backend.addr, translated.src_socket(), SYN | ACK, 1, 2);
            pass(&fx, synack, &what("SYN-ACK"));
        }
    }
}

/// "Fragmentation needed" (IPv4) or "packet too big" (IPv6) from `sender` to `dst`, quoting
/// the IP header and 8 bytes of `quoted` (an IP packet), MTU 1400.
fn mtu_error(family: Family, sender: IpAddr, dst: IpAddr, quoted: &[u8]) -> Packet {
    let mtu = 1400_u32.to_be_bytes();
    match family {
        Family::V6 => Packet::icmp(sender, dst, icmp::V6_PACKET_TOO_BIG, 0, mtu, &quoted[..48]),
        Family::V4 => Packet::icmp(
            sender,
            dst,
            icmp::V4_DEST_UNREACH,
            icmp::V4_CODE_FRAG_NEEDED,
            mtu,
            &quoted[..28],
        ),
    }
}

/// Sends an ICMP error and checks it reaches `client` from `outer_src`, quoting the client's
/// packet to the frontend (`client` -> `fe`, TCP, sequence `seq`).
#[track_caller]
fn translated_error(
    fx: &TcFixture,
    error: Packet,
    outer_src: IpAddr,
    (client, fe, seq): (SocketAddr, SocketAddr, u32),
    what: &str,
) {
    let before = fx.counters().unwrap();
    let (sent, _, out) = inject(fx, error);
    let got = expect_redirect(&out, what);
    assert_eq!(
        (got.src, got.dst),
        (outer_src, client.ip()),
        "{what}: outer (source, destination)"
    );
    let sent_icmp = sent.icmp_message().unwrap();
    let got_icmp = got
        .icmp_message()
        .unwrap_or_else(|| panic!("{what}: not ICMP: {got:?}"));
    assert_eq!(
        (got_icmp.kind, got_icmp.code, got_icmp.rest),
        (sent_icmp.kind, sent_icmp.code, sent_icmp.rest),
        "{what}: ICMP type, code and MTU"
    );
    let quoted = got.quoted().unwrap();
    assert_eq!(
        (
            sa(quoted.src, quoted.sport),
            sa(quoted.dst, quoted.dport),
            quoted.protocol,
            quoted.seq
        ),
        (client, fe, TCP, Some(seq)),
        "{what}: quoted (source, destination, protocol, seq)"
    );
    assert_eq!(
        got_icmp.body.len(),
        sent_icmp.body.len(),
        "{what}: quote length changed"
    );
    let macs = macs_to(client.ip()).unwrap();
    assert_eq!((got.src_mac, got.dst_mac), macs, "{what}: MACs (src, dst)");
    fx.counters()
        .unwrap()
        .since(&before)
        .assert_moved(&[(reason::TC_ICMP_ERROR_TRANSLATED, 1)], what);
}

/// ICMP errors about a tracked flow reach the client translated: the quoted packet, the outer
/// destination, and the outer source when the backend itself sent the error.
#[test]
fn icmp_errors_about_tracked_flows_are_translated() {
    require_root!();
    for family in Family::ALL {
        for snat in [true, false] {
            let flow_kind = if snat { "masqueraded" } else { "unmasqueraded" };
            let mut fx = fixture();
            fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
            let fe = sa(family.node(), 30080);
            let pool = backends(family, &[2], 8080, 1201);
            let np = service_flags::NODE_PORT;
            if snat {
                fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 130, np, &pool))
                    .unwrap();
            } else {
                let flags = np | service_flags::EXTERNAL_LOCAL;
                fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 130, flags, &pool))
                    .unwrap();
                fx.add_frontend(&frontend(fe, TCP, scope::LOCAL, 130, np, &pool))
                    .unwrap();
            }
            let client = sa(family.client(), 40400);
            let expect = NewFlow {
                backends: &pool,
                snat: snat.then_some(SNAT_PORTS),
                rev_nat_id: 130,
                counters: NEW_FLOW,
            };
            let syn = Packet::tcp(client, fe, SYN, 1000, 0);
            let (backend, translated) = new_flow(&fx, syn, &expect, flow_kind);
            let towards_backend = translated.src_socket();
            let synack = Packet::tcp(backend.addr, towards_backend, SYN | ACK, 9000, 1001);
            reply(&fx, synack, fe, client, flow_kind);
            // What the node sent the backend, as an error about it quotes it.
            let sent_on = Packet::tcp(towards_backend, backend.addr, ACK | PSH, 1001, 9001)
                .with_payload(&[1; 100])
                .with_ttl(63)
                .to_ip();
            let from_backend = mtu_error(family, backend.addr.ip(), towards_backend.ip(), &sent_on);
            let what = format!("{family:?} {flow_kind} flow, ICMP error from the backend");
            translated_error(&fx, from_backend, fe.ip(), (client, fe, 1001), &what);
            let router = family.router();
            let from_router = mtu_error(family, router, towards_backend.ip(), &sent_on);
            let what = format!("{family:?} {flow_kind} flow, ICMP error from a router");
            translated_error(&fx, from_router, router, (client, fe, 1001), &what);

            // An error about a flow nobody tracks passes untouched.
            let unknown = Packet::tcp(sa(family.masq(), 12345), backend.addr, ACK, 1, 1).to_ip();
            let error = mtu_error(family, backend.addr.ip(), family.masq(), &unknown);
            let what = format!("{family:?} ICMP error about an untracked flow");
            pass(&fx, error, &what);
        }
    }
}

/// SNAT ports: distinct for live flows to one backend; none free drops the new flow; the
/// port of an expired flow is reused.
#[test]
fn snat_ports_are_unique_per_backend() {
    require_root!();
    let range = (50_000, 50_001);
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} SNAT ports: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, range)).unwrap();
        let fe = sa(family.node(), 30080);
        let pool = backends(family, &[2], 8080, 1301);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            140,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let expect = NewFlow {
            backends: &pool,
            snat: Some(range),
            rev_nat_id: 140,
            counters: NEW_FLOW,
        };
        let a = sa(family.client(), 40000);
        let b = sa(family.remote(7), 40000);
        let c = sa(family.remote(8), 40000);
        let (_, to_a) = new_flow(&fx, Packet::tcp(a, fe, SYN, 1, 0), &expect, &what("flow A"));
        let (_, to_b) = new_flow(&fx, Packet::tcp(b, fe, SYN, 1, 0), &expect, &what("flow B"));
        let (port_a, port_b) = (to_a.src_socket().port(), to_b.src_socket().port());
        assert_ne!(port_a, port_b, "{}", what("two live flows share a port"));

        drop_with(
            &fx,
            Packet::tcp(c, fe, SYN, 1, 0),
            reason::TC_SNAT_EXHAUSTED,
            &what("flow C with every port taken"),
        );
        assert!(fx.ct(&Tuple::new(c, fe, TCP)).unwrap().is_none());

        // Flow A ends; its port comes back once its entries are gone (the agent's conntrack GC
        // removes expired flows with their reply entries).
        let flow_a = Tuple::new(a, fe, TCP);
        let entry = forward_entry(&fx, flow_a);
        fx.ct_delete(&flow_a).unwrap();
        fx.ct_delete(&Tuple::new(entry.dst, entry.src, TCP))
            .unwrap();
        let (_, to_c) = new_flow(
            &fx,
            Packet::tcp(c, fe, SYN, 1, 0),
            &expect,
            &what("flow C after A expired"),
        );
        assert_eq!(
            to_c.src_socket().port(),
            port_a,
            "{}",
            what("C did not get A's port")
        );
        let back = Packet::tcp(pool[0].addr, to_c.src_socket(), SYN | ACK, 1, 2);
        reply(
            &fx,
            back,
            fe,
            c,
            &what("reply on the reused port goes to C"),
        );
    }
}

/// A backend whose neighbour the FIB does not know is left to bpf_redirect_neigh: the packet
/// is translated and redirected with its MACs untouched.
#[test]
fn fib_unresolved_neighbour_uses_redirect_neigh() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30084);
        let unresolved = backends(family, &[net::UNRESOLVED_HOST], 8080, 1401);
        let np = service_flags::NODE_PORT;
        fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 150, np, &unresolved))
            .unwrap();
        let expect = NewFlow {
            backends: &unresolved,
            snat: Some(SNAT_PORTS),
            rev_nat_id: 150,
            counters: NEW_FLOW,
        };
        let syn = Packet::tcp(sa(family.client(), 40500), fe, SYN, 1, 0);
        let what = format!("{family:?} backend without a neighbour entry");
        new_flow(&fx, syn, &expect, &what);
    }
}

/// A frontend whose only backend no route reaches.
fn unrouted_backend(family: Family) -> [Backend; 1] {
    [Backend {
        id: 1402,
        addr: sa(family.unrouted(), 8080),
    }]
}

/// No route to the backend of a masqueraded flow: the packet is dropped (TC_FIB_FAILED).
#[test]
fn fib_no_route_drops_masqueraded_flows() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30085);
        let np = service_flags::NODE_PORT;
        let unrouted = unrouted_backend(family);
        fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, 151, np, &unrouted))
            .unwrap();
        let syn = Packet::tcp(sa(family.client(), 40501), fe, SYN, 1, 0);
        let what = format!("{family:?} no route to the backend, masqueraded");
        drop_with(&fx, syn, reason::TC_FIB_FAILED, &what);
        assert_no_ct(&fx, family, &what);
    }
}

/// The FIB does not forward the translated packet of an unmasqueraded flow (no route, or the
/// destination is this node: a host-network endpoint): it is translated and handed to the stack
/// (TC_ACT_OK), which delivers or drops it; its source is the client's, never a martian.
#[test]
fn fib_not_forwarded_unmasqueraded_flows_go_to_the_stack_translated() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let vip = sa(family.cluster_ip(), 80);
        let cip = service_flags::CLUSTER_IP;
        let unrouted = unrouted_backend(family);
        fx.add_frontend(&frontend(vip, TCP, scope::EXTERNAL, 152, cip, &unrouted))
            .unwrap();
        let client = sa(family.pod(), 40502);
        let syn = Packet::tcp(client, vip, SYN, 1, 0);
        let what = format!("{family:?} no route to the backend, unmasqueraded");
        let (_, _, out) = inject(&fx, syn);
        assert_eq!(out.code, 0, "{what}: return code");
        if let Err(e) = verify_checksums(&out.data) {
            panic!("{what}: {e:#}");
        }
        let got = out.packet();
        assert_eq!(
            (got.src_socket(), got.dst_socket()),
            (client, unrouted[0].addr),
            "{what}: translated (source kept)"
        );
    }
}

/// The service-CIDR guard on the TC path (nftables mode): with the agent's entries (the
/// ServiceCIDR, the active ClusterIP, another proxy's ClusterIP), a packet to a port the
/// ClusterIP does not serve is refused (RST, ICMP port unreachable), one to an address of the
/// ServiceCIDR that no Service holds is dropped, and the rest passes untouched; the Service's
/// own port is still translated.
#[test]
fn the_service_cidr_guard_refuses_other_ports_and_drops_unallocated_addresses() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let vip = sa(family.cluster_ip(), 80);
        let pool = backends(family, &[2], 8080, 901);
        fx.add_frontend(&frontend(
            vip,
            TCP,
            scope::EXTERNAL,
            92,
            service_flags::CLUSTER_IP,
            &pool,
        ))
        .unwrap();
        let (cidr_prefix, host_prefix) = if family.is_v6() { (112, 128) } else { (24, 32) };
        fx.add_guard(family.cluster_ip(), cidr_prefix, guard_flags::SERVICE_CIDR)
            .unwrap();
        fx.add_guard(family.cluster_ip(), host_prefix, guard_flags::CLUSTER_IP)
            .unwrap();
        let other = match family.cluster_ip() {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) + 1)),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) + 1)),
        };
        let unallocated = match family.cluster_ip() {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) + 2)),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) + 2)),
        };
        fx.add_guard(other, host_prefix, guard_flags::OTHER_PROXY)
            .unwrap();
        let client = sa(family.client(), 40090);

        // A port the ClusterIP does not serve: refused at once.
        let what = format!("{family:?} TCP to an undefined port");
        let before = fx.counters().unwrap();
        let (_, _, out) = inject(
            &fx,
            Packet::tcp(client, sa(family.cluster_ip(), 81), SYN, 1, 0),
        );
        let got = expect_redirect(&out, &what);
        let tcp = got.tcp_header().expect("a TCP RST");
        assert_eq!(tcp.flags, RST | ACK, "{what}");
        assert_eq!(got.dst_socket(), client, "{what}");
        fx.counters().unwrap().since(&before).assert_moved(
            &[(reason::TC_GUARD_REJECTED, 1), (reason::TC_REJECTED, 1)],
            &what,
        );
        let what = format!("{family:?} UDP to an undefined port");
        let before = fx.counters().unwrap();
        let (_, _, out) = inject(&fx, Packet::udp(client, sa(family.cluster_ip(), 53), b"q"));
        let got = expect_redirect(&out, &what);
        assert_eq!(got.dst, client.ip(), "{what}: ICMP back to the client");
        assert!(got.icmp_message().is_some(), "{what}: an ICMP error");
        fx.counters().unwrap().since(&before).assert_moved(
            &[(reason::TC_GUARD_REJECTED, 1), (reason::TC_REJECTED, 1)],
            &what,
        );

        // An address of the ServiceCIDR that no Service holds: dropped.
        drop_with(
            &fx,
            Packet::tcp(client, sa(unallocated, 80), SYN, 1, 0),
            reason::TC_GUARD_DROPPED,
            &format!("{family:?} unallocated service address"),
        );
        // Another proxy's ClusterIP, and addresses outside the ServiceCIDR: untouched.
        pass(
            &fx,
            Packet::tcp(client, sa(other, 80), SYN, 1, 0),
            &format!("{family:?} another proxy's ClusterIP"),
        );
        pass(
            &fx,
            Packet::tcp(client, sa(family.remote(7), 80), SYN, 1, 0),
            &format!("{family:?} outside the ServiceCIDR"),
        );
        assert_no_ct(&fx, family, &format!("{family:?} guarded traffic"));
        // The Service's own port is still a Service.
        let before = fx.counters().unwrap();
        let (_, _, out) = inject(&fx, Packet::tcp(client, vip, SYN, 1, 0));
        expect_redirect(&out, &format!("{family:?} the Service's port"));
        assert_eq!(
            fx.counters()
                .unwrap()
                .since(&before)
                .get(reason::TC_NEW_FLOW),
            1
        );
    }
}

/// A NodePort (eTP Cluster) with one backend for the conntrack-hardening tests; returns the
/// frontend and the backend.
fn one_backend_nodeport(
    fx: &mut TcFixture,
    family: Family,
    port: u16,
    rev_nat_id: u32,
) -> (SocketAddr, Backend) {
    fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
    let fe = sa(family.node(), port);
    let pool = backends(family, &[2], 8080, rev_nat_id * 10);
    fx.add_frontend(&frontend(
        fe,
        TCP,
        scope::EXTERNAL,
        rev_nat_id,
        service_flags::NODE_PORT,
        &pool,
    ))
    .unwrap();
    (fe, pool[0])
}

/// Opens a masqueraded TCP flow: SYN (client seq 1000), SYN-ACK (backend seq 9000), ACK, and
/// 100 bytes from the client. Returns the node's side towards the backend.
fn established(
    fx: &TcFixture,
    fe: SocketAddr,
    client: SocketAddr,
    backend: Backend,
    what: &dyn Fn(&str) -> String,
) -> SocketAddr {
    let (_, _, out) = inject(fx, Packet::tcp(client, fe, SYN, 1000, 0));
    let translated = expect_redirect(&out, &what("SYN"));
    assert_eq!(translated.dst_socket(), backend.addr, "{}", what("SYN"));
    let masq = translated.src_socket();
    reply(
        fx,
        Packet::tcp(backend.addr, masq, SYN | ACK, 9000, 1001),
        fe,
        client,
        &what("SYN-ACK"),
    );
    forward(
        fx,
        Packet::tcp(client, fe, ACK, 1001, 9001),
        masq,
        backend.addr,
        &what("ACK"),
    );
    let data = Packet::tcp(client, fe, ACK | PSH, 1001, 9001).with_payload(&[7; 100]);
    forward(fx, data, masq, backend.addr, &what("100 bytes"));
    masq
}

/// The sequence ends a flow's reply entry holds (client, backend) and its flags.
fn sequence_ends(fx: &TcFixture, reply_key: Tuple) -> (u32, u32, u16) {
    let entry = fx.ct(&reply_key).unwrap().expect("reply entry");
    let (client, backend) = proxy_common::ct_seq::split(entry.expires_ns);
    (
        client,
        backend,
        entry.flags & (ct_flags::SEQ_FORWARD | ct_flags::SEQ_REPLY),
    )
}

/// Sequence ends follow the flow; a RST outside its sender's sequence space (from either
/// side) is dropped and changes nothing; a RST in it closes the flow; a RST refusing a SYN
/// must acknowledge exactly the SYN.
#[test]
fn rst_changes_state_only_inside_the_sequence_space() {
    require_root!();
    let far = 1u32 << 25;
    for family in Family::ALL {
        for from_client in [true, false] {
            let what = |step: &str| {
                format!(
                    "{family:?} RST from the {}: {step}",
                    if from_client { "client" } else { "backend" }
                )
            };
            let mut fx = fixture();
            let (fe, backend) = one_backend_nodeport(&mut fx, family, 30090, 150);
            let client = sa(family.client(), 40300);
            let masq = established(&fx, fe, client, backend, &what);
            let flow_key = Tuple::new(client, fe, TCP);
            let reply_key = Tuple::new(backend.addr, masq, TCP);
            assert_eq!(
                sequence_ends(&fx, reply_key),
                (1101, 9001, ct_flags::SEQ_FORWARD | ct_flags::SEQ_REPLY),
                "{}",
                what("sequence ends after the handshake and 100 bytes")
            );
            let entry = forward_entry(&fx, flow_key);
            let rst = |seq: u32| {
                if from_client {
                    Packet::tcp(client, fe, RST | ACK, seq, 9001)
                } else {
                    Packet::tcp(backend.addr, masq, RST, seq, 0)
                }
            };
            let end = if from_client { 1101u32 } else { 9001 };
            for (seq, case) in [
                (end.wrapping_add(1), "one past the end"),
                (end.wrapping_add(far), "far ahead"),
                (end.wrapping_sub(far), "far behind"),
                (end ^ 0x8000_0000, "half the space away"),
            ] {
                drop_with(&fx, rst(seq), reason::TC_RST_OUT_OF_WINDOW, &what(case));
                assert_eq!(forward_entry(&fx, flow_key), entry, "{}", what(case));
            }
            // The flow still works both ways.
            forward(
                &fx,
                Packet::tcp(client, fe, ACK, 1101, 9001),
                masq,
                backend.addr,
                &what("ACK after the spoofed RSTs"),
            );
            reply(
                &fx,
                Packet::tcp(backend.addr, masq, ACK, 9001, 1101),
                fe,
                client,
                &what("reply after the spoofed RSTs"),
            );
            // A RST a little behind the end (the peer's last acknowledgment) is in the window.
            let seq = end.wrapping_sub(50);
            if from_client {
                forward(&fx, rst(seq), masq, backend.addr, &what("in-window RST"));
            } else {
                reply(&fx, rst(seq), fe, client, &what("in-window RST"));
            }
            let closed = forward_entry(&fx, flow_key);
            assert_ne!(
                closed.flags & ct_flags::RST,
                0,
                "{}",
                what("in-window RST closes")
            );
        }

        // A RST refusing the SYN (the backend has sent nothing yet) must acknowledge the SYN.
        let what = |step: &str| format!("{family:?} refused SYN: {step}");
        let mut fx = fixture();
        let (fe, backend) = one_backend_nodeport(&mut fx, family, 30091, 151);
        let client = sa(family.client(), 40301);
        let (_, _, out) = inject(&fx, Packet::tcp(client, fe, SYN, 5000, 0));
        let masq = expect_redirect(&out, &what("SYN")).src_socket();
        drop_with(
            &fx,
            Packet::tcp(backend.addr, masq, RST | ACK, 0, 777),
            reason::TC_RST_OUT_OF_WINDOW,
            &what("RST acknowledging something else"),
        );
        reply(
            &fx,
            Packet::tcp(backend.addr, masq, RST | ACK, 0, 5001),
            fe,
            client,
            &what("RST acknowledging the SYN"),
        );
        let entry = forward_entry(&fx, Tuple::new(client, fe, TCP));
        assert_ne!(entry.flags & ct_flags::RST, 0, "{}", what("closed"));
    }
}

/// A masqueraded flow keeps its client's source port when it lies in the SNAT range and is
/// free; a second client with the same port gets another one.
#[test]
fn snat_keeps_the_client_port_when_it_is_free() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} kept port: {step}");
        let mut fx = fixture();
        let (fe, backend) = one_backend_nodeport(&mut fx, family, 30092, 152);
        let pool = [backend];
        let port = SNAT_PORTS.0 + 500;
        let expect = NewFlow {
            backends: &pool,
            snat: Some(SNAT_PORTS),
            rev_nat_id: 152,
            counters: &[(reason::TC_NEW_FLOW, 1), (reason::TC_SNAT_PORT_KEPT, 1)],
        };
        let a = sa(family.client(), port);
        let (_, to_a) = new_flow(
            &fx,
            Packet::tcp(a, fe, SYN, 1, 0),
            &expect,
            &what("client A"),
        );
        assert_eq!(to_a.src_socket().port(), port, "{}", what("A's port"));
        let expect = NewFlow {
            counters: &[(reason::TC_NEW_FLOW, 1), (reason::TC_SNAT_PORT_KEPT, 0)],
            ..expect
        };
        let b = sa(family.remote(9), port);
        let (_, to_b) = new_flow(
            &fx,
            Packet::tcp(b, fe, SYN, 1, 0),
            &expect,
            &what("client B, same port"),
        );
        assert_ne!(
            to_b.src_socket().port(),
            port,
            "{}",
            what("B shares A's port")
        );
        // Outside the range: a port from the range.
        let c = sa(family.remote(10), 40_000);
        let (_, to_c) = new_flow(
            &fx,
            Packet::tcp(c, fe, SYN, 1, 0),
            &expect,
            &what("client C, port outside the range"),
        );
        assert_ne!(to_c.src_socket().port(), 40_000, "{}", what("C's port"));
    }
}

/// How a flow of the reuse test ends.
#[derive(Clone, Copy, Debug)]
enum End {
    Fins,
    Rst,
    UdpLifetime,
}

/// With every SNAT port taken, a new flow gets the port of a flow that ended (both FINs, a
/// RST, a UDP flow past its lifetime) from the datapath alone; while the flows live, none.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one table over every way a flow can end, both families"
)]
fn snat_ports_of_ended_flows_return_in_the_datapath() {
    require_root!();
    let range = (50_000, 50_001);
    for family in Family::ALL {
        for end in [End::Fins, End::Rst, End::UdpLifetime] {
            let what = |step: &str| format!("{family:?} {end:?}: {step}");
            let protocol = if matches!(end, End::UdpLifetime) {
                UDP
            } else {
                TCP
            };
            let mut fx = fixture();
            fx.set_config(&cluster_config(0, range)).unwrap();
            let fe = sa(family.node(), 30093);
            let pool = backends(family, &[2], 8080, 1601);
            fx.add_frontend(&frontend(
                fe,
                protocol,
                scope::EXTERNAL,
                160,
                service_flags::NODE_PORT,
                &pool,
            ))
            .unwrap();
            let first = |client: SocketAddr| {
                if protocol == TCP {
                    Packet::tcp(client, fe, SYN, 1000, 0)
                } else {
                    Packet::udp(client, fe, b"q")
                }
            };
            let expect = NewFlow {
                backends: &pool,
                snat: Some(range),
                rev_nat_id: 160,
                counters: NEW_FLOW,
            };
            let a = sa(family.client(), 40000);
            let b = sa(family.remote(7), 40000);
            let c = sa(family.remote(8), 40000);
            let (_, to_a) = new_flow(&fx, first(a), &expect, &what("flow A"));
            new_flow(&fx, first(b), &expect, &what("flow B"));
            drop_with(
                &fx,
                first(c),
                reason::TC_SNAT_EXHAUSTED,
                &what("flow C, every port live"),
            );
            let masq_a = to_a.src_socket();
            let backend = pool[0].addr;
            match end {
                End::Fins => {
                    reply(
                        &fx,
                        Packet::tcp(backend, masq_a, SYN | ACK, 9000, 1001),
                        fe,
                        a,
                        &what("SYN-ACK"),
                    );
                    forward(
                        &fx,
                        Packet::tcp(a, fe, FIN | ACK, 1001, 9001),
                        masq_a,
                        backend,
                        &what("client FIN"),
                    );
                    reply(
                        &fx,
                        Packet::tcp(backend, masq_a, FIN | ACK, 9001, 1002),
                        fe,
                        a,
                        &what("backend FIN"),
                    );
                }
                End::Rst => {
                    reply(
                        &fx,
                        Packet::tcp(backend, masq_a, SYN | ACK, 9000, 1001),
                        fe,
                        a,
                        &what("SYN-ACK"),
                    );
                    forward(
                        &fx,
                        Packet::tcp(a, fe, RST, 1001, 0),
                        masq_a,
                        backend,
                        &what("client RST"),
                    );
                }
                End::UdpLifetime => {
                    let key = Tuple::new(a, fe, UDP);
                    let mut entry = forward_entry(&fx, key);
                    entry.expires_ns = 1;
                    fx.ct_put(&key, &entry).unwrap();
                }
            }
            let expect = NewFlow {
                counters: &[(reason::TC_NEW_FLOW, 1), (reason::TC_SNAT_PORT_REUSED, 1)],
                ..expect
            };
            let (_, to_c) = new_flow(&fx, first(c), &expect, &what("flow C after A ended"));
            assert_eq!(
                to_c.src_socket(),
                masq_a,
                "{}",
                what("C did not get A's port")
            );
            let answer = if protocol == TCP {
                Packet::tcp(backend, masq_a, SYN | ACK, 1, 1001)
            } else {
                Packet::udp(backend, masq_a, b"a")
            };
            reply(&fx, answer, fe, c, &what("the reused port answers C"));
        }
    }
}

/// Two frontends reaching the same backend without masquerade (externalTrafficPolicy Local)
/// from the same client port would share one reply tuple: the first keeps its reply entry,
/// the second keeps the client's address with another port, and both are answered.
#[test]
fn a_live_reply_entry_is_never_overwritten() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} reply collision: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let local = backends(family, &[4], 8080, 1701);
        let local_flags = service_flags::NODE_PORT | service_flags::EXTERNAL_LOCAL;
        let first_fe = sa(family.node(), 30094);
        let second_fe = sa(family.node(), 30095);
        for (fe, id) in [(first_fe, 170), (second_fe, 171)] {
            fx.add_frontend(&frontend(fe, TCP, scope::EXTERNAL, id, local_flags, &local))
                .unwrap();
            fx.add_frontend(&frontend(
                fe,
                TCP,
                scope::LOCAL,
                id,
                service_flags::NODE_PORT,
                &local,
            ))
            .unwrap();
        }
        let client = sa(family.remote(7), 40400);
        let expect = NewFlow {
            backends: &local,
            snat: None,
            rev_nat_id: 170,
            counters: NEW_FLOW,
        };
        new_flow(
            &fx,
            Packet::tcp(client, first_fe, SYN, 1000, 0),
            &expect,
            &what("first flow"),
        );
        let reply_key = Tuple::new(local[0].addr, client, TCP);
        let owned = fx.ct(&reply_key).unwrap();
        // The second flow's own tuple is live: it keeps the client's address with a port of
        // the SNAT range, as netfilter's NAT resolves a clash.
        let before = fx.counters().expect("counters");
        let (sent, _, out) = inject(&fx, Packet::tcp(client, second_fe, SYN, 1000, 0));
        let got = expect_redirect(&out, &what("second flow"));
        assert_eq!(got.dst_socket(), local[0].addr, "{}", what("second flow"));
        assert_eq!(
            got.src,
            sent.src,
            "{}",
            what("the client's address is kept")
        );
        let remapped = got.src_socket();
        assert!(
            remapped.port() != client.port()
                && (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&remapped.port()),
            "{}: port {remapped}",
            what("remapped into the SNAT range")
        );
        fx.counters()
            .expect("counters")
            .since(&before)
            .assert_moved(
                &[
                    (reason::TC_NEW_FLOW, 1),
                    (reason::TC_CLIENT_PORT_REMAPPED, 1),
                ],
                &what("second flow"),
            );
        assert_eq!(
            fx.ct(&reply_key).unwrap(),
            owned,
            "{}",
            what("the reply entry was overwritten")
        );
        // Each flow's answers go back to the client's own port from its own frontend.
        reply(
            &fx,
            Packet::tcp(local[0].addr, client, SYN | ACK, 9000, 1001),
            first_fe,
            client,
            &what("first flow's SYN-ACK"),
        );
        reply(
            &fx,
            Packet::tcp(local[0].addr, remapped, SYN | ACK, 7000, 1001),
            second_fe,
            client,
            &what("second flow's SYN-ACK"),
        );
    }
}

/// A service without endpoints never answers a RST, nor a packet from or to a broadcast or
/// multicast address (dropped and counted).
#[test]
fn refusals_are_never_sent_to_resets_or_groups() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} suppressed refusal: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30096);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            180,
            service_flags::NODE_PORT,
            &[],
        ))
        .unwrap();
        fx.add_frontend(&frontend(
            fe,
            UDP,
            scope::EXTERNAL,
            181,
            service_flags::NODE_PORT,
            &[],
        ))
        .unwrap();
        let client = sa(family.client(), 40500);
        for flags in [RST, RST | ACK] {
            let before = fx.counters().unwrap();
            let (_, _, out) = inject(&fx, Packet::tcp(client, fe, flags, 1, 1));
            expect_shot(&out, &what("RST"));
            fx.counters().unwrap().since(&before).assert_moved(
                &[(reason::TC_REJECT_SUPPRESSED, 1), (reason::TC_REJECTED, 0)],
                &what("RST"),
            );
        }
        let group_source = family.ip(Ipv4Addr::new(224, 0, 0, 9), "ff02::9".parse().unwrap());
        let broadcast_source = family.ip(Ipv4Addr::BROADCAST, Ipv6Addr::UNSPECIFIED);
        for (packet, case) in [
            (
                Packet::tcp(sa(group_source, 40500), fe, SYN, 1, 0),
                "TCP from a multicast address",
            ),
            (
                Packet::udp(sa(group_source, 40500), fe, b"q"),
                "UDP from a multicast address",
            ),
            (
                Packet::udp(sa(broadcast_source, 68), fe, b"q"),
                "UDP from the broadcast or unspecified address",
            ),
        ] {
            let before = fx.counters().unwrap();
            let (_, _, out) = inject(&fx, packet);
            expect_shot(&out, &what(case));
            fx.counters().unwrap().since(&before).assert_moved(
                &[(reason::TC_REJECT_SUPPRESSED, 1), (reason::TC_REJECTED, 0)],
                &what(case),
            );
        }
        // A unicast packet in a broadcast or multicast frame.
        for dst_mac in [
            [0xff; 6],
            [0x33, 0x33, 0, 0, 0, 1],
            [0x01, 0x00, 0x5e, 0, 0, 1],
        ] {
            let frame = Packet::udp(client, fe, b"q")
                .with_macs(net::CLIENT_MAC, dst_mac)
                .to_frame();
            let before = fx.counters().unwrap();
            let out = fx.run(&frame).unwrap();
            expect_shot(&out, &what("group frame"));
            fx.counters().unwrap().since(&before).assert_moved(
                &[(reason::TC_REJECT_SUPPRESSED, 1), (reason::TC_REJECTED, 0)],
                &what("group frame"),
            );
        }
        // A plain SYN is still refused.
        let (_, _, out) = inject(&fx, Packet::tcp(client, fe, SYN, 1, 0));
        let got = expect_redirect(&out, &what("SYN"));
        assert_eq!(
            got.tcp_header().expect("a RST").flags,
            RST | ACK,
            "{}",
            what("SYN")
        );
    }
}

/// Refusals come out of a per-CPU token bucket: a burst of `reject_limit::BURST`, then
/// `reject_limit::PER_SEC` a second; the rest are dropped and counted.
#[test]
fn refusals_are_rate_limited() {
    use proxy_common::reject_limit::{BURST, PER_SEC};
    require_root!();
    for family in Family::ALL {
        let what = format!("{family:?} refusal rate limit");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30097);
        fx.add_frontend(&frontend(
            fe,
            TCP,
            scope::EXTERNAL,
            190,
            service_flags::NODE_PORT,
            &[],
        ))
        .unwrap();
        let attempts = BURST * 3;
        // Test runs execute on the calling thread's CPU, and each CPU has its own bucket:
        // keep the thread on one CPU meanwhile.
        let _pinned = PinnedToOneCpu::new();
        let before = fx.counters().unwrap();
        let started = std::time::Instant::now();
        let mut bounced = 0;
        for n in 0..attempts {
            let client = sa(family.client(), 41_000 + u16::try_from(n).unwrap());
            let (_, _, out) = inject(&fx, Packet::tcp(client, fe, SYN, 1, 0));
            if out.code == TC_ACT_REDIRECT {
                bounced += 1;
            } else {
                expect_shot(&out, &what);
            }
        }
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap();
        let moved = fx.counters().unwrap().since(&before);
        let refill = elapsed_ms * PER_SEC / 1000 + 1;
        assert!(
            (BURST..=BURST + refill).contains(&bounced),
            "{what}: {bounced} refusals sent of {attempts} in {elapsed_ms} ms (burst {BURST}, {PER_SEC}/s); counters {moved}"
        );
        assert_eq!(moved.get(reason::TC_REJECTED), bounced, "{what}: {moved}");
        assert_eq!(
            moved.get(reason::TC_REJECT_RATE_LIMITED),
            attempts - bounced,
            "{what}: {moved}"
        );
    }
}

/// Keeps the calling thread on the CPU it runs on until dropped (then on its former set).
struct PinnedToOneCpu(nix::sched::CpuSet);

impl PinnedToOneCpu {
    fn new() -> Self {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let former = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
        let cpu = nix::sched::sched_getcpu().expect("sched_getcpu");
        let mut one = CpuSet::new();
        one.set(cpu).expect("a CPU number within the set");
        sched_setaffinity(Pid::from_raw(0), &one).expect("sched_setaffinity");
        Self(former)
    }
}

impl Drop for PinnedToOneCpu {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// Whether both entries of a flow are in the map of unconfirmed flows (`true`) or in the main
/// map (`false`); panics if they are apart or missing.
#[track_caller]
fn flow_map(fx: &TcFixture, forward_key: Tuple, reply_key: Tuple, what: &str) -> bool {
    let (_, forward) = fx
        .ct_in(&forward_key)
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: no forward entry {forward_key}"));
    let (_, reply) = fx
        .ct_in(&reply_key)
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: no reply entry {reply_key}"));
    assert_eq!(
        forward, reply,
        "{what}: the flow's entries are in different maps"
    );
    forward
}

/// A new flow's entries go to the map of unconfirmed flows and work from there; a TCP flow
/// moves to the main map when the client acknowledges exactly the backend's SYN-ACK (not on a
/// blind ACK), a UDP flow on its first reply.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "the TCP handshake and a UDP exchange, step by step"
)]
fn flows_move_to_the_main_map_once_both_sides_have_spoken() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} promotion: {step}");
        let mut fx = fixture();
        let (fe, backend) = one_backend_nodeport(&mut fx, family, 30098, 200);
        let b = backend.addr;
        let client = sa(family.client(), 40600);
        let (_, _, out) = inject(&fx, Packet::tcp(client, fe, SYN, 1000, 0));
        let masq = expect_redirect(&out, &what("SYN")).src_socket();
        let forward_key = Tuple::new(client, fe, TCP);
        let reply_key = Tuple::new(b, masq, TCP);
        assert!(flow_map(
            &fx,
            forward_key,
            reply_key,
            &what("after the SYN")
        ));
        reply(
            &fx,
            Packet::tcp(b, masq, SYN | ACK, 9000, 1001),
            fe,
            client,
            &what("SYN-ACK"),
        );
        assert!(flow_map(
            &fx,
            forward_key,
            reply_key,
            &what("after the SYN-ACK")
        ));
        forward(
            &fx,
            Packet::tcp(client, fe, ACK, 1001, 1234),
            masq,
            b,
            &what("blind ACK"),
        );
        assert!(
            flow_map(&fx, forward_key, reply_key, &what("after a blind ACK")),
            "{}",
            what("a blind ACK must not confirm the flow")
        );
        forward(
            &fx,
            Packet::tcp(client, fe, ACK, 1001, 9001),
            masq,
            b,
            &what("ACK"),
        );
        assert!(
            !flow_map(&fx, forward_key, reply_key, &what("after the ACK")),
            "{}",
            what("the handshake's ACK must confirm the flow")
        );
        let entry = forward_entry(&fx, forward_key);
        assert_eq!(
            entry.flags,
            ct_flags::SNAT | ct_flags::SEEN_REPLY,
            "{}",
            what("state")
        );
        // Still translated both ways from the main map.
        forward(
            &fx,
            Packet::tcp(client, fe, ACK | PSH, 1001, 9001).with_payload(b"x"),
            masq,
            b,
            &what("data"),
        );
        reply(
            &fx,
            Packet::tcp(b, masq, ACK, 9001, 1002),
            fe,
            client,
            &what("data ACK"),
        );
        assert_eq!(
            sequence_ends(&fx, reply_key),
            (1002, 9001, ct_flags::SEQ_FORWARD | ct_flags::SEQ_REPLY),
            "{}",
            what("sequence ends carried to the main map")
        );

        // UDP: the first reply confirms.
        let udp_fe = sa(family.node(), 30099);
        let pool = [Backend {
            id: 2001,
            addr: sa(family.host(3), 53),
        }];
        fx.add_frontend(&frontend(
            udp_fe,
            UDP,
            scope::EXTERNAL,
            201,
            service_flags::NODE_PORT,
            &pool,
        ))
        .unwrap();
        let (_, _, out) = inject(&fx, Packet::udp(client, udp_fe, b"q"));
        let udp_masq = expect_redirect(&out, &what("UDP query")).src_socket();
        let forward_key = Tuple::new(client, udp_fe, UDP);
        let reply_key = Tuple::new(pool[0].addr, udp_masq, UDP);
        assert!(flow_map(
            &fx,
            forward_key,
            reply_key,
            &what("after the query")
        ));
        reply(
            &fx,
            Packet::udp(pool[0].addr, udp_masq, b"a"),
            udp_fe,
            client,
            &what("UDP answer"),
        );
        assert!(!flow_map(
            &fx,
            forward_key,
            reply_key,
            &what("after the answer")
        ));
    }
}

/// A SYN flood (many more new flows than the map of unconfirmed flows holds) evicts only
/// unconfirmed flows: an established flow stays in the main map and keeps working.
#[test]
fn a_syn_flood_never_evicts_an_established_flow() {
    const UNREPLIED: u32 = 256;
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} SYN flood: {step}");
        let mut fx = TcFixture::with_capacities(&[
            (proxy_common::map_names::CT4_UNREPLIED, UNREPLIED),
            (proxy_common::map_names::CT6_UNREPLIED, UNREPLIED),
            (proxy_common::map_names::CT4, 64),
            (proxy_common::map_names::CT6, 64),
        ])
        .unwrap_or_else(|e| panic!("TC fixture: {e:#}"));
        let (fe, backend) = one_backend_nodeport(&mut fx, family, 30100, 210);
        let client = sa(family.client(), 40700);
        let masq = established(&fx, fe, client, backend, &what);
        forward(
            &fx,
            Packet::tcp(client, fe, ACK, 1101, 9001),
            masq,
            backend.addr,
            &what("confirming ACK"),
        );
        let forward_key = Tuple::new(client, fe, TCP);
        let reply_key = Tuple::new(backend.addr, masq, TCP);
        assert!(!flow_map(
            &fx,
            forward_key,
            reply_key,
            &what("before the flood")
        ));
        // Four times the unconfirmed map's capacity in flows, from spoofed sources.
        for n in 0..UNREPLIED * 2 {
            let host = u8::try_from(n % 200).unwrap() + 20;
            let port = 20_000 + u16::try_from(n).unwrap();
            let (_, _, out) = inject(
                &fx,
                Packet::tcp(sa(family.remote(host), port), fe, SYN, n, 0),
            );
            assert_eq!(out.code, TC_ACT_REDIRECT, "{}", what("flood SYN"));
        }
        assert!(
            !flow_map(&fx, forward_key, reply_key, &what("after the flood")),
            "{}",
            what("the established flow left the main map")
        );
        forward(
            &fx,
            Packet::tcp(client, fe, ACK | PSH, 1101, 9001).with_payload(b"still"),
            masq,
            backend.addr,
            &what("data after the flood"),
        );
        reply(
            &fx,
            Packet::tcp(backend.addr, masq, ACK, 9001, 1106),
            fe,
            client,
            &what("reply after the flood"),
        );
    }
}

/// A Maglev NodePort: each new flow goes to the backend the agent's table (built by the agent's
/// own code from the backends' addresses) gives the flow's hash, and different flows spread
/// over the backends. Until the agent has written the table's settings, flows go at random.
/// A mid-stream segment of a flow this node has never seen (its ingress node changed) is
/// picked up the same way: the node it moved to sends it to the same backend.
#[test]
fn maglev_nodeport_flows_go_where_the_agents_table_says() {
    use proxy_userspace::{maglev, model};
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} Maglev NodePort: {step}");
        let mut fx = fixture();
        fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
        let fe = sa(family.node(), 30080);
        let pool = backends(family, &[2, 3, 4, 5, 6], 8080, 101);
        let settings = maglev::Settings {
            table_size: 251,
            seed: proxy_common::maglev::seed_of("prog-test-run"),
        };
        let addrs: Vec<model::BackendAddr> = pool
            .iter()
            .map(|backend| model::BackendAddr {
                ip: backend.addr.ip(),
                port: backend.addr.port(),
                protocol: model::Protocol::Tcp,
            })
            .collect();
        let table = maglev::table(&addrs, settings).unwrap();
        let ids: Vec<u32> = table
            .iter()
            .map(|slot| pool[addrs.iter().position(|a| a == slot).unwrap()].id)
            .collect();
        fx.add_maglev_frontend(
            &frontend(
                fe,
                TCP,
                scope::EXTERNAL,
                10,
                service_flags::NODE_PORT,
                &pool,
            ),
            3,
            &ids,
            settings.seed,
        )
        .unwrap();
        let before = fx.counters().unwrap();
        let flows = 64u16;
        let mut chosen = std::collections::BTreeSet::new();
        for port in 0..flows {
            let client = sa(family.client(), 41_000 + port);
            let tuple = Tuple::new(client, fe, TCP);
            let hash = flow_hash(&tuple, settings.seed);
            let predicted = table[(hash % settings.table_size) as usize];
            // Every fourth flow arrives mid-stream (data, no SYN).
            let (segment, flags, ack) = if port % 4 == 3 {
                ("mid-stream ACK", ACK, 7000)
            } else {
                ("SYN", SYN, 0)
            };
            let (_, _, out) = inject(&fx, Packet::tcp(client, fe, flags, 1000, ack));
            let translated = expect_redirect(&out, &what(&format!("{segment} from port {port}")));
            assert_eq!(
                translated.dst_socket(),
                SocketAddr::new(predicted.ip, predicted.port),
                "{}",
                what(&format!("flow {tuple}"))
            );
            chosen.insert(translated.dst_socket());
        }
        assert!(chosen.len() >= 4, "{}: {chosen:?}", what("spread"));
        fx.counters().unwrap().since(&before).assert_moved(
            &[
                (reason::TC_NEW_FLOW, u64::from(flows)),
                (reason::TC_MAGLEV_PICKED, u64::from(flows)),
            ],
            &what("counters"),
        );
    }
}

/// The flow hash the datapath computes (`proxy_common::maglev`), from a test tuple: addresses
/// and ports as the packet carries them.
fn flow_hash(tuple: &Tuple, seed: u32) -> u32 {
    let (sport, dport) = (tuple.src.port().to_be(), tuple.dst.port().to_be());
    match (tuple.src.ip(), tuple.dst.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => proxy_common::maglev::flow_hash4(
            seed,
            proxy_common::Addr4::from_ip(src),
            proxy_common::Addr4::from_ip(dst),
            sport,
            dport,
            tuple.protocol,
        ),
        (IpAddr::V6(src), IpAddr::V6(dst)) => proxy_common::maglev::flow_hash6(
            seed,
            &proxy_common::Addr6::from_ip(src),
            &proxy_common::Addr6::from_ip(dst),
            sport,
            dport,
            tuple.protocol,
        ),
        _ => unreachable!("one family per tuple"),
    }
}
