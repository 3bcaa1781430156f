//! The north-south datapath: TC ingress on the node's interfaces load-balances traffic that
//! reaches the node from outside (NodePort, externalIPs, LoadBalancer IPs, and ClusterIPs
//! routed to the node) with its own connection tracking, DNAT, masquerade and reverse NAT.
//!
//! Every packet first meets conntrack: a forward entry translates a known flow towards its
//! backend, a reply entry translates the backend's answer back. Otherwise the destination is
//! looked up in the services map; a new flow picks a backend, stores both entries and is
//! translated. Translated packets are routed here and redirected (see `fib`).
mod csum;
mod ct;
mod events;
mod fib;
mod guard;
mod icmp;
mod inet;
mod reject;
mod rewrite;
mod v4;
mod v6;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use proxy_common::{
    DatapathConfig, config_flags, ct_flags, protocol, reason, scope, service_flags,
};

use crate::{
    lb::{self, Selection, V4, V6},
    maps::CONFIG_V1,
    metrics,
};
use inet::{Flow, Inet, Packet, Parsed, Tuple};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Masquerade ports when the agent has not configured any (outside Linux's default
/// ephemeral range 32768-60999, so the node's own connections never pick them).
const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);
/// Random probes for a free masquerade port before a new flow is dropped.
const SNAT_PROBES: u32 = 32;

const PASS: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;
const REJECTED: u8 = proxy_common::monitor_kind::TC_REJECTED;
const DROPPED: u8 = proxy_common::monitor_kind::TC_DROPPED;

/// TC ingress entry: IPv4 and IPv6 frames; anything else passes untouched.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return PASS;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => run::<V4>(ctx),
        ETH_P_IPV6 => run::<V6>(ctx),
        _ => PASS,
    }
}

/// What a stage decided: a verdict, or which stage runs next.
#[derive(Clone, Copy)]
pub enum Step {
    Verdict(i32),
    NewFlow,
    RefuseTcp,
    RefuseUdp,
    IcmpError,
}

/// The stages are separate BPF functions called one after the other from here, never from
/// each other: the verifier limits the stack of a whole call chain to 512 bytes, and each
/// stage (IPv6 especially) needs most of that. Each stage parses the headers again (a few
/// loads) rather than receive them on the stack.
#[inline(always)]
fn run<I: Inet>(ctx: &TcContext) -> i32 {
    let step = match tracked::<I>(ctx) {
        Step::NewFlow => new_flow::<I>(ctx),
        other => other,
    };
    match step {
        Step::Verdict(verdict) => verdict,
        Step::RefuseTcp => reject::refuse_tcp::<I>(ctx),
        Step::RefuseUdp => reject::refuse_udp::<I>(ctx),
        Step::IcmpError => icmp::translate_error::<I>(ctx),
        Step::NewFlow => PASS,
    }
}

/// The packet's flow, parsed again by a later stage (`None` if it is not a TCP/UDP flow).
#[inline(always)]
fn parse_flow<I: Inet>(ctx: &TcContext) -> Option<Packet<I::Addr>> {
    match I::parse(ctx) {
        Ok(Parsed::Flow(packet)) => Some(packet),
        _ => None,
    }
}

/// First stage: parsing and the packets of tracked flows.
#[inline(never)]
fn tracked<I: Inet>(ctx: &TcContext) -> Step {
    match I::parse(ctx) {
        Ok(Parsed::Flow(packet)) => flow::<I>(ctx, &packet),
        Ok(Parsed::IcmpError(_)) => Step::IcmpError,
        Ok(Parsed::Fragment) => {
            metrics::count(reason::TC_FRAGMENT_PASSED);
            Step::Verdict(PASS)
        }
        Ok(Parsed::Pass) | Err(_) => Step::Verdict(PASS),
    }
}

/// The agent's settings (defaults when it has not written them yet).
#[inline(always)]
fn config() -> DatapathConfig {
    let mut config = CONFIG_V1.get(0).copied().unwrap_or_default();
    if config.snat_port_max == 0 || config.snat_port_min > config.snat_port_max {
        (config.snat_port_min, config.snat_port_max) = DEFAULT_SNAT_PORTS;
    }
    config
}

#[inline(always)]
fn flow<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>) -> Step {
    let now = ct::now_ns();
    if let Some(entry) = I::ct_get(&packet.tuple) {
        if entry.flags & ct_flags::REPLY != 0 {
            return Step::Verdict(reply::<I>(ctx, packet, &entry, now));
        }
        let restart = ct::syn_restarts(packet, &entry);
        if entry.expires_ns > now && !restart {
            return Step::Verdict(forward::<I>(ctx, packet, &entry, now));
        }
        if restart {
            metrics::count(reason::TC_SYN_RESTARTED);
        }
        ct::forget::<I>(&packet.tuple, &entry);
    }
    Step::NewFlow
}

/// A packet of a tracked flow, client → frontend.
#[inline(always)]
fn forward<I: Inet>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    entry: &Flow<I::Addr>,
    now: u64,
) -> i32 {
    let flags = entry.flags | ct::tcp_bits(packet, ct_flags::FIN_FORWARD);
    I::ct_touch(
        &packet.tuple,
        now + ct::lifetime_ns(packet.tuple.proto, flags),
        flags,
    );
    metrics::count(reason::TC_CT_FORWARD);
    translate::<I>(ctx, packet, &entry.to)
}

/// A backend's answer: translated back only while its forward entry is alive and still
/// points at this very tuple (a stale reply entry must never rewrite an unrelated flow).
#[inline(always)]
fn reply<I: Inet>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    entry: &Flow<I::Addr>,
    now: u64,
) -> i32 {
    let Some((forward_key, forward)) = ct::forward_of::<I>(&packet.tuple, entry, now) else {
        I::ct_delete(&packet.tuple);
        return PASS;
    };
    let flags = forward.flags | ct_flags::SEEN_REPLY | ct::tcp_bits(packet, ct_flags::FIN_REPLY);
    I::ct_touch(
        &forward_key,
        now + ct::lifetime_ns(packet.tuple.proto, flags),
        flags,
    );
    metrics::count(reason::TC_CT_REPLY);
    translate::<I>(ctx, packet, &entry.to)
}

/// Rewrites the packet to `to`, routes it and redirects it.
#[inline(always)]
fn translate<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>, to: &Tuple<I::Addr>) -> i32 {
    let route = match fib::lookup::<I>(ctx, &to.saddr, &to.daddr, false) {
        Ok(route) => route,
        Err(verdict) => return verdict,
    };
    if rewrite::rewrite::<I>(ctx, packet, to).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return DROP;
    }
    fib::redirect::<I>(ctx, &route)
}

/// A non-service SYN whose reversed tuple is a reply entry: that entry is left over from an
/// earlier service flow on the same ports and would rewrite this flow's answers. Forget it.
#[inline(always)]
fn purge_stale_reply<I: Inet>(packet: &Packet<I::Addr>) {
    if !ct::is_syn(packet) {
        return;
    }
    let reply_key = packet.tuple.reversed();
    let Some(reply) = I::ct_get(&reply_key) else {
        return;
    };
    if reply.flags & ct_flags::REPLY == 0 {
        return;
    }
    let forward_key = reply.to.reversed();
    if let Some(forward) = I::ct_get(&forward_key)
        && forward.flags & ct_flags::REPLY == 0
        && forward.to.reversed() == reply_key
    {
        I::ct_delete(&forward_key);
    }
    I::ct_delete(&reply_key);
    metrics::count(reason::TC_STALE_CT_PURGED);
}

/// The service's decision for a new flow, before a backend is chosen.
struct Frontend<K> {
    key: K,
    master: proxy_common::ServiceValue,
    /// The masquerade decision.
    snat: bool,
}

/// Which frontend entry serves this source, and whether its flows are masqueraded
/// (service-semantics §3.6, §3.11). `None`: the source is outside loadBalancerSourceRanges.
#[inline(always)]
fn frontend<I: Inet>(
    key: I::Key,
    master: proxy_common::ServiceValue,
    tuple: &Tuple<I::Addr>,
    config: &DatapathConfig,
) -> Option<Frontend<I::Key>> {
    let saddr = &tuple.saddr;
    let flags = master.flags;
    if flags & service_flags::SOURCE_RANGES != 0
        && flags & service_flags::LOAD_BALANCER != 0
        && !I::source_allowed(master.rev_nat_id, saddr)
    {
        return None;
    }
    let from_pod = I::in_cluster_cidr(saddr, config);
    if flags & service_flags::EXTERNAL == 0 {
        // A ClusterIP reached through the node: pods keep their address unless
        // --masquerade-all; anything else is masqueraded (hairpin is decided later).
        let snat = config.flags & config_flags::MASQUERADE_ALL != 0
            || (I::has_cluster_cidr(config) && !from_pod);
        return Some(Frontend { key, master, snat });
    }
    if flags & service_flags::EXTERNAL_LOCAL == 0 {
        return Some(Frontend {
            key,
            master,
            snat: true,
        });
    }
    if from_pod {
        // eTP=Local short-circuit: pods reach every endpoint, unmasqueraded.
        return Some(Frontend {
            key,
            master,
            snat: false,
        });
    }
    let local_key = I::service_key(tuple.daddr, tuple.dport, tuple.proto, scope::LOCAL);
    Some(match lb::master::<I>(local_key) {
        Some(local) => Frontend {
            key: local_key,
            master: local,
            snat: false,
        },
        // The agent writes the local entry before setting EXTERNAL_LOCAL; if it is missing
        // anyway, behave like externalTrafficPolicy Cluster rather than drop.
        None => Frontend {
            key,
            master,
            snat: true,
        },
    })
}

/// Second stage: a packet that starts a flow (or is not for a service at all).
#[inline(never)]
fn new_flow<I: Inet>(ctx: &TcContext) -> Step {
    match parse_flow::<I>(ctx) {
        Some(packet) => establish::<I>(ctx, &packet, ct::now_ns()),
        None => Step::Verdict(PASS),
    }
}

#[inline(always)]
fn establish<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>, now: u64) -> Step {
    let tuple = &packet.tuple;
    let key = I::service_key(tuple.daddr, tuple.dport, tuple.proto, scope::EXTERNAL);
    let Some(master) = lb::master::<I>(key) else {
        purge_stale_reply::<I>(packet);
        return guard::not_a_service::<I>(packet);
    };
    let config = config();
    let Some(frontend) = frontend::<I>(key, master, tuple, &config) else {
        metrics::count(reason::TC_DROPPED_SOURCE_RANGE);
        events::untranslated::<I>(
            DROPPED,
            reason::TC_DROPPED_SOURCE_RANGE,
            tuple,
            master.rev_nat_id,
        );
        return Step::Verdict(DROP);
    };
    let selection = lb::select_from::<I>(frontend.key, &frontend.master, || {
        I::client_cookie(&tuple.saddr)
    });
    let (backend, backend_id, rev_nat_id) = match selection {
        Selection::NotAService => return Step::Verdict(PASS),
        Selection::Refuse => {
            events::untranslated::<I>(REJECTED, reason::NO_BACKEND, tuple, master.rev_nat_id);
            return if tuple.proto == protocol::TCP {
                Step::RefuseTcp
            } else {
                Step::RefuseUdp
            };
        }
        Selection::Drop => {
            metrics::count(reason::TC_DROPPED_NO_LOCAL);
            events::untranslated::<I>(
                DROPPED,
                reason::TC_DROPPED_NO_LOCAL,
                tuple,
                master.rev_nat_id,
            );
            return Step::Verdict(DROP);
        }
        Selection::Backend {
            backend,
            backend_id,
            rev_nat_id,
        } => (backend, backend_id, rev_nat_id),
    };
    let (backend_addr, backend_port) = I::backend_target(&backend);
    // Hairpin: a client reaching itself through the service must see another source.
    let snat = frontend.snat || backend_addr == tuple.saddr;
    let route = match fib::lookup::<I>(ctx, &tuple.saddr, &backend_addr, snat) {
        Ok(route) => route,
        Err(verdict) => return Step::Verdict(verdict),
    };
    let snat_flag = if snat { ct_flags::SNAT } else { 0 };
    let reply = Flow {
        to: tuple.reversed(),
        expires_ns: 0,
        rev_nat_id,
        backend_id,
        flags: ct_flags::REPLY | snat_flag,
    };
    let mut to = Tuple {
        saddr: tuple.saddr,
        daddr: backend_addr,
        sport: tuple.sport,
        dport: backend_port,
        proto: tuple.proto,
    };
    if snat {
        to.saddr = route.src;
        let Some(port) = reserve_snat_port::<I>(&mut to, &reply, &config) else {
            metrics::count(reason::TC_SNAT_EXHAUSTED);
            events::untranslated::<I>(DROPPED, reason::TC_SNAT_EXHAUSTED, tuple, rev_nat_id);
            return Step::Verdict(DROP);
        };
        to.sport = port;
    } else if I::ct_put(&to.reversed(), &reply, u64::from(BPF_ANY)).is_err() {
        metrics::count(reason::TC_CT_STORE_FAILED);
        return Step::Verdict(DROP);
    }
    let flags = snat_flag | ct::tcp_bits(packet, ct_flags::FIN_FORWARD);
    let forward = Flow {
        to,
        expires_ns: now + ct::lifetime_ns(tuple.proto, flags),
        rev_nat_id,
        backend_id,
        flags,
    };
    if I::ct_put(tuple, &forward, u64::from(BPF_ANY)).is_err() {
        I::ct_delete(&to.reversed());
        metrics::count(reason::TC_CT_STORE_FAILED);
        return Step::Verdict(DROP);
    }
    metrics::count(reason::TC_NEW_FLOW);
    events::new_flow::<I>(tuple, &to, rev_nat_id, backend_id);
    if rewrite::rewrite::<I>(ctx, packet, &to).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return Step::Verdict(DROP);
    }
    Step::Verdict(fib::redirect::<I>(ctx, &route))
}

/// Picks a masquerade port whose reply tuple (backend → node address:port) is free and
/// claims it by storing the reply entry (BPF_NOEXIST, so two CPUs never share a port). Ports
/// of ended flows come back when the agent's conntrack GC removes their reply entries.
#[inline(always)]
fn reserve_snat_port<I: Inet>(
    to: &mut Tuple<I::Addr>,
    reply: &Flow<I::Addr>,
    config: &DatapathConfig,
) -> Option<u16> {
    let span = u32::from(config.snat_port_max - config.snat_port_min) + 1;
    for _ in 0..SNAT_PROBES {
        // SAFETY: a helper call without arguments or memory access.
        let random = unsafe { bpf_get_prandom_u32() };
        let port = (config.snat_port_min + (random % span) as u16).to_be();
        to.sport = port;
        let reply_key = to.reversed();
        if I::ct_put(&reply_key, reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port);
        }
    }
    None
}
