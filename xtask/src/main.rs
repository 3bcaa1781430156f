//! Developer tasks for Switchyard: `cargo xtask build | test | run | lint | bench`.
//!
//! `build` installs what a fresh machine lacks (rust-src for nightly, bpf-linker built against
//! rustc's own LLVM), builds the eBPF object with nightly and the rest with stable.
mod bench;
mod demo;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Switchyard developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (nightly) and target/release/switchyard with it embedded.
    Build,
    /// Formatting, clippy (userspace and eBPF) and every test (unit, golden, end to end).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Formatting and clippy only.
    Lint,
    /// Without arguments: a self-contained local demo. With `-- FLAGS`: `switchyard run FLAGS`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Benchmark against kube-proxy's iptables and nftables modes (root); writes
    /// target/bench/report.{json,md}. Without flags: the full run (40 to 90 minutes, plus the
    /// control plane).
    Bench {
        /// Data plane N up to 10 000, control plane up to 100 000: under 10 minutes on 2 cores.
        #[arg(long, conflicts_with = "smoke")]
        quick: bool,
        /// N = 10, a few connections per mode and 5 endpoint changes through the API server:
        /// checks that every mode measures (as in `cargo xtask test`); writes
        /// target/bench-smoke/.
        #[arg(long)]
        smoke: bool,
        /// Only the control-plane phase (the agent fed by the test API server): no lanes, no
        /// kube-proxy modes.
        #[arg(long)]
        control_plane_only: bool,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/bpfel-unknown-none/release/proxy-ebpf")
}

pub fn switchyard_binary() -> PathBuf {
    workspace_root().join("target/release/switchyard")
}

/// Runs a command to completion, failing with its command line if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// A stable-toolchain cargo command in the workspace, with the eBPF object wired in.
fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(workspace_root())
        .args(args)
        .env("SWITCHYARD_EBPF_OBJECT", ebpf_object());
    command
}

/// A nightly cargo command in the eBPF crate (its .cargo/config.toml sets target and build-std).
fn ebpf_cargo(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace_root().join("proxy-ebpf"))
        .arg("+nightly")
        .args(args)
        .env("CARGO_TARGET_DIR", workspace_root().join("target"))
        .env("PATH", toolchain::path_with_cargo_bin())
        // The outer (stable) cargo's settings must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO");
    command
}

fn build() -> Result<()> {
    toolchain::ensure()?;
    println!("xtask: building the eBPF object (nightly, bpfel-unknown-none)");
    run(&mut ebpf_cargo(&["build", "--release"]))?;
    println!("xtask: building switchyard and the test kit (stable)");
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "proxy-userspace",
        "-p",
        "switchyard-tests",
        "--bins",
    ]))?;
    println!("xtask: built {}", switchyard_binary().display());
    Ok(())
}

fn lint() -> Result<()> {
    run(&mut cargo(&["fmt", "--all", "--check"]))?;
    run(&mut ebpf_cargo(&["fmt", "--check"]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(&mut ebpf_cargo(&[
        "clippy",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(())
}

fn test(cargo_args: &[String]) -> Result<()> {
    build()?;
    lint()?;
    if !nix_is_root() {
        println!("xtask: not running as root: the end-to-end tests will skip themselves");
    }
    let mut args = vec!["test", "--release", "--workspace", "--no-fail-fast"];
    args.extend(cargo_args.iter().map(String::as_str));
    run(cargo(&args).env("SWITCHYARD_BIN", switchyard_binary()))?;
    // A tiny run of the benchmark so that it never rots; it judges completeness, not timings.
    if nix_is_root() {
        bench::run(bench::Profile::Smoke, bench::Scope::All)
    } else {
        println!("xtask: not running as root: skipping the bench smoke");
        Ok(())
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("Uid:")
                    .map(|uids| uids.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Build => build(),
        Task::Lint => {
            toolchain::ensure()?;
            lint()
        }
        Task::Test { cargo_args } => test(&cargo_args),
        Task::Bench {
            quick,
            smoke,
            control_plane_only,
        } => {
            build()?;
            bench::run(
                match (quick, smoke) {
                    (_, true) => bench::Profile::Smoke,
                    (true, false) => bench::Profile::Quick,
                    (false, false) => bench::Profile::Full,
                },
                if control_plane_only {
                    bench::Scope::ControlPlane
                } else {
                    bench::Scope::All
                },
            )
        }
        Task::Run { agent_args } => {
            build()?;
            if agent_args.is_empty() {
                demo::run()
            } else {
                let error = exec_agent(&agent_args);
                Err(error)
            }
        }
    }
}

/// Replaces xtask with `switchyard run FLAGS`.
fn exec_agent(agent_args: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let error = Command::new(switchyard_binary())
        .arg("run")
        .args(agent_args)
        .exec();
    anyhow::anyhow!("cannot run {}: {error}", switchyard_binary().display())
}
