//! Responses: the public [`Response`] builder and its serialization.
//!
//! The server owns framing: whatever `Content-Length`, `Transfer-Encoding` or `Connection`
//! headers a handler sets are replaced by the server's own (a handler's `Connection: close` is
//! still honoured). Header names or values containing CR or LF are dropped, never written.

use std::io::Write as _;

/// An HTTP response built by a [`Handler`](crate::Handler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, 100..=999 (anything else is answered as a 500).
    pub status: u16,
    headers: Vec<(String, String)>,
    /// The body; not sent for `HEAD` requests or 1xx/204/304 responses.
    pub body: Vec<u8>,
}

impl Response {
    /// An empty response with this status.
    pub fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }

    /// Adds a header (a repeated name adds another line).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body and its `Content-Type` (replacing any earlier `Content-Type`).
    pub fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        self.headers.push(("Content-Type".to_owned(), content_type.to_owned()));
        self.body = body.into();
        self
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, s: impl Into<String>) -> Self {
        Response::new(status).body("text/plain; charset=utf-8", s.into())
    }

    /// An `application/json` response; `s` must already be JSON.
    pub fn json(status: u16, s: impl Into<String>) -> Self {
        Response::new(status).body("application/json", s.into())
    }

    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// All headers set so far, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Whether the handler asked for the connection to be closed (`Connection: close`).
    pub(crate) fn wants_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    }

    /// Appends the serialized response to `out`.
    ///
    /// `head_only`: answer to a `HEAD` request (headers, including the `Content-Length` the body
    /// would have, but no body). `connection`: the value of the `Connection` header to send, if
    /// any. The status must be in 100..=999 (the server checks).
    pub(crate) fn write_to(&self, out: &mut Vec<u8>, head_only: bool, connection: Option<&str>) {
        let status = self.status;
        // Writing into a Vec cannot fail.
        let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
        for (name, value) in &self.headers {
            if ["content-length", "transfer-encoding", "connection"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                continue;
            }
            if !valid_header(name, value) {
                tracing::warn!(header = %name.escape_debug(), "invalid response header dropped");
                continue;
            }
            let _ = write!(out, "{name}: {value}\r\n");
        }
        if let Some(c) = connection {
            let _ = write!(out, "Connection: {c}\r\n");
        }
        // RFC 9110: no Content-Length and no body with 1xx and 204; a 304 has no body, and its
        // Content-Length would describe the unsent representation, which we do not know.
        let bodiless = status < 200 || status == 204 || status == 304;
        if !bodiless {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        out.extend_from_slice(b"\r\n");
        if !bodiless && !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

fn valid_header(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// The standard reason phrase for a status code, or `"Unknown"`.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(resp: &Response, head_only: bool, connection: Option<&str>) -> String {
        let mut out = Vec::new();
        resp.write_to(&mut out, head_only, connection);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn serializes_status_headers_and_length() {
        let resp = Response::text(200, "hi").header("X-A", "1");
        assert_eq!(
            render(&resp, false, None),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nX-A: 1\r\n\
             Content-Length: 2\r\n\r\nhi"
        );
        assert_eq!(
            render(&resp, true, Some("close")),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nX-A: 1\r\n\
             Connection: close\r\nContent-Length: 2\r\n\r\n"
        );
    }

    #[test]
    fn server_owns_framing_headers_and_drops_injection() {
        let resp = Response::json(201, "{}")
            .header("content-length", "99")
            .header("Transfer-Encoding", "chunked")
            .header("Connection", "keep-alive")
            .header("X-Evil", "a\r\nSet-Cookie: b")
            .header("Bad Name", "v");
        assert_eq!(
            render(&resp, false, None),
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn no_content_has_no_length_and_no_body() {
        let resp = Response::text(204, "ignored");
        assert_eq!(
            render(&resp, false, None),
            "HTTP/1.1 204 No Content\r\n\
            Content-Type: text/plain; charset=utf-8\r\n\r\n"
        );
    }

    #[test]
    fn builders_and_accessors() {
        let resp = Response::new(200).body("a/b", "x").body("c/d", vec![1u8, 2]);
        assert_eq!(resp.header_value("CONTENT-TYPE"), Some("c/d"));
        assert_eq!(resp.headers().count(), 1);
        assert_eq!(resp.body, vec![1, 2]);
        assert!(Response::new(200).header("Connection", "Upgrade, Close").wants_close());
        assert!(!Response::new(200).header("Connection", "keep-alive").wants_close());
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(799), "Unknown");
    }
}
