//! RFC 4733 §2.3 telephone-event payload (DTMF), receive side only.
//!
//! ```text
//!  0                   1                   2                   3
//! |     event     |E|R| volume    |          duration             |
//! ```
//! A sender repeats the packets of one event with the same RTP timestamp (the event's start)
//! and a growing duration, and sends the final (E bit) packet three times (§2.5.1.4): group
//! by timestamp to report each key press once.

/// Why a payload is not a telephone event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TelephoneEventError {
    /// The payload is shorter than the 4-byte event.
    #[error("telephone-event payload of {len} bytes is shorter than 4")]
    TooShort {
        /// Payload length.
        len: usize,
    },
}

/// One decoded telephone-event payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code (0–9 digits, 10 `*`, 11 `#`, 12–15 `A`–`D`, others per RFC 4734).
    pub event: u8,
    /// E bit: this is (a retransmission of) the event's final packet.
    pub end: bool,
    /// Power level in -dBm0, 0..=63 (the R bit is ignored).
    pub volume: u8,
    /// Duration so far, in RTP timestamp units, from the packet's timestamp.
    pub duration: u16,
}

impl TelephoneEvent {
    /// Payload length.
    pub const LEN: usize = 4;

    /// Parses the first event of `payload` (extra bytes, e.g. redundancy, are ignored).
    pub fn parse(payload: &[u8]) -> Result<Self, TelephoneEventError> {
        let [event, flags, d0, d1, ..] = *payload else {
            return Err(TelephoneEventError::TooShort { len: payload.len() });
        };
        Ok(Self {
            event,
            end: flags & 0x80 != 0,
            volume: flags & 0x3F,
            duration: u16::from_be_bytes([d0, d1]),
        })
    }

    /// The DTMF key of events 0–15, if it is one.
    #[must_use]
    pub fn digit(&self) -> Option<char> {
        const KEYS: &[u8; 16] = b"0123456789*#ABCD";
        KEYS.get(usize::from(self.event)).map(|&k| char::from(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields() {
        // RFC 4733 §2.3 layout: event 5, E=1, R=1 (ignored), volume 10, duration 800.
        let e = TelephoneEvent::parse(&[0x05, 0xCA, 0x03, 0x20]).unwrap();
        assert_eq!(e, TelephoneEvent { event: 5, end: true, volume: 10, duration: 800 });
        assert_eq!(e.digit(), Some('5'));

        let e = TelephoneEvent::parse(&[11, 0x3F, 0x00, 0xA0]).unwrap();
        assert_eq!(e, TelephoneEvent { event: 11, end: false, volume: 63, duration: 160 });
        assert_eq!(e.digit(), Some('#'));
    }

    #[test]
    fn digits() {
        let key = |event| TelephoneEvent { event, end: false, volume: 0, duration: 0 }.digit();
        assert_eq!(key(0), Some('0'));
        assert_eq!(key(10), Some('*'));
        assert_eq!(key(12), Some('A'));
        assert_eq!(key(15), Some('D'));
        assert_eq!(key(16), None);
        assert_eq!(key(255), None);
    }

    #[test]
    fn short_payloads_are_errors() {
        for len in 0..4 {
            assert_eq!(
                TelephoneEvent::parse(&[1, 2, 3][..len.min(3)]),
                Err(TelephoneEventError::TooShort { len: len.min(3) })
            );
        }
        assert!(TelephoneEvent::parse(&[1, 2, 3, 4, 5]).is_ok());
    }
}
