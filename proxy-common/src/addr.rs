//! Addresses as the maps and packets carry them: an IPv4 address is one `u32`, an IPv6
//! address four, each word holding four octets in network order in memory (what the kernel
//! hands sock_addr programs in `user_ip4`/`user_ip6`). Every crate converts through
//! [`WireAddr`], so the encoding exists once.
use core::{
    fmt::Debug,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

mod sealed {
    /// Only [`super::Addr4`] and [`super::Addr6`]: the generic wire types are `Pod` because
    /// both instantiations are checked for padding.
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for [u32; 4] {}
}

/// An address family's wire address, the type parameter of the generic keys and values.
pub trait WireAddr: sealed::Sealed + Copy + Default + Eq + Ord + Hash + Debug + 'static {
    /// The `core::net` address it stands for.
    type Ip: Copy + Into<IpAddr>;
    /// Explicit padding that ends a type holding the address, a port and a `u64` on the
    /// type's alignment (so no byte of it is implicit padding).
    type TailPad: Copy + Default + Eq + Ord + Hash + Debug + 'static;

    fn from_ip(ip: Self::Ip) -> Self;
    fn to_ip(self) -> Self::Ip;
    /// `ip` if it is of this family.
    fn from_ip_addr(ip: IpAddr) -> Option<Self>;

    /// The socket address of this address and a port in network byte order.
    fn socket(self, port_be: u16) -> SocketAddr {
        SocketAddr::new(self.to_ip().into(), u16::from_be(port_be))
    }
}

/// An IPv4 address on the wire.
pub type Addr4 = u32;
/// An IPv6 address on the wire.
pub type Addr6 = [u32; 4];

impl WireAddr for Addr4 {
    type Ip = Ipv4Addr;
    type TailPad = u16;

    #[inline]
    fn from_ip(ip: Ipv4Addr) -> Self {
        u32::from_ne_bytes(ip.octets())
    }

    #[inline]
    fn to_ip(self) -> Ipv4Addr {
        Ipv4Addr::from(self.to_ne_bytes())
    }

    fn from_ip_addr(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(Self::from_ip(ip)),
            IpAddr::V6(_) => None,
        }
    }
}

impl WireAddr for Addr6 {
    type Ip = Ipv6Addr;
    type TailPad = [u16; 3];

    #[inline]
    fn from_ip(ip: Ipv6Addr) -> Self {
        let o = ip.octets();
        [0, 1, 2, 3]
            .map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
    }

    #[inline]
    fn to_ip(self) -> Ipv6Addr {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(self) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(octets)
    }

    fn from_ip_addr(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(Self::from_ip(ip)),
            IpAddr::V4(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_their_octets_in_memory_order() {
        let v4 = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(Addr4::from_ip(v4).to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(Addr4::from_ip(v4).to_ip(), v4);
        let v6: Ipv6Addr = "fd00:96::1:2".parse().unwrap();
        let words = Addr6::from_ip(v6);
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x96]);
        assert_eq!(words.to_ip(), v6);
        assert_eq!(
            Addr4::from_ip(v4).socket(80u16.to_be()),
            "10.96.0.1:80".parse().unwrap()
        );
    }
}
