//! One agent per pin root, and agents of different map layout versions taking over from each
//! other (upgrade and rollback) under a connection loop.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use switchyard_tests::agent::layout::agent_with_layout_version;
use switchyard_tests::client::report::{assert_all_ok, backend_counts, reached};
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::process::wait_until;
use switchyard_tests::k8s::manifests::{Manifests, Protocol};
use switchyard_tests::world::harness::{Harness, backend_name};
use switchyard_tests::{require_root, testkit};

fn at(vip: &str) -> SocketAddr {
    SocketAddr::new(vip.parse().expect("an IP"), 80)
}

fn manifests(vip: &str, backends: &[IpAddr]) -> Manifests {
    Manifests::new().backed_service(
        "web",
        &[vip.parse::<IpAddr>().expect("an IP")],
        &[("http", Protocol::Tcp, 80)],
        backends,
    )
}

fn tcp(target: SocketAddr, count: u32) -> ClientRequest {
    ClientRequest::new(ClientProto::Tcp, target).count(count)
}

/// The layout versions with a directory under the agent's pin root.
fn versions(root: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with('v'))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn wait_for_log(harness: &mut Harness, needle: &str, starts: usize, within: Duration) -> bool {
    wait_until(within, Duration::from_millis(50), || {
        (harness.agent().log().matches(needle).count() >= starts).then_some(())
    })
    .is_some()
}

#[test]
fn a_second_agent_on_the_same_pins_exits_naming_the_first_which_keeps_serving() {
    require_root!();
    let mut harness = Harness::new(testkit!(), 2);
    let vip = "10.96.7.10";
    harness.write_manifests(&manifests(vip, &harness.backend_ipv4s()));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at(vip));
    let first = harness.agent().pid().expect("the agent runs");

    let links_dir = harness.agent().bpffs_dir().join("v1/links");
    let links = || -> BTreeSet<String> {
        std::fs::read_dir(links_dir.clone())
            .expect("the links directory")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let links_before = links();
    let loop_ = harness.spawn_client(&tcp(at(vip), 300).interval(Duration::from_millis(10)));
    let second = harness
        .agent()
        .run_second_instance(Duration::from_secs(20))
        .expect("running a second agent");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second agent must fail: {stderr}"
    );
    assert!(
        stderr.contains("another switchyard agent") && stderr.contains(&format!("PID {first}")),
        "the error names the first agent (PID {first}): {stderr}"
    );
    let attempts = loop_.finish().expect("the connection loop finished");
    assert_all_ok(&attempts, "connections while a second agent tried to start");
    harness
        .agent()
        .ensure_running()
        .expect("the first agent still runs");
    assert_eq!(
        links(),
        links_before,
        "the first agent's links are untouched"
    );

    // The first agent still follows changes, and the read-only commands work next to it.
    harness.write_manifests(&manifests(vip, &harness.backend_ipv4s()[..1]));
    let one = BTreeSet::from([backend_name(0)]);
    let switched = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (reached(&harness.client(&tcp(at(vip), 10))) == one).then_some(())
    });
    assert!(switched.is_some(), "the first agent applied a change");
    let inspect = harness
        .agent()
        .offline(&["inspect", "services"])
        .expect("running inspect");
    assert!(
        inspect.status.success() && String::from_utf8_lossy(&inspect.stdout).contains(vip),
        "inspect works while an agent runs: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let dump = harness.agent().offline(&["dump"]).expect("running dump");
    assert!(dump.status.success(), "dump works while an agent runs");
    let cleanup = harness.agent().cleanup().expect("running cleanup");
    assert!(
        !cleanup.status.success()
            && String::from_utf8_lossy(&cleanup.stderr).contains(&format!("PID {first}")),
        "cleanup refuses while an agent runs: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );

    // Once the first agent is gone, another may start (the kernel dropped its lock).
    harness.agent().kill().expect("SIGKILL the agent");
    harness.agent().restart().expect("restarting");
    harness.wait_until_translated(ClientProto::Tcp, at(vip));
    harness
        .agent()
        .ensure_running()
        .expect("a new agent runs after the first died");
}

/// Stops the running agent, changes the backends while no agent runs (what the pinned maps of
/// the stopped version hold is now stale), starts the agent of `next_version` and checks that
/// it took over: the other version's pins gone, and no connection reaches `removed`.
fn switch_version(
    harness: &mut Harness,
    bin: &Path,
    vip: &str,
    keep: &[IpAddr],
    removed: usize,
    next_version: u32,
) {
    harness.agent().stop().expect("stopping the agent");
    harness.write_manifests(&manifests(vip, keep));
    harness.agent().set_binary(bin.to_owned());
    let starts = harness
        .agent()
        .log()
        .matches("other map layout versions taken over")
        .count();
    harness
        .agent()
        .restart()
        .expect("starting the other version");
    assert!(
        wait_for_log(
            harness,
            "other map layout versions taken over",
            starts + 1,
            Duration::from_secs(30)
        ),
        "the agent of layout v{next_version} never took over"
    );
    let root = harness.agent().bpffs_dir().to_owned();
    assert_eq!(
        versions(&root),
        [format!("v{next_version}")],
        "only the running version's pins are left"
    );
    // No connection is served by the frozen maps of the retired version.
    let after = harness.client(&tcp(at(vip), 60));
    assert_all_ok(&after, "connections after the takeover");
    assert!(
        !reached(&after).contains(&backend_name(removed)),
        "a connection reached {} after the takeover, which only the retired maps held: {:?}",
        backend_name(removed),
        backend_counts(&after)
    );
}

#[test]
fn upgrade_and_rollback_between_layout_versions_lose_no_connection() {
    require_root!();
    let v2 = agent_with_layout_version(2).expect("building the layout v2 agent");
    let v1 = switchyard_tests::agent::switchyard_bin();
    let mut harness = Harness::new(testkit!(), 3);
    let vip = "10.96.7.20";
    let ips = harness.backend_ipv4s();
    harness.write_manifests(&manifests(vip, &ips));
    harness.start_agent(&[]);
    harness.wait_until_translated(ClientProto::Tcp, at(vip));

    let loop_ = harness.spawn_client(&tcp(at(vip), 4000).interval(Duration::from_millis(5)));
    loop_
        .wait_for_attempts(100, Duration::from_secs(10))
        .expect("the connection loop got going");
    // Upgrade: v1 → v2, backend 2 removed while no agent ran.
    switch_version(&mut harness, &v2, vip, &ips[..2], 2, 2);
    // Rollback: v2 → v1, backend 1 removed while no agent ran.
    switch_version(&mut harness, &v1, vip, &[ips[0], ips[2]], 1, 1);
    let attempts = loop_.finish().expect("the connection loop finished");
    assert_all_ok(&attempts, "connections across the upgrade and the rollback");
    assert!(
        attempts.len() >= 1000,
        "only {} connections",
        attempts.len()
    );

    // cleanup removes every version's pins: a v2 agent whose first sync never comes (its
    // manifests file is cut short) leaves both versions pinned.
    harness.agent().stop().expect("stopping the agent");
    let root = harness.agent().bpffs_dir().to_owned();
    std::fs::write(
        harness.manifests_path(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: cut}\nspec: {ports: [{port: 8",
    )
    .expect("writing a cut-short manifests file");
    let attached = harness
        .agent()
        .log()
        .matches("socket hooks attached")
        .count();
    harness.agent().set_binary(v2);
    harness.agent().restart().expect("starting v2 again");
    assert!(wait_for_log(
        &mut harness,
        "socket hooks attached",
        attached + 1,
        Duration::from_secs(30)
    ));
    assert_eq!(
        versions(&root),
        ["v1", "v2"],
        "v1 keeps serving until v2's first sync"
    );
    harness.agent().kill().expect("SIGKILL v2");
    let cleanup = harness.agent().cleanup().expect("running cleanup");
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert!(
        versions(&root).is_empty(),
        "cleanup left {:?} under {}",
        versions(&root),
        root.display()
    );
}
