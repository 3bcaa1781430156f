//! Direct Server Return: the reply maps on an endpoint's node and the option that carries
//! the frontend between nodes.

use crate::addr::{Addr4, Addr6, WireAddr};

/// Value of the Direct Server Return maps on an endpoint's node (key: [`Ct4Key`], the
/// tuple the pod replies with): the frontend the reply's source is rewritten to, until
/// `expires_ns` (`bpf_ktime_get_ns`), which packets carrying the option push forward.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DsrEntry<A: WireAddr> {
    pub expires_ns: u64,
    pub address: A,
    pub port_be: u16,
    pub pad: A::TailPad,
}
pub type Dsr4Entry = DsrEntry<Addr4>;
pub type Dsr6Entry = DsrEntry<Addr6>;
assert_layout!(DsrEntry<Addr4, Addr6>, size = (16, 32), align = (8, 8));

/// The wire encoding of Direct Server Return: the ingress node inserts the frontend (address
/// and port) as an IPv4 option or an IPv6 destination option; the endpoint's node removes it.
pub mod dsr_option {
    /// IPv4 option type: copied on fragmentation (0x80), class 0, number 0x1a (the number
    /// Cilium uses for the same purpose; not assigned by IANA).
    pub const IPV4_TYPE: u8 = 0x9a;
    /// IPv4 option length: type, length, port (2), address (4).
    pub const IPV4_LEN: u8 = 8;
    /// IPv6 destination option type: the two high bits 00 ("skip if unrecognised"), an
    /// experimental number (RFC 4727 reserves 0x1e for experiments).
    pub const IPV6_TYPE: u8 = 0x1e;
    /// The destination options header: next header, length (2 = 24 bytes), option type,
    /// option length (20), address (16), port (2), and a PadN option of 2 bytes.
    pub const IPV6_HEADER_LEN: u8 = 24;
    pub const IPV6_OPTION_LEN: u8 = 20;
    /// The IPv6 next-header number of a destination options header.
    pub const NEXTHDR_DEST: u8 = 60;
}
