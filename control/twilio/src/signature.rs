//! `X-Twilio-Signature`: HMAC-SHA1 over the requested URL and the POST parameters.
//!
//! Matches `twilio.request_validator.RequestValidator` (twilio 9.13, the primary source):
//!
//! 1. The string to sign is the full URL Twilio requested, then for every distinct parameter
//!    name in sorted order, every distinct value of that name in sorted order, as `name + value`
//!    with no separators. Sorting is by code point (byte order of UTF-8, the same thing);
//!    a pair repeated with the same name and value is signed once (the library sorts `set`s).
//! 2. HMAC-SHA1 keyed with the auth token; base64 of the digest is the signature.
//! 3. Validation tries two spellings of the URL, because Twilio's signing side is inconsistent
//!    and proxies add or strip ports: with the port removed (any port, not only the default)
//!    and with the default port added (`:443` for `https`, `:80` for everything else) when it
//!    has none. Both go through Python's `urlparse(...).geturl()`, which lower-cases the scheme
//!    and drops an empty `?` or `#`; this module does the same.
//! 4. JSON bodies: the URL carries `bodySHA256` = hex SHA-256 of the raw body; the signature is
//!    over the URL alone (no parameters appended).
//!
//! Comparisons are constant-time.

use std::fmt;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The request header that carries the signature.
pub const SIGNATURE_HEADER: &str = "X-Twilio-Signature";

/// The query parameter that carries the body hash of a JSON webhook.
pub const BODY_SHA256_PARAM: &str = "bodySHA256";

/// Computes and checks Twilio request signatures for one auth token.
///
/// `Debug` never shows the token.
#[derive(Clone)]
pub struct RequestValidator {
    /// HMAC-SHA1 already keyed with the auth token; cloned for every computation.
    keyed: Hmac<Sha1>,
}

impl RequestValidator {
    /// A validator for the account's auth token (or any secret Twilio signs with).
    pub fn new(token: impl AsRef<[u8]>) -> Self {
        let keyed = <Hmac<Sha1> as Mac>::new_from_slice(token.as_ref())
            .expect("HMAC accepts keys of any length");
        Self { keyed }
    }

    /// The signature Twilio would send for a form POST to `url` with `params`.
    pub fn compute(&self, url: &str, params: &[(String, String)]) -> String {
        let mut sorted: Vec<(&str, &str)> =
            params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut mac = self.keyed.clone();
        mac.update(url.as_bytes());
        for (name, value) in sorted {
            mac.update(name.as_bytes());
            mac.update(value.as_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Whether `signature` (the `X-Twilio-Signature` value) is Twilio's for a form POST to
    /// `url` with `params`, trying the URL with and without its port like Twilio's library.
    pub fn validate(&self, url: &str, params: &[(String, String)], signature: &str) -> bool {
        let mut valid = false;
        for candidate in url_variants(url) {
            // No short-circuit: every variant costs the same whatever matched.
            valid |= ct_eq(self.compute(&candidate, params).as_bytes(), signature.as_bytes());
        }
        valid
    }

    /// Whether a JSON webhook is Twilio's: `url` must carry a non-empty `bodySHA256` query
    /// parameter equal to the lower-case hex SHA-256 of `body`, and `signature` must be over
    /// the URL alone (with or without its port).
    ///
    /// Twilio's library skips the body check when the URL has no `bodySHA256`; here that is a
    /// failure, since the body would then be unauthenticated.
    pub fn validate_json(&self, url: &str, body: &[u8], signature: &str) -> bool {
        let Some(expected_hash) = body_sha256_param(url) else {
            return false;
        };
        let actual_hash = hex::encode(Sha256::digest(body));
        let hash_ok = ct_eq(actual_hash.as_bytes(), expected_hash.as_bytes());
        let signature_ok = self.validate(url, &[], signature);
        hash_ok & signature_ok
    }
}

impl fmt::Debug for RequestValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestValidator").field("token", &"<redacted>").finish()
    }
}

/// The first non-empty `bodySHA256` value in `url`'s query, as Python's `parse_qs` (which drops
/// blank values) would find it. A query that does not decode yields `None`.
fn body_sha256_param(url: &str) -> Option<String> {
    let before_fragment = url.split_once('#').map_or(url, |(u, _)| u);
    let (_, query) = before_fragment.split_once('?')?;
    let pairs = crate::form::parse_query(query).ok()?;
    pairs.into_iter().find(|(n, v)| n == BODY_SHA256_PARAM && !v.is_empty()).map(|(_, v)| v)
}

/// The URL spellings Twilio's library checks: port removed, then default port added.
///
/// Anything that is not `scheme://…`, or whose port is not a number up to 65535 (where the
/// Python library raises), is only tried as given.
fn url_variants(url: &str) -> Vec<String> {
    let Some(parts) = UrlParts::split(url) else {
        return vec![url.to_owned()];
    };
    let Ok(port) = parts.port() else {
        return vec![url.to_owned()];
    };
    match port {
        // `if not uri.port`: port 0 counts as none.
        Some(p) if p != 0 => {
            vec![parts.with_netloc(&parts.netloc_without_port()), parts.with_netloc(parts.netloc)]
        }
        _ => {
            let default = if parts.scheme == "https" { 443 } else { 80 };
            vec![
                parts.with_netloc(parts.netloc),
                parts.with_netloc(&format!("{}:{default}", parts.netloc)),
            ]
        }
    }
}

/// A URL cut the way Python's `urlsplit` cuts it (for `scheme://netloc…` URLs).
#[derive(Debug)]
struct UrlParts<'a> {
    /// Lower-cased, as `urlsplit` does.
    scheme: String,
    netloc: &'a str,
    path: &'a str,
    query: &'a str,
    fragment: &'a str,
}

impl<'a> UrlParts<'a> {
    fn split(url: &'a str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let mut chars = scheme.chars();
        let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return None;
        }
        let netloc_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (netloc, rest) = rest.split_at(netloc_end);
        let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        Some(Self { scheme: scheme.to_ascii_lowercase(), netloc, path, query, fragment })
    }

    /// Host and port without user info (`urlsplit`'s `_hostinfo`).
    fn host_and_port(&self) -> (&'a str, &'a str) {
        let hostinfo = self.netloc.rsplit_once('@').map_or(self.netloc, |(_, h)| h);
        if hostinfo.starts_with('[') {
            match hostinfo.split_once(']') {
                Some((_, after)) => (hostinfo, after.strip_prefix(':').unwrap_or("")),
                None => (hostinfo, ""),
            }
        } else {
            (hostinfo, hostinfo.split_once(':').map_or("", |(_, p)| p))
        }
    }

    /// `Ok(None)` without a port (or with an empty one); `Err` where Python raises.
    fn port(&self) -> Result<Option<u16>, ()> {
        let (_, port) = self.host_and_port();
        if port.is_empty() {
            return Ok(None);
        }
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        port.parse::<u16>().map(Some).map_err(|_| ())
    }

    /// The netloc with `:port` cut off the host, user info kept.
    ///
    /// Python's `remove_port` keeps only what precedes the netloc's first `:`, which mangles
    /// URLs with user info or IPv6 hosts; this cuts exactly the port instead.
    fn netloc_without_port(&self) -> String {
        let (_, port) = self.host_and_port();
        let keep = self.netloc.len() - port.len() - 1;
        self.netloc[..keep].to_owned()
    }

    /// `urlunsplit` with `netloc` in place of the original one.
    fn with_netloc(&self, netloc: &str) -> String {
        let mut out = String::with_capacity(
            self.scheme.len() + netloc.len() + self.path.len() + self.query.len() + 8,
        );
        out.push_str(&self.scheme);
        out.push_str("://");
        out.push_str(netloc);
        out.push_str(self.path);
        if !self.query.is_empty() {
            out.push('?');
            out.push_str(self.query);
        }
        if !self.fragment.is_empty() {
            out.push('#');
            out.push_str(self.fragment);
        }
        out
    }
}

/// Equality that takes the same time wherever the first difference is.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const DOCS_SIGNATURE: &str = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";

    fn docs_params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
    }

    #[test]
    fn twilio_published_vector() {
        let v = RequestValidator::new("12345");
        assert_eq!(v.compute(URL, &docs_params()), DOCS_SIGNATURE);
        assert!(v.validate(URL, &docs_params(), DOCS_SIGNATURE));
        // Parameter order on the wire does not matter.
        let mut shuffled = docs_params();
        shuffled.reverse();
        assert!(v.validate(URL, &shuffled, DOCS_SIGNATURE));
    }

    #[test]
    fn default_port_added_by_a_proxy() {
        let v = RequestValidator::new("12345");
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert!(v.validate(with_port, &docs_params(), DOCS_SIGNATURE));
    }

    #[test]
    fn rejections() {
        let v = RequestValidator::new("12345");
        assert!(!v.validate(URL, &docs_params(), "0/KCTR6DLpKmkAf8muzZqo1nDgQ"));
        assert!(!v.validate(URL, &docs_params(), ""));
        assert!(!RequestValidator::new("12346").validate(URL, &docs_params(), DOCS_SIGNATURE));
        let mut tampered = docs_params();
        tampered[2].1 = "1235".into();
        assert!(!v.validate(URL, &tampered, DOCS_SIGNATURE));
        let mut missing = docs_params();
        missing.remove(0);
        assert!(!v.validate(URL, &missing, DOCS_SIGNATURE));
        let http = URL.replacen("https", "http", 1);
        assert!(!v.validate(&http, &docs_params(), DOCS_SIGNATURE));
    }

    #[test]
    fn url_variants_follow_the_python_library() {
        assert_eq!(
            url_variants("https://h.com/p?q=1"),
            ["https://h.com/p?q=1", "https://h.com:443/p?q=1"]
        );
        assert_eq!(url_variants("http://h.com"), ["http://h.com", "http://h.com:80"]);
        assert_eq!(url_variants("wss://h.com/"), ["wss://h.com/", "wss://h.com:80/"]);
        assert_eq!(
            url_variants("https://h.com:8443/p"),
            ["https://h.com/p", "https://h.com:8443/p"]
        );
        assert_eq!(url_variants("HTTPS://H.com/p?#"), ["https://H.com/p", "https://H.com:443/p"]);
        // Corrected where Python's `split(":")[0]` would mangle the netloc.
        assert_eq!(
            url_variants("https://u:pw@h.com:8443/p"),
            ["https://u:pw@h.com/p", "https://u:pw@h.com:8443/p"]
        );
        assert_eq!(url_variants("http://[::1]:8080/p"), ["http://[::1]/p", "http://[::1]:8080/p"]);
        assert_eq!(url_variants("http://[::1]/p"), ["http://[::1]/p", "http://[::1]:80/p"]);
        // Port 0 is "no port" to Python.
        assert_eq!(url_variants("http://h:0/"), ["http://h:0/", "http://h:0:80/"]);
        // Where Python raises, only the URL as given.
        assert_eq!(url_variants("https://h.com:99999/p"), ["https://h.com:99999/p"]);
        assert_eq!(url_variants("https://h.com:x/p"), ["https://h.com:x/p"]);
        assert_eq!(url_variants("/relative?x=1"), ["/relative?x=1"]);
    }

    #[test]
    fn json_needs_a_body_hash() {
        let v = RequestValidator::new("12345");
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        let url = format!("{URL}&bodySHA256={hash}");
        let sig = "a9nBmqA0ju/hNViExpshrM61xv4=";
        assert!(v.validate_json(&url, body, sig));
        assert!(!v.validate_json(&url, b"{}", sig));
        // Signed without a body hash: the body is not covered, so refuse.
        let bare = v.compute(URL, &[]);
        assert!(v.validate(URL, &[], &bare));
        assert!(!v.validate_json(URL, body, &bare));
        let blank = format!("{URL}&bodySHA256=");
        assert!(!v.validate_json(&blank, body, &v.compute(&blank, &[])));
        // Upper-case hex is not what Twilio sends and does not match (as in the library).
        let upper = format!("{URL}&bodySHA256={}", hash.to_uppercase());
        assert!(!v.validate_json(&upper, body, &v.compute(&upper, &[])));
    }

    #[test]
    fn debug_hides_the_token() {
        let dbg = format!("{:?}", RequestValidator::new("s3cr3t-token"));
        assert_eq!(dbg, r#"RequestValidator { token: "<redacted>" }"#);
    }

    #[test]
    fn ct_eq_basics() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
