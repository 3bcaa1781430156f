//! Mounts that do not reach beyond the agent are refused, naming what to mount: a bpffs that
//! lives only in the agent's own mount namespace (its pins would vanish with it), one whose
//! origin cannot be seen from a private PID namespace, and a cgroup2 of the agent's private
//! cgroup namespace (its hooks would see only the agent's cgroup). A bpffs propagated from the
//! host's namespace is accepted from a private PID namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use libc::ENETUNREACH;
use switchyard_tests::agent::switchyard_bin;
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::process::{ChildGuard, run_bounded, run_checked};
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::manifests::{Manifests, Protocol};
use switchyard_tests::world::harness::Harness;
use switchyard_tests::{require_root, testkit};

const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);

fn target() -> SocketAddr {
    SocketAddr::new("10.96.9.10".parse().expect("an IP"), 80)
}

fn manifests(backends: &[IpAddr]) -> Manifests {
    Manifests::new().backed_service(
        "web",
        &[target().ip()],
        &[("http", Protocol::Tcp, 80)],
        backends,
    )
}

fn harness() -> Harness {
    let harness = Harness::new(testkit!(), 1);
    harness.write_manifests(&manifests(&harness.backend_ipv4s()));
    harness
}

/// `switchyard run` on the harness's manifests with these pins and cgroup (none: the
/// default), as arguments after the agent binary.
fn run_args(harness: &Harness, bpffs: &Path, cgroup: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        switchyard_bin().display().to_string(),
        "run".to_owned(),
        "--manifests".to_owned(),
        harness.manifests_path().display().to_string(),
        "--bpffs".to_owned(),
        bpffs.display().to_string(),
        "--healthz-bind-address=".to_owned(),
        "--metrics-bind-address=".to_owned(),
    ];
    if let Some(cgroup) = cgroup {
        args.extend(["--cgroup-path".to_owned(), cgroup.display().to_string()]);
    }
    args
}

/// Runs `command` (an agent expected to refuse) to its end; asserts that it failed with a
/// message containing every one of `needles`, and that nothing was translated.
fn assert_refused(harness: &Harness, command: &mut Command, needles: &[&str]) -> Output {
    let output = run_bounded(command, REFUSAL_TIMEOUT).expect("running the agent");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        !output.status.success(),
        "the agent should refuse to start: {}\n{stdout}\n{stderr}",
        output.status
    );
    for needle in needles {
        assert!(
            stderr.contains(needle) || stdout.contains(needle),
            "the refusal names {needle:?}:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        !stdout.contains("switchyard running") && !stderr.contains("switchyard running"),
        "the agent ran:\n{stdout}\n{stderr}"
    );
    let attempt = harness
        .client(&ClientRequest::new(ClientProto::Tcp, target()).timeout(Duration::from_millis(300)))
        .pop()
        .expect("one attempt");
    assert_eq!(
        attempt.errno,
        Some(ENETUNREACH),
        "nothing translates the VIP: {attempt:?}"
    );
    output
}

/// `nsenter` into the node's network namespace only: unlike `ip netns exec`, it keeps the
/// host's /sys (and so the test cgroup's path) in view, which a private PID namespace needs
/// (there, no ancestor process shows the outer mount namespace).
fn in_node_namespace(harness: &Harness) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!(
        "--net=/run/netns/{}",
        harness.topology().node_namespace()
    ));
    command.arg("--");
    command
}

/// `sh -ec SCRIPT sh ARGS...`: the script mounts, then execs its arguments.
fn shell(script: &str, args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut command = vec![
        "sh".to_owned(),
        "-ec".to_owned(),
        script.to_owned(),
        "sh".to_owned(),
    ];
    command.extend(args);
    command
}

#[test]
fn a_bpffs_mounted_only_in_the_agents_own_mount_namespace_is_refused() {
    require_root!();
    let harness = harness();
    // The agent's own mount namespace, with a fresh bpffs in it: as in a container that
    // mounts bpffs itself instead of getting the host's.
    let private = TempDir::new().expect("a mount point");
    let mut args = vec![private.path().display().to_string()];
    args.extend(run_args(
        &harness,
        &private.path().join("switchyard"),
        Some(harness.cgroup().path()),
    ));
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", harness.topology().node_namespace()])
        .args(["unshare", "--mount", "--propagation", "private", "--"])
        .args(shell(r#"mount -t bpf bpf "$1"; shift; exec "$@""#, args));
    assert_refused(
        &harness,
        &mut command,
        &[
            "would not outlive this agent",
            "not mounted in the host's mount namespace",
            "mount -t bpf bpf /sys/fs/bpf",
            "mountPropagation: HostToContainer",
        ],
    );
}

#[test]
fn a_private_pid_namespace_needs_a_bpffs_propagated_from_the_host() {
    require_root!();
    let mut harness = harness();
    // A fresh bpffs in a private PID and mount namespace: the host's mount table is hidden,
    // and nothing shows the bpffs comes from elsewhere.
    let private = TempDir::new().expect("a mount point");
    let mut args = vec![private.path().display().to_string()];
    args.extend(run_args(
        &harness,
        &private.path().join("switchyard"),
        Some(harness.cgroup().path()),
    ));
    let mut command = in_node_namespace(&harness);
    command
        .args(["unshare", "--pid", "--kill-child", "--mount-proc"])
        .args(["--propagation", "private", "--"])
        .args(shell(r#"mount -t bpf bpf "$1"; shift; exec "$@""#, args));
    assert_refused(
        &harness,
        &mut command,
        &[
            "cannot tell whether the pins",
            "private PID namespace",
            "hostPID: true",
        ],
    );

    // The test's bpffs, mounted in the host's namespace and shared, reaches the same kind of
    // namespace as a slave mount (`master:N`): accepted, and the agent serves.
    let shared = harness.bpffs().path().to_owned();
    run_checked(
        Command::new("mount").arg("--make-shared").arg(&shared),
        REFUSAL_TIMEOUT,
    )
    .expect("making the test bpffs shared");
    let mut command = in_node_namespace(&harness);
    command
        .args(["unshare", "--pid", "--kill-child", "--mount-proc"])
        .args(["--propagation", "slave", "--"])
        .args(run_args(
            &harness,
            &harness.bpffs().agent_dir(),
            Some(harness.cgroup().path()),
        ));
    let log = TempDir::new().expect("a log directory");
    let log_path = log.path().join("agent.log");
    let log_file = std::fs::File::create(&log_path).expect("creating the log");
    command
        .stdout(log_file.try_clone().expect("the log"))
        .stderr(log_file);
    let mut agent = ChildGuard::spawn(&mut command, "agent in a private PID namespace")
        .expect("starting the agent");
    harness.wait_until_translated(ClientProto::Tcp, target());
    assert!(
        agent.try_wait().expect("the agent").is_none(),
        "the agent keeps running"
    );
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        text.contains("Propagated"),
        "the agent accepted the bpffs as propagated from another namespace:\n{text}"
    );
    agent.kill().expect("stopping the agent");
}

#[test]
fn a_cgroup2_of_the_agents_private_cgroup_namespace_is_refused() {
    require_root!();
    let harness = harness();
    let cgroup = harness.cgroup().path().to_owned();
    // The agent's private cgroup namespace is rooted at the test cgroup (never the host's
    // root): a cgroup2 mounted inside it shows only that cgroup, as /sys/fs/cgroup does in a
    // container with a private cgroup namespace.
    let private = TempDir::new().expect("a mount point");
    for chosen in [true, false] {
        let mut args = vec![
            cgroup.join("cgroup.procs").display().to_string(),
            harness.topology().node_namespace().to_owned(),
            private.path().display().to_string(),
        ];
        args.extend(run_args(
            &harness,
            &harness.bpffs().agent_dir(),
            chosen.then_some(private.path()),
        ));
        // Join the test cgroup first, then (inside the node namespace) a new cgroup and mount
        // namespace, where cgroup2 is mounted fresh.
        let script = r#"echo $$ > "$1"; ns="$2"; dir="$3"; shift 3
exec ip netns exec "$ns" unshare --cgroup --mount --propagation private -- \
  sh -ec 'mount -t cgroup2 none "$1"; shift; exec "$@"' sh "$dir" "$@""#;
        let mut command = Command::new("sh");
        command.args(&shell(script, args)[1..]);
        assert_refused(
            &harness,
            &mut command,
            &[
                "would not cover the host's cgroup tree",
                "private cgroup namespace",
                "mount -t cgroup2 none /run/switchyard/cgroupv2",
                "--cgroup-path /run/switchyard/cgroupv2",
            ],
        );
    }
}
