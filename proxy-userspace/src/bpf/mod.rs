//! Everything that touches the kernel's BPF objects: finding (or mounting) bpffs and the
//! cgroup2 hierarchy and checking that they reach beyond the agent, sizing the maps, loading and attaching the programs, pinning, adopting or
//! migrating maps and links, forwarding the programs' logs, and removing it all again.
pub mod bpf_log;
pub mod error;
pub mod interfaces;
pub mod link_events;
pub mod loader;
pub mod lock;
pub mod migrate;
pub mod mount_scope;
pub mod mountinfo;
pub mod mounts;
pub mod north_south;
pub mod pins;
pub mod sizing;
pub mod sock_config;
pub mod versions;
