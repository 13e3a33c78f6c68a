//! Who a request comes from, for the per-client build share: the address
//! of the connection's peer, or, when that peer is a proxy the operator
//! trusts (`NIXERY_TRUSTED_PROXIES`), the rightmost address in its
//! `X-Forwarded-For` (else `Forwarded`) header that is not a trusted proxy.
//! IPv6 clients count by their /64, the smallest block a host is given,
//! so one host cannot take a share per address.

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

/// The prefix length IPv6 clients are grouped by.
const IPV6_CLIENT_PREFIX: u8 = 64;

/// The client a request counts against: an IPv4 address, or an IPv6 /64
/// (its first address).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Client(pub IpAddr);

impl Client {
    /// The client `address` belongs to.
    pub fn of(address: IpAddr) -> Client {
        match address {
            IpAddr::V4(v4) => Client(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(IpAddr::V4(v4)),
                None => {
                    let mask = u128::MAX << (128 - u32::from(IPV6_CLIENT_PREFIX));
                    Client(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)))
                }
            },
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/{IPV6_CLIENT_PREFIX}"),
        }
    }
}

/// The proxies whose forwarding headers are believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an IP address or a CIDR block (like 10.0.0.0/8 or fd00::/8)")]
pub struct ProxyError(String);

impl FromStr for TrustedProxies {
    type Err = ProxyError;

    /// A comma-separated list of addresses and CIDR blocks.
    fn from_str(list: &str) -> Result<Self, ProxyError> {
        list.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| ProxyError(item.to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl TrustedProxies {
    fn trusts(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            IpAddr::V4(_) => address,
        };
        self.0.iter().any(|net| net.contains(&address))
    }

    /// The client of a request that came from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        if !self.trusts(peer) {
            return Client::of(peer);
        }
        let hops = forwarded_for(headers);
        let client = hops
            .iter()
            .rev()
            .find(|hop| !self.trusts(**hop))
            .or(hops.first())
            .copied()
            .unwrap_or(peer);
        Client::of(client)
    }
}

/// The addresses a request passed through, first (the origin) to last:
/// from `X-Forwarded-For` if there is one, else from `Forwarded`'s `for=`.
/// Entries that are not addresses (`unknown`, obfuscated names) are left out.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|item| item.trim().to_owned())
            .collect()
    };
    let x_forwarded_for = values("x-forwarded-for");
    if !x_forwarded_for.is_empty() {
        return x_forwarded_for.iter().filter_map(|hop| address(hop)).collect();
    }
    values("forwarded")
        .iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                name.eq_ignore_ascii_case("for").then(|| address(value)).flatten()
            })
        })
        .collect()
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `"[2001:db8::1]:4711"`.
fn address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(address) = hop.parse() {
        return Some(address);
    }
    if let Some(bracketed) = hop.strip_prefix('[') {
        return bracketed.split(']').next()?.parse().ok();
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| host.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        assert_eq!(
            Client::of(ip("2001:db8:1:2::1")),
            Client::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(Client::of(ip("2001:db8:1:2::1")), Client::of(ip("2001:db8:1:3::1")));
        assert_eq!(Client::of(ip("::ffff:10.1.2.3")), Client(ip("10.1.2.3")));
        assert_ne!(Client::of(ip("10.0.0.1")), Client::of(ip("10.0.0.2")));
        assert_eq!(Client::of(ip("2001:db8:1:2::1")).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let none = TrustedProxies::default();
        let forwarded = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(none.client(ip("127.0.0.1"), &forwarded), Client(ip("127.0.0.1")));

        let proxies: TrustedProxies = "127.0.0.1, 10.0.0.0/8".parse().unwrap();
        assert_eq!(proxies.client(ip("127.0.0.1"), &forwarded), Client(ip("203.0.113.9")));
        assert_eq!(
            proxies.client(ip("192.0.2.7"), &forwarded),
            Client(ip("192.0.2.7")),
            "an untrusted peer's header is ignored"
        );
        // A client that sends its own header cannot hide behind it: the
        // rightmost untrusted hop is the one the trusted proxy saw.
        let spoofed = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.4, 10.1.1.1")]);
        assert_eq!(proxies.client(ip("127.0.0.1"), &spoofed), Client(ip("198.51.100.4")));
        let all_trusted = headers(&[("x-forwarded-for", "10.0.0.5, 10.0.0.6")]);
        assert_eq!(proxies.client(ip("127.0.0.1"), &all_trusted), Client(ip("10.0.0.5")));
        assert_eq!(
            proxies.client(ip("127.0.0.1"), &HeaderMap::new()),
            Client(ip("127.0.0.1"))
        );
    }

    #[test]
    fn forwarded_headers_are_read_too() {
        let proxies: TrustedProxies = "::1".parse().unwrap();
        let forwarded = headers(&[(
            "forwarded",
            r#"for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711";by=x"#,
        )]);
        assert_eq!(proxies.client(ip("::1"), &forwarded), Client(ip("2001:db8:cafe::")));
        let unknown = headers(&[("forwarded", "for=unknown"), ("x-forwarded-for", "garbage")]);
        assert_eq!(
            proxies.client(ip("::1"), &unknown),
            Client(ip("::")),
            "only the proxy is known"
        );
        assert_eq!(address("192.0.2.1:4711"), Some(ip("192.0.2.1")));
        assert_eq!(address("2001:db8::1"), Some(ip("2001:db8::1")));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!("".parse::<TrustedProxies>(), Ok(TrustedProxies::default()));
        assert_eq!(
            "10.0.0.0/8,nope".parse::<TrustedProxies>(),
            Err(ProxyError("nope".into()))
        );
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
    }
}
