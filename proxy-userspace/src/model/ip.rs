//! Lenient IP parsing, as Kubernetes does for objects that passed old validation: IPv4 octets
//! with leading zeros are read as decimal (`010.001.002.003` is 10.1.2.3), never as octal.
use std::net::{IpAddr, Ipv4Addr};

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
}
