//! Serialising the responses and requests we send (RFC 3261 §8.2.6, §12.2.1.1, §18.2.1).

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::message::list;
use crate::uri;
use crate::wire::HeaderLine;

/// The standard reason phrase of the codes precall sends.
pub(crate) fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        422 => "Session Interval Too Small",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "Version Not Supported",
        603 => "Decline",
        _ => "Unknown",
    }
}

/// A response to the request whose header fields are `headers`.
#[derive(Debug)]
pub(crate) struct ResponseSpec<'a> {
    pub code: u16,
    pub reason: &'a str,
    /// Our To tag, added unless the request's To already has one.
    pub to_tag: Option<&'a str>,
    /// Extra header lines, each ending in CRLF.
    pub extra: &'a str,
    /// `(content type, body)`.
    pub body: Option<(&'a str, &'a [u8])>,
    pub server: &'a str,
}

/// Copies Via (all values, in order), From, To, Call-ID and CSeq (RFC 3261 §8.2.6.2). The
/// top Via gets `received` and a filled-in `rport` (RFC 3261 §18.2.1, RFC 3581 §4): we answer
/// the datagram's source address, which is what carriers behind NAT expect.
pub(crate) fn response(
    headers: &[HeaderLine<'_>],
    source: SocketAddr,
    spec: &ResponseSpec<'_>,
) -> Vec<u8> {
    let mut out = String::with_capacity(512);
    let _ = write!(out, "SIP/2.0 {} {}\r\n", spec.code, spec.reason);
    for (i, via) in list(headers, "Via", Some("v")).into_iter().enumerate() {
        if i == 0 {
            out.push_str("Via: ");
            out.push_str(&top_via_with_received(via, source));
            out.push_str("\r\n");
        } else {
            let _ = write!(out, "Via: {via}\r\n");
        }
    }
    let find = |full: &str, compact: Option<&str>| {
        headers
            .iter()
            .find(|h| {
                h.name.eq_ignore_ascii_case(full)
                    || compact.is_some_and(|c| h.name.eq_ignore_ascii_case(c))
            })
            .map(|h| h.value)
    };
    if let Some(from) = find("From", Some("f")) {
        let _ = write!(out, "From: {from}\r\n");
    }
    if let Some(to) = find("To", Some("t")) {
        let has_tag = uri::parse_name_addr(to).ok().and_then(|n| n.tag()).is_some();
        match spec.to_tag {
            Some(tag) if !has_tag => {
                let _ = write!(out, "To: {to};tag={tag}\r\n");
            }
            _ => {
                let _ = write!(out, "To: {to}\r\n");
            }
        }
    }
    if let Some(call_id) = find("Call-ID", Some("i")) {
        let _ = write!(out, "Call-ID: {call_id}\r\n");
    }
    if let Some(cseq) = find("CSeq", None) {
        let _ = write!(out, "CSeq: {cseq}\r\n");
    }
    out.push_str(spec.extra);
    if !spec.server.is_empty() {
        let _ = write!(out, "Server: {}\r\n", spec.server);
    }
    finish(out, spec.body)
}

fn finish(mut out: String, body: Option<(&str, &[u8])>) -> Vec<u8> {
    match body {
        Some((content_type, body)) => {
            let _ = write!(
                out,
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(body);
            bytes
        }
        None => {
            out.push_str("Content-Length: 0\r\n\r\n");
            out.into_bytes()
        }
    }
}

fn top_via_with_received(via: &str, source: SocketAddr) -> String {
    let (head, params) = match via.find(';') {
        Some(i) => (via[..i].trim_end(), &via[i + 1..]),
        None => (via.trim_end(), ""),
    };
    let mut out = String::from(head);
    let mut had_received = false;
    for p in uri::split_outside_quotes(params, ';').filter(|p| !p.is_empty()) {
        let name = p.split_once('=').map_or(p, |(n, _)| n).trim();
        if name.eq_ignore_ascii_case("rport") {
            let _ = write!(out, ";rport={}", source.port());
        } else if name.eq_ignore_ascii_case("received") {
            had_received = true;
            let _ = write!(out, ";received={}", source.ip());
        } else {
            out.push(';');
            out.push_str(p);
        }
    }
    if !had_received {
        let _ = write!(out, ";received={}", source.ip());
    }
    out
}

/// An in-dialog request we originate (RFC 3261 §12.2.1.1): BYE, a refreshing UPDATE or
/// re-INVITE, the ACK of that re-INVITE.
#[derive(Debug)]
pub(crate) struct RequestSpec<'a> {
    pub method: &'a str,
    pub request_uri: &'a str,
    pub routes: &'a [String],
    /// Our Via sent-by (`host:port`).
    pub sent_by: &'a str,
    pub branch: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub call_id: &'a str,
    pub cseq: u32,
    pub user_agent: &'a str,
    /// Extra header lines, each ending in CRLF.
    pub extra: &'a str,
    /// `(content type, body)`.
    pub body: Option<(&'a str, &'a [u8])>,
}

pub(crate) fn request(spec: &RequestSpec<'_>) -> Vec<u8> {
    let mut out = String::with_capacity(512);
    let _ = write!(
        out,
        "{} {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={};rport\r\nMax-Forwards: 70\r\n",
        spec.method, spec.request_uri, spec.sent_by, spec.branch
    );
    for route in spec.routes {
        let _ = write!(out, "Route: {route}\r\n");
    }
    let _ = write!(
        out,
        "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\n",
        spec.from, spec.to, spec.call_id, spec.cseq, spec.method
    );
    out.push_str(spec.extra);
    if !spec.user_agent.is_empty() {
        let _ = write!(out, "User-Agent: {}\r\n", spec.user_agent);
    }
    finish(out, spec.body)
}

/// `host:port` with IPv6 brackets.
pub(crate) fn host_port(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_and_rport_are_filled() {
        let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        assert_eq!(
            top_via_with_received("SIP/2.0/UDP pbx.example.com;branch=z9hG4bKa;rport", src),
            "SIP/2.0/UDP pbx.example.com;branch=z9hG4bKa;rport=40000;received=198.51.100.7"
        );
        assert_eq!(
            top_via_with_received("SIP/2.0/UDP 10.0.0.1", src),
            "SIP/2.0/UDP 10.0.0.1;received=198.51.100.7"
        );
    }
}
