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
    Service4Key, Service6Key, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key,
    monitor_kind, protocol, reason, scope, service_flags,
};

use crate::{
    addr::ServiceAddr,
    guard,
    lb::{self, Selection, V4, V6},
    maps::{SOCK_CONFIG_V1, SOCK_NAT4_V1, SOCK_NAT6_V1},
    metrics, monitor,
    sock_source::{SourceCheck, Verdict},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const EPERM: i32 = 1;
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

/// Which L4 protocol the socket speaks, or `None` for anything that is not TCP or UDP.
fn socket_protocol(raw: u32) -> Option<u8> {
    match raw {
        6 => Some(protocol::TCP),
        17 => Some(protocol::UDP),
        _ => None,
    }
}

/// Whether the socket lives in the host's network namespace (the agent's own): a host
/// process, the agent included.
fn from_host(ctx: &SockAddrContext) -> bool {
    let host = SOCK_CONFIG_V1
        .get(0)
        .map_or(0, |config| config.host_netns_cookie);
    host != 0 && client_cookie(ctx) == host
}

/// A connect/sendmsg and what the socket asked for.
struct Call<'a, A> {
    ctx: &'a SockAddrContext,
    hook: u8,
    protocol: u8,
    /// The destination as the application gave it (an IPv4-mapped one as IPv4).
    dst: A,
    port_be: u16,
}

impl<A: ServiceAddr> Call<'_, A> {
    /// Starts a monitor event about this call (only while someone is monitoring).
    fn event(&self, kind: u8, why: u32, rev_nat_id: u32) -> Option<monitor::Event> {
        let mut event = monitor::start(kind, why, self.hook, self.protocol)?;
        event.destination(&self.dst, self.port_be);
        event.frontend(rev_nat_id);
        event.caller(socket_cookie(self.ctx), client_cookie(self.ctx));
        Some(event)
    }

    /// Fails the call, telling the monitor why.
    fn fail(&self, kind: u8, errno: i32, why: u32, rev_nat_id: u32) -> i32 {
        if let Some(event) = self.event(kind, why, rev_nat_id) {
            event.submit();
        }
        fail_with(errno, why)
    }

    /// The destination is no frontend: the service-CIDR guard decides.
    fn not_a_service(&self) -> Option<i32> {
        match guard::check(&self.dst) {
            guard::Verdict::Pass => {
                metrics::count(reason::NOT_A_SERVICE);
                None
            }
            guard::Verdict::Reject => Some(self.fail(
                monitor_kind::SOCK_REFUSED,
                ECONNREFUSED,
                reason::GUARD_REJECTED,
                0,
            )),
            guard::Verdict::Drop => {
                Some(self.fail(monitor_kind::SOCK_DROPPED, EPERM, reason::GUARD_DROPPED, 0))
            }
        }
    }

    /// Decides for the frontend `key`: `Err` is the syscall's result when it is not
    /// translated (proceed untouched, or fail), `Ok` the backend to translate to.
    #[inline(always)]
    fn decide<F: lb::Family + SourceCheck>(
        &self,
        key: F::Key,
    ) -> Result<(F::Backend, u32, u32), i32> {
        let Some(master) = lb::master::<F>(key) else {
            return Err(self.not_a_service().unwrap_or(PROCEED));
        };
        if master.flags & service_flags::NOT_FOR_HOST != 0 && from_host(self.ctx) {
            // CVE-2020-8554: an externalIP that is this node's or the API server's address
            // must keep reaching that address from the host.
            if let Some(event) = self.event(
                monitor_kind::SOCK_UNTRANSLATED,
                reason::HOST_EXTERNAL_IP_BYPASSED,
                master.rev_nat_id,
            ) {
                event.submit();
            }
            metrics::count(reason::HOST_EXTERNAL_IP_BYPASSED);
            return Err(PROCEED);
        }
        if master.flags & service_flags::SOURCE_RANGES != 0
            && master.flags & service_flags::LOAD_BALANCER != 0
        {
            match F::check(self.ctx, master.rev_nat_id) {
                Verdict::Allowed => {}
                // kube-proxy DROPs; failing at once tells the caller without a timeout.
                Verdict::Outside => {
                    return Err(self.fail(
                        monitor_kind::SOCK_DROPPED,
                        EPERM,
                        reason::SOCK_SOURCE_RANGE_DROPPED,
                        master.rev_nat_id,
                    ));
                }
                Verdict::Unknown => {
                    metrics::count(reason::SOCK_SOURCE_RANGE_DEFERRED);
                    return Err(PROCEED);
                }
            }
        }
        // No flow tuple at connect time: sockets always pick at random (Maglev is north-south).
        match lb::select_from::<F>(key, &master, || client_cookie(self.ctx), None) {
            Selection::NotAService => Err(PROCEED),
            // kube-proxy REJECTs a service without endpoints: the caller learns at once.
            Selection::Refuse => Err(self.fail(
                monitor_kind::SOCK_REFUSED,
                ECONNREFUSED,
                reason::NO_BACKEND,
                master.rev_nat_id,
            )),
            // kube-proxy DROPs when the policy leaves no endpoint for this node; nothing is
            // sent and the caller learns it at once (a packet-level DROP would make it wait
            // for a timeout instead).
            Selection::Drop => Err(self.fail(
                monitor_kind::SOCK_DROPPED,
                EHOSTUNREACH,
                reason::NO_LOCAL_ENDPOINT,
                master.rev_nat_id,
            )),
            Selection::Backend {
                backend,
                backend_id,
                rev_nat_id,
            } => Ok((backend, backend_id, rev_nat_id)),
        }
    }

    /// Tells the monitor where the call was sent.
    fn translated<B: ServiceAddr>(&self, backend: &B, port_be: u16, ids: (u32, u32)) {
        if let Some(mut event) =
            self.event(monitor_kind::SOCK_TRANSLATED, reason::TRANSLATED, ids.1)
        {
            event.backend(backend, port_be, ids.0);
            event.submit();
        }
    }
}

/// connect4/sendmsg4: translate VIP:port to a backend chosen at random.
pub fn translate_forward4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the verifier-checked context of a sock_addr program.
    let (ip, port_raw, proto_raw) =
        unsafe { ((*addr).user_ip4, (*addr).user_port, (*addr).protocol) };
    let Some(protocol) = socket_protocol(proto_raw) else {
        return PROCEED;
    };
    let call = Call {
        ctx,
        hook,
        protocol,
        dst: ip,
        port_be: port_raw as u16,
    };
    let key = Service4Key {
        address: ip,
        port_be: call.port_be,
        backend_slot: 0,
        protocol,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    let (backend, backend_id, rev_nat_id) = match call.decide::<V4>(key) {
        Ok(chosen) => chosen,
        Err(result) => return result,
    };
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
    call.translated(&backend.address, backend.port_be, (backend_id, rev_nat_id));
    PROCEED
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

/// connect6/sendmsg6: translate [VIP]:port to a backend chosen at random. Dual-stack
/// sockets reach IPv4 services through IPv4-mapped addresses, so those are looked up in the
/// IPv4 map and answered mapped.
pub fn translate_forward6(ctx: &SockAddrContext, hook: u8) -> i32 {
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
    let (backend_address, backend_port_be, rev_nat_id) = if let Some(ip4) = v4_mapped(&ip) {
        let call = Call {
            ctx,
            hook,
            protocol,
            dst: ip4,
            port_be,
        };
        let key = Service4Key {
            address: ip4,
            port_be,
            backend_slot: 0,
            protocol,
            scope: scope::EXTERNAL,
            pad: [0; 2],
        };
        match call.decide::<V4>(key) {
            Ok((backend, backend_id, rev_nat_id)) => {
                call.translated(&backend.address, backend.port_be, (backend_id, rev_nat_id));
                (
                    [0, 0, V4_MAPPED_PREFIX_WORD, backend.address],
                    backend.port_be,
                    rev_nat_id,
                )
            }
            Err(result) => return result,
        }
    } else {
        let call = Call {
            ctx,
            hook,
            protocol,
            dst: ip,
            port_be,
        };
        let key = Service6Key {
            address: ip,
            port_be,
            backend_slot: 0,
            protocol,
            scope: scope::EXTERNAL,
            pad: [0; 2],
        };
        match call.decide::<V6>(key) {
            Ok((backend, backend_id, rev_nat_id)) => {
                call.translated(&backend.address, backend.port_be, (backend_id, rev_nat_id));
                (backend.address, backend.port_be, rev_nat_id)
            }
            Err(result) => return result,
        }
    };
    let nat_key = SockRevNat6Key {
        cookie: socket_cookie(ctx),
        address: backend_address,
        port_be: backend_port_be,
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
        (*addr).user_ip6[0] = backend_address[0];
        (*addr).user_ip6[1] = backend_address[1];
        (*addr).user_ip6[2] = backend_address[2];
        (*addr).user_ip6[3] = backend_address[3];
        (*addr).user_port = u32::from(backend_port_be);
    }
    metrics::count(reason::TRANSLATED);
    PROCEED
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
