//! Test topologies: the single-node harness, the north-south world and the multi-node cluster,
//! and the [`agent_host::AgentHost`] each of them gives a node running an agent.

pub mod agent_host;
pub mod cluster;
pub mod harness;
pub mod north_south;
