//! The programs' names: the eBPF crate names its entry points so (checked at compile time
//! there) and the agent loads them by these names.

pub const CONNECT4: &str = "sy_connect4";
pub const SENDMSG4: &str = "sy_sendmsg4";
pub const RECVMSG4: &str = "sy_recvmsg4";
pub const GETPEERNAME4: &str = "sy_getpeername4";
pub const CONNECT6: &str = "sy_connect6";
pub const SENDMSG6: &str = "sy_sendmsg6";
pub const RECVMSG6: &str = "sy_recvmsg6";
pub const GETPEERNAME6: &str = "sy_getpeername6";
/// The socket-lifetime hook that cleans socket reverse-NAT entries.
pub const SOCK_RELEASE: &str = "sy_sock_release";
/// TC ingress on the node's interfaces: the north-south load balancer.
pub const TC_INGRESS: &str = "sy_tc_ingress";
/// XDP on the node's external interfaces: the fast path of tracked north-south flows.
pub const XDP_INGRESS: &str = "sy_xdp_ingress";

/// The socket-address hooks.
pub const SOCK_ADDR: [&str; 8] = [
    CONNECT4,
    SENDMSG4,
    RECVMSG4,
    GETPEERNAME4,
    CONNECT6,
    SENDMSG6,
    RECVMSG6,
    GETPEERNAME6,
];
