//! BPF_PROG_TEST_RUN of Direct Server Return in the TC program: the ingress node's encoding
//! (the frontend option inserted, checksums valid, the client's address kept, the
//! destination the endpoint, only a forward entry), the endpoint node's decoding (the option
//! removed, the reply tuple recorded; a spoofed or garbled option refused without state) and
//! the reply rewritten to the frontend. IPv4 and IPv6, TCP and UDP. Needs root.
//!
//! In the fixture's namespace (see `tc_fixture`) a "remote" endpoint is an address of the
//! network routed through a gateway (198.51.100.0/24, 2001:db8:51::/64 via the client link):
//! the ingress node reaches it through another node. An on-link backend is a local pod.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_common::{
    DatapathConfig, config_flags, ct_flags, dsr_option, protocol, reason, scope, service_flags,
};
use switchyard_tests::datapath::packet::{
    L4, Packet, internet_checksum, tcp_flags, verify_checksums,
};
use switchyard_tests::datapath::tc_fixture::{
    Backend, Counters, Frontend, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TcFixture,
    Tuple, cluster_config, monotonic_ns, net,
};
use switchyard_tests::require_root;

const TCP: u8 = protocol::TCP;
const UDP: u8 = protocol::UDP;
const SYN: u8 = tcp_flags::SYN;
const ACK: u8 = tcp_flags::ACK;
const ETH_HLEN: usize = 14;
const SNAT_PORTS: (u16, u16) = (45_000, 45_999);
const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;

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

    fn node(self) -> IpAddr {
        self.ip(net::NODE_V4, net::NODE_V6)
    }

    /// An external client (behind the gateway on the client link).
    fn client(self) -> SocketAddr {
        SocketAddr::new(self.ip(net::remote_v4(9), net::remote_v6(9)), 40_000)
    }

    /// An endpoint on another node (routed through the gateway).
    fn remote_endpoint(self) -> SocketAddr {
        SocketAddr::new(
            self.ip(net::remote_v4(77), net::remote_v6(77)),
            BACKEND_PORT,
        )
    }

    /// A pod of this node (on the backend link).
    fn local_pod(self) -> SocketAddr {
        SocketAddr::new(
            self.ip(net::backend_v4(3), net::backend_v6(3)),
            BACKEND_PORT,
        )
    }

    fn masq(self) -> IpAddr {
        self.ip(net::NODE_BACKEND_V4, net::NODE_BACKEND_V6)
    }

    fn lb_ip(self) -> IpAddr {
        self.ip(
            Ipv4Addr::new(192, 0, 2, 80),
            Ipv6Addr::new(0x2001, 0xdb8, 0x80, 0, 0, 0, 0, 0x80),
        )
    }

    /// Another node's address (a NodePort frontend on that node).
    fn other_node(self) -> IpAddr {
        self.ip(
            Ipv4Addr::new(203, 0, 113, 77),
            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x77),
        )
    }
}

fn fixture(config: &DatapathConfig) -> TcFixture {
    let mut fx = TcFixture::new().unwrap_or_else(|e| panic!("TC fixture: {e:#}"));
    fx.set_config(config).expect("config");
    fx
}

fn dsr_config(flags: u8) -> DatapathConfig {
    cluster_config(flags, SNAT_PORTS)
}

fn add(fx: &mut TcFixture, addr: SocketAddr, proto: u8, flags: u16, backend: SocketAddr) {
    fx.add_frontend(&Frontend {
        addr,
        protocol: proto,
        scope: scope::EXTERNAL,
        rev_nat_id: 7,
        flags,
        backends: vec![Backend {
            id: 70,
            addr: backend,
        }],
    })
    .expect("frontend");
}

fn packet(proto: u8, src: SocketAddr, dst: SocketAddr, flags: u8) -> Packet {
    if proto == TCP {
        Packet::tcp(
            src,
            dst,
            flags,
            1000,
            if flags & ACK != 0 { 5001 } else { 0 },
        )
        .with_payload(b"hello")
    } else {
        Packet::udp(src, dst, b"hello")
    }
}

/// Runs `packet` as received on the client link (from outside).
fn from_outside(fx: &TcFixture, packet: Packet) -> (Vec<u8>, Outcome) {
    let frame = packet
        .with_macs(net::CLIENT_MAC, net::NODE_CLIENT_MAC)
        .to_frame();
    let outcome = fx
        .run_on(fx.client_ifindex(), &frame)
        .unwrap_or_else(|e| panic!("test run: {e:#}"));
    (frame, outcome)
}

/// Runs a frame as received from a local pod (on the backend link).
fn from_pod(fx: &TcFixture, packet: Packet) -> Outcome {
    let frame = packet
        .with_macs(net::backend_mac(3), net::NODE_BACKEND_MAC)
        .to_frame();
    fx.run_on(fx.backend_ifindex(), &frame)
        .unwrap_or_else(|e| panic!("test run: {e:#}"))
}

fn counters(fx: &TcFixture) -> Counters {
    fx.counters().expect("counters")
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The encoding as the ingress node writes it, into a frame without it.
fn with_option(frame: &[u8], frontend: SocketAddr) -> Vec<u8> {
    let mut out = frame[..ETH_HLEN].to_vec();
    let ip = &frame[ETH_HLEN..];
    match frontend.ip() {
        IpAddr::V4(_) => {
            let mut header = ip[..20].to_vec();
            header[0] = 0x47;
            let total = u16::from_be_bytes([ip[2], ip[3]]) + 8;
            header[2..4].copy_from_slice(&total.to_be_bytes());
            header.extend_from_slice(&[dsr_option::IPV4_TYPE, dsr_option::IPV4_LEN]);
            header.extend_from_slice(&frontend.port().to_be_bytes());
            header.extend_from_slice(&addr_bytes(frontend.ip()));
            header[10..12].copy_from_slice(&[0, 0]);
            let csum = internet_checksum(&header);
            header[10..12].copy_from_slice(&csum.to_be_bytes());
            out.extend_from_slice(&header);
            out.extend_from_slice(&ip[20..]);
        }
        IpAddr::V6(_) => {
            let mut header = ip[..40].to_vec();
            let payload = u16::from_be_bytes([ip[4], ip[5]]) + 24;
            header[4..6].copy_from_slice(&payload.to_be_bytes());
            header[6] = dsr_option::NEXTHDR_DEST;
            header.extend_from_slice(&[
                ip[6],
                2,
                dsr_option::IPV6_TYPE,
                dsr_option::IPV6_OPTION_LEN,
            ]);
            header.extend_from_slice(&addr_bytes(frontend.ip()));
            header.extend_from_slice(&frontend.port().to_be_bytes());
            header.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&header);
            out.extend_from_slice(&ip[40..]);
        }
    }
    out
}

/// The frontend an encoded frame carries (panics when it carries none).
fn option_of(frame: &[u8]) -> SocketAddr {
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 == 4 {
        assert_eq!(ip[0], 0x47, "IPv4 header length 7 words (with the option)");
        let option = &ip[20..28];
        assert_eq!(&option[..2], &[dsr_option::IPV4_TYPE, dsr_option::IPV4_LEN]);
        let addr = Ipv4Addr::new(option[4], option[5], option[6], option[7]);
        SocketAddr::new(addr.into(), u16::from_be_bytes([option[2], option[3]]))
    } else {
        assert_eq!(
            ip[6],
            dsr_option::NEXTHDR_DEST,
            "a destination options header"
        );
        let header = &ip[40..64];
        assert_eq!(
            &header[1..4],
            &[2, dsr_option::IPV6_TYPE, dsr_option::IPV6_OPTION_LEN]
        );
        assert_eq!(&header[22..24], &[1, 0], "PadN");
        let addr = Ipv6Addr::from(<[u8; 16]>::try_from(&header[4..20]).expect("16 bytes"));
        SocketAddr::new(addr.into(), u16::from_be_bytes([header[20], header[21]]))
    }
}

/// Checks an encoded packet: redirected, checksums valid, the option naming `frontend`,
/// from the client to the endpoint, with the sent content.
#[track_caller]
fn assert_encoded(
    out: &Outcome,
    sent: &[u8],
    client: SocketAddr,
    endpoint: SocketAddr,
    frontend: SocketAddr,
    what: &str,
) {
    assert_eq!(out.code, TC_ACT_REDIRECT, "{what}: return code");
    verify_checksums(&out.data).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(
        option_of(&out.data),
        frontend,
        "{what}: the option's frontend"
    );
    let got = out.packet();
    let sent = Packet::parse(sent).expect("sent frame");
    assert_eq!(
        (got.src_socket(), got.dst_socket()),
        (client, endpoint),
        "{what}: (source, destination)"
    );
    assert_eq!(got.ttl, sent.ttl - 1, "{what}: TTL/hop limit");
    match (&sent.l4, &got.l4) {
        (L4::Tcp(a), L4::Tcp(b)) => assert_eq!(
            (a.seq, a.ack, a.flags, a.window, &a.payload),
            (b.seq, b.ack, b.flags, b.window, &b.payload),
            "{what}: TCP content"
        ),
        (L4::Udp(a), L4::Udp(b)) => assert_eq!(a.payload, b.payload, "{what}: UDP payload"),
        (a, b) => panic!("{what}: transport changed from {a:?} to {b:?}"),
    }
}

#[test]
fn ingress_node_encodes_the_frontend_for_a_remote_endpoint_and_keeps_only_the_forward_entry() {
    require_root!();
    for family in Family::ALL {
        for proto in [TCP, UDP] {
            let what = |step: &str| format!("{family:?} proto {proto}: {step}");
            let mut fx = fixture(&dsr_config(config_flags::DSR_TCP | config_flags::DSR_UDP));
            let fe = SocketAddr::new(family.node(), NODE_PORT);
            add(
                &mut fx,
                fe,
                proto,
                service_flags::NODE_PORT,
                family.remote_endpoint(),
            );
            let client = family.client();
            let before = counters(&fx);
            let first = packet(proto, client, fe, SYN);
            let (sent, out) = from_outside(&fx, first);
            assert_encoded(
                &out,
                &sent,
                client,
                family.remote_endpoint(),
                fe,
                &what("first packet"),
            );
            counters(&fx).since(&before).assert_moved(
                &[(reason::TC_NEW_FLOW, 1), (reason::TC_DSR_ENCODED, 1)],
                &what("first packet"),
            );
            let original = Tuple::new(client, fe, proto);
            let (entry, unreplied) = fx.ct_in(&original).expect("ct").expect("forward entry");
            assert!(
                unreplied,
                "{}",
                what("a new flow waits in the unreplied map")
            );
            assert_eq!(
                entry.flags,
                ct_flags::DSR,
                "{}",
                what("forward entry flags")
            );
            assert_eq!((entry.src, entry.dst), (client, family.remote_endpoint()));
            assert_eq!(
                fx.ct_entries(family == Family::V6).expect("ct").len(),
                1,
                "{}",
                what("no reply entry: replies never come back through this node")
            );

            // The client's next packet confirms the flow (it heard the endpoint's answer).
            let t0 = monotonic_ns();
            let (sent, out) = from_outside(&fx, packet(proto, client, fe, ACK));
            assert_encoded(
                &out,
                &sent,
                client,
                family.remote_endpoint(),
                fe,
                &what("second packet"),
            );
            let (entry, unreplied) = fx.ct_in(&original).expect("ct").expect("forward entry");
            assert!(
                !unreplied,
                "{}",
                what("confirmed flows move to the main map")
            );
            assert_eq!(entry.flags, ct_flags::DSR | ct_flags::SEEN_REPLY);
            let lifetime = if proto == TCP {
                proxy_common::ct_lifetime::TCP_ESTABLISHED_SECS
            } else {
                proxy_common::ct_lifetime::UDP_SECS
            };
            assert!(
                entry.expires_ns >= t0 + (lifetime - 1) * 1_000_000_000,
                "{}",
                what("lifetime")
            );
        }
    }
}

#[test]
fn local_endpoints_snat_mode_hybrid_udp_and_the_snat_annotation_are_masqueraded() {
    require_root!();
    let both = config_flags::DSR_TCP | config_flags::DSR_UDP;
    for family in Family::ALL {
        // (config, protocol, service flags, endpoint, DSR expected)
        let cases = [
            ("a local pod", both, TCP, 0, family.local_pod(), false),
            ("--lb-mode snat", 0, TCP, 0, family.remote_endpoint(), false),
            (
                "hybrid, UDP",
                config_flags::DSR_TCP,
                UDP,
                0,
                family.remote_endpoint(),
                false,
            ),
            (
                "hybrid, TCP",
                config_flags::DSR_TCP,
                TCP,
                0,
                family.remote_endpoint(),
                true,
            ),
            (
                "annotation snat",
                both,
                TCP,
                service_flags::FORWARD_SNAT,
                family.remote_endpoint(),
                false,
            ),
            (
                "annotation dsr",
                0,
                UDP,
                service_flags::FORWARD_DSR,
                family.remote_endpoint(),
                true,
            ),
        ];
        for (name, config, proto, extra, endpoint, dsr) in cases {
            let what = format!("{family:?} {name}");
            let mut fx = fixture(&dsr_config(config));
            let fe = SocketAddr::new(family.node(), NODE_PORT);
            add(
                &mut fx,
                fe,
                proto,
                service_flags::NODE_PORT | extra,
                endpoint,
            );
            let (sent, out) = from_outside(&fx, packet(proto, family.client(), fe, SYN));
            if dsr {
                assert_encoded(&out, &sent, family.client(), endpoint, fe, &what);
                continue;
            }
            assert_eq!(out.code, TC_ACT_REDIRECT, "{what}: return code");
            verify_checksums(&out.data).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let got = out.packet();
            assert_eq!(got.dst_socket(), endpoint, "{what}: destination");
            let masq = got.src_socket();
            assert!(
                masq.ip() == family.masq() || masq.ip() == family.node(),
                "{what}: masqueraded to a node address, got {masq}"
            );
            assert_eq!(
                got.to_frame().len(),
                out.data.len(),
                "{what}: no option in the packet"
            );
            let entry = fx
                .ct(&Tuple::new(family.client(), fe, proto))
                .expect("ct")
                .expect("forward entry");
            assert_eq!(entry.flags & ct_flags::DSR, 0, "{what}: not a DSR entry");
            assert_ne!(entry.flags & ct_flags::SNAT, 0, "{what}: masqueraded entry");
        }
    }
}

#[test]
fn endpoint_node_strips_the_option_records_the_reply_and_rewrites_the_reply_to_the_frontend() {
    require_root!();
    for family in Family::ALL {
        for proto in [TCP, UDP] {
            for (name, frontend, flags) in [
                (
                    "LoadBalancer IP",
                    SocketAddr::new(family.lb_ip(), 80),
                    service_flags::LOAD_BALANCER,
                ),
                // Another node's NodePort: this node serves the same port on its own address.
                (
                    "another node's NodePort",
                    SocketAddr::new(family.other_node(), NODE_PORT),
                    service_flags::NODE_PORT,
                ),
            ] {
                let what = |step: &str| format!("{family:?} proto {proto} {name}: {step}");
                let mut fx = fixture(&dsr_config(0));
                let served = if flags == service_flags::NODE_PORT {
                    SocketAddr::new(family.node(), NODE_PORT)
                } else {
                    frontend
                };
                add(&mut fx, served, proto, flags, family.local_pod());
                let client = family.client();
                let pod = family.local_pod();
                // As it left the ingress node: DNATed to the pod, the client's address kept.
                let plain = packet(proto, client, pod, SYN)
                    .with_macs(net::CLIENT_MAC, net::NODE_CLIENT_MAC)
                    .to_frame();
                let encoded = with_option(&plain, frontend);
                verify_checksums(&encoded).expect("the test's own encoding");
                let before = counters(&fx);
                let out = fx.run_on(fx.client_ifindex(), &encoded).expect("test run");
                assert_eq!(out.code, TC_ACT_OK, "{}", what("delivered by the stack"));
                assert!(
                    out.data == plain,
                    "{}: the option must be gone and nothing else changed\n want {:?}\n  got {:?}",
                    what("decoded"),
                    Packet::parse(&plain),
                    Packet::parse(&out.data)
                );
                counters(&fx)
                    .since(&before)
                    .assert_moved(&[(reason::TC_DSR_DECODED, 1)], &what("decoded"));
                let reply_key = Tuple::new(pod, client, proto);
                let (recorded, _) = fx
                    .dsr_reverse(&reply_key)
                    .expect("dsr map")
                    .unwrap_or_else(|| panic!("{}", what("no reverse entry")));
                assert_eq!(recorded, frontend, "{}", what("reverse entry"));

                let before = counters(&fx);
                let out = from_pod(&fx, packet(proto, pod, client, SYN | ACK));
                assert_eq!(out.code, TC_ACT_REDIRECT, "{}", what("reply redirected"));
                verify_checksums(&out.data).unwrap_or_else(|e| panic!("{}: {e:#}", what("reply")));
                let got = out.packet();
                assert_eq!(
                    (got.src_socket(), got.dst_socket()),
                    (frontend, client),
                    "{}",
                    what("the reply leaves from the frontend to the client")
                );
                assert_eq!(
                    (got.src_mac, got.dst_mac),
                    (net::NODE_CLIENT_MAC, net::CLIENT_MAC)
                );
                counters(&fx)
                    .since(&before)
                    .assert_moved(&[(reason::TC_DSR_REPLY, 1)], &what("reply"));
            }
        }
    }
}

#[test]
fn spoofed_or_garbled_options_are_dropped_without_state() {
    require_root!();
    for family in Family::ALL {
        let mut fx = fixture(&dsr_config(0));
        let lb = SocketAddr::new(family.lb_ip(), 80);
        add(
            &mut fx,
            lb,
            TCP,
            service_flags::LOAD_BALANCER,
            family.local_pod(),
        );
        add(
            &mut fx,
            SocketAddr::new(family.node(), NODE_PORT),
            TCP,
            service_flags::NODE_PORT,
            family.local_pod(),
        );
        let client = family.client();
        let pod = family.local_pod();
        let plain = packet(TCP, client, pod, SYN)
            .with_macs(net::CLIENT_MAC, net::NODE_CLIENT_MAC)
            .to_frame();
        let cases = [
            (
                "a frontend this node does not serve",
                SocketAddr::new(family.other_node(), 80),
            ),
            (
                "a served address on a port no Service has",
                SocketAddr::new(family.lb_ip(), 81),
            ),
            (
                "another node's address on a port that is no NodePort here",
                SocketAddr::new(family.other_node(), NODE_PORT + 1),
            ),
        ];
        for (name, frontend) in cases {
            let what = format!("{family:?} {name}");
            let before = counters(&fx);
            let out = fx
                .run_on(fx.client_ifindex(), &with_option(&plain, frontend))
                .expect("test run");
            assert_eq!(out.code, TC_ACT_SHOT, "{what}: dropped");
            counters(&fx)
                .since(&before)
                .assert_moved(&[(reason::TC_DSR_REFUSED, 1)], &what);
        }
        // The same frontend for a UDP flow: the option names a TCP frontend only.
        let udp = packet(UDP, client, pod, 0)
            .with_macs(net::CLIENT_MAC, net::NODE_CLIENT_MAC)
            .to_frame();
        let out = fx
            .run_on(fx.client_ifindex(), &with_option(&udp, lb))
            .expect("test run");
        assert_eq!(
            out.code, TC_ACT_SHOT,
            "{family:?}: a TCP frontend named by a UDP packet"
        );
        assert_eq!(
            fx.dsr_reverse_count(family == Family::V6).expect("dsr map"),
            0,
            "{family:?}: no state from refused options"
        );
        // And a pod's packet to that client is left alone (no reverse entry to use).
        let out = from_pod(&fx, packet(TCP, pod, client, SYN | ACK));
        assert_eq!(
            out.code, TC_ACT_OK,
            "{family:?}: an unknown reply passes untranslated"
        );
        assert_eq!(out.packet().src_socket(), pod);
    }
}
