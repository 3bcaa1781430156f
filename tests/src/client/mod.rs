//! Traffic: the `sy-testkit` helper's servers and clients, their JSON reports, and HTTP.

pub mod http;
pub mod report;
pub mod testkit;
