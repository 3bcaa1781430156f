//! Why loading, attaching or adopting the kernel objects failed.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this switchyard binary was built without its eBPF object; build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this agent needs {expected:?}: it was left by an incompatible version; run `switchyard cleanup` first"
    )]
    IncompatibleMap {
        path: PathBuf,
        found: (u32, u32),
        expected: (u32, u32),
    },
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {action} failed: {reason}")]
    Program {
        name: &'static str,
        action: &'static str,
        reason: String,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
