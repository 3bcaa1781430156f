//! Map keys, values and names shared by the eBPF programs and the agent.
//!
//! Every type here is a wire format between the kernel and userspace: `#[repr(C)]`, explicit
//! zeroed padding, no `bool`/`Option`/Rust enums, ports in network byte order (named `*_be`) and
//! addresses exactly as the kernel hands them to sock_addr programs (`user_ip4`/`user_ip6`, i.e.
//! network byte order stored in native `u32`s). A compile-time size/alignment assertion sits
//! beside each type so a layout change cannot slip through unnoticed; a layout change must bump
//! [`SOURCE_LAYOUT_VERSION`] so a new agent never adopts maps written with the old layout.
//!
//! The types live in one module per part of the datapath (services, sockets, conntrack, DSR,
//! guards, settings, monitor events) and are re-exported here: every crate names them
//! `proxy_common::Type`.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod map_table;

pub use addr::{Addr4, Addr6, WireAddr};

/// The map layout version of this source: bumped (and every pinned map renamed `_V<N>`) when a
/// key or value changes.
pub const SOURCE_LAYOUT_VERSION: u32 = 1;

/// Version of the map layout this build pins under (`<bpffs>/v<N>/`): the source's, unless
/// the build set `SWITCHYARD_MAP_LAYOUT_VERSION` (the upgrade tests build a second agent that
/// way; its map names keep the source's suffix).
pub const MAP_LAYOUT_VERSION: u32 =
    match parse_version(env!("SWITCHYARD_MAP_LAYOUT_VERSION_OVERRIDE").as_bytes()) {
        Some(version) => version,
        None => SOURCE_LAYOUT_VERSION,
    };

/// A decimal version, in a constant (`None` when empty or not a number).
const fn parse_version(text: &[u8]) -> Option<u32> {
    if text.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() {
            return None;
        }
        value = value * 10 + (text[i] - b'0') as u32;
        i += 1;
    }
    Some(value)
}

pub mod map_names;
pub mod program;
pub mod reason;

macro_rules! assert_layout {
    // A type generic over the address: both instantiations are checked, and it is `Pod` for
    // both (`WireAddr` is sealed: there is no third).
    ($generic:ident<$a4:ty, $a6:ty>, size = ($size4:expr, $size6:expr), align = ($align4:expr, $align6:expr)) => {
        const _: () = assert!(core::mem::size_of::<$generic<$a4>>() == $size4);
        const _: () = assert!(core::mem::align_of::<$generic<$a4>>() == $align4);
        const _: () = assert!(core::mem::size_of::<$generic<$a6>>() == $size6);
        const _: () = assert!(core::mem::align_of::<$generic<$a6>>() == $align6);
        #[cfg(feature = "user")]
        // SAFETY: `#[repr(C)]`, made only of integers, and neither instantiation has implicit
        // padding (the size assertions above pin that down; `WireAddr` has no other
        // implementations), so every bit pattern is a valid value.
        #[allow(unsafe_code)]
        unsafe impl<A: $crate::addr::WireAddr> aya::Pod for $generic<A> {}
    };
    ($ty:ty, size = $size:expr, align = $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
        const _: () = assert!(core::mem::align_of::<$ty>() == $align);
        #[cfg(feature = "user")]
        // SAFETY: the type is `#[repr(C)]`, made only of integers and has no implicit padding
        // (the size assertion above pins that down), so every bit pattern is a valid value.
        #[allow(unsafe_code)]
        unsafe impl aya::Pod for $ty {}
    };
}

// After the macro: their layout assertions use it.
mod config;
mod conntrack;
mod dsr;
mod guard;
pub mod maglev;
mod monitor;
mod service;
mod socket;

pub use config::*;
pub use conntrack::*;
pub use dsr::*;
pub use guard::*;
pub use monitor::*;
pub use service::*;
pub use socket::*;
