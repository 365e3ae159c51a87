//! Digest authentication of callers that cannot be listed by address (RFC 3261 §22.4, with
//! RFC 8760's SHA-256 and the RFC 7616 computation it points to): PBXs and phones behind
//! changing addresses.
//!
//! The challenge offers SHA-256 first and MD5 second (RFC 8760 §2.4: one `WWW-Authenticate`
//! per algorithm, in order of preference), `qop="auth"`. Nonces carry no server state: the
//! issue time and an HMAC over it and the caller's IP under a secret drawn at start, so any
//! answer within [`NONCE_LIFETIME`] from the same address verifies and a later one is `stale`
//! (the caller retries at once without asking its user). Passwords are compared through the
//! digest only; the response comparison runs in constant time.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest as _, Sha256};

/// How long a nonce is accepted. Callers answer a challenge at once; a PBX that caches its
/// nonce for later calls gets `stale=true` past this and retries without a prompt.
pub(crate) const NONCE_LIFETIME: Duration = Duration::from_secs(60);

/// `SIP_DIGEST_USERS` and `SIP_DIGEST_REALM`: who may call without being listed by address.
/// Its `Debug` shows the user names, never the passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestConfig {
    /// The realm of the challenge (`SIP_DIGEST_REALM`).
    pub realm: String,
    /// User names and their passwords.
    pub users: Vec<(String, String)>,
    /// The algorithms challenged, in order of preference (`SIP_DIGEST_ALGORITHMS`, default
    /// SHA-256 then MD5, RFC 8760 §2.4); credentials in another one are challenged again.
    pub algorithms: Vec<DigestAlgorithm>,
}

impl std::fmt::Debug for DigestConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<&str> = self.users.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("DigestConfig")
            .field("realm", &self.realm)
            .field("users", &users)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// A digest algorithm of RFC 8760.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    /// `SHA-256`.
    Sha256,
    /// `MD5` (RFC 2617; what older PBXs and SIPp 3.6 answer).
    Md5,
}

pub(crate) use DigestAlgorithm as Algorithm;

impl DigestAlgorithm {
    /// Both, SHA-256 first: the default.
    pub const ALL: [Self; 2] = [Self::Sha256, Self::Md5];

    /// The name in `algorithm=` and in `SIP_DIGEST_ALGORITHMS`, as RFC 8760 spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "SHA-256",
            Self::Md5 => "MD5",
        }
    }

    /// The algorithm a name stands for (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name().eq_ignore_ascii_case(name.trim()))
    }

    fn parse(name: Option<&str>) -> Option<Self> {
        match name {
            // RFC 3261 §22.4 / RFC 2617: no algorithm parameter means MD5.
            None => Some(Self::Md5),
            Some(n) if n.eq_ignore_ascii_case("MD5") => Some(Self::Md5),
            Some(n) if n.eq_ignore_ascii_case("SHA-256") => Some(Self::Sha256),
            Some(_) => None,
        }
    }

    fn hex(self, data: &str) -> String {
        let bytes: Vec<u8> = match self {
            Self::Sha256 => Sha256::digest(data.as_bytes()).to_vec(),
            Self::Md5 => <Md5 as md5::Digest>::digest(data.as_bytes()).to_vec(),
        };
        hex(&bytes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The `Authorization` fields the check needs (RFC 3261 §25.1 `digest-response`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Credentials<'a> {
    pub username: &'a str,
    pub realm: &'a str,
    pub nonce: &'a str,
    pub uri: &'a str,
    pub response: &'a str,
    pub algorithm: Option<&'a str>,
    pub cnonce: Option<&'a str>,
    pub qop: Option<&'a str>,
    pub nc: Option<&'a str>,
}

/// Parses `Digest username="…", realm="…", …`; `None` for another scheme or a value that is
/// not a list of `name=value` pairs.
pub(crate) fn parse_credentials(value: &str) -> Option<Credentials<'_>> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("Digest") {
        return None;
    }
    let mut c = Credentials::default();
    for part in crate::uri::split_outside_quotes(rest, ',') {
        let (name, v) = part.split_once('=')?;
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        match name.trim().to_ascii_lowercase().as_str() {
            "username" => c.username = v,
            "realm" => c.realm = v,
            "nonce" => c.nonce = v,
            "uri" => c.uri = v,
            "response" => c.response = v,
            "algorithm" => c.algorithm = Some(v),
            "cnonce" => c.cnonce = Some(v),
            "qop" => c.qop = Some(v),
            "nc" => c.nc = Some(v),
            _ => {}
        }
    }
    (!c.username.is_empty() && !c.nonce.is_empty() && !c.response.is_empty()).then_some(c)
}

/// The expected `response` (RFC 7616 §3.4.1, as RFC 8760 §2.3 uses it for SIP): `qop=auth`
/// includes nc and cnonce, no qop is the RFC 2069 form.
pub(crate) fn expected_response(
    alg: Algorithm,
    c: &Credentials<'_>,
    method: &str,
    password: &str,
) -> Option<String> {
    let ha1 = alg.hex(&format!("{}:{}:{password}", c.username, c.realm));
    let ha2 = alg.hex(&format!("{method}:{}", c.uri));
    match c.qop {
        None => Some(alg.hex(&format!("{ha1}:{}:{ha2}", c.nonce))),
        Some(q) if q.eq_ignore_ascii_case("auth") => {
            let (nc, cnonce) = (c.nc?, c.cnonce?);
            Some(alg.hex(&format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", c.nonce)))
        }
        // auth-int (a digest of the body) is not offered.
        Some(_) => None,
    }
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A known user with the right response to a fresh nonce of ours.
    Accepted,
    /// No usable credentials for our realm: challenge (`stale`: the nonce was ours but old).
    Challenge { stale: bool },
    /// Credentials for our realm and nonce that are wrong: unknown user, wrong password,
    /// another URI.
    Refused,
}

/// Issues and checks nonces without keeping state.
#[derive(Debug, Clone)]
pub(crate) struct Nonces {
    secret: [u8; 32],
    /// Issue times count from the first challenge (the core has no clock of its own).
    epoch: Option<Instant>,
}

impl Nonces {
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret, epoch: None }
    }

    /// `None` only if the HMAC refused the key, which HMAC never does (any length is a key).
    fn mac(&self, issued: u64, ip: IpAddr) -> Option<String> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).ok()?;
        mac.update(&issued.to_be_bytes());
        match ip {
            IpAddr::V4(v4) => mac.update(&v4.octets()),
            IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        Some(hex(&mac.finalize().into_bytes()[..16]))
    }

    /// A nonce for a challenge sent to `ip` now.
    pub fn issue(&mut self, now: Instant, ip: IpAddr) -> String {
        let epoch = *self.epoch.get_or_insert(now);
        let issued = now.saturating_duration_since(epoch).as_secs();
        format!("{issued:x}.{}", self.mac(issued, ip).unwrap_or_default())
    }

    /// `Some(true)`: ours and fresh; `Some(false)`: ours but past its lifetime; `None`: not
    /// ours (forged, or issued to another address or by another shard).
    fn check(&self, now: Instant, ip: IpAddr, nonce: &str) -> Option<bool> {
        let (issued, mac) = nonce.split_once('.')?;
        let issued = u64::from_str_radix(issued, 16).ok()?;
        let expected = self.mac(issued, ip)?;
        if mac.is_empty() || !constant_time_eq(mac.as_bytes(), expected.as_bytes()) {
            return None;
        }
        let age = now.saturating_duration_since(self.epoch?).as_secs().checked_sub(issued)?;
        Some(age < NONCE_LIFETIME.as_secs())
    }

    /// Checks the `Authorization` values of a request from `ip` against `cfg` (the first one
    /// for our realm counts).
    pub fn verify(
        &self,
        now: Instant,
        ip: IpAddr,
        cfg: &DigestConfig,
        method: &str,
        request_uri: &str,
        authorizations: &[&str],
    ) -> Verdict {
        let Some(c) = authorizations
            .iter()
            .filter_map(|a| parse_credentials(a))
            .find(|c| c.realm == cfg.realm)
        else {
            return Verdict::Challenge { stale: false };
        };
        match self.check(now, ip, c.nonce) {
            None => return Verdict::Challenge { stale: false },
            Some(false) => return Verdict::Challenge { stale: true },
            Some(true) => {}
        }
        let Some(alg) = Algorithm::parse(c.algorithm).filter(|a| cfg.algorithms.contains(a)) else {
            return Verdict::Challenge { stale: false };
        };
        // The digest covers the URI the caller names; it must be this request's.
        if c.uri != request_uri {
            return Verdict::Refused;
        }
        let password = cfg.users.iter().find(|(u, _)| *u == c.username).map(|(_, p)| p.as_str());
        let expected = password.and_then(|p| expected_response(alg, &c, method, p));
        match expected {
            Some(e)
                if constant_time_eq(e.as_bytes(), c.response.to_ascii_lowercase().as_bytes()) =>
            {
                Verdict::Accepted
            }
            _ => Verdict::Refused,
        }
    }

    /// The `WWW-Authenticate` lines of a `401`, one per algorithm in order of preference
    /// (RFC 8760 §2.4: SHA-256 before MD5).
    pub fn challenge(
        &mut self,
        now: Instant,
        ip: IpAddr,
        cfg: &DigestConfig,
        stale: bool,
    ) -> String {
        let nonce = self.issue(now, ip);
        let stale = if stale { ", stale=true" } else { "" };
        let realm = &cfg.realm;
        let mut out = String::new();
        for alg in cfg.algorithms.iter().map(|a| a.name()) {
            let _ = write!(
                out,
                "WWW-Authenticate: Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={alg}, qop=\"auth\"{stale}\r\n"
            );
        }
        out
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7616 §3.9.1: the same credentials hashed with MD5 and with SHA-256.
    #[test]
    fn rfc_7616_vectors() {
        let c = Credentials {
            username: "Mufasa",
            realm: "http-auth@example.org",
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            uri: "/dir/index.html",
            response: "",
            algorithm: None,
            cnonce: Some("f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"),
            qop: Some("auth"),
            nc: Some("00000001"),
        };
        assert_eq!(
            expected_response(Algorithm::Md5, &c, "GET", "Circle of Life").unwrap(),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
        assert_eq!(
            expected_response(Algorithm::Sha256, &c, "GET", "Circle of Life").unwrap(),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn the_configuration_never_prints_a_password() {
        let cfg = DigestConfig {
            realm: "r".into(),
            users: vec![("pbx".into(), "hunter2".into())],
            algorithms: DigestAlgorithm::ALL.to_vec(),
        };
        let shown = format!("{cfg:?}");
        assert!(shown.contains("pbx") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn credentials_parse_with_quotes_commas_and_case() {
        let c = parse_credentials(
            "Digest username=\"alice\",realm=\"precall\", nonce=\"1.ab\", uri=\"sip:+1@h\", \
             response=\"AB12\", algorithm=SHA-256, cnonce=\"x,y\", qop=auth, nc=00000001",
        )
        .unwrap();
        assert_eq!((c.username, c.realm, c.nonce, c.uri), ("alice", "precall", "1.ab", "sip:+1@h"));
        assert_eq!(
            (c.algorithm, c.cnonce, c.qop, c.nc),
            (Some("SHA-256"), Some("x,y"), Some("auth"), Some("00000001"))
        );
        assert!(parse_credentials("Basic YWxpY2U6c2VjcmV0").is_none());
        assert!(
            parse_credentials("Digest realm=\"precall\"").is_none(),
            "no user, nonce, response"
        );
    }

    #[test]
    fn nonces_are_bound_to_the_address_and_expire() {
        let t0 = Instant::now();
        let mut n = Nonces::new([7; 32]);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let nonce = n.issue(t0, ip);
        assert_eq!(n.check(t0 + Duration::from_secs(59), ip, &nonce), Some(true));
        assert_eq!(n.check(t0 + Duration::from_secs(61), ip, &nonce), Some(false), "stale");
        assert_eq!(n.check(t0, "198.51.100.8".parse().unwrap(), &nonce), None, "another address");
        let mut other = Nonces::new([8; 32]);
        other.issue(t0, ip);
        assert_eq!(other.check(t0, ip, &nonce), None, "another secret");
        assert_eq!(n.check(t0, ip, "0.0000"), None);
        assert_eq!(n.check(t0, ip, "garbage"), None);
    }

    #[test]
    fn only_the_configured_algorithms_are_challenged_and_accepted() {
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let md5_only = DigestConfig {
            realm: "precall".into(),
            users: vec![("pbx".into(), "hunter2".into())],
            algorithms: vec![DigestAlgorithm::Md5],
        };
        let mut n = Nonces::new([7; 32]);
        let challenge = n.challenge(t0, ip, &md5_only, false);
        assert_eq!(challenge.matches("WWW-Authenticate:").count(), 1, "{challenge}");
        assert!(challenge.contains("algorithm=MD5"), "{challenge}");
        // Right credentials in SHA-256, which this configuration does not offer: challenged
        // again, never accepted.
        let nonce = n.issue(t0, ip);
        let mut c = Credentials {
            username: "pbx",
            realm: "precall",
            nonce: &nonce,
            uri: "sip:+1@h",
            response: "",
            algorithm: Some("SHA-256"),
            cnonce: None,
            qop: None,
            nc: None,
        };
        let sha = expected_response(DigestAlgorithm::Sha256, &c, "INVITE", "hunter2").unwrap();
        let header = |alg: &str, response: &str| {
            format!(
                "Digest username=\"pbx\", realm=\"precall\", nonce=\"{nonce}\", \
                 uri=\"sip:+1@h\", response=\"{response}\", algorithm={alg}"
            )
        };
        let verdict = |h: &str| n.verify(t0, ip, &md5_only, "INVITE", "sip:+1@h", &[h]);
        assert_eq!(verdict(&header("SHA-256", &sha)), Verdict::Challenge { stale: false });
        c.algorithm = Some("MD5");
        let md5 = expected_response(DigestAlgorithm::Md5, &c, "INVITE", "hunter2").unwrap();
        assert_eq!(verdict(&header("MD5", &md5)), Verdict::Accepted);
        assert_eq!(DigestAlgorithm::from_name(" sha-256"), Some(DigestAlgorithm::Sha256));
        assert_eq!(DigestAlgorithm::from_name("SHA-512"), None);
    }
}
