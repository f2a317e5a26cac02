//! Addresses as the front door sees them: CIDR ranges (exempt lists, trusted proxies) and the
//! net block a source address belongs to (OpenSSH's PerSourceNetBlockSize).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// `a.b.c.d/n` or `x::y/n`; a bare address is its own /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let net = net.to_canonical();
        let max = max_prefix(net);
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self {
            net: mask(net, prefix),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The first `prefix` bits of `ip`, the rest zero.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

/// Whether any range in `list` holds `ip`.
pub fn any_contains(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// OpenSSH's PerSourceNetBlockSize: how many leading bits of an address name its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetBlock {
    pub v4: u8,
    pub v6: u8,
}

impl NetBlock {
    /// `v4[:v6]`, as OpenSSH writes it (v6 defaults to 128).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (v4, v6) = match text.split_once(':') {
            Some((a, b)) => (a, b),
            None => (text, "128"),
        };
        let v4 = v4
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 32)
            .ok_or_else(|| format!("{text:?}: the IPv4 block size must be 0 to 32"))?;
        let v6 = v6
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 128)
            .ok_or_else(|| format!("{text:?}: the IPv6 block size must be 0 to 128"))?;
        Ok(Self { v4, v6 })
    }

    /// The source `ip` counts as.
    pub fn source(&self, ip: IpAddr) -> Source {
        let ip = ip.to_canonical();
        let prefix = if ip.is_ipv4() { self.v4 } else { self.v6 };
        Source(mask(ip, prefix))
    }
}

/// A source address with the bits beyond its net block cleared: the key of every per-source
/// table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source(IpAddr);

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// IPv4 clients of a dual-stack (`[::]`) listener arrive as `::ffff:a.b.c.d`; everything
/// downstream (logs, labels, webhooks' `remoteAddress`, `from=` and `source-address`) sees
/// them as the IPv4 addresses they are, as ContainerSSH reports them.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_ranges_and_bare_addresses() {
        let c = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(ip("10.200.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")), "mapped IPv4 matches");
        let one = Cidr::parse("127.0.0.3").unwrap();
        assert!(one.contains(ip("127.0.0.3")) && !one.contains(ip("127.0.0.4")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        for bad in ["10.0.0.0/33", "::/129", "host", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_blocks_group_sources() {
        let b = NetBlock::parse("24:64").unwrap();
        assert_eq!(b.source(ip("192.0.2.7")), b.source(ip("192.0.2.200")));
        assert_ne!(b.source(ip("192.0.2.7")), b.source(ip("192.0.3.7")));
        assert_eq!(b.source(ip("2001:db8::1")), b.source(ip("2001:db8::ffff")));
        assert_eq!(b.source(ip("::ffff:192.0.2.1")), b.source(ip("192.0.2.9")));
        let d = NetBlock::parse("32").unwrap();
        assert_eq!(d, NetBlock { v4: 32, v6: 128 });
        assert_ne!(d.source(ip("127.0.0.1")), d.source(ip("127.0.0.2")));
        assert!(NetBlock::parse("33:128").is_err() && NetBlock::parse("32:129").is_err());
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let a: SocketAddr = "[::ffff:192.0.2.1]:2222".parse().unwrap();
        assert_eq!(canonical(a).to_string(), "192.0.2.1:2222");
        let b: SocketAddr = "[2001:db8::1]:22".parse().unwrap();
        assert_eq!(canonical(b), b);
    }
}
