//! Support library for the Switchyard end-to-end tests, by role:
//!
//! - [`env`]: what a test creates on the machine (network namespaces and veths, the test
//!   cgroup, a private bpffs, temporary directories, child processes, mount checks);
//! - [`world`]: topologies built from it (the single-node [`world::harness`], the
//!   [`world::north_south`] world, the multi-node [`world::cluster`]);
//! - [`k8s`]: Kubernetes objects (typed builders, manifests files, the test API server);
//! - [`datapath`]: the BPF_PROG_TEST_RUN fixture, packet builders and pinned-map readers;
//! - [`client`]: traffic (the `sy-testkit` helper, its reports, HTTP);
//! - [`agent`]: the agent process under test.
//!
//! Every resource is released by a guard's Drop, also when a test panics.

pub mod agent;
pub mod client;
pub mod datapath;
pub mod env;
pub mod k8s;
pub mod world;

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
