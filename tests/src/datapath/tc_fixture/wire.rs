//! Conversions between the maps' wire types (proxy-common's keys and values, addresses as
//! words in network byte order) and the family-neutral [`Tuple`] and [`CtValue`] the tests
//! write and compare.

use std::{fmt, net::SocketAddr};

use anyhow::{Result, anyhow};
use proxy_common::{CtEntry, CtKey, WireAddr};

use crate::datapath::packet::Packet;

/// A conntrack key or the tuple of a conntrack value, family-neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: u8,
}

impl Tuple {
    pub fn new(src: SocketAddr, dst: SocketAddr, protocol: u8) -> Self {
        Self { src, dst, protocol }
    }

    /// The tuple of a packet (as it is in the frame).
    pub fn of(packet: &Packet) -> Self {
        Self::new(packet.src_socket(), packet.dst_socket(), packet.protocol())
    }

    #[must_use]
    pub fn reversed(&self) -> Self {
        Self::new(self.dst, self.src, self.protocol)
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} proto {}", self.src, self.dst, self.protocol)
    }
}

/// A conntrack value, family-neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    pub expires_ns: u64,
    /// The rewritten source and destination.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub flags: u16,
    pub pad: u16,
}

/// The wire address of `addr`'s IP, which must be of family `A`.
fn wire<A: WireAddr>(addr: SocketAddr) -> Result<A> {
    A::from_ip_addr(addr.ip()).ok_or_else(|| anyhow!("{addr} is not of the map's address family"))
}

pub(super) fn ct_key<A: WireAddr>(tuple: &Tuple) -> Result<CtKey<A>> {
    Ok(CtKey {
        saddr: wire(tuple.src)?,
        daddr: wire(tuple.dst)?,
        sport_be: tuple.src.port().to_be(),
        dport_be: tuple.dst.port().to_be(),
        protocol: tuple.protocol,
        pad: [0; 3],
    })
}

pub(super) fn tuple_of<A: WireAddr>(key: &CtKey<A>) -> Tuple {
    let (src, dst) = key.ends();
    Tuple::new(src, dst, key.protocol)
}

pub(super) fn ct_value<A: WireAddr>(entry: CtEntry<A>) -> CtValue {
    CtValue {
        expires_ns: entry.expires_ns,
        src: entry.source(),
        dst: entry.destination(),
        rev_nat_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        flags: entry.flags,
        pad: entry.pad,
    }
}

pub(super) fn ct_entry<A: WireAddr>(value: &CtValue) -> Result<CtEntry<A>> {
    Ok(CtEntry {
        expires_ns: value.expires_ns,
        saddr: wire(value.src)?,
        daddr: wire(value.dst)?,
        sport_be: value.src.port().to_be(),
        dport_be: value.dst.port().to_be(),
        rev_nat_id: value.rev_nat_id,
        backend_id: value.backend_id,
        flags: value.flags,
        pad: value.pad,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::{Addr4, Addr6};

    use super::*;

    #[test]
    fn map_encodings_round_trip() {
        let v4 = Ipv4Addr::new(10, 240, 1, 2);
        let tuple = Tuple::new(
            SocketAddr::new(v4.into(), 40000),
            SocketAddr::new(Ipv4Addr::new(203, 0, 113, 1).into(), 30080),
            6,
        );
        let key = ct_key::<Addr4>(&tuple).expect("an IPv4 tuple");
        assert_eq!(key.sport_be, 40000_u16.to_be());
        assert_eq!(tuple_of(&key), tuple);
        assert!(
            ct_key::<Addr6>(&tuple).is_err(),
            "an IPv4 tuple has no IPv6 key"
        );
    }
}
