//! The map layout version, normally the one in the source (`SOURCE_LAYOUT_VERSION` in
//! `src/lib.rs`). `SWITCHYARD_MAP_LAYOUT_VERSION=N` at build time overrides it, for the
//! eBPF object and the agent alike: the upgrade and downgrade tests build a second agent that
//! pins under `v<N>` to prove that agents of different layouts take over from each other.
fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_MAP_LAYOUT_VERSION");
    let version = match std::env::var("SWITCHYARD_MAP_LAYOUT_VERSION") {
        Ok(text) if !text.is_empty() => {
            let version: u32 = text.parse().unwrap_or_else(|_| {
                panic!("SWITCHYARD_MAP_LAYOUT_VERSION={text:?} is not a positive number")
            });
            assert!(
                version > 0,
                "SWITCHYARD_MAP_LAYOUT_VERSION must be at least 1"
            );
            version.to_string()
        }
        _ => String::new(),
    };
    println!("cargo:rustc-env=SWITCHYARD_MAP_LAYOUT_VERSION_OVERRIDE={version}");
}
