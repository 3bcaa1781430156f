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
use lb::{V4, V6};
use proxy_common::{map_table::same_name, monitor_hook, program};

/// Return value that lets the syscall proceed (for recvmsg/getpeername the only valid one).
const PROCEED: i32 = 1;

/// Checks that an entry point is named as the agent loads it (`proxy_common::program`).
macro_rules! named_as {
    ($function:ident, $name:expr) => {
        const _: () = assert!(
            same_name(stringify!($function), $name),
            concat!(
                stringify!($function),
                " is not named as in proxy_common::program"
            ),
        );
    };
}

named_as!(sy_connect4, program::CONNECT4);
#[cgroup_sock_addr(connect4)]
pub fn sy_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate_forward4(&ctx, monitor_hook::CONNECT)
}

named_as!(sy_sendmsg4, program::SENDMSG4);
#[cgroup_sock_addr(sendmsg4)]
pub fn sy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_forward4(&ctx, monitor_hook::SENDMSG)
}

named_as!(sy_recvmsg4, program::RECVMSG4);
#[cgroup_sock_addr(recvmsg4)]
pub fn sy_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse::<V4>(&ctx);
    PROCEED
}

named_as!(sy_getpeername4, program::GETPEERNAME4);
#[cgroup_sock_addr(getpeername4)]
pub fn sy_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse::<V4>(&ctx);
    PROCEED
}

named_as!(sy_connect6, program::CONNECT6);
#[cgroup_sock_addr(connect6)]
pub fn sy_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate_forward6(&ctx, monitor_hook::CONNECT)
}

named_as!(sy_sendmsg6, program::SENDMSG6);
#[cgroup_sock_addr(sendmsg6)]
pub fn sy_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate_forward6(&ctx, monitor_hook::SENDMSG)
}

named_as!(sy_recvmsg6, program::RECVMSG6);
#[cgroup_sock_addr(recvmsg6)]
pub fn sy_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse::<V6>(&ctx);
    PROCEED
}

named_as!(sy_getpeername6, program::GETPEERNAME6);
#[cgroup_sock_addr(getpeername6)]
pub fn sy_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::translate_reverse::<V6>(&ctx);
    PROCEED
}

named_as!(sy_sock_release, program::SOCK_RELEASE);
#[cgroup_sock(sock_release)]
pub fn sy_sock_release(ctx: SockContext) -> i32 {
    sock::forget_released_socket(&ctx);
    PROCEED
}

named_as!(sy_tc_ingress, program::TC_INGRESS);
/// TC ingress on the node's interfaces: the north-south load balancer.
#[classifier]
pub fn sy_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

named_as!(sy_xdp_ingress, program::XDP_INGRESS);
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
