//! Facts about the machine and the run, recorded with the results.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::profile::{Profile, Scope};
use super::tools;

fn first_field(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key).then(|| value.trim().to_owned())
        })
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

pub fn facts(profile: Profile, scope: Scope, duration: Duration) -> Value {
    let memory_gib = first_field("/proc/meminfo", "MemTotal")
        .and_then(|kib| kib.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({
        "date": command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "profile": format!("{profile:?}").to_lowercase(),
        "phases": match scope {
            Scope::All => "data plane and control plane",
            Scope::ControlPlane => "control plane only",
        },
        "duration_s": duration.as_secs(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "cpu_model": first_field("/proc/cpuinfo", "model name"),
        "cpus": std::thread::available_parallelism().map(usize::from).ok(),
        "memory_gib": memory_gib,
        "iptables": tools::version("iptables-nft"),
        "iptables_legacy": tools::version("iptables-legacy"),
        "nft": tools::version("nft"),
        "git_commit": command_line("git", &["-C", &crate::workspace_root().to_string_lossy(), "rev-parse", "--short", "HEAD"]),
    })
}
