//! The eBPF datapath seen from a test: BPF_PROG_TEST_RUN of the TC program, packets, and
//! maps pinned by an agent.

pub mod packet;
pub mod pinned_maps;
pub mod tc_fixture;
