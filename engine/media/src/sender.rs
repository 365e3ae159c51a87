//! RTP header sequencing for one outgoing stream (RFC 3550 §5.1), sans-IO.

use crate::clip::FRAME_SAMPLES;
use crate::rtp::{RtpHeader, RtpTimestamp, SeqNo, Ssrc};

/// Timestamp increment per 20 ms G.711 frame (8000 Hz × 20 ms).
pub const TIMESTAMP_STEP: u32 = FRAME_SAMPLES as u32;

/// Makes the header of each packet of one stream: sequence +1 per packet, timestamp +160 per
/// frame (both wrapping), marker on the first packet and on the first after
/// [`RtpSender::talkspurt`]. Initial SSRC, sequence and timestamp are random per RFC 3550 §5.1:
/// the caller draws them (this crate has no randomness).
#[derive(Debug, Clone)]
pub struct RtpSender {
    ssrc: Ssrc,
    seq: SeqNo,
    timestamp: RtpTimestamp,
    marker_pending: bool,
}

impl RtpSender {
    /// A stream whose first packet will carry `first_seq` and `first_timestamp`, with the marker.
    #[must_use]
    pub fn new(ssrc: Ssrc, first_seq: SeqNo, first_timestamp: RtpTimestamp) -> Self {
        Self { ssrc, seq: first_seq, timestamp: first_timestamp, marker_pending: true }
    }

    /// The header for the next 20 ms frame, then advances sequence and timestamp.
    pub fn next_header(&mut self, payload_type: u8) -> RtpHeader {
        let header = RtpHeader {
            marker: std::mem::take(&mut self.marker_pending),
            payload_type,
            sequence: self.seq,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
        };
        self.seq = self.seq.next();
        self.timestamp = self.timestamp.add(TIMESTAMP_STEP);
        header
    }

    /// The next packet starts a talkspurt (after silence was not sent): set its marker.
    pub fn talkspurt(&mut self) {
        self.marker_pending = true;
    }

    /// Advances the timestamp over `frames` frames that were not sent (the media clock
    /// reported them [`crate::Due::skipped`]). The sequence number is untouched: it counts
    /// packets, not time (RFC 3550 §5.1).
    pub fn skip(&mut self, frames: u32) {
        self.timestamp = self.timestamp.add(TIMESTAMP_STEP.wrapping_mul(frames));
    }

    /// SSRC of the stream.
    #[must_use]
    pub fn ssrc(&self) -> Ssrc {
        self.ssrc
    }

    /// Sequence number the next packet will carry.
    #[must_use]
    pub fn next_sequence(&self) -> SeqNo {
        self.seq
    }

    /// Timestamp the next packet will carry.
    #[must_use]
    pub fn next_timestamp(&self) -> RtpTimestamp {
        self.timestamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_and_timestamp_wrap_together() {
        let mut s = RtpSender::new(Ssrc(7), SeqNo(65534), RtpTimestamp(u32::MAX - 200));
        let h: Vec<RtpHeader> = (0..4).map(|_| s.next_header(0)).collect();
        let seqs: Vec<u16> = h.iter().map(|h| h.sequence.0).collect();
        let ts: Vec<u32> = h.iter().map(|h| h.timestamp.0).collect();
        assert_eq!(seqs, [65534, 65535, 0, 1]);
        assert_eq!(ts, [u32::MAX - 200, u32::MAX - 40, 119, 279]);
        let markers: Vec<bool> = h.iter().map(|h| h.marker).collect();
        assert_eq!(markers, [true, false, false, false]);
        assert!(h.iter().all(|h| h.ssrc == Ssrc(7) && h.payload_type == 0));
    }

    #[test]
    fn talkspurt_marks_only_the_next_packet() {
        let mut s = RtpSender::new(Ssrc(1), SeqNo(0), RtpTimestamp(0));
        assert!(s.next_header(8).marker);
        assert!(!s.next_header(8).marker);
        s.talkspurt();
        assert!(s.next_header(8).marker);
        assert!(!s.next_header(8).marker);
    }

    #[test]
    fn skip_moves_time_not_sequence() {
        let mut s = RtpSender::new(Ssrc(1), SeqNo(10), RtpTimestamp(1000));
        s.next_header(0);
        s.skip(3);
        let h = s.next_header(0);
        assert_eq!(h.sequence, SeqNo(11));
        assert_eq!(h.timestamp, RtpTimestamp(1000 + 4 * 160));
        assert_eq!(s.next_sequence(), SeqNo(12));
        assert_eq!(s.next_timestamp(), RtpTimestamp(1000 + 5 * 160));
    }
}
