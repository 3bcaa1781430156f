//! The baselines' user-space tools (iptables with both backends, nft, conntrack), installed
//! from Debian when missing.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

const TOOLS: [&str; 4] = [
    "iptables-nft-restore",
    "iptables-legacy-restore",
    "nft",
    "conntrack",
];

fn installed(tool: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(tool).exists())
}

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !installed(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "bench: {} missing: installing iptables, nftables and conntrack with apt-get",
        missing.join(", ")
    );
    crate::run(Command::new("apt-get").args(["update", "-q"]))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "iptables", "nftables", "conntrack"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still: Vec<&str> = TOOLS.into_iter().filter(|t| !installed(t)).collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// First line of `program --version`, for the report.
pub fn version(program: &str) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|line| line.trim().to_owned())
}
