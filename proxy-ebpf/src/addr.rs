//! What the guard and the monitor need of an address, for both families (`u32` IPv4, four
//! words IPv6, network order as the maps and packets carry them).
use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{ServiceGuard4, ServiceGuard6};

use crate::maps::{SVC_GUARD4_V1, SVC_GUARD6_V1};

pub trait ServiceAddr: Copy {
    /// 4 or 6, as [`proxy_common::MonitorEvent::family`] spells it.
    const FAMILY: u8;
    /// The address as the four words of a monitor event (IPv4 in word 0).
    fn words(&self) -> [u32; 4];
    /// The `guard_flags` of the longest service-guard prefix holding the address.
    fn guard_flags(&self) -> Option<u32>;
}

impl ServiceAddr for u32 {
    const FAMILY: u8 = 4;

    #[inline(always)]
    fn words(&self) -> [u32; 4] {
        [*self, 0, 0, 0]
    }

    #[inline(always)]
    fn guard_flags(&self) -> Option<u32> {
        let key = Key::new(32, ServiceGuard4 { address: *self });
        SVC_GUARD4_V1.get(&key).copied()
    }
}

impl ServiceAddr for [u32; 4] {
    const FAMILY: u8 = 6;

    #[inline(always)]
    fn words(&self) -> [u32; 4] {
        *self
    }

    #[inline(always)]
    fn guard_flags(&self) -> Option<u32> {
        let key = Key::new(128, ServiceGuard6 { address: *self });
        SVC_GUARD6_V1.get(&key).copied()
    }
}
