//! Makes a fresh machine able to build the eBPF crate: the nightly toolchain (checked, it
//! cannot be installed here), its rust-src component, and bpf-linker built against the LLVM
//! that ships inside nightly rustc (no prebuilt download is reachable).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The nightly this project is known to build with ships LLVM 22 (bpf-linker feature llvm-22).
const MIN_NIGHTLY: (u32, u32) = (1, 97);

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory in front (where bpf-linker gets installed).
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_bin_dir()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("PATH entries are valid")
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_version() -> Result<(u32, u32)> {
    let text = output(Command::new("rustc").args(["+nightly", "--version"])).context(
        "the nightly Rust toolchain is needed for the eBPF crate (`rustup toolchain install nightly`)",
    )?;
    // "rustc 1.97.0-nightly (...)"
    let version = text.split_whitespace().nth(1).unwrap_or_default();
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok(());
    }
    println!("xtask: installing rust-src for the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_installed() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The name of nightly's LLVM shared library, e.g. `LLVM-22-rust-1.97.0-nightly`.
fn nightly_llvm_library(sysroot: &Path) -> Result<String> {
    let lib_dir = sysroot.join("lib");
    let entries = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .find_map(|name| {
            name.strip_prefix("lib")
                .and_then(|rest| rest.strip_suffix(".so"))
                .filter(|stem| stem.starts_with("LLVM-"))
                .map(str::to_owned)
        })
        .with_context(|| {
            format!(
                "no libLLVM-*.so in {}: cannot build bpf-linker against rustc's LLVM",
                lib_dir.display()
            )
        })
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let llvm = nightly_llvm_library(&sysroot)?;
    let lib = sysroot.join("lib");
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about a minute)");
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22,no-llvm-linking",
        ])
        .env(
            "RUSTFLAGS",
            format!(
                "-L native={} -l dylib={llvm} -C link-arg=-Wl,-rpath,{}",
                lib.display(),
                lib.display()
            ),
        )
        .env_remove("CARGO_TARGET_DIR"))
}

/// Installs whatever is missing; clear errors for what cannot be installed.
pub fn ensure() -> Result<()> {
    let version = nightly_version()?;
    if version < MIN_NIGHTLY {
        bail!(
            "nightly rustc {}.{} is too old: the eBPF crate needs nightly {}.{} or newer (LLVM 22)",
            version.0,
            version.1,
            MIN_NIGHTLY.0,
            MIN_NIGHTLY.1
        );
    }
    ensure_rust_src()?;
    if !bpf_linker_installed() {
        install_bpf_linker()?;
    }
    Ok(())
}
