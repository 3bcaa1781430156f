//! Switchyard's eBPF programs: the east-west socket load balancer and the north-south TC
//! load balancer (`tc`), with its XDP fast path (`tc::xdp`).
//!
//! cgroup sock_addr hooks translate a service address (VIP:port) to a backend once per
//! connection (connect4/6) or per datagram (sendmsg4/6), and translate the backend back to the
//! VIP wherever the application can observe its peer (recvmsg4/6, getpeername4/6). The agent
//! keeps the maps in `maps` exact; this crate only reads them (and owns the socket reverse-NAT
//! LRU). Entry points stay thin; the logic lives in `sock` and `lb`.
#![no_std]
#![no_main]

mod addr;
mod diag;
mod guard;
mod lb;
mod maps;
mod metrics;
mod monitor;
mod sock;
mod sock_source;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use proxy_common::monitor_hook;

/// Return value that lets the syscall proceed (for recvmsg/getpeername the only valid one).
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sy_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate_forward4(&ctx, monitor_hook::CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_forward4(&ctx, monitor_hook::SENDMSG)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sy_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sy_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sy_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate_forward6(&ctx, monitor_hook::CONNECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sy_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate_forward6(&ctx, monitor_hook::SENDMSG)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sy_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse6(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sy_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse6(&ctx);
    PROCEED
}

#[cgroup_sock(sock_release)]
pub fn sy_sock_release(ctx: SockContext) -> i32 {
    sock::forget_released_socket(&ctx);
    PROCEED
}

/// TC ingress on the node's interfaces: the north-south load balancer.
#[classifier]
pub fn sy_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

/// XDP on the same interfaces (`--xdp-mode`): the fast path for flows TC has set up.
#[xdp]
pub fn sy_xdp_ingress(ctx: XdpContext) -> u32 {
    tc::xdp::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this: there is no unwinding in BPF.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
