//! Requests: the public [`Request`], and parsing a request head with the limits applied.
//!
//! Parsing is pure (bytes in, [`Head`] or [`RequestError`] out) so that every limit can be tested
//! without a socket; the I/O around it lives in `server.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Limits;

/// One complete HTTP request, head and body.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method as received, e.g. `GET`.
    pub method: String,
    /// The request target up to (not including) the first `?`.
    pub path: String,
    /// The raw query string after the first `?`, without the `?`; may be empty.
    pub query: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub version_minor: u8,
    /// Header names as received, in order, with their values.
    headers: Vec<(String, String)>,
    /// The body, exactly `Content-Length` bytes (empty without one).
    pub body: Vec<u8>,
    /// The peer's address.
    pub peer: SocketAddr,
}

impl Request {
    /// Builds a request by hand, e.g. to unit-test a [`Handler`](crate::Handler) without a socket.
    /// `target` is split into path and query at the first `?`.
    pub fn new(
        method: &str,
        target: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        peer: SocketAddr,
    ) -> Request {
        let (path, query) = split_target(target);
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            version_minor: 1,
            headers,
            body,
            peer,
        }
    }

    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// All headers, in the order received, names as received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The request target: the path, plus `?` and the query if the query is not empty.
    pub fn target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

fn split_target(target: &str) -> (&str, &str) {
    target.split_once('?').unwrap_or((target, ""))
}

/// Why a request was refused. Each variant maps to one status code; the `Display` text is the
/// body of the error response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
    #[error("too many headers (limit {0})")]
    TooManyHeaders(usize),
    #[error("request head too large (limit {0} bytes)")]
    HeadTooLarge(usize),
    #[error("invalid Content-Length: {0:?}")]
    InvalidContentLength(String),
    #[error(
        "Transfer-Encoding is not supported (chunked bodies are refused); \
         send the body with a Content-Length"
    )]
    TransferEncoding,
    #[error("body too large: Content-Length {len} exceeds the limit of {limit} bytes")]
    BodyTooLarge { len: u64, limit: usize },
    #[error("request not received completely within {0:?}")]
    Timeout(Duration),
}

impl RequestError {
    /// The status code this error is answered with.
    pub(crate) fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_)
            | RequestError::InvalidContentLength(_)
            | RequestError::TransferEncoding => 400,
            RequestError::TooManyHeaders(_) | RequestError::HeadTooLarge(_) => 431,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::Timeout(_) => 408,
        }
    }
}

/// A parsed request head plus what the connection needs to frame the body and decide keep-alive.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) version_minor: u8,
    pub(crate) headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included.
    pub(crate) len: usize,
    /// Validated, and at most `Limits::max_body_bytes`.
    pub(crate) content_length: usize,
    /// Whether the request allows the connection to stay open afterwards.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1.
    pub(crate) expect_continue: bool,
}

impl Head {
    /// Turns the head and its body into a [`Request`].
    pub(crate) fn into_request(self, body: Vec<u8>, peer: SocketAddr) -> Request {
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            version_minor: self.version_minor,
            headers: self.headers,
            body,
            peer,
        }
    }
}

/// Parses the head at the start of `buf`.
///
/// `Ok(None)`: the head is not complete yet and may still become valid. Errors are final.
/// `buf` may hold more than the head (the body, pipelined requests); only the head is looked at.
pub(crate) fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, RequestError> {
    // On the heap: 100 headers are 3.2 KiB, too much for a coroutine stack.
    let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(RequestError::HeadTooLarge(limits.max_head_bytes));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::TooManyHeaders(limits.max_headers));
        }
        Err(e) => return Err(RequestError::Malformed(e)),
    };
    if len > limits.max_head_bytes {
        return Err(RequestError::HeadTooLarge(limits.max_head_bytes));
    }
    // `Complete` guarantees method, path and version.
    let method = req.method.unwrap_or_default().to_owned();
    let (path, query) = split_target(req.path.unwrap_or_default());
    let version_minor = req.version.unwrap_or_default();
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();

    if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding")) {
        return Err(RequestError::TransferEncoding);
    }
    let content_length = content_length(&headers, limits.max_body_bytes)?;

    let (mut close, mut keep) = (false, false);
    for token in header_tokens(&headers, "connection") {
        close |= token.eq_ignore_ascii_case("close");
        keep |= token.eq_ignore_ascii_case("keep-alive");
    }
    let keep_alive = !close && (version_minor >= 1 || keep);
    let expect_continue = version_minor >= 1
        && headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("expect") && v.trim().eq_ignore_ascii_case("100-continue")
        });

    Ok(Some(Head {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        version_minor,
        headers,
        len,
        content_length,
        keep_alive,
        expect_continue,
    }))
}

/// The comma-separated tokens of every header called `name`, trimmed, empty ones skipped.
fn header_tokens<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
}

/// The body length: 0 without `Content-Length`; every value (including comma-separated lists
/// and repeated headers) must be plain decimal digits and all values must agree.
fn content_length(headers: &[(String, String)], max: usize) -> Result<usize, RequestError> {
    let mut found: Option<u64> = None;
    for (name, value) in headers {
        if !name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let invalid = || RequestError::InvalidContentLength(value.clone());
        for part in value.split(',') {
            let part = part.trim_matches([' ', '\t']);
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            // Only digits here, so the only possible error is overflow.
            let n: u64 = part.parse().map_err(|_| invalid())?;
            match found {
                Some(prev) if prev != n => return Err(invalid()),
                _ => found = Some(n),
            }
        }
    }
    let len = found.unwrap_or(0);
    match usize::try_from(len) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(RequestError::BodyTooLarge { len, limit: max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head>, RequestError> {
        parse_head(raw.as_bytes(), &Limits::default())
    }

    fn status(raw: &str) -> u16 {
        match parse(raw) {
            Err(e) => e.status(),
            Ok(h) => panic!("expected an error, got {h:?}"),
        }
    }

    #[test]
    fn parses_a_complete_head_and_splits_the_query() {
        let raw = "POST /a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET";
        let head = parse(raw).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/a/b");
        assert_eq!(head.query, "x=1&y=2");
        assert_eq!(head.version_minor, 1);
        assert_eq!(head.content_length, 3);
        assert_eq!(head.len, raw.len() - "abcGET".len());
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
    }

    #[test]
    fn partial_head_is_not_an_error() {
        assert!(parse("GET / HTTP/1.1\r\nHost: h\r\n").unwrap().is_none());
        assert!(parse("GE").unwrap().is_none());
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(status("hello\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nno colon here\r\n\r\n"), 400);
        assert_eq!(status("\x16\x03\x01\x02\x00\x01"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 400);
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |raw: &str| parse(raw).unwrap().unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn content_length_validation() {
        let cl = |v: &str| parse(&format!("POST / HTTP/1.1\r\n{v}\r\n\r\n")).map(|h| h.unwrap());
        assert_eq!(cl("Content-Length: 5").unwrap().content_length, 5);
        assert_eq!(cl("Content-Length: 5\r\ncontent-length: 5").unwrap().content_length, 5);
        assert_eq!(cl("Content-Length: 5, 5").unwrap().content_length, 5);
        for bad in [
            "Content-Length: abc",
            "Content-Length: -5",
            "Content-Length: +5",
            "Content-Length: ",
            "Content-Length: 5\r\nContent-Length: 6",
            "Content-Length: 5, 6",
            "Content-Length: 99999999999999999999999",
        ] {
            assert_eq!(cl(bad).unwrap_err().status(), 400, "{bad}");
        }
        assert_eq!(cl("Content-Length: 65537").unwrap_err().status(), 413);
        assert_eq!(cl("Transfer-Encoding: chunked").unwrap_err().status(), 400);
    }

    #[test]
    fn header_limits() {
        let limits = Limits { max_headers: 3, max_head_bytes: 64, ..Limits::default() };
        let three = "GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n";
        assert!(parse_head(three.as_bytes(), &limits).unwrap().is_some());
        let four = "GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\n\r\n";
        let err = parse_head(four.as_bytes(), &limits).unwrap_err();
        assert_eq!((err.status(), err.to_string().as_str()), (431, "too many headers (limit 3)"));
        let long = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "y".repeat(60));
        assert_eq!(parse_head(long.as_bytes(), &limits).unwrap_err().status(), 431);
        let partial = format!("GET / HTTP/1.1\r\nx: {}", "y".repeat(60));
        assert_eq!(parse_head(partial.as_bytes(), &limits).unwrap_err().status(), 431);
    }

    #[test]
    fn request_accessors() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let headers = vec![("X-A".to_owned(), "1".to_owned()), ("x-a".to_owned(), "2".to_owned())];
        let req = Request::new("GET", "/p?q=1", headers, Vec::new(), peer);
        assert_eq!(req.header("x-A"), Some("1"));
        assert_eq!(req.header("missing"), None);
        assert_eq!(req.headers().count(), 2);
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/p", "q=1"));
        assert_eq!(req.target(), "/p?q=1");
        let req = Request::new("GET", "/p", Vec::new(), Vec::new(), peer);
        assert_eq!(req.target(), "/p");
    }
}
