//! Embeds the eBPF object. xtask builds it with the nightly toolchain and passes its path in
//! `SWITCHYARD_EBPF_OBJECT`; without that, the object from a previous `cargo xtask build` is
//! used if present, else an empty placeholder (the agent then refuses to run and says why).
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let default = manifest_dir.join("../target/bpfel-unknown-none/release/proxy-ebpf");
    let object = env::var_os("SWITCHYARD_EBPF_OBJECT").map_or(default, PathBuf::from);
    println!("cargo:rerun-if-changed={}", object.display());
    let embedded = if object.is_file() {
        object
    } else {
        let placeholder =
            PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("no-ebpf-object");
        std::fs::write(&placeholder, []).expect("write placeholder");
        placeholder
    };
    println!(
        "cargo:rustc-env=SWITCHYARD_EBPF_OBJECT_PATH={}",
        embedded.display()
    );
}
