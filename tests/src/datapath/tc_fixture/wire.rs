//! Conversions between the maps' wire types (proxy-common's keys and values, addresses as
//! words in network byte order) and the family-neutral [`Tuple`] and [`CtValue`] the tests
//! write and compare.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, ensure};
use proxy_common::{Ct4Entry, Ct4Key, Ct6Entry, Ct6Key};

use crate::datapath::packet::Packet;

/// Address in the encoding of the maps: network byte order kept in memory.
pub fn v4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn v6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

pub fn v4_from_word(word: u32) -> Ipv4Addr {
    Ipv4Addr::from(word.to_ne_bytes())
}

pub fn v6_from_words(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

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

fn v4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} where IPv4 was expected"),
    }
}

fn v6(addr: SocketAddr) -> Ipv6Addr {
    match addr.ip() {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => panic!("{ip} where IPv6 was expected"),
    }
}

pub(super) fn ct4_key(tuple: &Tuple) -> Ct4Key {
    Ct4Key {
        saddr: v4_word(v4(tuple.src)),
        daddr: v4_word(v4(tuple.dst)),
        sport_be: tuple.src.port().to_be(),
        dport_be: tuple.dst.port().to_be(),
        protocol: tuple.protocol,
        pad: [0; 3],
    }
}

pub(super) fn ct6_key(tuple: &Tuple) -> Ct6Key {
    Ct6Key {
        saddr: v6_words(v6(tuple.src)),
        daddr: v6_words(v6(tuple.dst)),
        sport_be: tuple.src.port().to_be(),
        dport_be: tuple.dst.port().to_be(),
        protocol: tuple.protocol,
        pad: [0; 3],
    }
}

pub(super) fn tuple4(key: &Ct4Key) -> Tuple {
    Tuple::new(
        SocketAddr::new(v4_from_word(key.saddr).into(), u16::from_be(key.sport_be)),
        SocketAddr::new(v4_from_word(key.daddr).into(), u16::from_be(key.dport_be)),
        key.protocol,
    )
}

pub(super) fn tuple6(key: &Ct6Key) -> Tuple {
    Tuple::new(
        SocketAddr::new(v6_from_words(key.saddr).into(), u16::from_be(key.sport_be)),
        SocketAddr::new(v6_from_words(key.daddr).into(), u16::from_be(key.dport_be)),
        key.protocol,
    )
}

pub(super) fn ct4_value(entry: Ct4Entry) -> CtValue {
    CtValue {
        expires_ns: entry.expires_ns,
        src: SocketAddr::new(
            v4_from_word(entry.saddr).into(),
            u16::from_be(entry.sport_be),
        ),
        dst: SocketAddr::new(
            v4_from_word(entry.daddr).into(),
            u16::from_be(entry.dport_be),
        ),
        rev_nat_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        flags: entry.flags,
        pad: entry.pad,
    }
}

pub(super) fn ct6_value(entry: Ct6Entry) -> CtValue {
    CtValue {
        expires_ns: entry.expires_ns,
        src: SocketAddr::new(
            v6_from_words(entry.saddr).into(),
            u16::from_be(entry.sport_be),
        ),
        dst: SocketAddr::new(
            v6_from_words(entry.daddr).into(),
            u16::from_be(entry.dport_be),
        ),
        rev_nat_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        flags: entry.flags,
        pad: entry.pad,
    }
}

pub(super) fn ct4_entry(value: &CtValue) -> Result<Ct4Entry> {
    ensure!(
        value.src.is_ipv4() && value.dst.is_ipv4(),
        "IPv4 entry expected"
    );
    Ok(Ct4Entry {
        expires_ns: value.expires_ns,
        saddr: v4_word(v4(value.src)),
        daddr: v4_word(v4(value.dst)),
        sport_be: value.src.port().to_be(),
        dport_be: value.dst.port().to_be(),
        rev_nat_id: value.rev_nat_id,
        backend_id: value.backend_id,
        flags: value.flags,
        pad: value.pad,
    })
}

pub(super) fn ct6_entry(value: &CtValue) -> Result<Ct6Entry> {
    ensure!(
        value.src.is_ipv6() && value.dst.is_ipv6(),
        "IPv6 entry expected"
    );
    Ok(Ct6Entry {
        expires_ns: value.expires_ns,
        saddr: v6_words(v6(value.src)),
        daddr: v6_words(v6(value.dst)),
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
    use super::*;

    #[test]
    fn map_encodings_round_trip() {
        let v4 = Ipv4Addr::new(10, 240, 1, 2);
        assert_eq!(v4_word(v4).to_ne_bytes(), [10, 240, 1, 2]);
        assert_eq!(v4_from_word(v4_word(v4)), v4);
        let v6 = Ipv6Addr::new(0xfd00, 0x240, 1, 0, 0, 0, 0, 2);
        assert_eq!(v6_from_words(v6_words(v6)), v6);
        let tuple = Tuple::new(
            SocketAddr::new(v4.into(), 40000),
            SocketAddr::new(Ipv4Addr::new(203, 0, 113, 1).into(), 30080),
            6,
        );
        let key = ct4_key(&tuple);
        assert_eq!(key.sport_be, 40000_u16.to_be());
        assert_eq!(tuple4(&key), tuple);
    }
}
