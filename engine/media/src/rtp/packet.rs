//! The RTP fixed header (RFC 3550 §5.1): a zero-copy view with checked offsets, and the
//! [`RtpHeader`] representation that the sender emits.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |V=2|P|X|  CC   |M|     PT      |       sequence number         |
//! |                           timestamp                           |
//! |           synchronization source (SSRC) identifier            |
//! |            contributing source (CSRC) identifiers (CC)        |
//! |  extension: profile-defined 16 | length in 32-bit words (16)  |  (if X)
//! |  payload …                                  | padding | count |  (if P)
//! ```

use super::seq::{RtpTimestamp, SeqNo, Ssrc};

/// Why a datagram is not a usable RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    /// Fewer than the 12 bytes of the fixed header.
    #[error("{len}-byte datagram is shorter than the 12-byte RTP header")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// The version field is not 2 (RFC 3550 §5.1).
    #[error("RTP version {0}, expected 2")]
    BadVersion(u8),
    /// The CSRC list announced by CC runs past the end of the datagram.
    #[error("{count} CSRCs need a {needed}-byte header, datagram has {len} bytes")]
    CsrcOverrun {
        /// CC field.
        count: u8,
        /// Header length the CSRCs need.
        needed: usize,
        /// Datagram length.
        len: usize,
    },
    /// The header extension (X bit) runs past the end of the datagram (RFC 3550 §5.3.1).
    #[error("header extension needs a {needed}-byte header, datagram has {len} bytes")]
    ExtensionOverrun {
        /// Header length the extension needs.
        needed: usize,
        /// Datagram length.
        len: usize,
    },
    /// The P bit is set but the padding count (last byte) is zero or larger than what follows
    /// the header.
    #[error("padding count {count} is invalid with {available} bytes after the header")]
    BadPadding {
        /// Last byte of the datagram.
        count: u8,
        /// Bytes after the header (payload + padding).
        available: usize,
    },
}

/// Byte offsets of the fixed header.
mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0; // V(2) P(1) X(1) CC(4)
    pub const MARKER_PT: usize = 1; // M(1) PT(7)
    pub const SEQUENCE: Range<usize> = 2..4;
    pub const TIMESTAMP: Range<usize> = 4..8;
    pub const SSRC: Range<usize> = 8..12;
    pub const CSRC_START: usize = 12;
}

/// Length of the fixed header, without CSRCs or extension.
pub const RTP_HEADER_LEN: usize = 12;
const RTP_VERSION: u8 = 2;

/// A read-only view over the bytes of an RTP packet. Build it with [`RtpPacket::new_checked`]:
/// every accessor is then in bounds and [`RtpPacket::payload`] honours CSRCs, the header
/// extension and padding. Nothing is copied.
#[derive(Debug, Clone, Copy)]
pub struct RtpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RtpPacket<T> {
    /// Wraps `buffer` after checking version, lengths and padding.
    pub fn new_checked(buffer: T) -> Result<Self, RtpError> {
        let packet = Self { buffer };
        packet.check()?;
        Ok(packet)
    }

    fn check(&self) -> Result<(), RtpError> {
        let data = self.buffer.as_ref();
        let len = data.len();
        if len < RTP_HEADER_LEN {
            return Err(RtpError::TooShort { len });
        }
        if self.version() != RTP_VERSION {
            return Err(RtpError::BadVersion(self.version()));
        }
        let csrc_end = self.csrc_end();
        if csrc_end > len {
            return Err(RtpError::CsrcOverrun { count: self.csrc_count(), needed: csrc_end, len });
        }
        if self.extension() {
            if csrc_end + 4 > len {
                return Err(RtpError::ExtensionOverrun { needed: csrc_end + 4, len });
            }
            let needed = self.header_len();
            if needed > len {
                return Err(RtpError::ExtensionOverrun { needed, len });
            }
        }
        if self.padding() {
            let count = data[len - 1];
            let available = len - self.header_len();
            if count == 0 || usize::from(count) > available {
                return Err(RtpError::BadPadding { count, available });
            }
        }
        Ok(())
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Version field (2 for every packet that passed the check).
    pub fn version(&self) -> u8 {
        self.bytes()[field::FLAGS] >> 6
    }

    /// P bit: the packet ends with padding whose length is its last byte.
    pub fn padding(&self) -> bool {
        self.bytes()[field::FLAGS] & 0x20 != 0
    }

    /// X bit: a header extension follows the CSRC list.
    pub fn extension(&self) -> bool {
        self.bytes()[field::FLAGS] & 0x10 != 0
    }

    /// CC field: number of CSRC identifiers.
    pub fn csrc_count(&self) -> u8 {
        self.bytes()[field::FLAGS] & 0x0F
    }

    /// M bit (for audio: first packet of a talkspurt, RFC 3551 §4.1).
    pub fn marker(&self) -> bool {
        self.bytes()[field::MARKER_PT] & 0x80 != 0
    }

    /// PT field.
    pub fn payload_type(&self) -> u8 {
        self.bytes()[field::MARKER_PT] & 0x7F
    }

    /// Sequence number.
    pub fn sequence(&self) -> SeqNo {
        SeqNo(read_u16(&self.bytes()[field::SEQUENCE]))
    }

    /// Timestamp.
    pub fn timestamp(&self) -> RtpTimestamp {
        RtpTimestamp(read_u32(&self.bytes()[field::TIMESTAMP]))
    }

    /// SSRC.
    pub fn ssrc(&self) -> Ssrc {
        Ssrc(read_u32(&self.bytes()[field::SSRC]))
    }

    /// The `index`-th CSRC, if the CC field lists that many.
    pub fn csrc(&self, index: usize) -> Option<u32> {
        if index >= usize::from(self.csrc_count()) {
            return None;
        }
        let at = field::CSRC_START + 4 * index;
        Some(read_u32(&self.bytes()[at..at + 4]))
    }

    fn csrc_end(&self) -> usize {
        field::CSRC_START + 4 * usize::from(self.csrc_count())
    }

    /// Length of the whole header: fixed part, CSRCs and extension.
    pub fn header_len(&self) -> usize {
        let csrc_end = self.csrc_end();
        if !self.extension() {
            return csrc_end;
        }
        let words = read_u16(&self.bytes()[csrc_end + 2..csrc_end + 4]);
        csrc_end + 4 + 4 * usize::from(words)
    }

    /// Bytes of padding at the end, including the count byte itself.
    pub fn padding_len(&self) -> usize {
        if self.padding() { usize::from(self.bytes()[self.bytes().len() - 1]) } else { 0 }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> RtpPacket<&'a T> {
    /// The payload: after the header, before any padding. Borrowed from the datagram.
    pub fn payload(&self) -> &'a [u8] {
        let data = self.buffer.as_ref();
        &data[self.header_len()..data.len() - self.padding_len()]
    }

    /// The header extension as (profile-defined 16 bits, extension data), if the X bit is set.
    pub fn extension_header(&self) -> Option<(u16, &'a [u8])> {
        if !self.extension() {
            return None;
        }
        let data = self.buffer.as_ref();
        let at = self.csrc_end();
        let profile = read_u16(&data[at..at + 2]);
        Some((profile, &data[at + 4..self.header_len()]))
    }
}

fn read_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The fields precall sends and acts on. [`RtpHeader::emit`] writes a 12-byte header
/// (no padding, no extension, no CSRCs); [`RtpHeader::parse`] validates a whole datagram
/// and keeps these fields (read CSRCs and extensions through [`RtpPacket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// M bit.
    pub marker: bool,
    /// Payload type (7 bits; emit masks it).
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: SeqNo,
    /// Timestamp in payload clock units.
    pub timestamp: RtpTimestamp,
    /// Synchronisation source.
    pub ssrc: Ssrc,
}

impl RtpHeader {
    /// Validates `datagram` as RTP and reads its header fields.
    pub fn parse(datagram: &[u8]) -> Result<Self, RtpError> {
        Ok(Self::from_packet(&RtpPacket::new_checked(datagram)?))
    }

    /// Reads the fields from a checked view.
    pub fn from_packet<T: AsRef<[u8]>>(packet: &RtpPacket<T>) -> Self {
        Self {
            marker: packet.marker(),
            payload_type: packet.payload_type(),
            sequence: packet.sequence(),
            timestamp: packet.timestamp(),
            ssrc: packet.ssrc(),
        }
    }

    /// Writes the 12-byte header to the start of `buf` and returns 12. No allocation.
    ///
    /// # Panics
    /// If `buf` is shorter than [`RTP_HEADER_LEN`]: the caller owns a fixed-size header buffer.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let out = &mut buf[..RTP_HEADER_LEN];
        out[field::FLAGS] = RTP_VERSION << 6;
        out[field::MARKER_PT] = (u8::from(self.marker) << 7) | (self.payload_type & 0x7F);
        out[field::SEQUENCE].copy_from_slice(&self.sequence.0.to_be_bytes());
        out[field::TIMESTAMP].copy_from_slice(&self.timestamp.0.to_be_bytes());
        out[field::SSRC].copy_from_slice(&self.ssrc.0.to_be_bytes());
        RTP_HEADER_LEN
    }

    /// The header as a fixed array, for a vectored send (header iovec + payload iovec).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; RTP_HEADER_LEN] {
        let mut b = [0u8; RTP_HEADER_LEN];
        self.emit(&mut b);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PCMU, marker, seq 0x1234, ts 0xDEADBEEF, SSRC 0x01020304, 4-byte payload.
    const PCMU_MARKER: [u8; 16] = [
        0x80, 0x80, 0x12, 0x34, 0xDE, 0xAD, 0xBE, 0xEF, 0x01, 0x02, 0x03, 0x04, 0xFF, 0xFE, 0x7F,
        0x00,
    ];

    fn pcmu_header() -> RtpHeader {
        RtpHeader {
            marker: true,
            payload_type: 0,
            sequence: SeqNo(0x1234),
            timestamp: RtpTimestamp(0xDEAD_BEEF),
            ssrc: Ssrc(0x0102_0304),
        }
    }

    #[test]
    fn view_reads_every_field() {
        let p = RtpPacket::new_checked(&PCMU_MARKER[..]).unwrap();
        assert_eq!(p.version(), 2);
        assert!(!p.padding() && !p.extension());
        assert_eq!(p.csrc_count(), 0);
        assert!(p.marker());
        assert_eq!(p.payload_type(), 0);
        assert_eq!(p.sequence(), SeqNo(0x1234));
        assert_eq!(p.timestamp(), RtpTimestamp(0xDEAD_BEEF));
        assert_eq!(p.ssrc(), Ssrc(0x0102_0304));
        assert_eq!(p.header_len(), 12);
        assert_eq!(p.payload(), &[0xFF, 0xFE, 0x7F, 0x00]);
        assert_eq!(p.csrc(0), None);
        assert_eq!(p.extension_header(), None);
    }

    #[test]
    fn parse_emit_round_trip() {
        let h = RtpHeader::parse(&PCMU_MARKER).unwrap();
        assert_eq!(h, pcmu_header());
        let mut buf = [0u8; 12];
        assert_eq!(h.emit(&mut buf), 12);
        assert_eq!(buf, PCMU_MARKER[..12]);
        assert_eq!(h.to_bytes(), buf);
    }

    #[test]
    fn pcma_without_marker_round_trip() {
        let bytes = [0x80, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x60, 0x00, 0x00, 0x00, 0x01];
        let h = RtpHeader::parse(&bytes).unwrap();
        assert_eq!(
            h,
            RtpHeader {
                marker: false,
                payload_type: 8,
                sequence: SeqNo(65535),
                timestamp: RtpTimestamp(0xFFFF_FF60),
                ssrc: Ssrc(1),
            }
        );
        assert_eq!(h.to_bytes(), bytes);
        // An empty payload is legal.
        assert_eq!(RtpPacket::new_checked(&bytes[..]).unwrap().payload(), &[] as &[u8]);
    }

    #[test]
    fn emit_masks_payload_type_to_seven_bits() {
        let h = RtpHeader { payload_type: 0xFF, marker: false, ..pcmu_header() };
        assert_eq!(h.to_bytes()[1], 0x7F);
    }

    #[test]
    fn csrc_extension_and_padding_are_skipped() {
        #[rustfmt::skip]
        let bytes = [
            0xB2, 0x65, 0x00, 0x01, 0, 0, 0, 160, 0xAA, 0xBB, 0xCC, 0xDD, // V=2 P X CC=2, PT 101
            0, 0, 0, 7, 0, 0, 0, 9,                                       // CSRCs 7 and 9
            0xBE, 0xDE, 0x00, 0x01, 0x10, 0x20, 0x30, 0x40,               // extension, 1 word
            0x05, 0x8A, 0x03, 0x20,                                       // payload (4733 event)
            0x00, 0x00, 0x03,                                             // 3 bytes of padding
        ];
        let p = RtpPacket::new_checked(&bytes[..]).unwrap();
        assert!(p.padding() && p.extension());
        assert_eq!(p.csrc_count(), 2);
        assert_eq!(p.csrc(0), Some(7));
        assert_eq!(p.csrc(1), Some(9));
        assert_eq!(p.csrc(2), None);
        assert_eq!(p.header_len(), 28);
        assert_eq!(p.padding_len(), 3);
        assert_eq!(p.extension_header(), Some((0xBEDE, &[0x10, 0x20, 0x30, 0x40][..])));
        assert_eq!(p.payload(), &[0x05, 0x8A, 0x03, 0x20]);
        assert_eq!(p.payload_type(), 101);
        assert_eq!(RtpHeader::from_packet(&p).ssrc, Ssrc(0xAABB_CCDD));
    }

    #[test]
    fn malformed_packets_give_specific_errors() {
        let cases: &[(&[u8], RtpError)] = &[
            (&[], RtpError::TooShort { len: 0 }),
            (&PCMU_MARKER[..11], RtpError::TooShort { len: 11 }),
            (&[0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], RtpError::BadVersion(1)),
            (&[0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], RtpError::BadVersion(0)),
            (&[0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], RtpError::BadVersion(3)),
            (
                // CC = 2 but only one CSRC present.
                &[0x82, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
                RtpError::CsrcOverrun { count: 2, needed: 20, len: 16 },
            ),
            (
                &[0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                RtpError::CsrcOverrun { count: 15, needed: 72, len: 12 },
            ),
            (
                // X set, no room for the extension header.
                &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE],
                RtpError::ExtensionOverrun { needed: 16, len: 14 },
            ),
            (
                // X set, extension claims 2 words, has 1.
                &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE, 0, 2, 1, 2, 3, 4],
                RtpError::ExtensionOverrun { needed: 24, len: 20 },
            ),
            (
                // P set, padding count 5 with 3 bytes after the header.
                &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 5],
                RtpError::BadPadding { count: 5, available: 3 },
            ),
            (
                // P set, padding count 0.
                &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0],
                RtpError::BadPadding { count: 0, available: 2 },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(RtpPacket::new_checked(*bytes).unwrap_err(), *want, "{bytes:02x?}");
            assert_eq!(RtpHeader::parse(bytes).unwrap_err(), *want);
        }
    }

    #[test]
    fn padding_may_fill_the_whole_payload() {
        let bytes = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let p = RtpPacket::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.payload(), &[] as &[u8]);
    }

    #[test]
    fn no_panic_on_any_short_prefix_or_flag_byte() {
        let mut bytes = [0u8; 40];
        for flags in 0..=255u8 {
            bytes[0] = flags;
            for last in [0u8, 1, 7, 28, 255] {
                for len in 0..=bytes.len() {
                    let mut b = bytes;
                    if len > 0 {
                        b[len - 1] = last;
                    }
                    if let Ok(p) = RtpPacket::new_checked(&b[..len]) {
                        let _ = (p.payload(), p.extension_header(), p.csrc(14));
                    }
                }
            }
        }
    }
}
