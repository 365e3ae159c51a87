//! `application/x-www-form-urlencoded` decoding for webhook bodies and query strings.
//!
//! Rules (WHATWG URL Standard, "application/x-www-form-urlencoded parsing"): pairs are split on
//! `&`, empty pairs are skipped, a pair without `=` is a name with an empty value, `+` is a space
//! and `%XX` is one byte. Unlike the WHATWG parser, a malformed `%` escape or a name or value
//! that is not UTF-8 after decoding is an error rather than passed through: a webhook that
//! does not decode cleanly was not made by Twilio, and its signature could never be checked
//! against what it really said. Repeated names are kept, in order, because every value is
//! part of the signature.

use std::fmt;

/// At most this many pairs are decoded; a Twilio webhook carries a few dozen.
pub const MAX_FIELDS: usize = 1000;

/// Why a form body or query string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// A `%` not followed by two hex digits; `offset` is the `%`'s byte offset in the input.
    #[error("invalid percent-escape at byte {offset}")]
    InvalidPercentEscape {
        /// Byte offset of the `%`.
        offset: usize,
    },
    /// A name or value is not UTF-8 once decoded.
    #[error("name or value at byte {offset} is not valid UTF-8 after decoding")]
    InvalidUtf8 {
        /// Byte offset where the offending name or value starts.
        offset: usize,
    },
    /// More than [`MAX_FIELDS`] pairs.
    #[error("more than {limit} form fields")]
    TooManyFields {
        /// The limit that was exceeded ([`MAX_FIELDS`]).
        limit: usize,
    },
}

/// Decodes an `application/x-www-form-urlencoded` body into `(name, value)` pairs, in order.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let mut pairs = Vec::new();
    let mut start = 0;
    for piece in body.split(|&b| b == b'&') {
        let offset = start;
        start += piece.len() + 1;
        if piece.is_empty() {
            continue;
        }
        if pairs.len() == MAX_FIELDS {
            return Err(FormError::TooManyFields { limit: MAX_FIELDS });
        }
        let (name, value) = match piece.iter().position(|&b| b == b'=') {
            Some(eq) => (&piece[..eq], &piece[eq + 1..]),
            None => (piece, &piece[piece.len()..]),
        };
        let value_offset = offset + name.len() + 1;
        let name = decode(name, offset)?;
        let value = decode(value, value_offset)?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Decodes a URL query string (without the leading `?`) with the same rules as [`parse_form`].
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, FormError> {
    parse_form(query.as_bytes())
}

/// Decodes one name or value; `offset` is its position in the whole input, for errors.
fn decode(raw: &[u8], offset: usize) -> Result<String, FormError> {
    let out = precall_api::percent::decode(raw, true)
        .map_err(|at| FormError::InvalidPercentEscape { offset: offset + at })?;
    String::from_utf8(out).map_err(|_| FormError::InvalidUtf8 { offset })
}

/// Decoded webhook parameters, in the order they arrived.
///
/// `Debug` shows the names only: values include phone numbers, which are personal data.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Decodes a form body ([`parse_form`]).
    pub fn parse(body: &[u8]) -> Result<Self, FormError> {
        parse_form(body).map(Self)
    }

    /// The first value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// All pairs, in order (what [`crate::RequestValidator::validate`] takes).
    pub fn as_slice(&self) -> &[(String, String)] {
        &self.0
    }

    /// Number of pairs, repeated names counted each time.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs, by value.
    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }
}

impl From<Vec<(String, String)>> for Params {
    fn from(pairs: Vec<(String, String)>) -> Self {
        Self(pairs)
    }
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Params")
            .field("names", &self.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn decodes_a_twilio_webhook() {
        let body = b"CallSid=CA1234567890ABCDE&From=%2B12349013030&To=%2B18005551212\
                     &CallStatus=ringing&FromCity=&CallerName=Jane+Q.+Doe%26Co";
        let got = parse_form(body).unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("CallSid", "CA1234567890ABCDE"),
                ("From", "+12349013030"),
                ("To", "+18005551212"),
                ("CallStatus", "ringing"),
                ("FromCity", ""),
                ("CallerName", "Jane Q. Doe&Co"),
            ])
        );
    }

    #[test]
    fn empty_pairs_skipped_repeats_kept_in_order() {
        assert_eq!(parse_form(b"").unwrap(), pairs(&[]));
        assert_eq!(parse_form(b"&&").unwrap(), pairs(&[]));
        assert_eq!(
            parse_form(b"&a=1&&a=2&b&a=1&").unwrap(),
            pairs(&[("a", "1"), ("a", "2"), ("b", ""), ("a", "1")])
        );
        // Only the first `=` splits; `=` in a value stays.
        assert_eq!(parse_form(b"x==y=").unwrap(), pairs(&[("x", "=y=")]));
        assert_eq!(parse_form(b"=v").unwrap(), pairs(&[("", "v")]));
    }

    #[test]
    fn percent_and_plus() {
        assert_eq!(
            parse_query("n%61me=a%2bb+c%20d%C3%A9%f0%9f%98%80").unwrap(),
            pairs(&[("name", "a+b c dé😀")])
        );
        // Raw UTF-8 passes through.
        assert_eq!(parse_query("k=é").unwrap(), pairs(&[("k", "é")]));
    }

    #[test]
    fn bad_escapes_name_their_offset() {
        for (input, offset) in [
            ("a=%", 2),
            ("a=%4", 2),
            ("a=%zz", 2),
            ("a=1&b=x%g1", 7),
            ("%x=1", 0),
            ("ok=1&n%=1", 6),
        ] {
            assert_eq!(
                parse_query(input),
                Err(FormError::InvalidPercentEscape { offset }),
                "{input}"
            );
        }
    }

    #[test]
    fn invalid_utf8_names_its_field() {
        assert_eq!(parse_query("a=1&b=%FF"), Err(FormError::InvalidUtf8 { offset: 6 }));
        assert_eq!(parse_form(b"a=\xC3"), Err(FormError::InvalidUtf8 { offset: 2 }));
        // A lone continuation byte made by an escape.
        assert_eq!(parse_query("%80=x"), Err(FormError::InvalidUtf8 { offset: 0 }));
    }

    #[test]
    fn field_limit() {
        let ok = vec!["a=1"; MAX_FIELDS].join("&");
        assert_eq!(parse_query(&ok).unwrap().len(), MAX_FIELDS);
        // Empty pairs do not count.
        let ok = format!("{ok}&&&");
        assert_eq!(parse_query(&ok).unwrap().len(), MAX_FIELDS);
        let too_many = format!("{ok}&b=2");
        assert_eq!(parse_query(&too_many), Err(FormError::TooManyFields { limit: MAX_FIELDS }));
    }

    #[test]
    fn params_helper() {
        let p = Params::parse(b"Digits=1&From=%2B1555&Digits=2").unwrap();
        assert_eq!(p.get("Digits"), Some("1"));
        assert_eq!(p.get_all("Digits").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(p.get("To"), None);
        assert_eq!(p.len(), 3);
        assert!(!p.is_empty());
        assert!(Params::default().is_empty());
        let dbg = format!("{p:?}");
        assert_eq!(dbg, r#"Params { names: ["Digits", "From", "Digits"] }"#);
        assert!(!dbg.contains("1555"));
        assert_eq!(Params::from(p.clone().into_vec()), p);
        assert_eq!(p.as_slice()[1], ("From".to_owned(), "+1555".to_owned()));
    }
}
