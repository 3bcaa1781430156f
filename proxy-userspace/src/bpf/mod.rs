//! Everything that touches the kernel's BPF objects: finding (or mounting) bpffs and the
//! cgroup2 hierarchy, loading and attaching the programs, pinning and adopting maps and links,
//! and removing it all again.
pub mod bpf_log;
pub mod error;
pub mod loader;
pub mod mounts;
pub mod north_south;
pub mod pins;
pub mod sock_config;
