//! Kubernetes objects for the agent to follow: typed builders, manifests files and the test
//! API server.

pub mod apiserver;
pub mod external_service;
pub mod manifests;
pub mod objects;
