//! `cargo xtask run` without arguments: a self-contained local demo.
//!
//! Three backend network namespaces answer with their own name, wired as a routed CNI wires
//! pods (unnumbered host veths, /32 and /128 routes, a link-local gateway); a node namespace
//! runs the agent on the shipped manifests file with `--interfaces` naming only its external
//! link; a client in a demo-owned cgroup connects to the VIPs (socket hooks), and a client in
//! an "outside" namespace to a NodePort (TC path); the spread over the backends is printed.
//! Editing the manifests file re-runs the probes.
//! Everything (namespaces, cgroup, bpffs mount, pins) is removed on Ctrl-C or on failure.
//! Traffic stays inside the demo namespaces, which have no route off the machine.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::sleep,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};

use crate::{run as run_command, switchyard_binary, workspace_root};

const NODE_NS: &str = "sy-demo-node";
/// A machine outside the cluster, on the node's external link.
const OUTSIDE_NS: &str = "sy-demo-out";
const EXTERNAL_LINK: &str = "sydemo-ext";
/// The routed layout's pod gateway: every host veth has this MAC, so the pods' IPv4 gateway
/// (a static neighbour, as proxy ARP would answer) and IPv6 gateway (its link-local) are fixed.
const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
const POD_GATEWAY4: &str = "169.254.1.1";
const POD_GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";
/// The NodePort of `demo/web`, probed from outside at the node's external address.
const NODE_PORT_TARGET: (&str, &str) = (
    "demo/web        TCP  192.0.2.1:30080 (NodePort)",
    "192.0.2.1:30080",
);
const BACKENDS: usize = 3;
const PROBES: usize = 60;

/// (label, VIP:port, protocol) of the probes the demo runs.
const TARGETS: [(&str, &str, &str); 4] = [
    (
        "demo/web        TCP  10.96.100.10:80",
        "10.96.100.10:80",
        "tcp",
    ),
    (
        "demo/web        TCP  [fd00:96::10]:80",
        "[fd00:96::10]:80",
        "tcp",
    ),
    (
        "demo/echo-udp   UDP  10.96.100.53:53",
        "10.96.100.53:53",
        "udp-unconnected",
    ),
    (
        "demo/not-ready  TCP  10.96.100.99:80",
        "10.96.100.99:80",
        "tcp",
    ),
];

fn backend_ns(index: usize) -> String {
    format!("sy-demo-b{index}")
}

fn testkit() -> PathBuf {
    workspace_root().join("target/release/sy-testkit")
}

fn manifests() -> PathBuf {
    workspace_root().join("examples/demo-services.yaml")
}

fn ip(args: &[&str]) -> Result<()> {
    run_command(Command::new("ip").args(args).stdout(Stdio::null()))
}

fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 mount found: the demo needs cgroup v2")
}

/// Everything the demo created, removed on drop (also after an error or a panic).
#[derive(Default)]
struct DemoEnv {
    namespaces: Vec<String>,
    cgroup: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    children: Vec<Child>,
}

impl Drop for DemoEnv {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(bpffs) = &self.bpffs {
            let _ = Command::new(switchyard_binary())
                .args(["cleanup", "--bpffs"])
                .arg(bpffs.join("switchyard"))
                .stdout(Stdio::null())
                .status();
            let _ = Command::new("umount").arg(bpffs).status();
            let _ = std::fs::remove_dir(bpffs);
        }
        if let Some(cgroup) = &self.cgroup {
            if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir(cgroup);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        println!("demo: cleaned up namespaces, cgroup, pins and mounts");
    }
}

impl DemoEnv {
    fn add_namespace(&mut self, name: &str) -> Result<()> {
        // A leftover from an interrupted demo would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "delete", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build_topology(&mut self) -> Result<()> {
        self.add_namespace(NODE_NS)?;
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            run_command(
                Command::new("ip")
                    .args(["netns", "exec", NODE_NS, "sysctl", "-q", "-w", setting])
                    .stdout(Stdio::null()),
            )?;
        }
        for index in 1..=BACKENDS {
            let ns = backend_ns(index);
            self.add_namespace(&ns)?;
            wire_routed_pod(index, &ns)?;
        }
        self.add_outside()
    }

    /// The outside machine: its own link to the node, and a route to nothing else.
    fn add_outside(&mut self) -> Result<()> {
        self.add_namespace(OUTSIDE_NS)?;
        ip(&[
            "-n",
            NODE_NS,
            "link",
            "add",
            EXTERNAL_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            OUTSIDE_NS,
        ])?;
        // Also the node's IPv6 address: its side of every pod veth has only a link-local one.
        for (ns, dev, v4, v6) in [
            (NODE_NS, EXTERNAL_LINK, "192.0.2.1/24", "2001:db8:d::1/64"),
            (OUTSIDE_NS, "eth0", "192.0.2.2/24", "2001:db8:d::2/64"),
        ] {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
        }
        ip(&["-n", NODE_NS, "link", "set", EXTERNAL_LINK, "up"])?;
        ip(&["-n", OUTSIDE_NS, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn start_backends(&mut self) -> Result<()> {
        for index in 1..=BACKENDS {
            let child = Command::new(testkit())
                .args([
                    "serve",
                    "--name",
                    &format!("backend-{index}"),
                    "--port",
                    "8080",
                    "--netns",
                    &backend_ns(index),
                ])
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start the demo backends")?;
            self.children.push(child);
        }
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        let cgroup = cgroup2_root()?.join("switchyard-demo");
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        self.cgroup = Some(cgroup.clone());
        // A private bpffs keeps the demo's pins apart from any real installation.
        let bpffs = workspace_root().join("target/demo-bpffs");
        std::fs::create_dir_all(&bpffs)?;
        run_command(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        self.bpffs = Some(bpffs.clone());
        let agent = Command::new("ip")
            .args(["netns", "exec", NODE_NS])
            .arg(switchyard_binary())
            .arg("run")
            .arg("--manifests")
            .arg(manifests())
            .arg("--cgroup-path")
            .arg(&cgroup)
            .arg("--bpffs")
            .arg(bpffs.join("switchyard"))
            .arg("--node-name")
            .arg("demo-node")
            // The external link only: the pods' host veths are found from their routes.
            .args(["--interfaces", EXTERNAL_LINK])
            .spawn()
            .context("cannot start the agent")?;
        self.children.push(agent);
        Ok(())
    }
}

/// Where a probe's client runs.
#[derive(Clone, Copy)]
enum ProbeFrom<'a> {
    /// The node namespace, in the hooked cgroup (the socket hooks translate).
    Hooked(&'a Path),
    /// The outside namespace, in no hooked cgroup (the TC program translates).
    Outside,
}

/// Wires backend `index` (namespace `ns`) as a routed CNI wires a pod: an unnumbered host veth
/// with a fixed MAC, /32 and /128 routes to the pod, the pod's default routes via the gateway.
fn wire_routed_pod(index: usize, ns: &str) -> Result<()> {
    let (node_if, pod_if) = (format!("sydemo-n{index}"), format!("sydemo-b{index}"));
    let (pod4, pod6) = (format!("10.244.{index}.2"), format!("fd00:244:{index}::2"));
    let (gw4, gw6, mac) = (POD_GATEWAY4, POD_GATEWAY6, HOST_VETH_MAC);
    for command in [
        format!(
            "-n {NODE_NS} link add {node_if} address {mac} type veth peer name {pod_if} netns {ns}"
        ),
        format!("-n {ns} addr add {pod4}/32 dev {pod_if}"),
        format!("-n {ns} addr add {pod6}/128 dev {pod_if} nodad"),
        format!("-n {NODE_NS} link set {node_if} up"),
        format!("-n {ns} link set {pod_if} up"),
        format!("-n {NODE_NS} route add {pod4}/32 dev {node_if}"),
        format!("-n {NODE_NS} -6 route add {pod6}/128 dev {node_if}"),
        format!("-n {ns} route add {gw4} dev {pod_if} scope link"),
        format!("-n {ns} route add default via {gw4} dev {pod_if}"),
        // What proxy ARP would answer (the node has no route to the gateway to proxy for).
        format!("-n {ns} neigh replace {gw4} lladdr {mac} dev {pod_if} nud permanent"),
        format!("-n {ns} -6 route add default via {gw6} dev {pod_if}"),
    ] {
        ip(&command.split_whitespace().collect::<Vec<_>>())?;
    }
    Ok(())
}

/// Outcome counts of one probe run: backend name (or error) → count.
fn probe(
    from: ProbeFrom<'_>,
    target: &str,
    proto: &str,
    count: usize,
    timeout_ms: u32,
) -> Result<BTreeMap<String, usize>> {
    let mut command = Command::new(testkit());
    match from {
        ProbeFrom::Hooked(cgroup) => {
            command
                .args(["client", "--netns", NODE_NS, "--cgroup"])
                .arg(cgroup);
        }
        ProbeFrom::Outside => {
            command.args(["client", "--netns", OUTSIDE_NS]);
        }
    }
    let out = command
        .args([
            "--target",
            target,
            "--proto",
            proto,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ])
        .output()
        .context("cannot run the demo client")?;
    let mut tally = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(attempt) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let outcome = match attempt["backend"].as_str() {
            Some(backend) => backend.to_owned(),
            None if attempt["errno"].as_i64() == Some(111) => "refused (ECONNREFUSED)".to_owned(),
            None => format!("failed: {}", attempt["error"].as_str().unwrap_or("unknown")),
        };
        *tally.entry(outcome).or_insert(0) += 1;
    }
    Ok(tally)
}

fn print_probes(cgroup: &Path) -> Result<()> {
    println!("\n== {PROBES} new connections per Service, from a process in the hooked cgroup ==");
    for (label, target, proto) in TARGETS {
        let tally = probe(ProbeFrom::Hooked(cgroup), target, proto, PROBES, 1000)?;
        print_tally(label, &tally);
    }
    println!(
        "\n== {PROBES} new connections from the outside namespace, through the node's TC program =="
    );
    let (label, target) = NODE_PORT_TARGET;
    let tally = probe(ProbeFrom::Outside, target, "tcp", PROBES, 1000)?;
    print_tally(label, &tally);
    println!(
        "\nEdit {} to see changes; Ctrl-C to stop and clean up.",
        manifests().display()
    );
    println!(
        "Look inside: {} inspect services --bpffs {}",
        switchyard_binary().display(),
        workspace_root()
            .join("target/demo-bpffs/switchyard")
            .display()
    );
    Ok(())
}

fn print_tally(label: &str, tally: &BTreeMap<String, usize>) {
    println!("{label}");
    for (outcome, count) in tally {
        println!("    {outcome:<24} {count:>3}  {}", "#".repeat(*count));
    }
}

fn wait_until_ready(cgroup: &Path, stop: &AtomicBool) -> Result<()> {
    // Fresh veth links resolve their first IPv6 neighbour slowly: talk to every backend
    // directly once (not a service address, so the hooks leave it alone) before measuring.
    for index in 1..=BACKENDS {
        for address in [
            format!("10.244.{index}.2:8080"),
            format!("[fd00:244:{index}::2]:8080"),
        ] {
            probe(ProbeFrom::Hooked(cgroup), &address, "tcp", 1, 3000)?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        let hooked = probe(
            ProbeFrom::Hooked(cgroup),
            TARGETS[0].1,
            TARGETS[0].2,
            1,
            1000,
        )?;
        let outside = probe(ProbeFrom::Outside, NODE_PORT_TARGET.1, "tcp", 1, 1000)?;
        let served = |tally: &BTreeMap<String, usize>| {
            tally.keys().any(|outcome| outcome.starts_with("backend-"))
        };
        if served(&hooked) && served(&outside) {
            return Ok(());
        }
        sleep(Duration::from_millis(200));
    }
    bail!("the agent did not start translating within 20 s (see its log above)")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
}

pub fn run() -> Result<()> {
    if !std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            line.strip_prefix("Uid:")
                .is_some_and(|uids| uids.split_whitespace().nth(1) == Some("0"))
        })
    {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let handler_stop = Arc::clone(&stop);
    ctrlc::set_handler(move || handler_stop.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;

    let mut env = DemoEnv::default();
    env.build_topology()?;
    env.start_backends()?;
    env.start_agent()?;
    let cgroup = env.cgroup.clone().expect("set by start_agent");
    wait_until_ready(&cgroup, &stop)?;
    print_probes(&cgroup)?;
    let mut seen = modified(&manifests());
    loop {
        sleep(Duration::from_millis(250));
        // Ctrl-C reaches the whole process group: the agent stops at the same moment.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let now = modified(&manifests());
        if now != seen {
            seen = now;
            // The agent re-reads within a second; give it that second.
            sleep(Duration::from_millis(1200));
            println!("\nmanifests changed:");
            print_probes(&cgroup)?;
        }
        if env
            .children
            .iter_mut()
            .any(|child| matches!(child.try_wait(), Ok(Some(_))))
        {
            bail!("a demo process exited unexpectedly (see its output above)");
        }
    }
    Ok(())
}
