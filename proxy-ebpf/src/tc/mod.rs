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
mod fib;
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
use proxy_common::{DatapathConfig, config_flags, ct_flags, reason, scope, service_flags};

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

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

/// TC ingress entry: IPv4 and IPv6 frames; anything else passes untouched.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return PASS;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => handle::<V4>(ctx),
        ETH_P_IPV6 => handle::<V6>(ctx),
        _ => PASS,
    }
}

// Separate BPF functions (not inlined) keep each stack frame within the 512-byte limit.
#[inline(never)]
fn handle<I: Inet>(ctx: &TcContext) -> i32 {
    match I::parse(ctx) {
        Ok(Parsed::Flow(packet)) => flow::<I>(ctx, &packet),
        Ok(Parsed::IcmpError(error)) => icmp::translate_error::<I>(ctx, &error),
        Ok(Parsed::Fragment) => {
            metrics::count(reason::TC_FRAGMENT_PASSED);
            PASS
        }
        Ok(Parsed::Pass) | Err(_) => PASS,
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
fn flow<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>) -> i32 {
    let now = ct::now_ns();
    if let Some(entry) = I::ct_get(&packet.tuple) {
        if entry.flags & ct_flags::REPLY != 0 {
            return reply::<I>(ctx, packet, &entry, now);
        }
        let restart = ct::syn_restarts(packet, &entry);
        if entry.expires_ns > now && !restart {
            return forward::<I>(ctx, packet, &entry, now);
        }
        if restart {
            metrics::count(reason::TC_SYN_RESTARTED);
        }
        ct::forget::<I>(&packet.tuple, &entry);
    }
    new_flow::<I>(ctx, packet, now)
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

#[inline(never)]
fn new_flow<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>, now: u64) -> i32 {
    let tuple = &packet.tuple;
    let key = I::service_key(tuple.daddr, tuple.dport, tuple.proto, scope::EXTERNAL);
    let Some(master) = lb::master::<I>(key) else {
        purge_stale_reply::<I>(packet);
        return PASS;
    };
    let config = config();
    let Some(frontend) = frontend::<I>(key, master, tuple, &config) else {
        metrics::count(reason::TC_DROPPED_SOURCE_RANGE);
        return DROP;
    };
    let selection = lb::select_from::<I>(frontend.key, &frontend.master, || {
        I::client_cookie(&tuple.saddr)
    });
    let (backend, backend_id, rev_nat_id) = match selection {
        Selection::NotAService => return PASS,
        Selection::Refuse => return reject::refuse::<I>(ctx, packet),
        Selection::Drop => {
            metrics::count(reason::TC_DROPPED_NO_LOCAL);
            return DROP;
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
        Err(verdict) => return verdict,
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
            return DROP;
        };
        to.sport = port;
    } else if I::ct_put(&to.reversed(), &reply, u64::from(BPF_ANY)).is_err() {
        metrics::count(reason::TC_CT_STORE_FAILED);
        return DROP;
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
        return DROP;
    }
    metrics::count(reason::TC_NEW_FLOW);
    if rewrite::rewrite::<I>(ctx, packet, &to).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return DROP;
    }
    fib::redirect::<I>(ctx, &route)
}

/// Picks a masquerade port whose reply tuple (backend → node address:port) is free and
/// claims it by storing the reply entry (BPF_NOEXIST, so two CPUs never share a port).
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
        if I::ct_put(&to.reversed(), reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port);
        }
    }
    None
}
