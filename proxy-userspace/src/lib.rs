//! Switchyard's agent: follows Services and EndpointSlices and keeps the eBPF dataplane's maps
//! exact.
//!
//! The flow: `source` (manifests file) → `model` (pure Kubernetes semantics → desired
//! frontends) → `plan` (ordered, idempotent, make-before-break operations) → `writer` (pinned
//! BPF maps, or an in-memory fake) driven by the coalescing `sync` runner. `bpf` loads,
//! attaches, pins and adopts the kernel objects; `state` is the mirror of what is programmed
//! and the one place that encodes it into map entries.
pub mod agent;
pub mod bpf;
pub mod cli;
pub mod dump;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod node_addresses;
pub mod plan;
pub mod source;
pub mod state;
pub mod stats;
pub mod sync;
pub mod udp_reaper;
pub mod writer;
