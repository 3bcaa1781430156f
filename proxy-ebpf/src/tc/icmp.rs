//! ICMP errors about tracked flows (unreachable, packet too big, time exceeded): the quoted
//! packet and the outer addresses are translated like the flow itself, so path-MTU discovery
//! and errors reach the real client or backend.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{ct_flags, reason};

use super::{
    ct, fib,
    inet::{IcmpError, Inet, Parsed, Tuple},
    rewrite::{L4Csum, replace_addr, replace_port},
};
use crate::metrics;

#[inline(never)]
pub fn translate_error<I: Inet>(ctx: &TcContext) -> i32 {
    let Ok(Parsed::IcmpError(error)) = I::parse(ctx) else {
        return TC_ACT_OK;
    };
    let error = &error;
    // The quoted packet went out with `inner`; the flow's entry for it is keyed by the tuple
    // of the packets that would answer it.
    let key = error.inner.reversed();
    let Some(entry) = I::ct_get(&key) else {
        return TC_ACT_OK;
    };
    let now = ct::now_ns();
    let alive = if entry.flags & ct_flags::REPLY != 0 {
        ct::forward_of::<I>(&key, &entry, now).is_some()
    } else {
        entry.expires_ns > now
    };
    if !alive {
        return TC_ACT_OK;
    }
    // Packets with tuple `key` are rewritten to `entry.to`; the quoted packet is the reverse.
    let to = entry.to;
    let outer = &error.outer.tuple;
    let new_src = if outer.saddr == key.saddr {
        // The error comes from the translated peer itself: it must appear to come from the
        // address the other side talks to.
        to.saddr
    } else {
        outer.saddr
    };
    let new_outer = Tuple {
        saddr: new_src,
        daddr: to.daddr,
        ..*outer
    };
    let route = match fib::lookup::<I>(ctx, &new_outer.saddr, &new_outer.daddr, false) {
        Ok(route) => route,
        Err(fib::NoRoute::Verdict(verdict)) => return verdict,
        Err(fib::NoRoute::TooBig(_)) => {
            // An ICMP error is never answered with another.
            metrics::count(reason::TC_MTU_EXCEEDED);
            return TC_ACT_SHOT;
        }
    };
    if rewrite_error::<I>(ctx, error, &to.reversed(), &new_outer).is_err() {
        metrics::count(reason::TC_REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    metrics::count(reason::TC_ICMP_ERROR_TRANSLATED);
    fib::redirect::<I>(ctx, &route)
}

#[inline(always)]
fn rewrite_error<I: Inet>(
    ctx: &TcContext,
    error: &IcmpError<I::Addr>,
    inner_to: &Tuple<I::Addr>,
    outer_to: &Tuple<I::Addr>,
) -> Result<(), i64> {
    let icmp_csum = Some(L4Csum {
        offset: error.outer.l4 + 2,
        flags: 0,
    });
    let inner = &error.inner;
    let inner_ip_csum = I::ip_csum(error.inner_l3);
    // A quoted IPv4 header sums to a constant once its own checksum is fixed, so only ICMPv6
    // (no header checksum) needs the ICMP checksum adjusted for quoted addresses.
    let inner_addr_csum = if I::ICMP_PSEUDO { icmp_csum } else { None };
    if inner.saddr != inner_to.saddr {
        let offset = error.inner_l3 + I::SADDR;
        replace_addr::<I>(
            ctx,
            offset,
            &inner.saddr,
            &inner_to.saddr,
            inner_ip_csum,
            inner_addr_csum,
            false,
        )?;
    }
    if inner.daddr != inner_to.daddr {
        let offset = error.inner_l3 + I::DADDR;
        replace_addr::<I>(
            ctx,
            offset,
            &inner.daddr,
            &inner_to.daddr,
            inner_ip_csum,
            inner_addr_csum,
            false,
        )?;
    }
    if inner.sport != inner_to.sport {
        replace_port(ctx, error.inner_l4, inner.sport, inner_to.sport, icmp_csum)?;
    }
    if inner.dport != inner_to.dport {
        replace_port(
            ctx,
            error.inner_l4 + 2,
            inner.dport,
            inner_to.dport,
            icmp_csum,
        )?;
    }
    let outer = &error.outer.tuple;
    let outer_ip_csum = I::ip_csum(error.outer.l3);
    let outer_csum = if I::ICMP_PSEUDO {
        Some(L4Csum {
            offset: error.outer.l4 + 2,
            flags: 0,
        })
    } else {
        None
    };
    if outer.saddr != outer_to.saddr {
        let offset = error.outer.l3 + I::SADDR;
        replace_addr::<I>(
            ctx,
            offset,
            &outer.saddr,
            &outer_to.saddr,
            outer_ip_csum,
            outer_csum,
            true,
        )?;
    }
    if outer.daddr != outer_to.daddr {
        let offset = error.outer.l3 + I::DADDR;
        replace_addr::<I>(
            ctx,
            offset,
            &outer.daddr,
            &outer_to.daddr,
            outer_ip_csum,
            outer_csum,
            true,
        )?;
    }
    I::decrement_ttl(ctx, error.outer.l3)
}
