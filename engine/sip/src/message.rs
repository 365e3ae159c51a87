//! Typed views over a framed message: the header fields a UAS routes, matches and answers on,
//! checked in a fixed order so each malformed request gets one precise status.
//!
//! Order of checks (first failure answers): framing, header lines, Request-Line, mandatory
//! and single-valued header fields, Via, CSeq number, From/To/Contact syntax, Request-URI
//! syntax, method (501/405), CSeq method, URI scheme (416), Max-Forwards (483), Require (420),
//! body type (415), Accept (406), Session-Expires (422). RFC 4475's expected answers follow
//! from it (see `tests/torture/INDEX`).

use crate::error::RequestError;
use crate::uri::{self, NameAddr, Scheme, Uri};
use crate::wire::{HeaderLine, is_token_char};

/// Request methods. Method names are case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Update,
    Info,
    /// Recognised SIP methods that a trunk-facing UAS does not serve: `405`.
    NotAllowed,
    /// Anything else: `501` (RFC 3261 §8.2.1).
    Unknown,
}

impl Method {
    pub fn parse(s: &str) -> Self {
        match s {
            "INVITE" => Self::Invite,
            "ACK" => Self::Ack,
            "BYE" => Self::Bye,
            "CANCEL" => Self::Cancel,
            "OPTIONS" => Self::Options,
            "UPDATE" => Self::Update,
            "INFO" => Self::Info,
            "REGISTER" | "PRACK" | "SUBSCRIBE" | "NOTIFY" | "REFER" | "MESSAGE" | "PUBLISH" => {
                Self::NotAllowed
            }
            _ => Self::Unknown,
        }
    }
}

/// What we answer in Allow (RFC 3261 §20.5).
pub(crate) const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO";
/// Option tags we implement (RFC 4028 session timers, either side refreshing).
pub(crate) const SUPPORTED: &str = "timer";
/// Smallest Session-Expires we accept (RFC 4028 §4: Min-SE default 90 s).
pub(crate) const MIN_SE: u32 = 90;

/// First line of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartLine<'h> {
    Request { method: &'h str, uri: &'h str },
    Response { code: u16 },
}

/// Why the start line is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartLineError {
    /// No SIP version anywhere: not SIP, drop it.
    NotSip,
    /// A SIP response whose status line is malformed: drop it.
    BadStatusLine,
    /// A request we can still answer.
    Request(RequestErrorKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestErrorKind {
    BadRequestLine,
    Version,
}

pub(crate) fn parse_start_line(line: &str) -> Result<StartLine<'_>, StartLineError> {
    if line.len() >= 4 && line.as_bytes()[..4].eq_ignore_ascii_case(b"SIP/") {
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let code = parts.next().unwrap_or("");
        if !version.eq_ignore_ascii_case("SIP/2.0")
            || code.len() != 3
            || !code.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(StartLineError::BadStatusLine);
        }
        let code: u16 = code.parse().map_err(|_| StartLineError::BadStatusLine)?;
        if !(100..=699).contains(&code) {
            return Err(StartLineError::BadStatusLine);
        }
        return Ok(StartLine::Response { code });
    }
    let Some(version_at) = line.to_ascii_uppercase().rfind("SIP/") else {
        return Err(StartLineError::NotSip);
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, uri, version] = parts.as_slice() else {
        return Err(StartLineError::Request(RequestErrorKind::BadRequestLine));
    };
    if method.is_empty() || !method.chars().all(is_token_char) || uri.is_empty() {
        return Err(StartLineError::Request(RequestErrorKind::BadRequestLine));
    }
    if version_at + version.len() != line.len() {
        return Err(StartLineError::Request(RequestErrorKind::BadRequestLine));
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(StartLineError::Request(RequestErrorKind::Version));
    }
    Ok(StartLine::Request { method, uri })
}

fn named<'h>(h: &HeaderLine<'h>, full: &str, compact: Option<&str>) -> bool {
    h.name.eq_ignore_ascii_case(full) || compact.is_some_and(|c| h.name.eq_ignore_ascii_case(c))
}

/// All values of a header field, comma-separated ones split (RFC 3261 §7.3.1), lazily.
fn values<'h, 'a>(
    headers: &'a [HeaderLine<'h>],
    full: &'a str,
    compact: Option<&'a str>,
) -> impl Iterator<Item = &'h str> + 'a {
    headers
        .iter()
        .filter(move |h| named(h, full, compact))
        .flat_map(|h| uri::split_outside_quotes(h.value, ','))
}

/// All values of a header field, comma-separated ones split (RFC 3261 §7.3.1).
pub(crate) fn list<'h>(
    headers: &[HeaderLine<'h>],
    full: &str,
    compact: Option<&str>,
) -> Vec<&'h str> {
    values(headers, full, compact).collect()
}

/// The first value of a list header field (the top Via), without collecting the rest.
pub(crate) fn first<'h>(
    headers: &[HeaderLine<'h>],
    full: &str,
    compact: Option<&str>,
) -> Option<&'h str> {
    values(headers, full, compact).next()
}

/// Every line of a header field whose values hold commas of their own (`Authorization`:
/// RFC 3261 §7.3.1 lets such fields repeat but not be joined), one value per line.
pub(crate) fn list_whole<'h>(headers: &[HeaderLine<'h>], full: &str) -> Vec<&'h str> {
    headers.iter().filter(|h| named(h, full, None)).map(|h| h.value).collect()
}

/// The one value of a single-valued header field.
pub(crate) fn single<'h>(
    headers: &[HeaderLine<'h>],
    full: &'static str,
    compact: Option<&str>,
) -> Result<Option<&'h str>, RequestError> {
    let mut it = headers.iter().filter(|h| named(h, full, compact));
    let first = it.next();
    if it.next().is_some() {
        return Err(RequestError::MultipleHeaders(full));
    }
    Ok(first.map(|h| h.value))
}

fn required<'h>(
    headers: &[HeaderLine<'h>],
    full: &'static str,
    compact: Option<&str>,
) -> Result<&'h str, RequestError> {
    single(headers, full, compact)?.ok_or(RequestError::MissingHeader(full))
}

/// The top Via value: where the transaction comes from (RFC 3261 §17.2.3, §18.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Via<'h> {
    /// `host[:port]` as written.
    pub sent_by: &'h str,
    pub branch: Option<&'h str>,
    pub rport: bool,
}

/// RFC 3261 §8.1.1.7 magic cookie of RFC 3261 branch ids.
pub(crate) const MAGIC_COOKIE: &str = "z9hG4bK";

pub(crate) fn parse_via(v: &str) -> Option<Via<'_>> {
    // sent-protocol = name SLASH version SLASH transport, with LWS allowed around SLASH.
    let (name, rest) = v.split_once('/')?;
    let (version, rest) = rest.split_once('/')?;
    if !name.trim().eq_ignore_ascii_case("SIP") || version.trim() != "2.0" {
        return None;
    }
    let rest = rest.trim_start_matches([' ', '\t']);
    let transport_len = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
    if transport_len == 0 {
        return None;
    }
    let rest = rest[transport_len..].trim_start_matches([' ', '\t']);
    let (sent_by, params) = match rest.find(';') {
        Some(i) => (rest[..i].trim_end_matches([' ', '\t']), &rest[i..]),
        None => (rest.trim_end_matches([' ', '\t']), ""),
    };
    uri::split_host_port(sent_by).ok()?;
    let params = uri::header_params(params).ok()?;
    Some(Via {
        sent_by,
        branch: uri::param(params, "branch").flatten(),
        rport: uri::param(params, "rport").is_some(),
    })
}

/// A request whose header fields passed every check.
#[derive(Debug, Clone)]
pub(crate) struct Request<'h> {
    pub method: Method,
    pub uri: Uri<'h>,
    pub from: NameAddr<'h>,
    pub to: NameAddr<'h>,
    pub from_raw: &'h str,
    pub to_raw: &'h str,
    pub call_id: &'h str,
    pub cseq: u32,
    pub contact: Option<NameAddr<'h>>,
    /// Record-Route values in order (RFC 3261 §12.1.1: copied into the 2xx, and the UAS
    /// route set in the same order).
    pub record_route: Vec<&'h str>,
    pub content_type: Option<&'h str>,
    /// `Session-Expires` delta-seconds and `refresher` (RFC 4028 §4).
    pub session_expires: Option<(u32, Option<&'h str>)>,
    pub supports_timer: bool,
}

/// Checks the request in the documented order.
pub(crate) fn parse_request<'h>(
    method_str: &'h str,
    uri_str: &'h str,
    headers: &[HeaderLine<'h>],
    body: &[u8],
) -> Result<Request<'h>, RequestError> {
    // Mandatory header fields (RFC 3261 §8.1.1) and single values (RFC 4475 §3.3.8).
    let vias = list(headers, "Via", Some("v"));
    if vias.is_empty() {
        return Err(RequestError::MissingHeader("Via"));
    }
    let to_raw = required(headers, "To", Some("t"))?;
    let from_raw = required(headers, "From", Some("f"))?;
    let call_id = required(headers, "Call-ID", Some("i"))?;
    let cseq_raw = required(headers, "CSeq", None)?;
    let max_forwards = single(headers, "Max-Forwards", None)?;
    let content_type = single(headers, "Content-Type", Some("c"))?;
    let contact_raw = list(headers, "Contact", Some("m"));

    if vias.iter().any(|v| v.is_empty()) {
        return Err(RequestError::MalformedHeader("Via"));
    }
    let top_via = parse_via(vias[0]).ok_or(RequestError::MalformedHeader("Via"))?;
    if top_via.branch == Some(MAGIC_COOKIE) {
        return Err(RequestError::EmptyBranch);
    }
    if call_id.is_empty() || call_id.contains([' ', '\t']) {
        return Err(RequestError::MalformedHeader("Call-ID"));
    }
    // CSeq = 1*DIGIT LWS Method, the number below 2**31 (RFC 3261 §8.1.1.5).
    let (seq, cseq_method) =
        cseq_raw.split_once([' ', '\t']).ok_or(RequestError::MalformedHeader("CSeq"))?;
    let cseq_method = cseq_method.trim_matches([' ', '\t']);
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || cseq_method.is_empty() {
        return Err(RequestError::MalformedHeader("CSeq"));
    }
    let cseq: u32 =
        seq.parse().ok().filter(|n| *n < 1 << 31).ok_or(RequestError::MalformedHeader("CSeq"))?;

    let from = uri::parse_name_addr(from_raw).map_err(|_| RequestError::MalformedHeader("From"))?;
    let to = uri::parse_name_addr(to_raw).map_err(|_| RequestError::MalformedHeader("To"))?;
    let contact = match contact_raw.as_slice() {
        [] => None,
        ["*"] => None,
        values => {
            let mut first = None;
            for v in values {
                let na = uri::parse_name_addr(v)
                    .map_err(|_| RequestError::MalformedHeader("Contact"))?;
                first.get_or_insert(na);
            }
            first
        }
    };
    let record_route = list(headers, "Record-Route", None);
    for rr in &record_route {
        uri::parse_name_addr(rr).map_err(|_| RequestError::MalformedHeader("Record-Route"))?;
    }

    if uri_str.starts_with('<') {
        return Err(RequestError::BadRequestUri);
    }
    let uri = uri::parse_uri(uri_str).map_err(|_| RequestError::BadRequestUri)?;
    if uri.has_headers {
        // RFC 4475 §3.1.2.11 `escruri`: headers are not allowed in a Request-URI.
        return Err(RequestError::BadRequestUri);
    }

    let method = Method::parse(method_str);
    match method {
        Method::Unknown => return Err(RequestError::UnknownMethod),
        Method::NotAllowed => return Err(RequestError::MethodNotAllowed),
        _ => {}
    }
    if cseq_method != method_str {
        return Err(RequestError::CSeqMismatch);
    }
    if uri.scheme == Scheme::Other {
        return Err(RequestError::UnsupportedUriScheme);
    }
    if let Some(mf) = max_forwards {
        if mf.is_empty() || !mf.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RequestError::MalformedHeader("Max-Forwards"));
        }
        let mf: u32 = mf.parse().map_err(|_| RequestError::MalformedHeader("Max-Forwards"))?;
        if mf > 255 {
            return Err(RequestError::MalformedHeader("Max-Forwards"));
        }
        // OPTIONS with Max-Forwards 0 is answered by its final recipient (RFC 4475 §3.3.11,
        // `zeromf`); anything else that ran out of hops reached us through a loop.
        if mf == 0 && method != Method::Options && method != Method::Ack {
            return Err(RequestError::TooManyHops);
        }
    }
    // Require is ignored on ACK and CANCEL (RFC 3261 §8.2.2.3).
    if method != Method::Ack && method != Method::Cancel {
        let unsupported: Vec<String> = list(headers, "Require", None)
            .into_iter()
            .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(SUPPORTED))
            .map(str::to_owned)
            .collect();
        if !unsupported.is_empty() {
            return Err(RequestError::BadExtension(unsupported));
        }
    }
    let carries_session = matches!(method, Method::Invite | Method::Ack | Method::Update);
    if carries_session && !body.is_empty() {
        let ct = content_type.ok_or(RequestError::MissingHeader("Content-Type"))?;
        if !is_sdp(ct) && !is_multipart_mixed(ct) {
            return Err(RequestError::UnsupportedMediaType);
        }
    }
    if method == Method::Invite {
        let accept = list(headers, "Accept", None);
        let usable = accept.is_empty()
            || accept.iter().any(|a| {
                let mt = a.split(';').next().unwrap_or("").trim();
                is_sdp(mt) || mt.eq_ignore_ascii_case("application/*") || mt == "*/*"
            });
        if !usable {
            return Err(RequestError::NotAcceptable);
        }
    }
    let supports_timer = list(headers, "Supported", Some("k"))
        .iter()
        .chain(list(headers, "Require", None).iter())
        .any(|t| t.eq_ignore_ascii_case("timer"));
    let session_expires = match single(headers, "Session-Expires", Some("x"))? {
        None => None,
        Some(v) => {
            let (delta, params) = v.split_once(';').unwrap_or((v, ""));
            let delta: u32 = delta
                .trim()
                .parse()
                .map_err(|_| RequestError::MalformedHeader("Session-Expires"))?;
            // RFC 4028 §9: a refresh below our minimum gets 422 + Min-SE, but only from a
            // caller that supports the extension (it can retry); for one that does not, a
            // proxy put the header in, and the interval is raised instead (errata 1687).
            let refresh = matches!(method, Method::Invite | Method::Update);
            if refresh && delta < MIN_SE && supports_timer {
                return Err(RequestError::SessionIntervalTooSmall);
            }
            Some((delta, uri::param(params, "refresher").flatten()))
        }
    };

    Ok(Request {
        method,
        uri,
        from,
        to,
        from_raw,
        to_raw,
        call_id,
        cseq,
        contact,
        record_route,
        content_type,
        session_expires,
        supports_timer,
    })
}

pub(crate) fn is_sdp(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/sdp")
}

pub(crate) fn is_multipart_mixed(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("multipart/mixed")
}

/// The fields a response needs to find its client transaction (RFC 3261 §17.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Response<'h> {
    pub code: u16,
    pub branch: &'h str,
    pub cseq_method: &'h str,
}

pub(crate) fn parse_response<'h>(code: u16, headers: &[HeaderLine<'h>]) -> Option<Response<'h>> {
    let vias = list(headers, "Via", Some("v"));
    let via = parse_via(vias.first()?)?;
    let cseq = single(headers, "CSeq", None).ok()??;
    let (seq, method) = cseq.split_once([' ', '\t'])?;
    seq.parse::<u32>().ok().filter(|n| *n < 1 << 31)?;
    Some(Response { code, branch: via.branch?, cseq_method: method.trim() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_lines() {
        assert_eq!(
            parse_start_line("INVITE sip:a@b SIP/2.0"),
            Ok(StartLine::Request { method: "INVITE", uri: "sip:a@b" })
        );
        assert_eq!(parse_start_line("SIP/2.0 100 "), Ok(StartLine::Response { code: 100 }));
        assert_eq!(parse_start_line("SIP/2.0 180"), Ok(StartLine::Response { code: 180 }));
        assert_eq!(
            parse_start_line("SIP/2.0 4294967301 better not break the receiver"),
            Err(StartLineError::BadStatusLine)
        );
        assert_eq!(
            parse_start_line("INVITE  sip:a@b  SIP/2.0"),
            Err(StartLineError::Request(RequestErrorKind::BadRequestLine))
        );
        assert_eq!(
            parse_start_line("OPTIONS sip:a@b SIP/2.0  "),
            Err(StartLineError::Request(RequestErrorKind::BadRequestLine))
        );
        assert_eq!(
            parse_start_line("OPTIONS sip:a@b SIP/7.0"),
            Err(StartLineError::Request(RequestErrorKind::Version))
        );
        assert_eq!(parse_start_line("GET / HTTP/1.1"), Err(StartLineError::NotSip));
    }

    #[test]
    fn via_with_lws() {
        let v = parse_via("SIP  /   2.0 /UDP 192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.sent_by, "192.0.2.2");
        assert_eq!(v.branch, Some("390skdjuw"));
        let v = parse_via("SIP  / 2.0  / TCP     spindle.example.com   ; branch  =   z9hG4bK9ikj8")
            .unwrap();
        assert_eq!(v.sent_by, "spindle.example.com");
        assert_eq!(v.branch, Some("z9hG4bK9ikj8"));
        let v = parse_via("SIP/2.0/UDP [2001:db8::9]:5070;rport;branch=z9hG4bKx").unwrap();
        assert!(v.rport);
        assert_eq!(v.sent_by, "[2001:db8::9]:5070");
        assert!(parse_via("SIP/2.0/UDP 192.0.2.15;;").is_none());
        assert!(parse_via("garbage").is_none());
    }
}
