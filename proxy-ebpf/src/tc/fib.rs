//! Forwarding of translated packets past the IP stack: a translated packet may carry a node
//! address as its source, which the stack would drop as a martian, so it is routed here
//! (bpf_fib_lookup) and redirected to the egress interface.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
        bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::reason;

use super::inet::Inet;
use crate::{maps::FIB_SCRATCH, metrics};

/// How a translated packet leaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Redirected to the egress interface with the neighbour's MAC written here.
    Direct,
    /// Redirected through the kernel's neighbour resolution.
    ResolveNeighbour,
    /// Handed to the stack: the destination is this node (a host-network endpoint), or the
    /// stack must decide (and drop) it.
    Stack,
}

/// Where a translated packet goes next.
#[derive(Clone, Copy)]
pub struct Route<A> {
    exit: Exit,
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    /// The source address the kernel would use on that route (asked for masquerading).
    pub src: A,
    nexthop: A,
}

/// Why a translated packet cannot be forwarded.
#[derive(Clone, Copy)]
pub enum NoRoute {
    /// Dropped or handed to the stack: the verdict to return.
    Verdict(i32),
    /// Larger than the route's MTU (the MTU): the sender is told, or it is dropped.
    TooBig(u16),
}

/// The interface the packet arrived on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the verifier-checked context of this TC program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The length the route's MTU is checked against: the IP packet's; for a GSO packet (GRO on
/// the ingress device, or TSO from a local veth peer), whose header carries the length of all
/// its segments together, that of one segment, as the stack's forwarding checks it
/// (`skb_gso_validate_network_len`). 0 ("check the skb against the device") if unreadable.
#[inline(always)]
fn checked_len<I: Inet>(ctx: &TcContext) -> u16 {
    let Ok(total) = I::ip_len(ctx) else {
        return 0;
    };
    // SAFETY: `skb` is the verifier-checked context of this TC program.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return total;
    }
    match I::headers_len(ctx) {
        Ok(headers) => total.min(headers.saturating_add(gso_size.min(0xffff) as u16)),
        Err(_) => 0,
    }
}

/// Routes `src → dst` as the stack would forward it, checking the packet's length against
/// the route's MTU (`tot_len`, so route and PMTU exceptions count, as when the stack forwards).
/// With `want_src` the kernel also picks the source address for the route (the masquerade
/// address).
#[inline(always)]
pub fn lookup<I: Inet>(
    ctx: &TcContext,
    src: &I::Addr,
    dst: &I::Addr,
    want_src: bool,
) -> Result<Route<I::Addr>, NoRoute> {
    lookup_grown::<I>(ctx, src, dst, want_src, 0)
}

/// [`lookup`] for a packet that grows by `room` bytes before it leaves (the Direct Server
/// Return option): the MTU is checked against the grown length, and a packet too big is
/// answered with the MTU less `room`, what the sender's packets may then carry.
#[inline(always)]
pub fn lookup_grown<I: Inet>(
    ctx: &TcContext,
    src: &I::Addr,
    dst: &I::Addr,
    want_src: bool,
    room: u16,
) -> Result<Route<I::Addr>, NoRoute> {
    let Some(params) = FIB_SCRATCH.get_ptr_mut(0) else {
        metrics::count(reason::TC_FIB_FAILED);
        return Err(NoRoute::Verdict(TC_ACT_SHOT));
    };
    // SAFETY: the pointer comes from a successful per-CPU array lookup; only this CPU uses it
    // and no BPF program is preempted, so nothing else touches it until we return.
    let params = unsafe { &mut *params };
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    *params = unsafe { core::mem::zeroed() };
    params.family = I::AF;
    params.ifindex = ingress_ifindex(ctx);
    let checked = checked_len::<I>(ctx);
    params.__bindgen_anon_1.tot_len = if checked == 0 {
        0
    } else {
        checked.saturating_add(room)
    };
    I::fib_params(params, src, dst);
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: `params` is a map value of the size passed; ctx is this program's.
    let result = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            core::ptr::from_mut(params),
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    let exit = match result as u32 {
        BPF_FIB_LKUP_RET_SUCCESS if result >= 0 => Exit::Direct,
        BPF_FIB_LKUP_RET_NO_NEIGH if result >= 0 => Exit::ResolveNeighbour,
        // Not forwarded (the destination is local, or there is no route): the stack delivers
        // or drops it. Not for masqueraded flows: their source would be missing, and a local
        // source arriving from outside is a martian to the stack anyway.
        BPF_FIB_LKUP_RET_NOT_FWDED if result >= 0 && !want_src => Exit::Stack,
        BPF_FIB_LKUP_RET_FRAG_NEEDED if result >= 0 => {
            // SAFETY: the kernel wrote the MTU over tot_len (a union) for this result.
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            return Err(NoRoute::TooBig(mtu.saturating_sub(room)));
        }
        _ => {
            metrics::count(reason::TC_FIB_FAILED);
            return Err(NoRoute::Verdict(TC_ACT_SHOT));
        }
    };
    Ok(Route {
        exit,
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
        src: I::fib_src(params),
        nexthop: I::fib_dst(params),
    })
}

impl<A: PartialEq> Route<A> {
    /// Whether the route to `dst` goes through a gateway (another node reaches it), rather
    /// than to a directly connected neighbour (a pod behind this node's own host veth) or
    /// this node itself.
    #[inline(always)]
    pub fn via_gateway(&self, dst: &A) -> bool {
        self.exit != Exit::Stack && self.nexthop != *dst
    }
}

/// Sends the (already rewritten) packet out of the route's interface.
#[inline(always)]
pub fn redirect<I: Inet>(ctx: &TcContext, route: &Route<I::Addr>) -> i32 {
    if route.exit == Exit::Stack {
        return TC_ACT_OK;
    }
    if route.exit == Exit::Direct {
        if ctx.store(0, &route.dmac, 0).is_err() || ctx.store(6, &route.smac, 0).is_err() {
            metrics::count(reason::TC_REWRITE_FAILED);
            return TC_ACT_SHOT;
        }
        // SAFETY: a helper call with plain integer arguments.
        return unsafe { bpf_redirect(route.ifindex, 0) } as i32;
    }
    // SAFETY: an all-zero union is valid; the address is copied in below.
    let mut nexthop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nexthop.nh_family = u32::from(I::AF);
    let size = core::mem::size_of::<I::Addr>();
    // SAFETY: both unions members start at offset 0 and the address is at most 16 bytes, the
    // size of the union.
    unsafe {
        let union_ptr: *mut bpf_redir_neigh__bindgen_ty_1 = &raw mut nexthop.__bindgen_anon_1;
        core::ptr::copy_nonoverlapping(
            (&raw const route.nexthop).cast::<u8>(),
            union_ptr.cast::<u8>(),
            size,
        );
    }
    // SAFETY: `nexthop` is a live stack struct of the size passed.
    let verdict = unsafe {
        bpf_redirect_neigh(
            route.ifindex,
            &raw mut nexthop,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    verdict as i32
}

/// Bounces a reply the program built back out of the interface the packet came in on.
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> i32 {
    // SAFETY: a helper call with plain integer arguments.
    unsafe { bpf_redirect(ingress_ifindex(ctx), 0) as i32 }
}
