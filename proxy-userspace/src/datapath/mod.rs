//! Follow-up work on the datapath's own state: the TC path's conntrack (garbage collection,
//! departed UDP backends, live flows), the reason counters, and stale UDP sockets.
pub mod affinity;
pub mod conntrack;
pub mod counters;
pub mod udp_reaper;
