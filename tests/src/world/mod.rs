//! Test topologies: the single-node harness, the north-south world and the multi-node cluster.

pub mod agent_host;
pub mod cluster;
pub mod harness;
pub mod north_south;
