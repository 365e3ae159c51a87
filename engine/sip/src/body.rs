//! Finding the SDP in a request body: either the whole body (`application/sdp`) or the SDP
//! part of a `multipart/mixed` body (RFC 2046 §5.1), as SIP-I trunks send with ISUP.

use crate::message::{is_multipart_mixed, is_sdp};
use crate::uri;

pub(crate) fn sdp_of<'b>(content_type: Option<&str>, body: &'b [u8]) -> Option<&'b [u8]> {
    let ct = content_type?;
    if is_sdp(ct) {
        return Some(body);
    }
    if !is_multipart_mixed(ct) {
        return None;
    }
    let params = ct.split_once(';').map_or("", |(_, p)| p);
    let boundary = uri::param(params, "boundary").flatten()?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let d = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut i = 0;
    let mut start = None;
    while i + d.len() <= body.len() {
        let at_line_start = i == 0 || body[i - 1] == b'\n';
        if at_line_start && &body[i..i + d.len()] == d {
            if let Some(s) = start {
                parts.push(trim_crlf_end(&body[s..i]));
            }
            // skip the delimiter line
            let eol = body[i..].iter().position(|b| *b == b'\n').map_or(body.len(), |p| i + p + 1);
            start = Some(eol);
            i = eol;
            continue;
        }
        i += 1;
    }
    parts.into_iter().find_map(|part| {
        let (head, content) = crate::wire::split_head_body(part);
        let head = String::from_utf8_lossy(head);
        let is_sdp_part = head.split('\n').any(|line| {
            line.split_once(':').is_some_and(|(n, v)| {
                n.trim().eq_ignore_ascii_case("content-type") && is_sdp(v.trim())
            })
        });
        is_sdp_part.then_some(content)
    })
}

fn trim_crlf_end(mut b: &[u8]) -> &[u8] {
    if let Some(r) = b.strip_suffix(b"\n") {
        b = r;
    }
    if let Some(r) = b.strip_suffix(b"\r") {
        b = r;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_sdp_is_found() {
        let body = b"--xyz\r\nContent-Type: application/isup\r\n\r\n\x01\x02\r\n--xyz\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--xyz--\r\n";
        assert_eq!(sdp_of(Some("multipart/mixed;boundary=xyz"), body), Some(&b"v=0"[..]));
        assert_eq!(sdp_of(Some("application/sdp"), b"v=0"), Some(&b"v=0"[..]));
        assert_eq!(sdp_of(Some("text/plain"), b"v=0"), None);
    }
}
