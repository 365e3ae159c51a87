//! URIs and name-addr header values (RFC 3261 §19.1, §20.10, §25.1; RFC 3966 for `tel:`).
//!
//! rsip rejects IPv6 hosts, `tel:` URIs, escaped and `user;par=` user parts (STACK.md), all of
//! which carrier trunks send. So the syntax is checked here; rsip's typed URI is used where it
//! holds, to turn a stored remote target or route into a socket address (see [`resolve`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::wire::is_token_char;

/// URI scheme classes that matter to a UAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Sip,
    Sips,
    Tel,
    /// Any other absolute URI (`http:`, `isbn:`...): legal in From/To, never routable by us.
    Other,
}

/// A syntactically checked URI; all fields borrow the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Uri<'a> {
    pub raw: &'a str,
    pub scheme: Scheme,
    /// User part as written (still %-escaped); the number of a `tel:` URI.
    pub user: Option<&'a str>,
    /// Host as written, IPv6 with brackets; empty for `tel:` and other schemes.
    pub host: &'a str,
    pub port: Option<u16>,
    /// URI parameters without the leading `;`.
    pub params: &'a str,
    /// `?hname=hvalue` present (RFC 3261 §19.1.1).
    pub has_headers: bool,
}

/// Why a URI does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UriError {
    NoScheme,
    Whitespace,
    BadHost,
    BadPort,
    EmptyParam,
}

pub(crate) fn parse_uri(raw: &str) -> Result<Uri<'_>, UriError> {
    if raw.is_empty() || raw.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(UriError::Whitespace);
    }
    let (scheme_str, rest) = raw.split_once(':').ok_or(UriError::NoScheme)?;
    if scheme_str.is_empty()
        || !scheme_str.starts_with(|c: char| c.is_ascii_alphabetic())
        || !scheme_str.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(UriError::NoScheme);
    }
    let scheme = if scheme_str.eq_ignore_ascii_case("sip") {
        Scheme::Sip
    } else if scheme_str.eq_ignore_ascii_case("sips") {
        Scheme::Sips
    } else if scheme_str.eq_ignore_ascii_case("tel") {
        Scheme::Tel
    } else {
        Scheme::Other
    };
    let mut uri =
        Uri { raw, scheme, user: None, host: "", port: None, params: "", has_headers: false };
    match scheme {
        Scheme::Other => Ok(uri),
        Scheme::Tel => {
            let (number, params) = rest.split_once(';').unwrap_or((rest, ""));
            if number.is_empty() {
                return Err(UriError::BadHost);
            }
            uri.user = Some(number);
            uri.params = params;
            check_params(params)?;
            Ok(uri)
        }
        Scheme::Sip | Scheme::Sips => {
            // The user part may hold `;`, `?`, `:` (RFC 4475 §3.1.1.2, §3.1.1.9) but never an
            // unescaped `@`, so the last `@` ends it.
            let (user, hostpart) = match rest.rfind('@') {
                Some(at) => {
                    let userinfo = &rest[..at];
                    let user = userinfo.split_once(':').map_or(userinfo, |(u, _password)| u);
                    (Some(user), &rest[at + 1..])
                }
                None => (None, rest),
            };
            uri.user = user;
            let (hostport, tail) = match hostpart.find([';', '?']) {
                Some(i) => (&hostpart[..i], &hostpart[i..]),
                None => (hostpart, ""),
            };
            let (host, port) = split_host_port(hostport)?;
            uri.host = host;
            uri.port = port;
            let (params, headers) = match tail.find('?') {
                Some(i) => (&tail[..i], Some(&tail[i + 1..])),
                None => (tail, None),
            };
            uri.params = params.strip_prefix(';').unwrap_or(params);
            check_params(uri.params)?;
            uri.has_headers = headers.is_some();
            Ok(uri)
        }
    }
}

pub(crate) fn split_host_port(hostport: &str) -> Result<(&str, Option<u16>), UriError> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let close = v6.find(']').ok_or(UriError::BadHost)?;
        v6[..close].parse::<Ipv6Addr>().map_err(|_| UriError::BadHost)?;
        let after = &v6[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(UriError::BadHost),
        };
        (&hostport[..close + 2], port)
    } else {
        let (h, p) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err(UriError::BadHost);
        }
        (h, p)
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| UriError::BadPort)?)
        }
        Some(_) => return Err(UriError::BadPort),
        None => None,
    };
    Ok((host, port))
}

fn check_params(params: &str) -> Result<(), UriError> {
    if params.is_empty() {
        return Ok(());
    }
    if params.split(';').any(str::is_empty) {
        return Err(UriError::EmptyParam);
    }
    Ok(())
}

/// Looks up a `;name[=value]` parameter (case-insensitive name). `Some(None)` for a flag.
pub(crate) fn param<'a>(params: &'a str, name: &str) -> Option<Option<&'a str>> {
    split_outside_quotes(params, ';').find_map(|p| {
        let (n, v) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (p.trim(), None),
        };
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// `%HH` unescaping of a user part (RFC 3261 §19.1.2); non-UTF-8 results are replaced.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits on `sep` outside double quotes (with `\` escapes) and outside `<...>`.
/// Elements are trimmed; empty elements are kept so callers can reject them.
pub(crate) fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    // Every delimiter is ASCII, so scanning bytes never splits a UTF-8 sequence; lazily, with
    // no allocation (this runs for most header fields of every message).
    debug_assert!(sep.is_ascii());
    SplitOutsideQuotes { s, sep: sep as u8, pos: 0, done: false }
}

/// The iterator of [`split_outside_quotes`].
struct SplitOutsideQuotes<'a> {
    s: &'a str,
    sep: u8,
    pos: usize,
    done: bool,
}

impl<'a> Iterator for SplitOutsideQuotes<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.done {
            return None;
        }
        let bytes = self.s.as_bytes();
        let start = self.pos;
        let mut in_angle = false;
        let mut i = start;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    // A quoted string runs to its closing quote; a backslash escapes one byte.
                    i += 1;
                    while i < bytes.len() {
                        match bytes[i] {
                            b'\\' => i += 2,
                            b'"' => break,
                            _ => i += 1,
                        }
                    }
                }
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                c if c == self.sep && !in_angle => {
                    self.pos = i + 1;
                    return Some(self.s[start..i].trim_matches([' ', '\t']));
                }
                _ => {}
            }
            i += 1;
        }
        self.done = true;
        Some(self.s[start..].trim_matches([' ', '\t']))
    }
}

/// A From/To/Contact/Route value: `[display] <uri> *(;param)` or `addr-spec *(;param)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameAddr<'a> {
    pub uri: Uri<'a>,
    /// Header parameters without the leading `;` (`tag=...;expires=...`).
    pub params: &'a str,
}

impl<'a> NameAddr<'a> {
    pub fn tag(&self) -> Option<&'a str> {
        param(self.params, "tag").flatten().filter(|t| !t.is_empty())
    }
}

/// Why a name-addr value does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameAddrError {
    /// RFC 4475 §3.1.2.6 `quotbal`.
    UnterminatedQuote,
    /// RFC 4475 §3.1.2.15 `baddn`: non-token display name without quotes.
    BadDisplayName,
    /// RFC 4475 §3.1.2.14 `badaspec`, §3.1.2.13 `regbadct`.
    BadUri,
    /// RFC 4475 §3.1.2.1 `badinv01`: `;;` without parameters.
    BadParams,
}

pub(crate) fn parse_name_addr(value: &str) -> Result<NameAddr<'_>, NameAddrError> {
    let v = value.trim_matches([' ', '\t']);
    let (uri_str, rest) = if let Some(quoted) = v.strip_prefix('"') {
        let close = closing_quote(quoted).ok_or(NameAddrError::UnterminatedQuote)?;
        let after = quoted[close + 1..].trim_start_matches([' ', '\t']);
        let inner = after.strip_prefix('<').ok_or(NameAddrError::BadDisplayName)?;
        bracketed(inner)?
    } else if let Some(lt) = v.find('<') {
        let display = &v[..lt];
        if !display.chars().all(|c| is_token_char(c) || c == ' ' || c == '\t') {
            return Err(NameAddrError::BadDisplayName);
        }
        bracketed(&v[lt + 1..])?
    } else {
        // addr-spec form: parameters after the first `;` belong to the header field, and a
        // URI holding `?` or `,` would have needed brackets (RFC 3261 §20).
        let (u, rest) = match v.find(';') {
            Some(i) => (v[..i].trim_end_matches([' ', '\t']), &v[i..]),
            None => (v, ""),
        };
        if u.contains(['?', ',']) {
            return Err(NameAddrError::BadUri);
        }
        (u, rest)
    };
    let uri = parse_uri(uri_str).map_err(|_| NameAddrError::BadUri)?;
    let params = header_params(rest)?;
    Ok(NameAddr { uri, params })
}

fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            return Some(i);
        }
    }
    None
}

fn bracketed(inner: &str) -> Result<(&str, &str), NameAddrError> {
    let gt = inner.find('>').ok_or(NameAddrError::BadUri)?;
    Ok((&inner[..gt], &inner[gt + 1..]))
}

/// Checks `*(SEMI generic-param)` and returns it without the first `;`.
pub(crate) fn header_params(rest: &str) -> Result<&str, NameAddrError> {
    let rest = rest.trim_matches([' ', '\t']);
    if rest.is_empty() {
        return Ok("");
    }
    let body = rest.strip_prefix(';').ok_or(NameAddrError::BadParams)?;
    for p in split_outside_quotes(body, ';') {
        let name = p.split_once('=').map_or(p, |(n, _)| n).trim_matches([' ', '\t']);
        if name.is_empty() || !name.chars().all(is_token_char) {
            return Err(NameAddrError::BadParams);
        }
    }
    Ok(body.trim_start_matches([' ', '\t']))
}

/// The user part a call is for or from: unescaped user of a sip(s) URI, or the number of a
/// `tel:` URI, without visual separators' parameters.
pub(crate) fn user_of(uri: &Uri<'_>) -> Option<String> {
    let user = uri.user?;
    // `user;par=...` user parts (RFC 4475 §3.1.1.9) keep their parameters: they are the user.
    Some(unescape(user))
}

/// Where to send a request for this URI, for IP-literal hosts (we do no DNS: sans-IO).
/// `maddr` overrides the host (RFC 3261 §19.1.1). rsip's typed URI is used when it parses the
/// URI (plain IPv4 `sip:` URIs); IPv6 and the forms rsip rejects go through our own fields.
pub(crate) fn resolve(uri: &Uri<'_>) -> Option<SocketAddr> {
    if !matches!(uri.scheme, Scheme::Sip | Scheme::Sips) {
        return None;
    }
    let default_port = if uri.scheme == Scheme::Sips { 5061 } else { 5060 };
    if let Some(Some(maddr)) = param(uri.params, "maddr") {
        let ip = maddr.trim_matches(['[', ']']).parse::<IpAddr>().ok()?;
        return Some(SocketAddr::new(ip, uri.port.unwrap_or(default_port)));
    }
    if let Ok(typed) = rsip::Uri::try_from(uri.raw) {
        if let rsip::Host::IpAddr(ip) = typed.host() {
            let port = typed.port().map_or(default_port, |p| u16::from(*p));
            return Some(SocketAddr::new(*ip, port));
        }
    }
    let ip = uri.host.trim_matches(['[', ']']).parse::<IpAddr>().ok()?;
    Some(SocketAddr::new(ip, uri.port.unwrap_or(default_port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uris() {
        let u = parse_uri("sip:+15551234567@203.0.113.5:5080;user=phone;lr").unwrap();
        assert_eq!(u.user, Some("+15551234567"));
        assert_eq!(u.host, "203.0.113.5");
        assert_eq!(u.port, Some(5080));
        assert_eq!(param(u.params, "lr"), Some(None));
        assert_eq!(resolve(&u), Some("203.0.113.5:5080".parse().unwrap()));

        let v6 = parse_uri("sip:u@[2001:db8::10]:5062").unwrap();
        assert_eq!(v6.host, "[2001:db8::10]");
        assert_eq!(resolve(&v6), Some("[2001:db8::10]:5062".parse().unwrap()));

        let semi = parse_uri("sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(user_of(&semi).unwrap(), "user;par=u@example.net");
        assert_eq!(semi.host, "example.com");

        let esc = parse_uri("sip:sips%3Auser%40example.com@example.net").unwrap();
        assert_eq!(user_of(&esc).unwrap(), "sips:user@example.com");

        let hdr = parse_uri("sip:user@example.com?Route=%3Csip:example.com%3E").unwrap();
        assert!(hdr.has_headers);
        assert!(parse_uri("sip:user@example.com; lr").is_err());
        assert!(parse_uri("sip:user@exa mple.com").is_err());
        assert!(parse_uri("sip:user@host:99999").is_err());
        assert!(parse_uri("sip:user@[::1").is_err());
        assert!(parse_uri("<sip:user@example.com>").is_err());
    }

    #[test]
    fn tel_and_other_uris() {
        let t = parse_uri("tel:+1-201-555-0123;phone-context=example.com").unwrap();
        assert_eq!(t.scheme, Scheme::Tel);
        assert_eq!(user_of(&t).unwrap(), "+1-201-555-0123");
        assert_eq!(resolve(&t), None);
        assert_eq!(parse_uri("isbn:2983792873").unwrap().scheme, Scheme::Other);
    }

    #[test]
    fn name_addrs() {
        let n = parse_name_addr(
            "\"J Rosenberg \\\\\\\"\"  <sip:jdrosen@example.com>  ;  tag = 98asjd8",
        )
        .unwrap();
        assert_eq!(n.tag(), Some("98asjd8"));
        let n =
            parse_name_addr("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n").unwrap();
        assert_eq!(n.tag(), Some("1918181833n"));
        assert_eq!(n.uri.user, Some("vivekg"));
        let n = parse_name_addr("caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(n.tag(), Some("323"));
        let n = parse_name_addr("<tel:+15551234567>;tag=a").unwrap();
        assert_eq!(n.uri.scheme, Scheme::Tel);
        assert_eq!(
            parse_name_addr("\"Mr. J. User <sip:j.user@example.com>"),
            Err(NameAddrError::UnterminatedQuote)
        );
        assert_eq!(
            parse_name_addr("Bell, Alexander <sip:a.g.bell@example.com>;tag=43"),
            Err(NameAddrError::BadDisplayName)
        );
        assert_eq!(
            parse_name_addr("\"Watson, Thomas\" < sip:t.watson@example.org >"),
            Err(NameAddrError::BadUri)
        );
        assert_eq!(
            parse_name_addr("sip:user@example.com?Route=%3Csip:sip.example.com%3E"),
            Err(NameAddrError::BadUri)
        );
        assert_eq!(
            parse_name_addr("\"Joe\" <sip:joe@example.org>;;;;"),
            Err(NameAddrError::BadParams)
        );
    }

    #[test]
    fn comma_split_respects_quotes_and_brackets() {
        let v: Vec<_> = split_outside_quotes("\"a,b\" <sip:x@y;p=1,2>, <sip:z@w>", ',').collect();
        assert_eq!(v, vec!["\"a,b\" <sip:x@y;p=1,2>", "<sip:z@w>"]);
    }

    #[test]
    fn comma_split_honours_escapes_and_unterminated_quotes() {
        // An escaped quote does not end the quoted string; neither does a `<` inside it.
        let v: Vec<_> = split_outside_quotes(r#""a\",<b" <sip:x@y>, c, "é\é,", d"#, ',').collect();
        assert_eq!(v, vec![r#""a\",<b" <sip:x@y>"#, "c", r#""é\é,""#, "d"]);
        // An unterminated quote runs to the end: one element, nothing lost.
        let v: Vec<_> = split_outside_quotes(r#"a, "b, c\"#, ',').collect();
        assert_eq!(v, vec!["a", r#""b, c\"#]);
        assert_eq!(split_outside_quotes("", ',').collect::<Vec<_>>(), vec![""]);
    }

    #[test]
    fn unescape_handles_edges() {
        assert_eq!(unescape("%75se%72"), "user");
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%4"), "%4");
        assert_eq!(unescape("%zz"), "%zz");
    }
}
