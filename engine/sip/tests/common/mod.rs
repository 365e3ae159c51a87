//! Helpers shared by the integration tests: a deterministic id generator and a config.
#![allow(dead_code)]

use std::net::SocketAddr;

use precall_sip::{IdGen, SipConfig};

/// Counts instead of drawing random numbers, so every byte sent is predictable.
#[derive(Debug, Default)]
pub struct CounterIds {
    n: u64,
}

impl IdGen for CounterIds {
    fn tag(&mut self) -> String {
        self.n += 1;
        format!("tag{}", self.n)
    }
    fn branch(&mut self) -> String {
        self.n += 1;
        format!("z9hG4bKbr{}", self.n)
    }
    fn session_id(&mut self) -> u64 {
        self.n += 1;
        1000 + self.n
    }
}

pub const LOCAL: &str = "192.0.2.10:5060";

pub fn config() -> SipConfig {
    let mut cfg = SipConfig::new(LOCAL.parse::<SocketAddr>().unwrap());
    cfg.advertised_ip = Some("203.0.113.10".parse().unwrap());
    cfg
}

/// Status code of a response datagram.
pub fn status(payload: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(payload).ok()?;
    let line = text.lines().next()?;
    line.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// Value of the first header field `name` (case-insensitive) of a message we sent.
pub fn header<'a>(payload: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(payload).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Body of a message we sent.
pub fn body(payload: &[u8]) -> &str {
    let text = std::str::from_utf8(payload).unwrap_or("");
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}
