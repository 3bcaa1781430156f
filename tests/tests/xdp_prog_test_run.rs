//! Table tests of the XDP fast path `sy_xdp_ingress` through BPF_PROG_TEST_RUN, against the
//! same maps as the TC program: flows are set up by TC (as on a node, where XDP passes their
//! first packets to it), then their packets go through XDP, which must translate them exactly
//! as TC would (every checksum verified), update the shared conntrack entries and counters,
//! and pass everything it does not handle untouched. IPv4 and IPv6 run the same tables.
//!
//! Run as root after `cargo xtask build`:
//! `cargo test --release -p switchyard-tests --test xdp_prog_test_run`.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{ct_flags, ct_lifetime, ct_seq, protocol, reason, scope, service_flags};
use switchyard_tests::datapath::packet::{L4, Mac, Packet, icmp, tcp_flags, verify_checksums};
use switchyard_tests::datapath::tc_fixture::{
    Backend, Frontend, Outcome, TC_ACT_REDIRECT, TcFixture, Tuple, XDP_PASS, XDP_REDIRECT,
    cluster_config, monotonic_ns, net,
};
use switchyard_tests::require_root;

const SEC: u64 = 1_000_000_000;
const SNAT_PORTS: (u16, u16) = (45_000, 45_999);
const TCP: u8 = protocol::TCP;
const UDP: u8 = protocol::UDP;
const SYN: u8 = tcp_flags::SYN;
const ACK: u8 = tcp_flags::ACK;
const PSH: u8 = tcp_flags::PSH;
const FIN: u8 = tcp_flags::FIN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Self; 2] = [Self::V4, Self::V6];

    fn node(self) -> IpAddr {
        match self {
            Self::V4 => net::NODE_V4.into(),
            Self::V6 => net::NODE_V6.into(),
        }
    }

    fn client(self) -> IpAddr {
        match self {
            Self::V4 => net::CLIENT_V4.into(),
            Self::V6 => net::CLIENT_V6.into(),
        }
    }

    fn masq(self) -> IpAddr {
        match self {
            Self::V4 => net::NODE_BACKEND_V4.into(),
            Self::V6 => net::NODE_BACKEND_V6.into(),
        }
    }

    fn host(self, host: u8) -> IpAddr {
        match self {
            Self::V4 => net::backend_v4(host).into(),
            Self::V6 => net::backend_v6(host).into(),
        }
    }
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Which side a packet arrives from: the backend link (true) or the client link.
fn from_backend(family: Family, src: IpAddr) -> bool {
    (2..=9).any(|host| family.host(host) == src)
}

/// A fixture with the XDP program loaded, the default cluster configuration and one NodePort
/// frontend (`rev_nat_id` 10) with a single backend (host 2, port 8080, id 101).
fn nodeport(family: Family, proto: u8) -> (TcFixture, SocketAddr, Backend) {
    let mut fx = TcFixture::new().unwrap_or_else(|e| panic!("fixture: {e:#}"));
    fx.load_xdp()
        .unwrap_or_else(|e| panic!("loading the XDP program: {e:#}"));
    fx.set_config(&cluster_config(0, SNAT_PORTS)).unwrap();
    let fe = sa(family.node(), 30080);
    let backend = Backend {
        id: 101,
        addr: sa(family.host(2), 8080),
    };
    fx.add_frontend(&Frontend {
        addr: fe,
        protocol: proto,
        scope: scope::EXTERNAL,
        rev_nat_id: 10,
        flags: service_flags::NODE_PORT,
        backends: vec![backend],
    })
    .unwrap();
    (fx, fe, backend)
}

/// The frame of `packet` as received at the node, and the ingress interface.
fn frame(fx: &TcFixture, family: Family, packet: Packet) -> (Packet, Vec<u8>, u32) {
    let backend_side = from_backend(family, packet.src);
    let (src_mac, dst_mac): (Mac, Mac) = if backend_side {
        (net::backend_mac(2), net::NODE_BACKEND_MAC)
    } else {
        (net::CLIENT_MAC, net::NODE_CLIENT_MAC)
    };
    let packet = packet.with_macs(src_mac, dst_mac);
    let frame = packet.to_frame();
    let ifindex = if backend_side {
        fx.backend_ifindex()
    } else {
        fx.client_ifindex()
    };
    (packet, frame, ifindex)
}

/// Runs `packet` through TC (flow set-up); returns the translated packet.
#[track_caller]
fn through_tc(fx: &TcFixture, family: Family, packet: Packet, what: &str) -> Packet {
    let (_, frame, ifindex) = frame(fx, family, packet);
    let out = fx.run_on(ifindex, &frame).expect("TC test run");
    assert_eq!(out.code, TC_ACT_REDIRECT, "{what}: TC verdict");
    out.packet()
}

/// Runs `packet` through XDP.
fn through_xdp(fx: &TcFixture, family: Family, packet: Packet) -> (Packet, Vec<u8>, Outcome) {
    let (sent, frame, ifindex) = frame(fx, family, packet);
    let out = fx.run_xdp_on(ifindex, &frame).expect("XDP test run");
    (sent, frame, out)
}

/// Runs `packet` through XDP: it must be translated from `from` to `to`, with valid
/// checksums, its content, TTL less one, the next hop's MACs and `counter` moved by one.
#[track_caller]
fn xdp_translated(
    fx: &TcFixture,
    family: Family,
    packet: Packet,
    (from, to): (SocketAddr, SocketAddr),
    counter: u32,
    what: &str,
) -> Packet {
    let before = fx.counters().unwrap();
    let (sent, _, out) = through_xdp(fx, family, packet);
    assert_eq!(out.code, XDP_REDIRECT, "{what}: XDP verdict");
    if let Err(e) = verify_checksums(&out.data) {
        panic!("{what}: {e:#}; output {:?}", Packet::parse(&out.data));
    }
    let got = out.packet();
    assert_eq!(
        (got.src_socket(), got.dst_socket()),
        (from, to),
        "{what}: rewritten (source, destination)"
    );
    match (&sent.l4, &got.l4) {
        (L4::Tcp(a), L4::Tcp(b)) => assert_eq!(
            (a.seq, a.ack, a.flags, a.window, &a.payload),
            (b.seq, b.ack, b.flags, b.window, &b.payload),
            "{what}: TCP content changed"
        ),
        (L4::Udp(a), L4::Udp(b)) => assert_eq!(a.payload, b.payload, "{what}: UDP payload"),
        (a, b) => panic!("{what}: transport changed from {a:?} to {b:?}"),
    }
    assert_eq!(got.ttl, sent.ttl - 1, "{what}: TTL/hop limit");
    let macs = if from_backend(family, to.ip()) {
        (net::NODE_BACKEND_MAC, net::backend_mac(2))
    } else {
        (net::NODE_CLIENT_MAC, net::CLIENT_MAC)
    };
    assert_eq!((got.src_mac, got.dst_mac), macs, "{what}: MACs (src, dst)");
    fx.counters()
        .unwrap()
        .since(&before)
        .assert_moved(&[(counter, 1)], what);
    got
}

/// Runs `packet` through XDP: it must pass, byte for byte, counted as passed, with the
/// conntrack maps unchanged.
#[track_caller]
fn xdp_passed(fx: &TcFixture, family: Family, packet: Packet, what: &str) {
    let before = fx.counters().unwrap();
    let ct_before = fx.ct_entries(family == Family::V6).unwrap();
    let (_, frame, out) = through_xdp(fx, family, packet);
    assert_eq!(out.code, XDP_PASS, "{what}: XDP verdict");
    assert!(out.data == frame, "{what}: the frame was modified");
    fx.counters()
        .unwrap()
        .since(&before)
        .assert_moved(&[(reason::XDP_PASSED, 1)], what);
    assert_eq!(
        fx.ct_entries(family == Family::V6).unwrap(),
        ct_before,
        "{what}: conntrack changed"
    );
}

/// Writes into a frame's UDP checksum what a sender with checksum offload leaves there (its
/// pseudo-header's folded sum, CHECKSUM_PARTIAL), for the kernel to complete later.
fn with_pending_checksum(frame: &mut [u8], family: Family) {
    let (l4, addrs) = match family {
        Family::V4 => (14 + 20, 14 + 12..14 + 20),
        Family::V6 => (14 + 40, 14 + 8..14 + 40),
    };
    let len = frame.len() - l4;
    let mut sum: u32 = frame[addrs]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    sum += u32::from(UDP) + u32::try_from(len).unwrap();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[l4 + 6..l4 + 8].copy_from_slice(&u16::try_from(sum).unwrap().to_be_bytes());
}

/// A masqueraded NodePort TCP connection set up by TC (SYN, SYN-ACK, ACK): its data both
/// ways then goes through XDP, translated as TC would, keeping the flow's lifetime and the
/// sequence ends TC judges RSTs by; FIN and RST stay with TC.
#[test]
fn tracked_tcp_flow_is_forwarded_and_replies_reverse_translated() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} XDP TCP: {step}");
        let (fx, fe, backend) = nodeport(family, TCP);
        let client = sa(family.client(), 40001);
        let syn = Packet::tcp(client, fe, SYN, 1000, 0);
        xdp_passed(&fx, family, syn.clone(), &what("SYN of a new flow"));
        let masq = through_tc(&fx, family, syn, &what("SYN")).src_socket();
        assert_eq!(masq.ip(), family.masq(), "{}", what("masquerade address"));
        let synack = Packet::tcp(backend.addr, masq, SYN | ACK, 5000, 1001);
        xdp_passed(&fx, family, synack.clone(), &what("SYN-ACK"));
        through_tc(&fx, family, synack, &what("SYN-ACK"));
        let ack = Packet::tcp(client, fe, ACK, 1001, 5001);
        xdp_passed(
            &fx,
            family,
            ack.clone(),
            &what("handshake ACK (confirms the flow)"),
        );
        through_tc(&fx, family, ack, &what("handshake ACK"));
        let original = Tuple::new(client, fe, TCP);
        let (entry, unreplied) = fx.ct_in(&original).unwrap().expect("forward entry");
        assert!(!unreplied, "{}", what("the flow is confirmed"));

        let t0 = monotonic_ns();
        for i in 0..3u32 {
            let data = Packet::tcp(client, fe, ACK | PSH, 1001 + 5 * i, 5001)
                .with_payload(b"hello")
                .with_ttl(50);
            xdp_translated(
                &fx,
                family,
                data,
                (masq, backend.addr),
                reason::XDP_FORWARDED,
                &what(&format!("client data {i}")),
            );
        }
        let t1 = monotonic_ns();
        let after = fx.ct(&original).unwrap().expect("forward entry");
        assert_eq!(after.flags, entry.flags, "{}", what("forward flags kept"));
        let lifetime = ct_lifetime::TCP_ESTABLISHED_SECS * SEC;
        assert!(
            after.expires_ns >= t0 + lifetime && after.expires_ns <= t1 + lifetime + SEC / 1000,
            "{}: expiry {} not refreshed to established ({t0}..{t1})",
            what("forward entry"),
            after.expires_ns
        );
        // The reply entry holds the sequence ends TC judges RSTs by: XDP moved the client's.
        let reply_key = Tuple::new(backend.addr, masq, TCP);
        let reply_entry = fx.ct(&reply_key).unwrap().expect("reply entry");
        assert_eq!(
            ct_seq::split(reply_entry.expires_ns).0,
            1016,
            "{}",
            what("the client's sequence end after its data")
        );

        let data = Packet::tcp(backend.addr, masq, ACK | PSH, 5001, 1016).with_payload(b"world");
        xdp_translated(
            &fx,
            family,
            data,
            (fe, client),
            reason::XDP_REPLIED,
            &what("backend data"),
        );
        let reply_entry = fx.ct(&reply_key).unwrap().expect("reply entry");
        assert_eq!(
            ct_seq::split(reply_entry.expires_ns).1,
            5006,
            "{}",
            what("the backend's sequence end after its data")
        );
        let fin = Packet::tcp(client, fe, FIN | ACK, 1016, 5006);
        xdp_passed(&fx, family, fin, &what("FIN (closing is TC's)"));
    }
}

/// A NodePort UDP flow: the first datagram passes to TC, which sets it up; later datagrams
/// of the unreplied flow go through XDP; the first reply (which confirms the flow) passes
/// to TC; later replies go through XDP. A datagram without a checksum keeps none.
#[test]
fn tracked_udp_flow_is_forwarded_and_replies_reverse_translated() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} XDP UDP: {step}");
        let (fx, fe, backend) = nodeport(family, UDP);
        let client = sa(family.client(), 40002);
        let first = Packet::udp(client, fe, b"one");
        xdp_passed(&fx, family, first.clone(), &what("first datagram"));
        let masq = through_tc(&fx, family, first, &what("first datagram")).src_socket();
        xdp_translated(
            &fx,
            family,
            Packet::udp(client, fe, b"two"),
            (masq, backend.addr),
            reason::XDP_FORWARDED,
            &what("second datagram (unreplied flow)"),
        );
        let reply = Packet::udp(backend.addr, masq, b"answer");
        xdp_passed(
            &fx,
            family,
            reply.clone(),
            &what("first reply (confirms the flow)"),
        );
        through_tc(&fx, family, reply, &what("first reply"));
        let (entry, unreplied) = fx
            .ct_in(&Tuple::new(client, fe, UDP))
            .unwrap()
            .expect("forward entry");
        assert!(!unreplied, "{}", what("confirmed by its reply"));
        assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0);
        xdp_translated(
            &fx,
            family,
            Packet::udp(backend.addr, masq, b"again"),
            (fe, client),
            reason::XDP_REPLIED,
            &what("second reply"),
        );
        xdp_translated(
            &fx,
            family,
            Packet::udp(client, fe, b"three"),
            (masq, backend.addr),
            reason::XDP_FORWARDED,
            &what("datagram of the confirmed flow"),
        );
        if family == Family::V4 {
            let got = xdp_translated(
                &fx,
                family,
                Packet::udp(client, fe, b"no checksum").with_zero_udp_checksum(),
                (masq, backend.addr),
                reason::XDP_FORWARDED,
                &what("datagram without a checksum"),
            );
            let L4::Udp(udp) = &got.l4 else {
                unreachable!()
            };
            assert!(udp.zero_checksum, "{}", what("a zero checksum stays zero"));
        }
    }
}

/// What XDP leaves to TC passes byte for byte: new flows, non-service traffic, ICMP,
/// fragments, packets about to expire, and flows TC does not know.
#[test]
fn untracked_traffic_passes_untouched() {
    require_root!();
    for family in Family::ALL {
        let what = |step: &str| format!("{family:?} XDP pass: {step}");
        let (fx, fe, _backend) = nodeport(family, UDP);
        let client = sa(family.client(), 40003);
        xdp_passed(
            &fx,
            family,
            Packet::udp(client, fe, b"new"),
            &what("new flow"),
        );
        xdp_passed(
            &fx,
            family,
            Packet::udp(client, sa(family.node(), 22), b"x"),
            &what("not a service"),
        );
        xdp_passed(
            &fx,
            family,
            Packet::tcp(client, sa(family.node(), 30080), ACK, 1, 1),
            &what("TCP to a UDP frontend"),
        );
        let echo = if family == Family::V4 {
            icmp::V4_ECHO_REQUEST
        } else {
            icmp::V6_ECHO_REQUEST
        };
        xdp_passed(
            &fx,
            family,
            Packet::icmp(client.ip(), fe.ip(), echo, 0, [0, 1, 0, 1], b"ping"),
            &what("ICMP"),
        );
        // A tracked flow's fragment and its last-hop packet are TC's too.
        through_tc(
            &fx,
            family,
            Packet::udp(client, fe, b"set up"),
            &what("set-up"),
        );
        xdp_passed(
            &fx,
            family,
            Packet::udp(client, fe, b"first fragment").with_fragment(0, true),
            &what("first fragment of a tracked flow"),
        );
        xdp_passed(
            &fx,
            family,
            Packet::udp(client, fe, b"ttl 1").with_ttl(1),
            &what("TTL 1"),
        );
        // A datagram whose checksum a local sender's offload has yet to complete: TC's.
        let (_, mut pending, ifindex) = frame(&fx, family, Packet::udp(client, fe, b"offload"));
        with_pending_checksum(&mut pending, family);
        let before = fx.counters().unwrap();
        let out = fx.run_xdp_on(ifindex, &pending).expect("XDP test run");
        let what_pending = what("checksum offload pending");
        assert_eq!(out.code, XDP_PASS, "{what_pending}: XDP verdict");
        assert!(
            out.data == pending,
            "{what_pending}: the frame was modified"
        );
        fx.counters()
            .unwrap()
            .since(&before)
            .assert_moved(&[(reason::XDP_PASSED, 1)], &what_pending);
        assert_eq!(
            fx.counters().unwrap().get(reason::XDP_FORWARDED),
            0,
            "{}",
            what("nothing was forwarded")
        );
    }
}
