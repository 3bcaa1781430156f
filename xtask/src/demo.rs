//! `cargo xtask run` without arguments: a self-contained local demo.
//!
//! Three backend network namespaces answer with their own name; a node namespace runs the
//! agent on the shipped manifests file; a client in a demo-owned cgroup connects to the VIPs and
//! the spread over the backends is printed. Editing the manifests file re-runs the probes.
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
        for index in 1..=BACKENDS {
            let ns = backend_ns(index);
            self.add_namespace(&ns)?;
            let (node_if, backend_if) = (format!("sydemo-n{index}"), format!("sydemo-b{index}"));
            ip(&[
                "-n",
                NODE_NS,
                "link",
                "add",
                &node_if,
                "type",
                "veth",
                "peer",
                "name",
                &backend_if,
                "netns",
                &ns,
            ])?;
            for (netns, link, host) in [(NODE_NS, &node_if, 1), (ns.as_str(), &backend_if, 2)] {
                ip(&[
                    "-n",
                    netns,
                    "addr",
                    "add",
                    &format!("10.244.{index}.{host}/24"),
                    "dev",
                    link,
                ])?;
                ip(&[
                    "-n",
                    netns,
                    "addr",
                    "add",
                    &format!("fd00:244:{index}::{host}/64"),
                    "dev",
                    link,
                    "nodad",
                ])?;
                ip(&["-n", netns, "link", "set", link, "up"])?;
            }
        }
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
            .spawn()
            .context("cannot start the agent")?;
        self.children.push(agent);
        Ok(())
    }
}

/// Outcome counts of one probe run: backend name (or error) → count.
fn probe(
    cgroup: &Path,
    target: &str,
    proto: &str,
    count: usize,
    timeout_ms: u32,
) -> Result<BTreeMap<String, usize>> {
    let out = Command::new(testkit())
        .args(["client", "--netns", NODE_NS, "--cgroup"])
        .arg(cgroup)
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
        let tally = probe(cgroup, target, proto, PROBES, 1000)?;
        println!("{label}");
        for (outcome, count) in tally {
            println!("    {outcome:<24} {count:>3}  {}", "#".repeat(count));
        }
    }
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

fn wait_until_ready(cgroup: &Path, stop: &AtomicBool) -> Result<()> {
    // Fresh veth links resolve their first IPv6 neighbour slowly: talk to every backend
    // directly once (not a service address, so the hooks leave it alone) before measuring.
    for index in 1..=BACKENDS {
        for address in [
            format!("10.244.{index}.2:8080"),
            format!("[fd00:244:{index}::2]:8080"),
        ] {
            probe(cgroup, &address, "tcp", 1, 3000)?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        let tally = probe(cgroup, TARGETS[0].1, TARGETS[0].2, 1, 1000)?;
        if tally.keys().any(|outcome| outcome.starts_with("backend-")) {
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
