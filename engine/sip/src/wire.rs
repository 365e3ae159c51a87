//! Framing of one UDP datagram (RFC 3261 §7, §18.3): start line, header fields, body.
//!
//! rsip measured gaps (see `shared/STACK.md`): it ignores Content-Length, rejects LF-only line
//! endings and folded header fields. This layer runs first on every datagram and fixes all
//! three: it normalises the header section to CRLF without folding, frames the body by
//! Content-Length, and keeps going after a bad header line so that a precise `400` can still be
//! built.

use std::borrow::Cow;

use crate::error::FramingError;

/// One header field line after unfolding: the name as written and its trimmed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeaderLine<'h> {
    pub name: &'h str,
    pub value: &'h str,
}

/// The datagram cut into its parts. `head` is owned by the caller (see [`normalize_head`]).
#[derive(Debug)]
pub(crate) struct Head<'h> {
    pub start_line: &'h str,
    pub headers: Vec<HeaderLine<'h>>,
    /// A line in the header section that is not `name: value` (first one only).
    pub bad_line: bool,
}

/// Splits the datagram at the blank line ending the header section. Accepts CRLFCRLF and the
/// LF-only forms. Without a blank line the whole datagram is header section (RFC 3261 allows
/// no body; a truncated header section then fails later on a missing header field).
pub(crate) fn split_head_body(datagram: &[u8]) -> (&[u8], &[u8]) {
    for i in memchr::memchr_iter(b'\n', datagram) {
        let head = &datagram[..i];
        let head = head.strip_suffix(b"\r").unwrap_or(head);
        // "\n\n" or "\n\r\n" ends the head.
        if datagram.get(i + 1) == Some(&b'\n') {
            return (head, &datagram[i + 2..]);
        }
        if datagram.get(i + 1) == Some(&b'\r') && datagram.get(i + 2) == Some(&b'\n') {
            return (head, &datagram[i + 3..]);
        }
    }
    (datagram, &[])
}

/// Leading CRLFs are keepalives (RFC 5626 §4.4.1) or noise before a message (RFC 3261 §7.5).
pub(crate) fn skip_leading_crlf(datagram: &[u8]) -> &[u8] {
    let n = datagram.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
    &datagram[n..]
}

/// Lossy UTF-8, CRLF line endings, folded lines joined with one SP (RFC 3261 §7.3.1: a folded
/// line is equivalent to a single SP). Borrows when the head needs no change.
pub(crate) fn normalize_head(head: &[u8]) -> Cow<'_, str> {
    // `from_utf8` checks ASCII a word at a time; the lossy decoder only runs on bad input.
    let text = match std::str::from_utf8(head) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(head),
    };
    let bytes = text.as_bytes();
    let needs_rewrite = bytes.ends_with(b"\r")
        || memchr::memchr_iter(b'\n', bytes).any(|i| {
            i == 0 || bytes[i - 1] != b'\r' || matches!(bytes.get(i + 1), Some(b' ') | Some(b'\t'))
        });
    if !needs_rewrite {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for (n, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if n > 0 && (line.starts_with(' ') || line.starts_with('\t')) {
            let trimmed = line.trim_start_matches([' ', '\t']);
            if !out.ends_with(' ') && !trimmed.is_empty() {
                out.push(' ');
            }
            out.push_str(trimmed);
        } else {
            if n > 0 {
                out.push_str("\r\n");
            }
            out.push_str(line);
        }
    }
    Cow::Owned(out)
}

/// `token` characters of RFC 3261 §25.1.
pub(crate) fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '-' | '.' | '!' | '%' | '*' | '_' | '+' | '`' | '\'' | '~')
}

/// Cuts a normalised head into start line and header lines.
pub(crate) fn parse_head(head: &str) -> Head<'_> {
    // The head is normalised: every LF ends a CRLF, so cutting at LF and taking the CR off
    // each line gives the CRLF lines (a single-byte search, not a two-byte pattern).
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let start_line = lines.next().unwrap_or("");
    let mut headers = Vec::with_capacity(16);
    let mut bad_line = false;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) => {
                let name = name.trim_end_matches([' ', '\t']);
                if name.is_empty() || !name.chars().all(is_token_char) {
                    bad_line = true;
                    continue;
                }
                headers.push(HeaderLine { name, value: value.trim_matches([' ', '\t']) });
            }
            None => bad_line = true,
        }
    }
    Head { start_line, headers, bad_line }
}

/// Frames the body by Content-Length (RFC 3261 §18.3, §20.14): extra octets after the body
/// are discarded; a datagram that ends early is an error (a request gets `400`). Without
/// Content-Length over UDP the body runs to the end of the datagram.
pub(crate) fn frame_body<'d>(
    headers: &[HeaderLine<'_>],
    rest: &'d [u8],
) -> Result<&'d [u8], FramingError> {
    let mut values = headers.iter().filter(|h| {
        h.name.eq_ignore_ascii_case("content-length") || h.name.eq_ignore_ascii_case("l")
    });
    let Some(first) = values.next() else {
        return Ok(rest);
    };
    if values.next().is_some() {
        return Err(FramingError::MultipleContentLength);
    }
    let v = first.value;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FramingError::BadContentLength);
    }
    let len: usize = v.parse().map_err(|_| FramingError::BadContentLength)?;
    if len > rest.len() {
        return Err(FramingError::Truncated { declared: len, available: rest.len() });
    }
    Ok(&rest[..len])
}

/// Finds the Call-ID value (`Call-ID:` or compact `i:`, any case) without parsing the message,
/// so a shard can route a datagram to the shard owning the call before anything else.
/// Looks at header lines only (the start line and the body are skipped); no allocation.
pub fn peek_call_id(datagram: &[u8]) -> Option<Cow<'_, [u8]>> {
    let datagram = skip_leading_crlf(datagram);
    let mut pos = memchr::memchr(b'\n', datagram)? + 1;
    let line_at = |pos: usize| {
        let end = memchr::memchr(b'\n', &datagram[pos..]).map_or(datagram.len(), |e| pos + e);
        let line = &datagram[pos..end];
        (line.strip_suffix(b"\r").unwrap_or(line), end + 1)
    };
    while pos < datagram.len() {
        let (line, next) = line_at(pos);
        if line.is_empty() {
            return None; // end of the header section
        }
        if is_call_id_line(line) {
            // A folded value (continuation lines start with SP or HT) is unfolded exactly as
            // the endpoint's `normalize_head` does, so both name the same call and the
            // datagram goes to the shard that owns it.
            let mut folded = line.to_vec();
            let mut at = next;
            let mut was_folded = false;
            while at < datagram.len() {
                let (cont, after) = line_at(at);
                if !matches!(cont.first(), Some(b' ' | b'\t')) {
                    break;
                }
                was_folded = true;
                let trimmed = trim_bytes(cont);
                if !folded.ends_with(b" ") && !trimmed.is_empty() {
                    folded.push(b' ');
                }
                folded.extend_from_slice(trim_start(cont));
                at = after;
            }
            if !was_folded {
                return call_id_value(line).map(Cow::Borrowed);
            }
            return call_id_value(&folded).map(|v| Cow::Owned(v.to_vec()));
        }
        pos = next;
    }
    None
}

fn is_call_id_line(line: &[u8]) -> bool {
    line.iter().position(|b| *b == b':').is_some_and(|colon| {
        let name = trim_bytes(&line[..colon]);
        name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i")
    })
}

fn trim_start(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    b
}

fn call_id_value(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|b| *b == b':')?;
    let name = trim_bytes(&line[..colon]);
    if !(name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i")) {
        return None;
    }
    let value = trim_bytes(&line[colon + 1..]);
    (!value.is_empty()).then_some(value)
}

fn trim_bytes(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if *first == b' ' || *first == b'\t' {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if *last == b' ' || *last == b'\t' {
            b = rest;
        } else {
            break;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lf_only_and_folding_are_normalised() {
        let head = b"INVITE sip:a@b SIP/2.0\nSubject: one\n two\n\tthree\nTo: x";
        let n = normalize_head(head);
        assert_eq!(n, "INVITE sip:a@b SIP/2.0\r\nSubject: one two three\r\nTo: x");
        let h = parse_head(&n);
        assert_eq!(h.headers[0].value, "one two three");
    }

    #[test]
    fn crlf_head_is_borrowed() {
        let head = b"OPTIONS sip:a@b SIP/2.0\r\nTo: x";
        assert!(matches!(normalize_head(head), Cow::Borrowed(_)));
    }

    #[test]
    fn split_accepts_lf_only_blank_line() {
        let (h, b) = split_head_body(b"A\nB: c\n\nbody");
        assert_eq!(h, b"A\nB: c");
        assert_eq!(b, b"body");
        let (h, b) = split_head_body(b"A\r\nB: c\r\n\r\nbody");
        assert_eq!(h, b"A\r\nB: c");
        assert_eq!(b, b"body");
    }

    #[test]
    fn content_length_framing() {
        let hs = [HeaderLine { name: "l", value: "3" }];
        assert_eq!(frame_body(&hs, b"abcdef"), Ok(&b"abc"[..]));
        assert_eq!(
            frame_body(&hs, b"ab"),
            Err(FramingError::Truncated { declared: 3, available: 2 })
        );
        let neg = [HeaderLine { name: "Content-Length", value: "-999" }];
        assert_eq!(frame_body(&neg, b""), Err(FramingError::BadContentLength));
        let two = [
            HeaderLine { name: "Content-Length", value: "1" },
            HeaderLine { name: "content-length", value: "1" },
        ];
        assert_eq!(frame_body(&two, b"a"), Err(FramingError::MultipleContentLength));
        assert_eq!(frame_body(&[], b"rest"), Ok(&b"rest"[..]));
    }

    #[test]
    fn peek_call_id_forms() {
        let normal = b"INVITE sip:a@b SIP/2.0\r\nVia: x\r\nCall-ID: abc@host\r\n\r\n";
        assert_eq!(peek(normal), Some(&b"abc@host"[..]));
        let compact = b"BYE sip:a@b SIP/2.0\r\ni:   zz9 \r\n\r\n";
        assert_eq!(peek(compact), Some(&b"zz9"[..]));
        let weird = b"OPTIONS sip:a@b SIP/2.0\ncALL-iD   :\tq1\n\n";
        assert_eq!(peek(weird), Some(&b"q1"[..]));
        let in_body = b"MESSAGE sip:a@b SIP/2.0\r\nTo: x\r\n\r\nCall-ID: nope\r\n";
        assert_eq!(peek(in_body), None);
        assert_eq!(peek(b"\x00\xff garbage"), None);
        assert_eq!(peek(b""), None);
        assert_eq!(peek(b"\r\n\r\n"), None);
        // a header whose name merely ends in "i" is not the compact form
        let not_i = b"INVITE sip:a@b SIP/2.0\r\nMulti: x\r\nI: real\r\n\r\n";
        assert_eq!(peek(not_i), Some(&b"real"[..]));
    }

    fn peek(d: &[u8]) -> Option<&[u8]> {
        // A leak keeps the test's slices simple; tests only.
        peek_call_id(d).map(|c| &*Box::leak(c.into_owned().into_boxed_slice()))
    }

    #[test]
    fn a_folded_call_id_is_peeked_as_the_endpoint_reads_it() {
        for (datagram, want) in [
            (&b"BYE sip:a@b SIP/2.0\r\nCall-ID:\r\n  abc@host\r\nVia: x\r\n\r\n"[..], "abc@host"),
            (&b"BYE sip:a@b SIP/2.0\r\nCall-ID: abc\r\n\t@host\r\n\r\n"[..], "abc @host"),
            (&b"BYE sip:a@b SIP/2.0\r\ni: abc@host\r\n \r\n\r\n"[..], "abc@host"),
        ] {
            assert_eq!(
                peek(datagram),
                Some(want.as_bytes()),
                "{}",
                String::from_utf8_lossy(datagram)
            );
            // The endpoint's own reading of the same head.
            let (head, _) = split_head_body(datagram);
            let text = normalize_head(head);
            let parsed = parse_head(&text);
            let value = parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("call-id") || h.name == "i")
                .unwrap()
                .value;
            assert_eq!(value, want);
        }
    }
}
