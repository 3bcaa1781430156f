//! Checks the test infrastructure itself, without the agent: the topology gives direct
//! connectivity to every backend, the VIP range is unreachable without the agent (so nothing
//! can leave the machine), and every guard cleans up after itself.

use std::net::SocketAddr;
use std::path::Path;

use switchyard_tests::client::report::failures;
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::bpffs::PrivateBpffs;
use switchyard_tests::env::cgroup::TestCgroup;
use switchyard_tests::env::netns::{NETNS_DIR, Topology};
use switchyard_tests::world::harness::{BACKEND_PORT, Harness, backend_name};
use switchyard_tests::{require_root, testkit};

#[test]
fn backends_are_directly_reachable_over_every_protocol_and_family() {
    require_root!();
    let harness = Harness::new(testkit!(), 2);
    for backend in harness.backends() {
        for ip in [backend.ipv4.into(), backend.ipv6.into()] {
            let target = SocketAddr::new(ip, BACKEND_PORT);
            for proto in ClientProto::ALL {
                let attempts = harness.client(&ClientRequest::new(proto, target).count(3));
                assert_eq!(attempts.len(), 3);
                assert!(
                    failures(&attempts).is_empty(),
                    "{proto:?} {target}: {attempts:?}"
                );
                for attempt in attempts {
                    assert_eq!(attempt.backend, Some(backend_name(backend.index)));
                    assert_eq!(attempt.peer, Some(target), "{proto:?}");
                }
            }
        }
    }
}

#[test]
fn service_addresses_are_unreachable_without_the_agent() {
    require_root!();
    let harness = Harness::new(testkit!(), 1);
    for target in ["10.96.0.10:80", "[fd00:96::a]:80"] {
        let target: SocketAddr = target.parse().unwrap();
        for proto in ClientProto::ALL {
            let attempts = harness.client(&ClientRequest::new(proto, target));
            let attempt = &attempts[0];
            // No default route: the kernel refuses at once and no packet is sent.
            let unreachable = [libc::ENETUNREACH, libc::EHOSTUNREACH];
            assert!(
                attempt.errno.is_some_and(|e| unreachable.contains(&e)),
                "{proto:?} {target}: {attempt:?}"
            );
        }
    }
}

#[test]
fn guards_remove_everything_they_created() {
    require_root!();
    let (namespaces, cgroup, bpffs) = {
        let topology = Topology::new(2).unwrap();
        let cgroup = TestCgroup::new().unwrap();
        let bpffs = PrivateBpffs::new().unwrap();
        let mut namespaces = vec![topology.node_namespace().to_owned()];
        namespaces.extend(topology.backends().iter().map(|b| b.namespace.clone()));
        for ns in &namespaces {
            assert!(Path::new(NETNS_DIR).join(ns).exists());
        }
        assert!(cgroup.path().join("cgroup.procs").exists());
        assert!(switchyard_tests::env::bpffs::holds_mount(bpffs.path()));
        (
            namespaces,
            cgroup.path().to_owned(),
            bpffs.path().to_owned(),
        )
    };
    for ns in &namespaces {
        assert!(!Path::new(NETNS_DIR).join(ns).exists(), "{ns} left behind");
    }
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(!switchyard_tests::env::bpffs::holds_mount(&bpffs));
    assert!(!bpffs.exists(), "{} left behind", bpffs.display());
}
