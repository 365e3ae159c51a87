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
