//! RTP identifiers and the one place where sequence-number and timestamp wrap-around is handled
//! (RFC 3550 §5.1, Appendix A.1).

use std::fmt;

/// Synchronisation source identifier (RFC 3550 §5.1). Chosen at random by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ssrc(pub u32);

impl fmt::Display for Ssrc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// A 16-bit RTP sequence number. It wraps, so it has no total order: compare with
/// [`SeqNo::delta`] / [`SeqNo::is_after`] (serial-number arithmetic), or extend it with
/// [`ExtendedSeq`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqNo(pub u16);

impl SeqNo {
    /// The following sequence number (65535 is followed by 0).
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0.wrapping_add(1))
    }

    /// Signed distance from `earlier` to `self`, assuming the two are less than 32768 apart.
    #[must_use]
    pub const fn delta(self, earlier: Self) -> i16 {
        self.0.wrapping_sub(earlier.0) as i16
    }

    /// Whether `self` comes after `other` in serial-number order.
    #[must_use]
    pub const fn is_after(self, other: Self) -> bool {
        self.delta(other) > 0
    }
}

/// A 32-bit RTP timestamp in units of the payload clock (8000 Hz for G.711). Wraps like
/// [`SeqNo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RtpTimestamp(pub u32);

impl RtpTimestamp {
    /// `self` advanced by `ticks` clock units, wrapping.
    #[must_use]
    pub const fn add(self, ticks: u32) -> Self {
        Self(self.0.wrapping_add(ticks))
    }

    /// Signed distance from `earlier` to `self`, assuming less than 2^31 ticks apart.
    #[must_use]
    pub const fn delta(self, earlier: Self) -> i32 {
        self.0.wrapping_sub(earlier.0) as i32
    }
}

/// Outcome of feeding one received sequence number to [`ExtendedSeq::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqUpdate {
    /// A new highest sequence number (possibly after a gap of lost packets).
    Advanced {
        /// The 64-bit extended sequence number of this packet.
        extended: u64,
    },
    /// Behind the highest number seen (reordered or duplicate, up to `MAX_MISORDER` back).
    Late {
        /// The extended sequence number this packet had when it was sent.
        extended: u64,
    },
    /// A jump larger than `MAX_DROPOUT`: dropped unless the next packet confirms it.
    Jumped,
    /// The packet after a jump followed it in order: the sender restarted its sequence, and
    /// counting restarted from this packet.
    Restarted {
        /// The new extended sequence number (cycle count reset to 0).
        extended: u64,
    },
}

/// Extends 16-bit sequence numbers to 64 bits by counting rollovers, as in RFC 3550 A.1
/// (`update_seq`): a step forward of less than `MAX_DROPOUT` advances (wrapping 65535 -> 0
/// counts a cycle), up to `MAX_MISORDER` back is late, anything else is a jump that is only
/// believed when the next packet follows it.
///
/// Unlike A.1 there is no probation (the session has already latched onto this source), and an
/// in-order packet forgets a pending jump, so a stray far-off packet followed much later by
/// its successor is not taken for a restart.
#[derive(Debug, Clone)]
pub struct ExtendedSeq {
    base: u64,
    max_seq: SeqNo,
    /// Number of 65536 wraps, already shifted (cycles << 16).
    cycles: u64,
    /// The sequence number after a jump that would confirm it (A.1 `bad_seq`).
    bad_seq: Option<SeqNo>,
    received: u64,
}

impl ExtendedSeq {
    /// RFC 3550 A.1 `MAX_DROPOUT`.
    pub const MAX_DROPOUT: u16 = 3000;
    /// RFC 3550 A.1 `MAX_MISORDER`.
    pub const MAX_MISORDER: u16 = 100;

    /// Starts tracking at the first received sequence number (A.1 `init_seq`).
    #[must_use]
    pub fn new(first: SeqNo) -> Self {
        Self { base: u64::from(first.0), max_seq: first, cycles: 0, bad_seq: None, received: 1 }
    }

    /// Feeds the next received sequence number.
    pub fn update(&mut self, seq: SeqNo) -> SeqUpdate {
        let udelta = seq.0.wrapping_sub(self.max_seq.0);
        if udelta < Self::MAX_DROPOUT {
            if udelta != 0 && seq.0 < self.max_seq.0 {
                self.cycles += 1 << 16;
            }
            if udelta == 0 {
                // Duplicate of the highest packet.
                self.received += 1;
                return SeqUpdate::Late { extended: self.extended_max() };
            }
            self.max_seq = seq;
            self.bad_seq = None;
            self.received += 1;
            SeqUpdate::Advanced { extended: self.extended_max() }
        } else if udelta <= u16::MAX - Self::MAX_MISORDER {
            if self.bad_seq == Some(seq) {
                // Two sequential packets after a jump: the source restarted (A.1: re-init).
                *self = Self::new(seq);
                SeqUpdate::Restarted { extended: self.extended_max() }
            } else {
                self.bad_seq = Some(seq.next());
                SeqUpdate::Jumped
            }
        } else {
            // Up to MAX_MISORDER behind the maximum.
            self.received += 1;
            let back = u64::from(self.max_seq.0.wrapping_sub(seq.0));
            SeqUpdate::Late { extended: self.extended_max().saturating_sub(back) }
        }
    }

    /// Highest extended sequence number received.
    #[must_use]
    pub fn extended_max(&self) -> u64 {
        self.cycles | u64::from(self.max_seq.0)
    }

    /// Packets expected since the start (A.1: `extended_max - base_seq + 1`).
    #[must_use]
    pub fn expected(&self) -> u64 {
        self.extended_max() - self.base + 1
    }

    /// Packets received, duplicates and late ones included (as in A.1).
    #[must_use]
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Cumulative packets lost (A.3); negative when duplicates outnumber losses.
    #[must_use]
    pub fn lost(&self) -> i64 {
        self.expected() as i64 - self.received as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_wraps_and_compares_across_the_wrap() {
        assert_eq!(SeqNo(65535).next(), SeqNo(0));
        assert!(SeqNo(0).is_after(SeqNo(65535)));
        assert!(!SeqNo(65535).is_after(SeqNo(0)));
        assert_eq!(SeqNo(2).delta(SeqNo(65534)), 4);
        assert_eq!(SeqNo(65534).delta(SeqNo(2)), -4);
        assert!(!SeqNo(7).is_after(SeqNo(7)));
    }

    #[test]
    fn timestamp_wraps() {
        let t = RtpTimestamp(u32::MAX - 100);
        assert_eq!(t.add(160), RtpTimestamp(59));
        assert_eq!(t.add(160).delta(t), 160);
        assert_eq!(t.delta(t.add(160)), -160);
    }

    #[test]
    fn extends_across_65535_to_0() {
        let mut s = ExtendedSeq::new(SeqNo(65533));
        assert_eq!(s.update(SeqNo(65534)), SeqUpdate::Advanced { extended: 65534 });
        assert_eq!(s.update(SeqNo(65535)), SeqUpdate::Advanced { extended: 65535 });
        assert_eq!(s.update(SeqNo(0)), SeqUpdate::Advanced { extended: 65536 });
        assert_eq!(s.update(SeqNo(1)), SeqUpdate::Advanced { extended: 65537 });
        assert_eq!(s.expected(), 5);
        assert_eq!(s.received(), 5);
        assert_eq!(s.lost(), 0);
    }

    #[test]
    fn late_packet_from_before_the_wrap_keeps_its_cycle() {
        let mut s = ExtendedSeq::new(SeqNo(65534));
        assert_eq!(s.update(SeqNo(0)), SeqUpdate::Advanced { extended: 65536 });
        assert_eq!(s.update(SeqNo(65535)), SeqUpdate::Late { extended: 65535 });
        assert_eq!(s.update(SeqNo(1)), SeqUpdate::Advanced { extended: 65537 });
        assert_eq!(s.update(SeqNo(1)), SeqUpdate::Late { extended: 65537 });
        assert_eq!(s.extended_max(), 65537);
    }

    #[test]
    fn gap_wrapping_past_zero_counts_one_cycle_and_losses() {
        let mut s = ExtendedSeq::new(SeqNo(65000));
        assert_eq!(s.update(SeqNo(100)), SeqUpdate::Advanced { extended: 65536 + 100 });
        assert_eq!(s.expected(), 65536 + 100 - 65000 + 1);
        assert_eq!(s.lost(), s.expected() as i64 - 2);
    }

    #[test]
    fn many_wraps() {
        let mut s = ExtendedSeq::new(SeqNo(0));
        let mut seq = SeqNo(0);
        for _ in 0..(3 * 65536) {
            seq = seq.next();
            s.update(seq);
        }
        assert_eq!(s.extended_max(), 3 * 65536);
        assert_eq!(s.lost(), 0);
    }

    #[test]
    fn jump_is_dropped_once_then_accepted_as_restart() {
        let mut s = ExtendedSeq::new(SeqNo(10));
        assert_eq!(s.update(SeqNo(11)), SeqUpdate::Advanced { extended: 11 });
        assert_eq!(s.update(SeqNo(40_000)), SeqUpdate::Jumped);
        assert_eq!(s.extended_max(), 11);
        assert_eq!(s.update(SeqNo(40_001)), SeqUpdate::Restarted { extended: 40_001 });
        assert_eq!(s.update(SeqNo(40_002)), SeqUpdate::Advanced { extended: 40_002 });
    }

    #[test]
    fn lone_jump_then_normal_traffic_keeps_the_old_sequence() {
        let mut s = ExtendedSeq::new(SeqNo(10));
        assert_eq!(s.update(SeqNo(40_000)), SeqUpdate::Jumped);
        assert_eq!(s.update(SeqNo(11)), SeqUpdate::Advanced { extended: 11 });
        // The remembered jump target no longer confirms anything.
        assert_eq!(s.update(SeqNo(40_001)), SeqUpdate::Jumped);
    }
}
