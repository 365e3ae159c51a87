//! Phone numbers are personal data: logs show them through [`Redacted`].

use std::fmt;

/// Shows only the last four characters of a value in logs (`+1••••••1212`).
///
/// Wrap caller and recipient numbers (and SIP URIs' user parts) in this whenever they are logged.
#[derive(Clone, Copy)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() <= 4 {
            return f.write_str(&"•".repeat(chars.len()));
        }
        let keep_head = usize::from(chars[0] == '+') * 2;
        let tail = chars.len() - 4;
        for (i, c) in chars.iter().enumerate() {
            if i < keep_head || i >= tail {
                write!(f, "{c}")?;
            } else {
                f.write_str("•")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::Redacted;

    #[test]
    fn keeps_country_code_and_last_four() {
        assert_eq!(Redacted("+18005551212").to_string(), "+1••••••1212");
        assert_eq!(Redacted("5551212").to_string(), "•••1212");
        assert_eq!(Redacted("123").to_string(), "•••");
        assert_eq!(Redacted("").to_string(), "");
    }
}
