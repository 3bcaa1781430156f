//! Ethernet frames for the TC program tests: builders with correct checksums, a parser back
//! into a [`Packet`], and checksum verification (RFC 1071 one's-complement sums; TCP, UDP and
//! ICMPv6 over their pseudo-headers, RFC 793 / RFC 768 / RFC 8200 §8.1).
//!
//! One struct serves both ways: a test builds a [`Packet`], turns it into bytes with
//! [`Packet::to_frame`], and parses what the program wrote back with [`Packet::parse`], so
//! expectations are written as the same struct with a few fields changed. The builder never
//! validates (a test may want an odd packet); [`verify_checksums`] says whether a frame's
//! checksums are right.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, Result, bail, ensure};

/// An Ethernet address.
pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// A protocol the datapath does not handle (GRE).
pub const IPPROTO_GRE: u8 = 47;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
const FRAG_HLEN: usize = 8;
/// IPv4 "more fragments" flag and fragment-offset mask in the flags/offset word.
const IPV4_MF: u16 = 0x2000;
const IPV4_DF: u16 = 0x4000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// TCP header flag bits (byte 13).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// ICMP and ICMPv6 types and codes the tests use.
pub mod icmp {
    pub const V4_ECHO_REPLY: u8 = 0;
    pub const V4_DEST_UNREACH: u8 = 3;
    pub const V4_ECHO_REQUEST: u8 = 8;
    pub const V4_TIME_EXCEEDED: u8 = 11;
    pub const V4_CODE_PORT_UNREACH: u8 = 3;
    pub const V4_CODE_FRAG_NEEDED: u8 = 4;
    pub const V6_DEST_UNREACH: u8 = 1;
    pub const V6_PACKET_TOO_BIG: u8 = 2;
    pub const V6_TIME_EXCEEDED: u8 = 3;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_CODE_PORT_UNREACH: u8 = 4;
}

/// An IP fragment's position: `offset` in 8-byte units, `more` = more fragments follow. IPv4
/// carries it in the header; IPv6 in a Fragment extension header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub offset: u16,
    pub more: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// Built: send a zero checksum (IPv4's "no checksum"). Parsed: the checksum field was 0.
    pub zero_checksum: bool,
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) message: which one follows from the packet's family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub kind: u8,
    pub code: u8,
    /// The 4 bytes after the checksum (unused, MTU, or echo id and sequence).
    pub rest: [u8; 4],
    /// Everything after the 8-byte header (for errors, the quoted packet).
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp(Udp),
    Icmp(Icmp),
    /// Any other protocol, and every fragment but the first (no transport header there).
    Other {
        protocol: u8,
        payload: Vec<u8>,
    },
}

/// An Ethernet + IPv4/IPv6 packet, as built by a test or parsed from a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 identification, or the IPv6 fragment header's identification.
    pub ident: u32,
    /// IPv4 "don't fragment".
    pub dont_fragment: bool,
    pub fragment: Option<Fragment>,
    pub l4: L4,
}

/// The packet an ICMP error quotes: its IP header and the start of its transport header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub ttl: u8,
    /// TCP/UDP ports (the first 4 bytes after the IP header).
    pub sport: u16,
    pub dport: u16,
    /// The TCP sequence number when at least 8 transport bytes are quoted.
    pub seq: Option<u32>,
    /// IPv4 only: whether the quoted header's checksum is right.
    pub header_checksum_ok: bool,
    /// The whole quoted data.
    pub bytes: Vec<u8>,
}

impl Packet {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "source and destination must be of one family"
        );
        Self {
            dst_mac: [0; 6],
            src_mac: [0; 6],
            src,
            dst,
            ttl: 64,
            // IPv6 has an identification only in a fragment header.
            ident: if src.is_ipv4() { 0x1234 } else { 0 },
            dont_fragment: false,
            fragment: None,
            l4,
        }
    }

    /// A TCP segment (window 64240, no options).
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, seq: u32, ack: u32) -> Self {
        Self::new(
            src.ip(),
            dst.ip(),
            L4::Tcp(Tcp {
                sport: src.port(),
                dport: dst.port(),
                seq,
                ack,
                flags,
                window: 64240,
                payload: Vec::new(),
            }),
        )
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Self {
        Self::new(
            src.ip(),
            dst.ip(),
            L4::Udp(Udp {
                sport: src.port(),
                dport: dst.port(),
                payload: payload.to_vec(),
                zero_checksum: false,
            }),
        )
    }

    pub fn icmp(src: IpAddr, dst: IpAddr, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        Self::new(
            src,
            dst,
            L4::Icmp(Icmp {
                kind,
                code,
                rest,
                body: body.to_vec(),
            }),
        )
    }

    /// A packet of another protocol with an opaque payload.
    pub fn other(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Self {
        Self::new(
            src,
            dst,
            L4::Other {
                protocol,
                payload: payload.to_vec(),
            },
        )
    }

    #[must_use]
    pub fn with_macs(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    #[must_use]
    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    #[must_use]
    pub fn with_fragment(mut self, offset: u16, more: bool) -> Self {
        self.fragment = Some(Fragment { offset, more });
        self
    }

    /// Sets the TCP or UDP payload (panics for other protocols).
    #[must_use]
    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp(tcp) => tcp.payload = payload.to_vec(),
            L4::Udp(udp) => udp.payload = payload.to_vec(),
            other => panic!("with_payload on {other:?}"),
        }
        self
    }

    /// Sends the UDP datagram with a zero checksum (panics for other protocols).
    #[must_use]
    pub fn with_zero_udp_checksum(mut self) -> Self {
        match &mut self.l4 {
            L4::Udp(udp) => udp.zero_checksum = true,
            other => panic!("with_zero_udp_checksum on {other:?}"),
        }
        self
    }

    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The IP protocol number (the transport's, never the fragment header's).
    pub fn protocol(&self) -> u8 {
        match &self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp(_) => IPPROTO_UDP,
            L4::Icmp(_) if self.is_ipv6() => IPPROTO_ICMPV6,
            L4::Icmp(_) => IPPROTO_ICMP,
            L4::Other { protocol, .. } => *protocol,
        }
    }

    pub fn tcp_header(&self) -> Option<&Tcp> {
        match &self.l4 {
            L4::Tcp(tcp) => Some(tcp),
            _ => None,
        }
    }

    pub fn udp_header(&self) -> Option<&Udp> {
        match &self.l4 {
            L4::Udp(udp) => Some(udp),
            _ => None,
        }
    }

    pub fn icmp_message(&self) -> Option<&Icmp> {
        match &self.l4 {
            L4::Icmp(icmp) => Some(icmp),
            _ => None,
        }
    }

    /// Source address and port (port 0 for protocols without ports).
    pub fn src_socket(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.ports().0)
    }

    /// Destination address and port (port 0 for protocols without ports).
    pub fn dst_socket(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.ports().1)
    }

    fn ports(&self) -> (u16, u16) {
        match &self.l4 {
            L4::Tcp(tcp) => (tcp.sport, tcp.dport),
            L4::Udp(udp) => (udp.sport, udp.dport),
            _ => (0, 0),
        }
    }

    /// The ICMP error's quoted packet, parsed.
    pub fn quoted(&self) -> Result<Quoted> {
        let icmp = self.icmp_message().context("not an ICMP message")?;
        parse_quoted(&icmp.body, self.is_ipv6())
    }

    /// The Ethernet frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETH_HLEN + 80);
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        let ethertype = if self.is_ipv6() { ETH_P_IPV6 } else { ETH_P_IP };
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&self.to_ip());
        frame
    }

    /// The IP packet (what an ICMP error quotes).
    pub fn to_ip(&self) -> Vec<u8> {
        let l4 = self.transport_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = ipv4_header(
                    src,
                    dst,
                    self.protocol(),
                    self.ttl,
                    u16::try_from(self.ident & 0xffff).expect("masked"),
                    self.flags_and_offset(),
                    l4.len(),
                );
                ip.extend_from_slice(&l4);
                ip
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut extension = Vec::new();
                let mut next_header = self.protocol();
                if let Some(fragment) = self.fragment {
                    extension.push(next_header);
                    extension.push(0);
                    let word = (fragment.offset << 3) | u16::from(fragment.more);
                    extension.extend_from_slice(&word.to_be_bytes());
                    extension.extend_from_slice(&self.ident.to_be_bytes());
                    next_header = IPPROTO_FRAGMENT;
                }
                let payload_len =
                    u16::try_from(extension.len() + l4.len()).expect("IPv6 payload fits");
                let mut ip = Vec::with_capacity(IPV6_HLEN + usize::from(payload_len));
                ip.extend_from_slice(&[0x60, 0, 0, 0]);
                ip.extend_from_slice(&payload_len.to_be_bytes());
                ip.push(next_header);
                ip.push(self.ttl);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&extension);
                ip.extend_from_slice(&l4);
                ip
            }
            _ => unreachable!("families checked in Packet::new"),
        }
    }

    fn flags_and_offset(&self) -> u16 {
        let mut word = if self.dont_fragment { IPV4_DF } else { 0 };
        if let Some(fragment) = self.fragment {
            word |= fragment.offset & IPV4_OFFSET_MASK;
            if fragment.more {
                word |= IPV4_MF;
            }
        }
        word
    }

    /// The transport header and payload, checksummed.
    fn transport_bytes(&self) -> Vec<u8> {
        let protocol = self.protocol();
        match &self.l4 {
            L4::Tcp(tcp) => {
                let mut bytes = Vec::with_capacity(TCP_HLEN + tcp.payload.len());
                bytes.extend_from_slice(&tcp.sport.to_be_bytes());
                bytes.extend_from_slice(&tcp.dport.to_be_bytes());
                bytes.extend_from_slice(&tcp.seq.to_be_bytes());
                bytes.extend_from_slice(&tcp.ack.to_be_bytes());
                bytes.push(5 << 4);
                bytes.push(tcp.flags);
                bytes.extend_from_slice(&tcp.window.to_be_bytes());
                bytes.extend_from_slice(&[0, 0, 0, 0]);
                bytes.extend_from_slice(&tcp.payload);
                let sum = pseudo_header_checksum(self.src, self.dst, protocol, &bytes);
                bytes[16..18].copy_from_slice(&sum.to_be_bytes());
                bytes
            }
            L4::Udp(udp) => {
                let length = u16::try_from(UDP_HLEN + udp.payload.len()).expect("UDP fits");
                let mut bytes = Vec::with_capacity(usize::from(length));
                bytes.extend_from_slice(&udp.sport.to_be_bytes());
                bytes.extend_from_slice(&udp.dport.to_be_bytes());
                bytes.extend_from_slice(&length.to_be_bytes());
                bytes.extend_from_slice(&[0, 0]);
                bytes.extend_from_slice(&udp.payload);
                if !udp.zero_checksum {
                    let mut sum = pseudo_header_checksum(self.src, self.dst, protocol, &bytes);
                    // RFC 768: a computed zero is sent as all ones (zero means "none").
                    if sum == 0 {
                        sum = 0xffff;
                    }
                    bytes[6..8].copy_from_slice(&sum.to_be_bytes());
                }
                bytes
            }
            L4::Icmp(message) => {
                let mut bytes = Vec::with_capacity(ICMP_HLEN + message.body.len());
                bytes.push(message.kind);
                bytes.push(message.code);
                bytes.extend_from_slice(&[0, 0]);
                bytes.extend_from_slice(&message.rest);
                bytes.extend_from_slice(&message.body);
                let sum = if self.is_ipv6() {
                    pseudo_header_checksum(self.src, self.dst, IPPROTO_ICMPV6, &bytes)
                } else {
                    internet_checksum(&bytes)
                };
                bytes[2..4].copy_from_slice(&sum.to_be_bytes());
                bytes
            }
            L4::Other { payload, .. } => payload.clone(),
        }
    }

    /// Parses an Ethernet frame (no VLAN tags) carrying IPv4 or IPv6.
    pub fn parse(frame: &[u8]) -> Result<Self> {
        ensure!(
            frame.len() >= ETH_HLEN,
            "frame of {} bytes has no Ethernet header",
            frame.len()
        );
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        ensure!(
            ethertype == ETH_P_IP || ethertype == ETH_P_IPV6,
            "ethertype {ethertype:#06x} is not IP"
        );
        let mut packet = Self::parse_ip(&frame[ETH_HLEN..])?;
        ensure!(
            packet.is_ipv6() == (ethertype == ETH_P_IPV6),
            "ethertype {ethertype:#06x} does not match the IP version"
        );
        packet.dst_mac.copy_from_slice(&frame[0..6]);
        packet.src_mac.copy_from_slice(&frame[6..12]);
        Ok(packet)
    }

    /// Parses an IP packet (MACs left zero). Bytes past the IP length are ignored.
    pub fn parse_ip(bytes: &[u8]) -> Result<Self> {
        let layout = IpLayout::parse(bytes)?;
        let l4_bytes = &bytes[layout.l4_offset..layout.end];
        // A fragment's transport bytes stay opaque: even a first fragment holds only part of
        // its datagram (the transport length and checksum cover all of it).
        let l4 = if layout.fragment.is_none() {
            parse_l4(layout.protocol, l4_bytes)?
        } else {
            L4::Other {
                protocol: layout.protocol,
                payload: l4_bytes.to_vec(),
            }
        };
        Ok(Self {
            dst_mac: [0; 6],
            src_mac: [0; 6],
            src: layout.src,
            dst: layout.dst,
            ttl: layout.ttl,
            ident: layout.ident,
            dont_fragment: layout.dont_fragment,
            fragment: layout.fragment,
            l4,
        })
    }
}

/// Where the parts of an IP packet are.
struct IpLayout {
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    ident: u32,
    dont_fragment: bool,
    fragment: Option<Fragment>,
    /// The transport protocol (after extension headers).
    protocol: u8,
    /// IPv4 header length; 0 for IPv6.
    ipv4_header_len: usize,
    l4_offset: usize,
    /// End of the IP packet (its length field), within the bytes given.
    end: usize,
}

impl IpLayout {
    fn parse(bytes: &[u8]) -> Result<Self> {
        ensure!(!bytes.is_empty(), "empty IP packet");
        match bytes[0] >> 4 {
            4 => Self::parse_v4(bytes),
            6 => Self::parse_v6(bytes),
            version => bail!("IP version {version}"),
        }
    }

    fn parse_v4(bytes: &[u8]) -> Result<Self> {
        ensure!(bytes.len() >= IPV4_HLEN, "truncated IPv4 header");
        let header_len = usize::from(bytes[0] & 0x0f) * 4;
        ensure!(
            header_len >= IPV4_HLEN && bytes.len() >= header_len,
            "bad IPv4 header length {header_len}"
        );
        let total = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        ensure!(
            total >= header_len && total <= bytes.len(),
            "IPv4 total length {total} outside {header_len}..={}",
            bytes.len()
        );
        let word = u16::from_be_bytes([bytes[6], bytes[7]]);
        let offset = word & IPV4_OFFSET_MASK;
        let more = word & IPV4_MF != 0;
        Ok(Self {
            src: IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15])),
            dst: IpAddr::V4(Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19])),
            ttl: bytes[8],
            ident: u32::from(u16::from_be_bytes([bytes[4], bytes[5]])),
            dont_fragment: word & IPV4_DF != 0,
            fragment: (offset != 0 || more).then_some(Fragment { offset, more }),
            protocol: bytes[9],
            ipv4_header_len: header_len,
            l4_offset: header_len,
            end: total,
        })
    }

    fn parse_v6(bytes: &[u8]) -> Result<Self> {
        ensure!(bytes.len() >= IPV6_HLEN, "truncated IPv6 header");
        let end = IPV6_HLEN + usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
        ensure!(
            end <= bytes.len(),
            "IPv6 payload length runs past the packet ({end} > {})",
            bytes.len()
        );
        let mut next_header = bytes[6];
        let mut offset = IPV6_HLEN;
        let mut fragment = None;
        let mut ident = 0;
        loop {
            match next_header {
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                    ensure!(offset + 8 <= end, "truncated extension header");
                    let len = (usize::from(bytes[offset + 1]) + 1) * 8;
                    next_header = bytes[offset];
                    offset += len;
                }
                IPPROTO_FRAGMENT => {
                    ensure!(offset + FRAG_HLEN <= end, "truncated fragment header");
                    let word = u16::from_be_bytes([bytes[offset + 2], bytes[offset + 3]]);
                    fragment = Some(Fragment {
                        offset: word >> 3,
                        more: word & 1 != 0,
                    });
                    ident = u32::from_be_bytes(
                        bytes[offset + 4..offset + 8].try_into().expect("4 bytes"),
                    );
                    next_header = bytes[offset];
                    offset += FRAG_HLEN;
                }
                _ => break,
            }
        }
        ensure!(offset <= end, "extension headers run past the packet");
        let address = |at: usize| {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&bytes[at..at + 16]).expect("16 bytes"),
            ))
        };
        Ok(Self {
            src: address(8),
            dst: address(24),
            ttl: bytes[7],
            ident,
            dont_fragment: false,
            fragment,
            protocol: next_header,
            ipv4_header_len: 0,
            l4_offset: offset,
            end,
        })
    }
}

fn parse_l4(protocol: u8, bytes: &[u8]) -> Result<L4> {
    let be16 = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    Ok(match protocol {
        IPPROTO_TCP => {
            ensure!(bytes.len() >= TCP_HLEN, "truncated TCP header");
            let header_len = usize::from(bytes[12] >> 4) * 4;
            ensure!(
                header_len >= TCP_HLEN && header_len <= bytes.len(),
                "bad TCP data offset {header_len}"
            );
            L4::Tcp(Tcp {
                sport: be16(0),
                dport: be16(2),
                seq: be32(4),
                ack: be32(8),
                flags: bytes[13],
                window: be16(14),
                payload: bytes[header_len..].to_vec(),
            })
        }
        IPPROTO_UDP => {
            ensure!(bytes.len() >= UDP_HLEN, "truncated UDP header");
            let length = usize::from(be16(4));
            ensure!(
                length >= UDP_HLEN && length <= bytes.len(),
                "UDP length {length} outside 8..={}",
                bytes.len()
            );
            L4::Udp(Udp {
                sport: be16(0),
                dport: be16(2),
                payload: bytes[UDP_HLEN..length].to_vec(),
                zero_checksum: be16(6) == 0,
            })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            ensure!(bytes.len() >= ICMP_HLEN, "truncated ICMP header");
            L4::Icmp(Icmp {
                kind: bytes[0],
                code: bytes[1],
                rest: bytes[4..8].try_into().expect("4 bytes"),
                body: bytes[ICMP_HLEN..].to_vec(),
            })
        }
        protocol => L4::Other {
            protocol,
            payload: bytes.to_vec(),
        },
    })
}

/// Parses an ICMP error's quoted packet: an IP header (whose length fields describe the
/// original, longer packet) and at least the first 4 bytes after it.
fn parse_quoted(bytes: &[u8], ipv6: bool) -> Result<Quoted> {
    let (src, dst, protocol, ttl, header_len, header_checksum_ok) = if ipv6 {
        ensure!(bytes.len() >= IPV6_HLEN, "quoted IPv6 header truncated");
        ensure!(bytes[0] >> 4 == 6, "quoted packet is not IPv6");
        let address = |at: usize| {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&bytes[at..at + 16]).expect("16 bytes"),
            ))
        };
        (address(8), address(24), bytes[6], bytes[7], IPV6_HLEN, true)
    } else {
        ensure!(bytes.len() >= IPV4_HLEN, "quoted IPv4 header truncated");
        ensure!(bytes[0] >> 4 == 4, "quoted packet is not IPv4");
        let header_len = usize::from(bytes[0] & 0x0f) * 4;
        ensure!(
            header_len >= IPV4_HLEN && bytes.len() >= header_len,
            "quoted IPv4 header length {header_len}"
        );
        (
            IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15])),
            IpAddr::V4(Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19])),
            bytes[9],
            bytes[8],
            header_len,
            internet_checksum(&bytes[..header_len]) == 0,
        )
    };
    let l4 = &bytes[header_len..];
    ensure!(l4.len() >= 4, "quoted packet has no ports");
    Ok(Quoted {
        src,
        dst,
        protocol,
        ttl,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        seq: (protocol == IPPROTO_TCP && l4.len() >= 8)
            .then(|| u32::from_be_bytes(l4[4..8].try_into().expect("4 bytes"))),
        header_checksum_ok,
        bytes: bytes.to_vec(),
    })
}

fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ttl: u8,
    ident: u16,
    flags_and_offset: u16,
    payload_len: usize,
) -> Vec<u8> {
    let total = u16::try_from(IPV4_HLEN + payload_len).expect("IPv4 packet fits");
    let mut header = Vec::with_capacity(usize::from(total));
    header.extend_from_slice(&[0x45, 0]);
    header.extend_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&ident.to_be_bytes());
    header.extend_from_slice(&flags_and_offset.to_be_bytes());
    header.extend_from_slice(&[ttl, protocol, 0, 0]);
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    let sum = internet_checksum(&header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header
}

/// The 32-bit one's-complement accumulation of `data` as big-endian 16-bit words (an odd
/// last byte is padded with zero), RFC 1071 §4.1.
fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for word in &mut chunks {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
        // Fold early so that no input length can overflow the accumulator.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// The Internet checksum of `data` (RFC 1071): the one's complement of the one's-complement
/// sum. Computed over data that already holds a correct checksum it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// The TCP/UDP/ICMPv6 checksum of `l4` (whose checksum field is zero, or holds the value to
/// verify) under the pseudo-header of `src`, `dst` and `protocol`.
pub fn pseudo_header_checksum(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> u16 {
    let mut sum = 0;
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            sum = sum_words(&src.octets(), sum);
            sum = sum_words(&dst.octets(), sum);
            sum = sum_words(&[0, protocol], sum);
            let length = u16::try_from(l4.len()).expect("IPv4 payload fits in 16 bits");
            sum = sum_words(&length.to_be_bytes(), sum);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            sum = sum_words(&src.octets(), sum);
            sum = sum_words(&dst.octets(), sum);
            let length = u32::try_from(l4.len()).expect("IPv6 payload fits in 32 bits");
            sum = sum_words(&length.to_be_bytes(), sum);
            sum = sum_words(&[0, 0, 0, protocol], sum);
        }
        _ => panic!("pseudo-header of mixed families {src} and {dst}"),
    }
    !fold(sum_words(l4, sum))
}

/// Checks every checksum of an Ethernet frame: the IPv4 header; TCP and UDP over their
/// pseudo-header (a zero UDP checksum is accepted for IPv4 only, RFC 768 / RFC 8200 §8.1);
/// ICMP over the message, ICMPv6 over its pseudo-header; and, in an ICMP error, the quoted
/// IPv4 header. Transport checksums of fragments are not checked (they span fragments).
pub fn verify_checksums(frame: &[u8]) -> Result<()> {
    ensure!(frame.len() >= ETH_HLEN, "no Ethernet header");
    let ip = &frame[ETH_HLEN..];
    let layout = IpLayout::parse(ip)?;
    let ipv6 = layout.src.is_ipv6();
    if !ipv6 {
        let sum = internet_checksum(&ip[..layout.ipv4_header_len]);
        ensure!(
            sum == 0,
            "IPv4 header checksum wrong (field {:#06x}, should be {:#06x})",
            u16::from_be_bytes([ip[10], ip[11]]),
            corrected(u16::from_be_bytes([ip[10], ip[11]]), sum)
        );
    }
    if layout.fragment.is_some() {
        return Ok(());
    }
    let l4 = &ip[layout.l4_offset..layout.end];
    let (what, field_at, sum) = match layout.protocol {
        IPPROTO_TCP => {
            ensure!(l4.len() >= TCP_HLEN, "truncated TCP header");
            (
                "TCP",
                16,
                pseudo_header_checksum(layout.src, layout.dst, IPPROTO_TCP, l4),
            )
        }
        IPPROTO_UDP => {
            ensure!(l4.len() >= UDP_HLEN, "truncated UDP header");
            if l4[6] == 0 && l4[7] == 0 {
                ensure!(!ipv6, "zero UDP checksum in IPv6 (RFC 8200 §8.1)");
                return Ok(());
            }
            (
                "UDP",
                6,
                pseudo_header_checksum(layout.src, layout.dst, IPPROTO_UDP, l4),
            )
        }
        IPPROTO_ICMP if !ipv6 => {
            ensure!(l4.len() >= ICMP_HLEN, "truncated ICMP header");
            ("ICMP", 2, internet_checksum(l4))
        }
        IPPROTO_ICMPV6 if ipv6 => {
            ensure!(l4.len() >= ICMP_HLEN, "truncated ICMPv6 header");
            (
                "ICMPv6",
                2,
                pseudo_header_checksum(layout.src, layout.dst, IPPROTO_ICMPV6, l4),
            )
        }
        _ => return Ok(()),
    };
    let field = u16::from_be_bytes([l4[field_at], l4[field_at + 1]]);
    ensure!(
        sum == 0,
        "{what} checksum wrong (field {field:#06x}, should be {:#06x})",
        corrected(field, sum)
    );
    if layout.protocol == IPPROTO_ICMP && is_icmp_error(l4[0], false) {
        let quoted = parse_quoted(&l4[ICMP_HLEN..], false).context("ICMP error")?;
        ensure!(
            quoted.header_checksum_ok,
            "quoted IPv4 header checksum wrong"
        );
    }
    Ok(())
}

/// Given a checksum field and the (non-zero) sum computed over data holding it, the field
/// value that would have made the sum zero.
fn corrected(field: u16, sum: u16) -> u16 {
    // sum = !(S + field) with S the sum of everything else, so S = !sum - field, i.e.
    // !sum + !field in one's-complement arithmetic; the right field is !S.
    !fold(u32::from(!sum) + u32::from(!field))
}

/// Whether an ICMP (or ICMPv6) type is an error that quotes a packet.
pub fn is_icmp_error(kind: u8, ipv6: bool) -> bool {
    if ipv6 {
        matches!(
            kind,
            icmp::V6_DEST_UNREACH | icmp::V6_PACKET_TOO_BIG | icmp::V6_TIME_EXCEEDED | 4
        )
    } else {
        matches!(
            kind,
            icmp::V4_DEST_UNREACH | icmp::V4_TIME_EXCEEDED | 12 | 4 | 5
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: Mac = [0x02, 0, 0, 0, 0, 0x0a];
    const MAC_B: Mac = [0x02, 0, 0, 0, 0, 0x0b];

    fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
    }

    fn v6(last: u16, port: u16) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)),
            port,
        )
    }

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (carries folded).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&data, 0)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
        // An odd length pads the last byte with zero on the right.
        assert_eq!(internet_checksum(&[0x12, 0x34, 0x56]), !0x6834);
    }

    #[test]
    fn ipv4_header_checksum_known_vector() {
        // The classic example header (192.168.0.1 -> 192.168.0.199, UDP, TTL 64, DF), whose
        // checksum is b861.
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
        header[10..12].copy_from_slice(&0xb861_u16.to_be_bytes());
        assert_eq!(internet_checksum(&header), 0);
        let built = ipv4_header(
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
            IPPROTO_UDP,
            64,
            0,
            IPV4_DF,
            0x73 - 20,
        );
        assert_eq!(built, header);
    }

    #[test]
    fn udp_checksum_by_hand() {
        // 10.0.0.1:1 -> 10.0.0.2:2, empty payload. Words: pseudo-header 0a00 0001 0a00 0002
        // 0011 0008, header 0001 0002 0008 0000; sum 1427, checksum !1427 = ebd8.
        let frame = Packet::udp(v4(10, 0, 0, 1, 1), v4(10, 0, 0, 2, 2), b"").to_frame();
        assert_eq!(&frame[ETH_HLEN + 20 + 6..ETH_HLEN + 20 + 8], &[0xeb, 0xd8]);
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn tcp_checksum_by_hand() {
        // 10.0.0.1:1 -> 10.0.0.2:2 SYN seq 1 ack 0 window 64240 (faf0), no options.
        // Pseudo-header 0a00 0001 0a00 0002 0006 0014 sums to 0x141d; header 0001 0002
        // 0000 0001 0000 0000 5002 faf0 0000 0000 sums to 0x14af6; total 0x15f13 folds to
        // 0x5f14, checksum a0eb.
        let frame =
            Packet::tcp(v4(10, 0, 0, 1, 1), v4(10, 0, 0, 2, 2), tcp_flags::SYN, 1, 0).to_frame();
        assert_eq!(
            &frame[ETH_HLEN + 20 + 16..ETH_HLEN + 20 + 18],
            &[0xa0, 0xeb]
        );
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn icmp_checksums_by_hand() {
        // Echo request id 1 seq 1, no data: 0800 0001 0001 -> checksum f7fd.
        let ip = |last| IpAddr::V4(Ipv4Addr::new(10, 0, 0, last));
        let frame =
            Packet::icmp(ip(1), ip(2), icmp::V4_ECHO_REQUEST, 0, [0, 1, 0, 1], b"").to_frame();
        assert_eq!(&frame[ETH_HLEN + 22..ETH_HLEN + 24], &[0xf7, 0xfd]);
        verify_checksums(&frame).unwrap();
        // ICMPv6 echo request ::1 -> ::1 id 1 seq 1: pseudo-header 0001 0001 0008 003a, then
        // 8000 0001 0001; sum 8046 -> checksum 7fb9.
        let lo = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let frame = Packet::icmp(lo, lo, icmp::V6_ECHO_REQUEST, 0, [0, 1, 0, 1], b"").to_frame();
        assert_eq!(&frame[ETH_HLEN + 42..ETH_HLEN + 44], &[0x7f, 0xb9]);
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn round_trips_through_the_parser() {
        let packets = [
            Packet::tcp(
                v4(203, 0, 113, 2, 40000),
                v4(203, 0, 113, 1, 30080),
                tcp_flags::SYN | tcp_flags::ACK,
                7,
                9,
            )
            .with_payload(b"hello")
            .with_macs(MAC_A, MAC_B)
            .with_ttl(17),
            Packet::udp(v6(2, 53), v6(1, 5353), b"odd"),
            Packet::udp(v4(10, 1, 1, 1, 9), v4(10, 1, 1, 2, 10), b"x").with_zero_udp_checksum(),
            Packet::icmp(
                v6(1, 0).ip(),
                v6(2, 0).ip(),
                icmp::V6_PACKET_TOO_BIG,
                0,
                1280_u32.to_be_bytes(),
                &Packet::tcp(v6(2, 1), v6(3, 2), tcp_flags::ACK, 1, 2).to_ip()[..48],
            ),
            Packet::other(v4(1, 2, 3, 4, 0).ip(), v4(5, 6, 7, 8, 0).ip(), 47, b"gre!"),
        ];
        for packet in packets {
            let frame = packet.to_frame();
            verify_checksums(&frame).unwrap_or_else(|e| panic!("{packet:?}: {e:#}"));
            assert_eq!(Packet::parse(&frame).unwrap(), packet);
        }
    }

    #[test]
    fn fragments_round_trip() {
        for (src, dst) in [
            (v4(10, 0, 0, 1, 1), v4(10, 0, 0, 2, 2)),
            (v6(1, 1), v6(2, 2)),
        ] {
            // A first fragment parses back opaque: its payload is the UDP header and data.
            let first = Packet::udp(src, dst, b"0123456789").with_fragment(0, true);
            let frame = first.to_frame();
            let parsed = Packet::parse(&frame).unwrap();
            assert_eq!(parsed.fragment, first.fragment);
            assert_eq!(
                parsed.l4,
                L4::Other {
                    protocol: IPPROTO_UDP,
                    payload: first.transport_bytes(),
                }
            );
            verify_checksums(&frame).unwrap();
            let later = Packet::udp(src, dst, b"0123456789").with_fragment(3, false);
            let parsed = Packet::parse(&later.to_frame()).unwrap();
            assert_eq!(
                parsed.fragment,
                Some(Fragment {
                    offset: 3,
                    more: false
                })
            );
            assert!(matches!(
                parsed.l4,
                L4::Other {
                    protocol: IPPROTO_UDP,
                    ..
                }
            ));
        }
        let frame = Packet::udp(v6(1, 1), v6(2, 2), b"")
            .with_fragment(0, true)
            .to_frame();
        assert_eq!(frame[ETH_HLEN + 6], IPPROTO_FRAGMENT);
        assert_eq!(
            u16::from_be_bytes([frame[ETH_HLEN + 4], frame[ETH_HLEN + 5]]),
            16
        );
    }

    #[test]
    fn verification_catches_every_corruption() {
        let inner = Packet::tcp(
            v4(10, 240, 1, 1, 61000),
            v4(10, 240, 1, 2, 8080),
            tcp_flags::SYN,
            1,
            0,
        );
        let error = Packet::icmp(
            v4(10, 240, 1, 2, 0).ip(),
            v4(10, 240, 1, 1, 0).ip(),
            icmp::V4_DEST_UNREACH,
            icmp::V4_CODE_FRAG_NEEDED,
            [0, 0, 5, 0xdc],
            &inner.to_ip()[..28],
        );
        let frames = [
            Packet::tcp(v4(1, 1, 1, 1, 1), v4(2, 2, 2, 2, 2), tcp_flags::SYN, 5, 0)
                .with_payload(b"abc")
                .to_frame(),
            Packet::udp(v6(1, 1), v6(2, 2), b"payload").to_frame(),
            Packet::udp(v4(1, 1, 1, 1, 1), v4(2, 2, 2, 2, 2), b"payload").to_frame(),
            error.to_frame(),
            Packet::icmp(v6(1, 0).ip(), v6(2, 0).ip(), 128, 0, [0; 4], b"ping").to_frame(),
        ];
        for frame in frames {
            verify_checksums(&frame).unwrap();
            // Flipping a bit anywhere after the Ethernet header breaks a checksum or the
            // parse, except in the IPv6 header's fields no checksum covers (version, traffic
            // class, flow label, next header, hop limit).
            let ipv6 = frame[ETH_HLEN] >> 4 == 6;
            for at in ETH_HLEN..frame.len() {
                if ipv6 && (at < ETH_HLEN + 4 || (ETH_HLEN + 6..ETH_HLEN + 8).contains(&at)) {
                    continue;
                }
                let mut bad = frame.clone();
                bad[at] ^= 0x10;
                assert!(
                    verify_checksums(&bad).is_err(),
                    "corruption at byte {at} of {frame:02x?} went unnoticed"
                );
            }
        }
        let quoted = error.quoted().unwrap();
        assert_eq!(quoted.src, v4(10, 240, 1, 1, 0).ip());
        assert_eq!(
            (quoted.sport, quoted.dport, quoted.seq),
            (61000, 8080, Some(1))
        );
        assert!(quoted.header_checksum_ok);
    }

    #[test]
    fn zero_udp_checksum_is_valid_for_ipv4_only() {
        let frame = Packet::udp(v4(1, 1, 1, 1, 1), v4(2, 2, 2, 2, 2), b"x")
            .with_zero_udp_checksum()
            .to_frame();
        verify_checksums(&frame).unwrap();
        let frame = Packet::udp(v6(1, 1), v6(2, 2), b"x")
            .with_zero_udp_checksum()
            .to_frame();
        assert!(verify_checksums(&frame).is_err());
    }
}
