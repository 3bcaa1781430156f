//! What a test creates on the machine, each released by a guard's Drop: network namespaces
//! and veths, the test cgroup, a private bpffs, temporary directories, child processes, and the
//! checks on mounts.

pub mod bpffs;
pub mod cgroup;
pub mod mounts;
pub mod names;
pub mod netns;
pub mod process;
pub mod stale;
pub mod tempdir;
