//! The north-south datapath: TC ingress on the node's interfaces load-balances traffic that
//! reaches the node from outside (NodePort, externalIPs, LoadBalancer IPs, and ClusterIPs
//! routed to the node) with its own connection tracking, DNAT, masquerade and reverse NAT.
//!
//! Every packet first meets conntrack: a forward entry translates a known flow towards its
//! backend, a reply entry translates the backend's answer back. Otherwise the destination is
//! looked up in the services map; a new flow picks a backend, stores both entries and is
//! translated. Translated packets are routed here and redirected (see `fib`); one too big
//! for its route is answered with the MTU (see `pmtu`). The later fragments of a UDP datagram
//! carry no ports: they take those of its first fragment (see `Fragment`).
mod csum;
mod ct;
mod dsr;
mod events;
mod fib;
mod guard;
mod icmp;
mod inet;
mod pmtu;
mod reject;
mod rewrite;
mod seq;
mod v4;
mod v6;
pub mod xdp;

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
    maps::{CONFIG_V1, FLOW_SCRATCH, MAGLEV_CFG_V1},
    metrics,
};
use fib::NoRoute;
use inet::{Flow, Fragment, Inet, Owner, Packet, Parsed, Tuple};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Masquerade ports when the agent has not configured any.
const DEFAULT_SNAT_PORTS: (u16, u16) = proxy_common::DEFAULT_SNAT_PORTS;
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
        metrics::count(reason::TC_TRUNCATED_PASSED);
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
    /// A new flow is decided (in `FLOW_SCRATCH`): claim its reply tuple, store and translate.
    Commit,
    /// The translated packet exceeds its route's MTU (this one).
    TooBig(u16),
    /// A new Direct Server Return flow is decided (in `FLOW_SCRATCH`): store and send it.
    DsrCommit,
    /// A packet of a tracked Direct Server Return flow: send it with the frontend option.
    DsrForward,
    /// A pod's reply of a Direct Server Return flow served on this node.
    DsrReply,
}

/// The stages are separate BPF functions called one after the other from here, never from
/// each other: the verifier limits the stack of a whole call chain to 512 bytes, and each
/// stage (IPv6 especially) needs most of that. Each stage parses the headers again (a few
/// loads) rather than receive them on the stack.
#[inline(always)]
fn run<I: dsr::Encoding>(ctx: &TcContext) -> i32 {
    if let Some(verdict) = dsr::arriving::<I>(ctx) {
        return verdict;
    }
    let step = match tracked::<I>(ctx) {
        Step::NewFlow => new_flow::<I>(ctx, new_flow_hash::<I>(ctx)),
        other => other,
    };
    let step = match step {
        Step::DsrCommit => dsr::commit::<I>(ctx),
        Step::DsrForward => dsr::forward::<I>(ctx),
        Step::DsrReply => dsr::reply::<I>(ctx),
        other => other,
    };
    match step {
        Step::Verdict(verdict) => verdict,
        Step::RefuseTcp => reject::refuse_tcp::<I>(ctx),
        Step::RefuseUdp => reject::refuse_udp::<I>(ctx),
        Step::IcmpError => icmp::translate_error::<I>(ctx),
        Step::Commit => commit::<I>(ctx),
        Step::TooBig(mtu) => pmtu::too_big::<I>(ctx, mtu),
        Step::NewFlow | Step::DsrCommit | Step::DsrForward | Step::DsrReply => PASS,
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
fn tracked<I: dsr::Encoding>(ctx: &TcContext) -> Step {
    match I::parse(ctx) {
        Ok(Parsed::Flow(packet)) => {
            if packet.fragment == Fragment::First {
                // Every UDP first fragment, service or not: the later fragments of any
                // datagram need its ports to be judged (and are dropped without them).
                I::fragment_seen(ctx, &packet);
            }
            flow::<I>(ctx, &packet)
        }
        Ok(Parsed::IcmpError(_)) => Step::IcmpError,
        Ok(Parsed::Fragment) => {
            metrics::count(reason::TC_FRAGMENT_PASSED);
            Step::Verdict(PASS)
        }
        Ok(Parsed::UntrackedFragment) => {
            metrics::count(reason::TC_FRAGMENT_UNTRACKED);
            Step::Verdict(DROP)
        }
        Ok(Parsed::Pass) => Step::Verdict(PASS),
        Err(_) => {
            metrics::count(reason::TC_TRUNCATED_PASSED);
            Step::Verdict(PASS)
        }
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
fn flow<I: dsr::Encoding>(ctx: &TcContext, packet: &Packet<I::Addr>) -> Step {
    let now = ct::now_ns();
    if let Some(entry) = I::ct_get(&packet.tuple) {
        if entry.flags & ct_flags::DSR != 0 {
            return dsr::track::<I>(packet, &entry, now);
        }
        if entry.flags & ct_flags::REPLY != 0 {
            return reply::<I>(ctx, packet, &entry, now);
        }
        if entry.expires_ns > now {
            let syn = if ct::is_syn(packet) {
                match ct::syn_on_flow(entry.flags) {
                    // An unanswered flow whose endpoint was deleted meanwhile: the SYN
                    // (retransmitted, or a new connection from the same client port) must
                    // not go to an endpoint that no longer exists; it starts afresh.
                    ct::SynOnFlow::Retransmit if !ct::backend_current::<I>(&entry) => {
                        ct::SynOnFlow::Restart
                    }
                    syn => syn,
                }
            } else {
                ct::SynOnFlow::Retransmit
            };
            match syn {
                ct::SynOnFlow::Retransmit => {
                    return forward::<I>(ctx, packet, &entry, now);
                }
                ct::SynOnFlow::Ignore => {
                    metrics::count(reason::TC_SYN_IGNORED);
                    return translate::<I>(ctx, packet, &entry.to);
                }
                ct::SynOnFlow::Restart => metrics::count(reason::TC_SYN_RESTARTED),
            }
        }
        ct::forget::<I>(&packet.tuple, &entry);
    }
    Step::NewFlow
}

/// A stage between the first and the new-flow stage: the Maglev hash of the packet's flow,
/// with the seed the agent configured (0 before it did). A stage of its own because neither
/// neighbour has the stack to spare.
#[inline(never)]
fn new_flow_hash<I: Inet>(ctx: &TcContext) -> u32 {
    let seed = MAGLEV_CFG_V1.get(0).map_or(0, |config| config.seed);
    parse_flow::<I>(ctx).map_or(0, |packet| I::flow_hash(&packet.tuple, seed))
}

/// A packet of a tracked flow, client → frontend.
#[inline(always)]
fn forward<I: Inet>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    entry: &Flow<I::Addr>,
    now: u64,
) -> Step {
    let reply_key = entry.to.reversed();
    let owner = packet.tuple.reversed();
    if !seq::follow::<I>(ctx, packet, &reply_key, &owner, seq::Side::Forward) {
        metrics::count(reason::TC_RST_OUT_OF_WINDOW);
        return Step::Verdict(DROP);
    }
    let flags = entry.flags | ct::tcp_bits(packet, ct_flags::FIN_FORWARD);
    let expires_ns = now + ct::lifetime_ns(packet.tuple.proto, flags);
    if entry.unreplied
        && flags & ct_flags::SEEN_REPLY != 0
        && seq::acknowledges_reply::<I>(ctx, packet, &reply_key, &owner)
    {
        // The client acknowledged the backend's SYN-ACK: the flow is confirmed.
        let confirmed = Flow {
            expires_ns,
            flags,
            ..*entry
        };
        if !ct::promote::<I>(&packet.tuple, &confirmed, &reply_key) {
            metrics::count(reason::TC_CT_COLLISION);
            return Step::Verdict(DROP);
        }
    } else {
        I::ct_touch(&packet.tuple, expires_ns, flags, entry.unreplied);
    }
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
) -> Step {
    let Some((forward_key, forward)) = ct::forward_of::<I>(&packet.tuple, entry, now) else {
        I::ct_delete(&packet.tuple);
        return Step::Verdict(PASS);
    };
    if !seq::follow::<I>(ctx, packet, &packet.tuple, &entry.to, seq::Side::Reply) {
        metrics::count(reason::TC_RST_OUT_OF_WINDOW);
        return Step::Verdict(DROP);
    }
    let flags = forward.flags | ct_flags::SEEN_REPLY | ct::tcp_bits(packet, ct_flags::FIN_REPLY);
    let expires_ns = now + ct::lifetime_ns(packet.tuple.proto, flags);
    if forward.unreplied && packet.tuple.proto != protocol::TCP {
        // A UDP flow is confirmed by its first reply (a TCP flow by the client's ACK).
        let confirmed = Flow {
            expires_ns,
            flags,
            ..forward
        };
        if !ct::promote::<I>(&forward_key, &confirmed, &packet.tuple) {
            metrics::count(reason::TC_CT_COLLISION);
            return Step::Verdict(DROP);
        }
    } else {
        I::ct_touch(&forward_key, expires_ns, flags, forward.unreplied);
    }
    metrics::count(reason::TC_CT_REPLY);
    translate::<I>(ctx, packet, &entry.to)
}

/// Rewrites the packet to `to`, routes it and redirects it.
#[inline(always)]
fn translate<I: Inet>(ctx: &TcContext, packet: &Packet<I::Addr>, to: &Tuple<I::Addr>) -> Step {
    let route = match fib::lookup::<I>(ctx, &to.saddr, &to.daddr, false) {
        Ok(route) => route,
        Err(no_route) => return refused(no_route),
    };
    if rewrite::rewrite::<I>(ctx, packet, to).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return Step::Verdict(DROP);
    }
    if packet.fragment == Fragment::Later {
        metrics::count(reason::TC_FRAGMENT_TRANSLATED);
    }
    Step::Verdict(fib::redirect::<I>(ctx, &route))
}

/// The next step for a packet that cannot be forwarded.
#[inline(always)]
fn refused(no_route: NoRoute) -> Step {
    match no_route {
        NoRoute::Verdict(verdict) => Step::Verdict(verdict),
        NoRoute::TooBig(mtu) => Step::TooBig(mtu),
    }
}

/// A non-service SYN whose reversed tuple is a reply entry: if that entry is left over from
/// an ended flow on the same ports it would rewrite this flow's answers, so it goes. The
/// entry of a live flow stays (a spoofed SYN must not delete it).
#[inline(always)]
fn purge_stale_reply<I: Inet>(packet: &Packet<I::Addr>, now: u64) {
    if !ct::is_syn(packet) {
        return;
    }
    let reply_key = packet.tuple.reversed();
    match I::ct_owner(&reply_key, now) {
        Owner::Free => return,
        Owner::Live => {
            metrics::count(reason::TC_CT_COLLISION);
            return;
        }
        // The ended flow's forward entry, if any, expires or is collected on its own.
        Owner::Ended => {}
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

/// Which frontend entry serves this source, and whether its flows are masqueraded (kube-proxy
/// masquerades external traffic unless externalTrafficPolicy is Local; README "What the agent
/// programs for external frontends").
/// `None`: the source is outside loadBalancerSourceRanges.
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
fn new_flow<I: dsr::Encoding>(ctx: &TcContext, flow_hash: u32) -> Step {
    match parse_flow::<I>(ctx) {
        // A later fragment never starts a flow: its datagram's first fragment was not
        // translated, so the stack reassembles both.
        Some(packet) if packet.fragment != Fragment::Later => {
            establish::<I>(ctx, &packet, ct::now_ns(), flow_hash)
        }
        _ => Step::Verdict(PASS),
    }
}

#[inline(always)]
fn establish<I: dsr::Encoding>(
    ctx: &TcContext,
    packet: &Packet<I::Addr>,
    now: u64,
    flow_hash: u32,
) -> Step {
    let tuple = &packet.tuple;
    let key = I::service_key(tuple.daddr, tuple.dport, tuple.proto, scope::EXTERNAL);
    let Some(master) = lb::master::<I>(key) else {
        if dsr::is_reply::<I>(tuple) {
            return Step::DsrReply;
        }
        purge_stale_reply::<I>(packet, now);
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
    let selection = lb::select_from::<I>(
        frontend.key,
        &frontend.master,
        || I::client_cookie(&tuple.saddr),
        Some(flow_hash),
    );
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
    let hairpin = backend_addr == tuple.saddr;
    let snat = frontend.snat || hairpin;
    // Direct Server Return: external traffic policy Cluster, to an endpoint another node
    // reaches (whose route goes through a gateway); local endpoints are masqueraded as ever.
    let dsr_candidate = frontend.snat
        && !hairpin
        && frontend.master.flags & service_flags::EXTERNAL != 0
        && packet.fragment == Fragment::Whole
        && dsr::wanted(frontend.master.flags, tuple.proto, &config)
        && I::encodable(packet);
    let route = match fib::lookup::<I>(ctx, &tuple.saddr, &backend_addr, snat && !dsr_candidate) {
        Ok(route) => route,
        Err(no_route) => return refused(no_route),
    };
    let dsr = dsr_candidate && route.via_gateway(&backend_addr);
    let route = if dsr_candidate && !dsr {
        match fib::lookup::<I>(ctx, &tuple.saddr, &backend_addr, snat) {
            Ok(route) => route,
            Err(no_route) => return refused(no_route),
        }
    } else {
        route
    };
    let snat = snat && !dsr;
    let Some(pending) = pending::<I>() else {
        metrics::count(reason::TC_CT_STORE_FAILED);
        return Step::Verdict(DROP);
    };
    let snat_flag = if snat {
        ct_flags::SNAT
    } else if dsr {
        ct_flags::DSR
    } else {
        0
    };
    let (seq_word, seq_flag) = seq::first::<I>(ctx, packet);
    pending.reply = Flow {
        to: tuple.reversed(),
        expires_ns: seq_word,
        rev_nat_id,
        backend_id,
        flags: ct_flags::REPLY | snat_flag | seq_flag,
        unreplied: true,
    };
    let flags = snat_flag | ct::tcp_bits(packet, ct_flags::FIN_FORWARD);
    pending.forward = Flow {
        to: Tuple {
            saddr: if snat { route.src } else { tuple.saddr },
            daddr: backend_addr,
            sport: tuple.sport,
            dport: backend_port,
            proto: tuple.proto,
        },
        expires_ns: now + ct::lifetime_ns(tuple.proto, flags),
        rev_nat_id,
        backend_id,
        flags,
        unreplied: true,
    };
    pending.route = route;
    pending.config = config;
    pending.snat = snat;
    if dsr { Step::DsrCommit } else { Step::Commit }
}

/// The new flow being committed, in this CPU's scratch space.
#[inline(always)]
fn pending<I: Inet>() -> Option<&'static mut Pending<I::Addr>> {
    let scratch = FLOW_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the pointer comes from a successful per-CPU array lookup (8-aligned, of the
    // size `Pending` is checked against below); only this CPU uses it and no BPF program is
    // preempted, so nothing else touches it until the packet is done. The new-flow stage
    // writes every field before the commit stage reads them.
    Some(unsafe { &mut *scratch.cast::<Pending<I::Addr>>() })
}

/// Third stage: claims the new flow's reply tuple (and masquerade port), stores its forward
/// entry and translates the packet. A stage of its own: the claim needs stack the new-flow
/// stage has used up.
#[inline(never)]
fn commit<I: Inet>(ctx: &TcContext) -> i32 {
    let (Some(packet), Some(pending)) = (parse_flow::<I>(ctx), pending::<I>()) else {
        return PASS;
    };
    if packet.fragment == Fragment::Later {
        return PASS;
    }
    // A first fragment is rewritten as a whole packet is; one packet kind from here on keeps
    // the verifier from walking the port search below once per kind.
    let packet = Packet {
        fragment: Fragment::Whole,
        ..packet
    };
    let tuple = &packet.tuple;
    let now = ct::now_ns();
    let rev_nat_id = pending.forward.rev_nat_id;
    let reserved = reserve_reply_tuple::<I>(
        &mut pending.forward.to,
        &pending.reply,
        &pending.config,
        now,
        pending.snat,
    );
    match reserved {
        Reserved::Yes => {}
        Reserved::Exhausted => {
            metrics::count(reason::TC_SNAT_EXHAUSTED);
            events::untranslated::<I>(DROPPED, reason::TC_SNAT_EXHAUSTED, tuple, rev_nat_id);
            return DROP;
        }
        Reserved::Collision => {
            metrics::count(reason::TC_CT_COLLISION);
            return DROP;
        }
    }
    let to = pending.forward.to;
    if I::ct_put(tuple, &pending.forward, u64::from(BPF_ANY)).is_err() {
        I::ct_delete(&to.reversed());
        metrics::count(reason::TC_CT_STORE_FAILED);
        return DROP;
    }
    metrics::count(reason::TC_NEW_FLOW);
    events::new_flow::<I>(tuple, &to, rev_nat_id, pending.forward.backend_id);
    if rewrite::rewrite::<I>(ctx, &packet, &to).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return DROP;
    }
    fib::redirect::<I>(ctx, &pending.route)
}

/// A new flow while it is decided and committed (in `FLOW_SCRATCH`): its two entries, its
/// route and the settings it was decided with.
struct Pending<A> {
    reply: Flow<A>,
    forward: Flow<A>,
    route: fib::Route<A>,
    config: DatapathConfig,
    snat: bool,
}

const _: () = assert!(
    size_of::<Pending<[u32; 4]>>() <= proxy_common::map_table::FLOW_SCRATCH_SIZE as usize
        && align_of::<Pending<[u32; 4]>>() <= 8
);

/// What claiming a reply tuple for a new flow found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The tuple was free: the reply entry is stored.
    Fresh,
    /// The tuple belonged to a flow that has ended: its reply entry was replaced.
    Reused,
    /// A live flow owns the tuple (left alone).
    Taken,
}

/// Stores `reply` (in the map of unreplied flows) under `key` unless a live flow owns that
/// reply tuple in either map: a free tuple is claimed with BPF_NOEXIST (two CPUs never both
/// get it); one whose flow ended is taken over.
#[inline(always)]
fn claim<I: Inet>(key: &Tuple<I::Addr>, reply: &Flow<I::Addr>, now: u64) -> Claim {
    let claimed = match I::ct_owner(key, now) {
        Owner::Live => return Claim::Taken,
        Owner::Ended => {
            I::ct_delete(key);
            Claim::Reused
        }
        Owner::Free => Claim::Fresh,
    };
    if I::ct_put(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
        claimed
    } else {
        Claim::Taken
    }
}

/// What reserving a new flow's reply tuple gave.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reserved {
    /// `to.sport` is the flow's port and its reply entry is stored.
    Yes,
    /// No port of the SNAT range is free.
    Exhausted,
    /// The unmasqueraded flow's own reply tuple is already claimed for this very flow.
    Collision,
}

/// Claims the reply tuple of a new flow (`to` reversed), as netfilter's NAT does: first the
/// client's own port (unmasqueraded always; masqueraded when it lies in the range) if its
/// tuple is free or its flow ended (the same client reusing its port gets the same
/// translation), else random ports of the SNAT range, free or of a flow that ended. A live
/// flow's tuple is never taken: an unmasqueraded flow that meets one (the same client port
/// reaching the same backend through another frontend) keeps the client's address with
/// another port. So ports return to the pool as their flows end, with or without the agent.
/// (One loop with one claim: the verifier walks every round.)
#[inline(always)]
fn reserve_reply_tuple<I: Inet>(
    to: &mut Tuple<I::Addr>,
    reply: &Flow<I::Addr>,
    config: &DatapathConfig,
    now: u64,
    snat: bool,
) -> Reserved {
    let client_port = to.sport;
    let keep =
        !snat || (config.snat_port_min..=config.snat_port_max).contains(&u16::from_be(client_port));
    let span = u32::from(config.snat_port_max - config.snat_port_min) + 1;
    // Round 0: the client's port; then random ports of the range.
    for round in 0..=SNAT_PROBES {
        let port = if round == 0 {
            if !keep {
                continue;
            }
            client_port
        } else {
            // SAFETY: a helper call without arguments or memory access.
            let random = unsafe { bpf_get_prandom_u32() };
            (config.snat_port_min + (random % span) as u16).to_be()
        };
        to.sport = port;
        let key = to.reversed();
        let claimed = claim::<I>(&key, reply, now);
        if claimed == Claim::Taken && round == 0 && !snat && I::ct_seq(&key, &reply.to).is_some() {
            // The tuple is this very flow's (a second CPU committing its retransmitted first
            // packet, or entries a migration copied): not a clash to resolve with a new port.
            return Reserved::Collision;
        }
        if claimed != Claim::Taken {
            if claimed == Claim::Reused {
                metrics::count(reason::TC_SNAT_PORT_REUSED);
            }
            if round == 0 {
                if snat {
                    metrics::count(reason::TC_SNAT_PORT_KEPT);
                }
            } else if !snat {
                metrics::count(reason::TC_CLIENT_PORT_REMAPPED);
            }
            return Reserved::Yes;
        }
    }
    Reserved::Exhausted
}
