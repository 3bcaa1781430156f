//! Why loading, attaching or adopting the kernel objects failed.
use std::{fmt::Write as _, path::PathBuf};

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
    #[error("{}", refusals_text(.0))]
    IncompatibleMaps(Vec<Refusal>),
    #[error("migrating pinned map {map} failed, nothing was attached: {reason}")]
    Migration { map: &'static str, reason: String },
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

/// A pinned map this agent will neither adopt nor migrate, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub map: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

fn refusals_text(refusals: &[Refusal]) -> String {
    let mut text = String::from("refusing to adopt pinned maps:");
    for refusal in refusals {
        let _ = write!(
            text,
            " map {} ({}): {};",
            refusal.map,
            refusal.path.display(),
            refusal.reason
        );
    }
    text.push_str(
        " nothing was loaded or attached, and the dataplane in place keeps serving; `switchyard cleanup` removes it (Services are then unreachable until an agent programs them again)",
    );
    text
}
