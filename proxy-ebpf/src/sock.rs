//! The socket hooks' logic: forward translation (VIP → backend) at connect/sendmsg, reverse
//! translation (backend → VIP) at recvmsg/getpeername, and socket reverse-NAT cleanup.
//!
//! Field semantics (include/uapi/linux/bpf.h, `struct bpf_sock_addr`): `user_ip4`/`user_ip6`
//! are in network byte order, `user_port` holds a network-order port in its low 16 bits and
//! must be accessed with 4-byte loads and stores.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    Addr4, Addr6, ServiceKey, SockRevNat, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key,
    SockRevNatKey, WireAddr, monitor_kind, protocol, reason, scope, service_flags,
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

/// What differs between the IPv4 and IPv6 hooks: where the address sits in the context, and
/// which socket reverse-NAT map remembers it.
pub trait SockFamily {
    type Addr: WireAddr;
    /// The context's address and port (`user_ip6` read word by word, as the kernel requires).
    fn read(addr: *mut bpf_sock_addr) -> (Self::Addr, u16);
    /// Points the context at `ip`:`port_be` (4-byte stores).
    fn write(addr: *mut bpf_sock_addr, ip: Self::Addr, port_be: u16);
    fn rev_nat() -> &'static LruHashMap<SockRevNatKey<Self::Addr>, SockRevNat<Self::Addr>>;
}

impl SockFamily for V4 {
    type Addr = Addr4;

    #[inline(always)]
    fn read(addr: *mut bpf_sock_addr) -> (Addr4, u16) {
        // SAFETY: `addr` is the verifier-checked context of a sock_addr program.
        unsafe { ((*addr).user_ip4, (*addr).user_port as u16) }
    }

    #[inline(always)]
    fn write(addr: *mut bpf_sock_addr, ip: Addr4, port_be: u16) {
        // SAFETY: as above; 4-byte stores into writable context fields.
        unsafe {
            (*addr).user_ip4 = ip;
            (*addr).user_port = u32::from(port_be);
        }
    }

    #[inline(always)]
    fn rev_nat() -> &'static LruHashMap<SockRevNat4Key, SockRevNat4> {
        &SOCK_NAT4_V1
    }
}

impl SockFamily for V6 {
    type Addr = Addr6;

    #[inline(always)]
    fn read(addr: *mut bpf_sock_addr) -> (Addr6, u16) {
        // SAFETY: `addr` is the verifier-checked context of a sock_addr program; the address
        // is read word by word as the kernel requires.
        unsafe {
            (
                [
                    (*addr).user_ip6[0],
                    (*addr).user_ip6[1],
                    (*addr).user_ip6[2],
                    (*addr).user_ip6[3],
                ],
                (*addr).user_port as u16,
            )
        }
    }

    #[inline(always)]
    fn write(addr: *mut bpf_sock_addr, ip: Addr6, port_be: u16) {
        // SAFETY: as above; 4-byte stores into writable context fields.
        unsafe {
            (*addr).user_ip6[0] = ip[0];
            (*addr).user_ip6[1] = ip[1];
            (*addr).user_ip6[2] = ip[2];
            (*addr).user_ip6[3] = ip[3];
            (*addr).user_port = u32::from(port_be);
        }
    }

    #[inline(always)]
    fn rev_nat() -> &'static LruHashMap<SockRevNat6Key, SockRevNat6> {
        &SOCK_NAT6_V1
    }
}

/// The socket's protocol, when it is one we translate.
#[inline(always)]
fn call_protocol(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: `sock_addr` is the verifier-checked context of a sock_addr program.
    socket_protocol(unsafe { (*ctx.sock_addr).protocol })
}

/// Points a translated socket at its backend, remembering what the application asked for so
/// that recvmsg/getpeername can show it.
#[inline(always)]
fn redirect<F: SockFamily>(
    ctx: &SockAddrContext,
    (asked, asked_port_be): (F::Addr, u16),
    (backend, backend_port_be): (F::Addr, u16),
    rev_nat_id: u32,
) {
    let nat_key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        address: backend,
        port_be: backend_port_be,
        pad: Default::default(),
    };
    let nat = SockRevNat {
        address: asked,
        port_be: asked_port_be,
        pad: 0,
        rev_nat_id,
    };
    if F::rev_nat().insert(nat_key, nat, 0).is_err() {
        metrics::count(reason::SOCK_REV_NAT_STORE_FAILED);
    }
    F::write(ctx.sock_addr, backend, backend_port_be);
    metrics::count(reason::TRANSLATED);
}

/// The frontend key of a destination.
#[inline(always)]
fn frontend_key<A: WireAddr>(address: A, port_be: u16, protocol: u8) -> ServiceKey<A> {
    ServiceKey {
        address,
        port_be,
        backend_slot: 0,
        protocol,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    }
}

/// connect4/sendmsg4: translate VIP:port to a backend chosen at random.
pub fn translate_forward4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let Some(protocol) = call_protocol(ctx) else {
        return PROCEED;
    };
    let (ip, port_be) = V4::read(ctx.sock_addr);
    let call = Call {
        ctx,
        hook,
        protocol,
        dst: ip,
        port_be,
    };
    let (backend, backend_id, rev_nat_id) =
        match call.decide::<V4>(frontend_key(ip, port_be, protocol)) {
            Ok(chosen) => chosen,
            Err(result) => return result,
        };
    redirect::<V4>(
        ctx,
        (ip, port_be),
        (backend.address, backend.port_be),
        rev_nat_id,
    );
    call.translated(&backend.address, backend.port_be, (backend_id, rev_nat_id));
    PROCEED
}

/// recvmsg/getpeername: show the VIP instead of the backend the socket really talks to.
pub fn translate_reverse<F: SockFamily>(ctx: &SockAddrContext) {
    let (ip, port_be) = F::read(ctx.sock_addr);
    let key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        address: ip,
        port_be,
        pad: Default::default(),
    };
    // SAFETY: plain data, copied out at once.
    if let Some(nat) = unsafe { F::rev_nat().get(key) }.copied() {
        F::write(ctx.sock_addr, nat.address, nat.port_be);
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
    let Some(protocol) = call_protocol(ctx) else {
        return PROCEED;
    };
    let (ip, port_be) = V6::read(ctx.sock_addr);
    let (backend_address, backend_port_be, rev_nat_id) = if let Some(ip4) = v4_mapped(&ip) {
        let call = Call {
            ctx,
            hook,
            protocol,
            dst: ip4,
            port_be,
        };
        match call.decide::<V4>(frontend_key(ip4, port_be, protocol)) {
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
        match call.decide::<V6>(frontend_key(ip, port_be, protocol)) {
            Ok((backend, backend_id, rev_nat_id)) => {
                call.translated(&backend.address, backend.port_be, (backend_id, rev_nat_id));
                (backend.address, backend.port_be, rev_nat_id)
            }
            Err(result) => return result,
        }
    };
    redirect::<V6>(
        ctx,
        (ip, port_be),
        (backend_address, backend_port_be),
        rev_nat_id,
    );
    PROCEED
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
