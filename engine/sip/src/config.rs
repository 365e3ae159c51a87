//! Configuration and the injected id generator (no randomness inside the core).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Per-endpoint settings; one copy per shard, never read from globals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipConfig {
    /// RTT estimate (RFC 3261 T1, 500 ms).
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses (T2, 4 s).
    pub t2: Duration,
    /// Maximum time a message stays in the network (T4, 5 s).
    pub t4: Duration,
    /// The bound SIP address (Via of our requests, Contact when not advertised).
    pub local: SocketAddr,
    /// `SIP_ADVERTISED_IP`: the public address for Contact, Via and SDP `c=`/`o=` behind NAT.
    pub advertised_ip: Option<IpAddr>,
    /// Sent as `Server` in responses and `User-Agent` in requests; empty to omit.
    pub user_agent: String,
    /// Larger datagrams are dropped unread.
    pub max_message_bytes: usize,
    /// `SIP_TRUSTED_CIDRS`: the only sources served; a request from elsewhere gets `403` and
    /// nothing else (no call, no application event), a response from elsewhere is dropped.
    /// Empty: every source is served.
    pub trusted: Vec<Cidr>,
    /// With a trusted list: each untrusted source may send this many requests per
    /// [`SipConfig::untrusted_window`] (each answered `403`); past it the source is ignored for
    /// [`SipConfig::untrusted_ban`] (pike-style), so a flood cannot turn precall into a
    /// reflector. Trusted sources are never limited.
    pub untrusted_limit: u32,
    /// See [`SipConfig::untrusted_limit`].
    pub untrusted_window: Duration,
    /// See [`SipConfig::untrusted_limit`].
    pub untrusted_ban: Duration,
    /// `SIP_FORCE_RPORT`: answer every request at its source port, as if its top Via had
    /// `rport` (Kamailio's `force_rport()`, Asterisk's `force_rport`). Off by default: RFC 3261
    /// §18.2.2 sends a response to the Via's sent-by port unless the sender asked for `rport`.
    /// Turn it on for phones behind NAT that neither send `rport` nor listen where they send.
    pub force_rport: bool,
    /// Live server transactions kept at most: INVITEs still ringing, or refused and waiting
    /// for their ACK. Past it a new INVITE gets `503` and other requests are answered without
    /// keeping state, so a flood cannot grow the endpoint's memory without bound.
    pub max_transactions: usize,
    /// Memory budget of the transactions that only absorb retransmissions (an answered
    /// non-INVITE for Timer J, an answered INVITE for Timer L or I): stored response bytes
    /// plus a fixed cost per entry. Past it the entry nearest its end is forgotten first.
    pub absorbed_bytes: usize,
    /// `SIP_DIGEST_USERS`: callers outside [`SipConfig::trusted`] (or anyone, with no list)
    /// must answer a digest challenge (RFC 8760) before an INVITE is served; `None`: no
    /// authentication.
    pub digest: Option<crate::auth::DigestConfig>,
}

/// An IP network, `addr/prefix` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) =
            s.trim().split_once('/').map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let net: std::net::IpAddr =
            addr.parse().map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { net, prefix })
    }
}

/// Whether `ip` may talk to an endpoint trusting `trusted` (empty: anyone).
pub(crate) fn is_trusted(trusted: &[Cidr], ip: std::net::IpAddr) -> bool {
    trusted.is_empty() || trusted.iter().any(|c| c.contains(ip))
}

impl SipConfig {
    /// RFC 3261 default timers for the given bound address.
    pub fn new(local: SocketAddr) -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            local,
            advertised_ip: None,
            user_agent: "precall".to_owned(),
            max_message_bytes: 65_535,
            trusted: Vec::new(),
            untrusted_limit: 10,
            untrusted_window: Duration::from_secs(2),
            untrusted_ban: Duration::from_secs(30),
            force_rport: false,
            max_transactions: 250_000,
            absorbed_bytes: 64 << 20,
            digest: None,
        }
    }

    /// The address we announce: advertised IP with the bound port.
    pub fn public_addr(&self) -> SocketAddr {
        SocketAddr::new(self.advertised_ip.unwrap_or(self.local.ip()), self.local.port())
    }
}

/// Source of the unique values SIP needs. Inject a random one in production and a counter in
/// tests, so that every byte the endpoint sends is deterministic.
pub trait IdGen {
    /// A From/To tag (RFC 3261 §19.3: at least 32 bits of randomness).
    fn tag(&mut self) -> String;
    /// A branch id starting with the magic cookie `z9hG4bK` (RFC 3261 §8.1.1.7); the endpoint
    /// adds the cookie if it is missing.
    fn branch(&mut self) -> String;
    /// An SDP session id for `o=` (RFC 4566 §5.2).
    fn session_id(&mut self) -> u64;
}

#[cfg(test)]
mod cidr_tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses() {
        let c: Cidr = "198.51.100.0/24".parse().unwrap();
        assert!(c.contains("198.51.100.77".parse().unwrap()));
        assert!(!c.contains("198.51.101.1".parse().unwrap()));
        assert!(c.contains("::ffff:198.51.100.9".parse().unwrap()), "IPv4-mapped");
        let one: Cidr = "203.0.113.5".parse().unwrap();
        assert!(one.contains("203.0.113.5".parse().unwrap()));
        assert!(!one.contains("203.0.113.6".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::9".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("198.51.100.1".parse().unwrap()));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("carrier.example".parse::<Cidr>().is_err());
        assert!(is_trusted(&[], "192.0.2.1".parse().unwrap()));
        assert!(!is_trusted(&[c], "192.0.2.1".parse().unwrap()));
    }
}
