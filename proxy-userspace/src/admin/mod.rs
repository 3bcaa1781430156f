//! What the agent tells operators and load balancers: HTTP endpoints for metrics and health,
//! the healthCheckNodePort listeners, and the statistics they report.
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod stats;
