//! Follow-up work on the datapath's own state: the TC path's conntrack (garbage collection,
//! departed UDP backends, live flows), the reason counters, the maps' fill, and stale UDP
//! sockets.
pub mod affinity;
pub mod conntrack;
pub mod counters;
pub mod fill;
pub mod udp_reaper;
