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
    #[error("migrating pinned map {map} failed, nothing was attached: {source}")]
    Migration {
        map: &'static str,
        #[source]
        source: MigrationError,
    },
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {action} failed: {}", chain(source.as_ref()))]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {name} on interface {interface}: {action} failed: {}", chain(source.as_ref()))]
    OnInterface {
        name: &'static str,
        interface: String,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {name}: converting its link failed: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("program {name}: pinning its link at {path} failed: {source}")]
    LinkPin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map {map}: {action} failed: {source}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot list the node's interfaces and routes: {0}")]
    Interfaces(#[source] std::io::Error),
    #[error(
        "the TC datapath needs TCX links (Linux 6.6 or later) so that its attachments outlive the agent; this kernel is {version}"
    )]
    KernelTooOld { version: String },
    #[error(
        "cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14 or later): {0}"
    )]
    NetnsCookie(#[source] std::io::Error),
    #[error("cannot open the eBPF programs' log ring buffer: {0}")]
    Log(#[source] aya_log::Error),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LoadError {
    /// For `map_err`: `action` on program `name` failed.
    pub fn program(
        name: &'static str,
        action: &'static str,
    ) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        move |source| Self::Program {
            name,
            action,
            source: Box::new(source),
        }
    }

    /// For `map_err`: `action` on program `name` failed on `interface`.
    pub fn on_interface(
        name: &'static str,
        interface: &str,
        action: &'static str,
    ) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        let interface = interface.to_owned();
        move |source| Self::OnInterface {
            name,
            interface,
            action,
            source: Box::new(source),
        }
    }
}

/// An error with its sources: aya's attach errors keep the kernel's reason in a source,
/// which the one-line message must not lose.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why copying a pinned map into its migrated successor failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the map table has no typed definition of it")]
    Untyped,
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error("moving its pin from {from} to {to}: {source}")]
    MovePin {
        from: PathBuf,
        to: PathBuf,
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
