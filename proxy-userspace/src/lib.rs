//! Switchyard's agent: follows Services and EndpointSlices and keeps the eBPF dataplane's maps
//! exact.
//!
//! The flow, one directory per stage: `source` (API server watchers or a manifests file) →
//! `model` (pure Kubernetes semantics → desired frontends) → `plan` (ordered, idempotent,
//! make-before-break operations against the `plan::mirror` of what is programmed) → `maps`
//! (the pinned BPF maps, or an in-memory fake). `reconcile` is one sync of that flow, one
//! Service at a time; the bounded-frequency `runner` decides when syncs run.
//! `bpf` loads, attaches, pins and adopts the kernel objects; `datapath` is the follow-up work
//! on the datapath's own state (conntrack, counters, stale UDP sockets); `admin` serves
//! metrics and health; `render` prints what is programmed. `agent` wires it all together.
pub mod admin;
pub mod agent;
pub mod bpf;
pub mod cli;
pub mod datapath;
pub mod hash;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod monitor;
pub mod node;
pub mod node_ports;
pub mod offline;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod runner;
pub mod source;
