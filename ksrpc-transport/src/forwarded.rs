//! The client's address behind reverse proxies: `X-Forwarded-For` is
//! believed only from proxies the configuration trusts
//! (`server.trusted_proxies`), so a client cannot choose the address it is
//! logged and throttled under.

use std::net::IpAddr;

/// An address or a network (`10.0.0.0/8`, `::1`), as written in
/// `server.trusted_proxies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A `server.trusted_proxies` entry that is neither an address nor a network.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1)")]
pub struct BadCidr(pub String);

impl std::str::FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's address: the connection's peer, or, when that peer is a
/// trusted proxy, the right-most address of `X-Forwarded-For` that is not a
/// trusted proxy itself (each proxy appends the address it received from).
/// A header that does not parse is ignored.
pub fn client_ip(peer: Option<IpAddr>, forwarded_for: Option<&[u8]>, trusted: &[Cidr]) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let Some(list) = forwarded_for.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Some(peer);
    };
    let hops: Option<Vec<IpAddr>> = list.split(',').map(|h| h.trim().parse().ok()).collect();
    let Some(hops) = hops else {
        return Some(peer);
    };
    let mut client = peer;
    for hop in hops.iter().rev() {
        client = *hop;
        if !is_trusted(*hop) {
            break;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.200.1.1")) && !net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "an IPv4-mapped address is its IPv4 address");
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["", "localhost", "10.0.0.0/33", "::1/129", "1.2.3.4/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = ["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let client = |peer: &str, header: Option<&str>| client_ip(Some(ip(peer)), header.map(str::as_bytes), &trusted);
        // An untrusted peer's header is ignored: it is the client.
        assert_eq!(client("203.0.113.9", Some("1.2.3.4")), Some(ip("203.0.113.9")));
        // Through a trusted proxy: the address it saw.
        assert_eq!(client("127.0.0.1", Some("198.51.100.7")), Some(ip("198.51.100.7")));
        // A client that sends its own header: the proxy appends the real
        // address, which is the right-most untrusted one.
        assert_eq!(client("127.0.0.1", Some("1.1.1.1, 198.51.100.7")), Some(ip("198.51.100.7")));
        // Two trusted proxies in a row are skipped.
        assert_eq!(client("127.0.0.1", Some("198.51.100.7, 10.0.0.5")), Some(ip("198.51.100.7")));
        // No header, or one that does not parse: the proxy itself.
        assert_eq!(client("127.0.0.1", None), Some(ip("127.0.0.1")));
        assert_eq!(client("127.0.0.1", Some("unknown, 1.2.3.4")), Some(ip("127.0.0.1")));
        // Nothing trusted: the peer, whatever the header says.
        assert_eq!(client_ip(Some(ip("127.0.0.1")), Some(b"1.2.3.4"), &[]), Some(ip("127.0.0.1")));
    }
}
