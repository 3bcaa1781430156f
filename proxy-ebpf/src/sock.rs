//! The socket hooks' logic: forward translation (VIP → backend) at connect/sendmsg, reverse
//! translation (backend → VIP) at recvmsg/getpeername, and socket reverse-NAT cleanup.
//!
//! Field semantics (include/uapi/linux/bpf.h, `struct bpf_sock_addr`): `user_ip4`/`user_ip6`
//! are in network byte order, `user_port` holds a network-order port in its low 16 bits and
//! must be accessed with 4-byte loads and stores.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    Service4Key, Service6Key, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, protocol,
    reason, scope,
};

use crate::{
    lb::{self, Selection, V4, V6},
    maps::{SOCK_NAT4_V1, SOCK_NAT6_V1},
    metrics,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
/// Let the syscall continue.
const PROCEED: i32 = 1;
/// Fail the syscall; the errno is what `bpf_set_retval` stored.
const REJECT: i32 = 0;

fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is the program's own ctx, which the helper accepts.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The client's identity for session affinity: its network namespace.
fn client_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is the program's own ctx, which the helper accepts.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Fails the syscall with `errno` (no packet leaves the socket).
fn fail_with(errno: i32, reason: u32) -> i32 {
    metrics::count(reason);
    // SAFETY: a helper call with a plain integer argument; valid in cgroup sock_addr programs
    // since Linux 5.19.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// Makes the syscall fail with ECONNREFUSED, as kube-proxy's REJECT does for services without
/// endpoints (instead of a silent black hole).
fn refuse() -> i32 {
    fail_with(ECONNREFUSED, reason::NO_BACKEND)
}

/// kube-proxy DROPs traffic whose policy leaves no endpoint for this node while the service
/// has endpoints elsewhere. Nothing is sent and no endpoint is reached; the caller learns it at
/// once with EHOSTUNREACH (a packet-level DROP would make it wait for a timeout instead).
fn drop_no_local_endpoint() -> i32 {
    fail_with(EHOSTUNREACH, reason::NO_LOCAL_ENDPOINT)
}

/// Which L4 protocol the socket speaks, or `None` for anything that is not TCP or UDP.
fn socket_protocol(raw: u32) -> Option<u8> {
    match raw {
        6 => Some(protocol::TCP),
        17 => Some(protocol::UDP),
        _ => None,
    }
}

/// connect4/sendmsg4: translate VIP:port to a backend chosen at random.
pub fn translate_forward4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the verifier-checked context of a sock_addr program.
    let (ip, port_raw, proto_raw) =
        unsafe { ((*addr).user_ip4, (*addr).user_port, (*addr).protocol) };
    let Some(protocol) = socket_protocol(proto_raw) else {
        return PROCEED;
    };
    let key = Service4Key {
        address: ip,
        port_be: port_raw as u16,
        backend_slot: 0,
        protocol,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    match lb::select::<V4>(key, || client_cookie(ctx)) {
        Selection::NotAService => {
            metrics::count(reason::NOT_A_SERVICE);
            PROCEED
        }
        Selection::Refuse => refuse(),
        Selection::Drop => drop_no_local_endpoint(),
        Selection::Backend {
            backend,
            rev_nat_id,
            ..
        } => {
            let nat_key = SockRevNat4Key {
                cookie: socket_cookie(ctx),
                address: backend.address,
                port_be: backend.port_be,
                pad: 0,
            };
            let nat = SockRevNat4 {
                address: ip,
                port_be: key.port_be,
                pad: 0,
                rev_nat_id,
            };
            if SOCK_NAT4_V1.insert(nat_key, nat, 0).is_err() {
                metrics::count(reason::SOCK_REV_NAT_STORE_FAILED);
            }
            // SAFETY: as above; 4-byte stores into writable context fields.
            unsafe {
                (*addr).user_ip4 = backend.address;
                (*addr).user_port = u32::from(backend.port_be);
            }
            metrics::count(reason::TRANSLATED);
            PROCEED
        }
    }
}

/// recvmsg4/getpeername4: show the VIP instead of the backend the socket really talks to.
pub fn translate_reverse4(ctx: &SockAddrContext) {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the verifier-checked context of a sock_addr program.
    let (ip, port_raw) = unsafe { ((*addr).user_ip4, (*addr).user_port) };
    let key = SockRevNat4Key {
        cookie: socket_cookie(ctx),
        address: ip,
        port_be: port_raw as u16,
        pad: 0,
    };
    // SAFETY: plain data, copied out at once.
    if let Some(nat) = unsafe { SOCK_NAT4_V1.get(key) }.copied() {
        // SAFETY: 4-byte stores into writable context fields.
        unsafe {
            (*addr).user_ip4 = nat.address;
            (*addr).user_port = u32::from(nat.port_be);
        }
        metrics::count(reason::REV_NAT_APPLIED);
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), if it is one.
fn v4_mapped(ip: &[u32; 4]) -> Option<u32> {
    (ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX_WORD).then_some(ip[3])
}

/// Word 2 of an IPv4-mapped address (`0000:ffff`) as it sits in memory (network order).
const V4_MAPPED_PREFIX_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A chosen backend, as an IPv6 socket addresses it.
struct Backend6Choice {
    address: [u32; 4],
    port_be: u16,
}

/// Selects a backend for an IPv6 destination. Dual-stack sockets reach IPv4 services through
/// IPv4-mapped addresses, so those are looked up in the IPv4 map and answered mapped.
fn select_for_ipv6_socket(
    ctx: &SockAddrContext,
    ip: [u32; 4],
    port_be: u16,
    protocol: u8,
) -> Selection<Backend6Choice> {
    if let Some(ip4) = v4_mapped(&ip) {
        let key = Service4Key {
            address: ip4,
            port_be,
            backend_slot: 0,
            protocol,
            scope: scope::EXTERNAL,
            pad: [0; 2],
        };
        return lb::select::<V4>(key, || client_cookie(ctx)).map(|backend| Backend6Choice {
            address: [0, 0, V4_MAPPED_PREFIX_WORD, backend.address],
            port_be: backend.port_be,
        });
    }
    let key = Service6Key {
        address: ip,
        port_be,
        backend_slot: 0,
        protocol,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    lb::select::<V6>(key, || client_cookie(ctx)).map(|backend| Backend6Choice {
        address: backend.address,
        port_be: backend.port_be,
    })
}

/// connect6/sendmsg6: translate [VIP]:port to a backend chosen at random.
pub fn translate_forward6(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the verifier-checked context of a sock_addr program; the address is
    // read word by word as the kernel requires.
    let (ip, port_raw, proto_raw) = unsafe {
        (
            [
                (*addr).user_ip6[0],
                (*addr).user_ip6[1],
                (*addr).user_ip6[2],
                (*addr).user_ip6[3],
            ],
            (*addr).user_port,
            (*addr).protocol,
        )
    };
    let Some(protocol) = socket_protocol(proto_raw) else {
        return PROCEED;
    };
    let port_be = port_raw as u16;
    match select_for_ipv6_socket(ctx, ip, port_be, protocol) {
        Selection::NotAService => {
            metrics::count(reason::NOT_A_SERVICE);
            PROCEED
        }
        Selection::Refuse => refuse(),
        Selection::Drop => drop_no_local_endpoint(),
        Selection::Backend {
            backend,
            rev_nat_id,
            ..
        } => {
            let nat_key = SockRevNat6Key {
                cookie: socket_cookie(ctx),
                address: backend.address,
                port_be: backend.port_be,
                pad: [0; 3],
            };
            let nat = SockRevNat6 {
                address: ip,
                port_be,
                pad: 0,
                rev_nat_id,
            };
            if SOCK_NAT6_V1.insert(nat_key, nat, 0).is_err() {
                metrics::count(reason::SOCK_REV_NAT_STORE_FAILED);
            }
            // SAFETY: 4-byte stores into writable context fields.
            unsafe {
                (*addr).user_ip6[0] = backend.address[0];
                (*addr).user_ip6[1] = backend.address[1];
                (*addr).user_ip6[2] = backend.address[2];
                (*addr).user_ip6[3] = backend.address[3];
                (*addr).user_port = u32::from(backend.port_be);
            }
            metrics::count(reason::TRANSLATED);
            PROCEED
        }
    }
}

/// recvmsg6/getpeername6: show the VIP instead of the backend.
pub fn translate_reverse6(ctx: &SockAddrContext) {
    let addr = ctx.sock_addr;
    // SAFETY: as in `translate_forward6`.
    let (ip, port_raw) = unsafe {
        (
            [
                (*addr).user_ip6[0],
                (*addr).user_ip6[1],
                (*addr).user_ip6[2],
                (*addr).user_ip6[3],
            ],
            (*addr).user_port,
        )
    };
    let key = SockRevNat6Key {
        cookie: socket_cookie(ctx),
        address: ip,
        port_be: port_raw as u16,
        pad: [0; 3],
    };
    // SAFETY: plain data, copied out at once.
    if let Some(nat) = unsafe { SOCK_NAT6_V1.get(key) }.copied() {
        // SAFETY: 4-byte stores into writable context fields.
        unsafe {
            (*addr).user_ip6[0] = nat.address[0];
            (*addr).user_ip6[1] = nat.address[1];
            (*addr).user_ip6[2] = nat.address[2];
            (*addr).user_ip6[3] = nat.address[3];
            (*addr).user_port = u32::from(nat.port_be);
        }
        metrics::count(reason::REV_NAT_APPLIED);
    }
}

/// sock_release: drop the reverse-NAT entry of a connected socket that goes away. Unconnected
/// UDP sockets may have sent to many backends; their entries age out of the LRU.
pub fn forget_released_socket(ctx: &SockContext) {
    let sk = ctx.sock;
    // SAFETY: `sk` is the verifier-checked context of a cgroup sock program; the destination
    // fields are readable at sock_release (net/core/filter.c, __sock_filter_check_attach_type).
    let (family, port_be) = unsafe { ((*sk).family, (*sk).dst_port) };
    if port_be == 0 {
        return;
    }
    // SAFETY: the context pointer is the program's own ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let removed = if family == AF_INET {
        // SAFETY: as above.
        let address = unsafe { (*sk).dst_ip4 };
        SOCK_NAT4_V1
            .remove(SockRevNat4Key {
                cookie,
                address,
                port_be,
                pad: 0,
            })
            .is_ok()
    } else if family == AF_INET6 {
        // SAFETY: as above, read word by word.
        let address = unsafe {
            [
                (*sk).dst_ip6[0],
                (*sk).dst_ip6[1],
                (*sk).dst_ip6[2],
                (*sk).dst_ip6[3],
            ]
        };
        SOCK_NAT6_V1
            .remove(SockRevNat6Key {
                cookie,
                address,
                port_be,
                pad: [0; 3],
            })
            .is_ok()
    } else {
        false
    };
    if removed {
        metrics::count(reason::SOCK_REV_NAT_RELEASED);
    }
}
