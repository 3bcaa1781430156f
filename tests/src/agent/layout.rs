//! A second agent binary built with another map layout version (the upgrade and downgrade
//! tests run it against the pins of the usual build). `SWITCHYARD_MAP_LAYOUT_VERSION` is read
//! by proxy-common's build script, so the build goes to a target directory of its own
//! (`target/layout-v<N>`, kept between runs: a rebuild is incremental) and never touches the
//! binary the other tests run. It embeds the same eBPF object: the object's map names carry
//! the source's layout version, not the pin directory's.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::env::process::run_bounded;

/// A full first build of the agent's dependency tree on two busy cores.
const BUILD_TIMEOUT: Duration = Duration::from_mins(25);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package is inside the workspace")
        .to_owned()
}

/// The eBPF object the usual build embeds.
fn ebpf_object() -> PathBuf {
    std::env::var_os("SWITCHYARD_EBPF_OBJECT").map_or_else(
        || workspace().join("target/bpfel-unknown-none/release/proxy-ebpf"),
        PathBuf::from,
    )
}

/// Builds (once per process) and returns the agent binary pinning under `v<version>`.
pub fn agent_with_layout_version(version: u32) -> Result<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = workspace().join(format!("target/layout-v{version}"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building the agent with map layout version {version} in {} (the first time takes minutes)",
        target.display()
    );
    let output = run_bounded(
        Command::new(cargo)
            .current_dir(workspace())
            .args([
                "build",
                "--release",
                "-p",
                "proxy-userspace",
                "--bin",
                "switchyard",
            ])
            .arg("--target-dir")
            .arg(&target)
            .env("SWITCHYARD_MAP_LAYOUT_VERSION", version.to_string())
            .env("SWITCHYARD_EBPF_OBJECT", ebpf_object())
            // No debug info: a faster build of a binary only these tests run.
            .env("CARGO_PROFILE_RELEASE_DEBUG", "0"),
        BUILD_TIMEOUT,
    )?;
    if !output.status.success() {
        bail!(
            "building the layout v{version} agent failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(target.join("release/switchyard"))
}
