//! Lenient IP parsing, as Kubernetes does for objects that passed old validation: IPv4 octets
//! with leading zeros are read as decimal (`010.001.002.003` is 10.1.2.3), never as octal.
use std::net::{IpAddr, Ipv4Addr};

use super::Cidr;

/// Parses an IP address, accepting IPv4 octets with leading zeros (read as decimal).
pub fn parse_ip_lenient(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Parses a CIDR the way kube-proxy does (`ParseCIDRSloppy`): surrounding whitespace is
/// ignored, IPv4 octets and the prefix may carry leading zeros (`203.0.113.000/025` is
/// 203.0.113.0/25), and host bits are masked off (`10.0.0.1/8` is 10.0.0.0/8).
pub fn parse_cidr_lenient(text: &str) -> Option<Cidr> {
    let (address, prefix) = text.trim().split_once('/')?;
    // The address must end where the slash is: `10.0.0.0 /8` is not a CIDR.
    if address.ends_with(char::is_whitespace) || prefix.starts_with(char::is_whitespace) {
        return None;
    }
    let ip = parse_ip_lenient(address)?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Cidr::new(ip, prefix.parse().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_decimal() {
        assert_eq!(
            parse_ip_lenient("010.096.000.010"),
            Some("10.96.0.10".parse().unwrap())
        );
    }

    #[test]
    fn canonical_v4_and_v6_parse() {
        assert_eq!(
            parse_ip_lenient("10.96.0.1"),
            Some("10.96.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_ip_lenient(" fd00::0001 "),
            Some("fd00::1".parse().unwrap())
        );
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "",
            "None",
            "10.96.0",
            "10.96.0.256",
            "1.2.3.4.5",
            "a.b.c.d",
            "0100.1.1.1",
        ] {
            assert_eq!(parse_ip_lenient(bad), None, "{bad}");
        }
    }

    #[test]
    fn cidrs_are_read_leniently_and_masked() {
        let cases = [
            ("203.0.113.000/025", "203.0.113.0/25"),
            (" 203.0.113.0/25 ", "203.0.113.0/25"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("fd00::1/064", "fd00::/64"),
            ("2001:db8::5/128", "2001:db8::5/128"),
        ];
        for (text, canonical) in cases {
            assert_eq!(
                parse_cidr_lenient(text).map(|cidr| cidr.to_string()),
                Some(canonical.to_owned()),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_cidrs_are_rejected() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/-1",
            "10.0.0.0 /8",
            "10.0.0.256/8",
            "a.b.c.d/8",
        ] {
            assert_eq!(parse_cidr_lenient(bad), None, "{bad}");
        }
    }
}
