//! Percent-encoding (RFC 3986) shared by every crate that builds or reads URLs and forms.

/// Encodes `v` for a query value or path segment: RFC 3986 unreserved characters pass, every
/// other byte becomes `%XX`.
pub fn encode_component(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as in forms).
///
/// A `%` not followed by two hex digits is an error carrying its byte offset in `raw`.
pub fn decode(raw: &[u8], plus_is_space: bool) -> Result<Vec<u8>, usize> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hi = raw.get(i + 1).copied().and_then(hex_value);
                let lo = raw.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(i);
                };
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(encode_component("agent_01-x.~"), "agent_01-x.~");
        assert_eq!(encode_component("a b&c/é"), "a%20b%26c%2F%C3%A9");
        assert_eq!(decode(b"a%20b%26c%2f%C3%A9", false).unwrap(), "a b&c/é".as_bytes());
        assert_eq!(decode(b"a+b", true).unwrap(), b"a b");
        assert_eq!(decode(b"a+b", false).unwrap(), b"a+b");
    }

    #[test]
    fn bad_escapes_name_their_offset() {
        assert_eq!(decode(b"ab%zz", false), Err(2));
        assert_eq!(decode(b"%4", false), Err(0));
        assert_eq!(decode(b"x%", true), Err(1));
    }
}
