//! Support library for the Switchyard end-to-end tests: isolated network namespaces, a test
//! cgroup, a private bpffs, the agent process, Kubernetes manifests and the `sy-testkit`
//! helper. Every resource is released by a guard's Drop, also when a test panics.

pub mod agent;
pub mod apiserver;
pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod harness;
pub mod http;
pub mod layout;
pub mod manifests;
pub mod mounts;
pub mod names;
pub mod netns;
pub mod north_south;
pub mod objects;
pub mod packet;
pub mod pinned_maps;
pub mod process;
pub mod report;
pub mod stale;
pub mod tc_fixture;
pub mod tempdir;
pub mod testkit;

/// Whether this process may create namespaces, cgroups and mounts.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Returns early from a test (which then passes) with a message when not running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            // libtest names each test's thread after the test.
            let current = ::std::thread::current();
            eprintln!(
                "skipping {}: needs root (network namespaces, cgroups, bpffs)",
                current.name().unwrap_or(module_path!())
            );
            return;
        }
    };
}
