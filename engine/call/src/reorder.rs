//! A small reorder window for the caller's RTP on its way to the agent: packets that arrive
//! out of order within the window are put back in order; late packets (behind what was
//! already released) and duplicates are dropped; gaps the window gives up on count as loss.
//! Sequence numbers wrap (RFC 3550 §A.1); the difference is taken modulo 2^16.

/// Packets held at most while waiting for a missing one (4 × 20 ms = 80 ms of waiting at
/// worst, and only when a packet really is missing).
pub const DEPTH: usize = 4;

/// What the window saw, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReorderStats {
    /// Packets released in order.
    pub released: u64,
    /// Arrived behind the window (already skipped or released).
    pub late: u64,
    /// Arrived twice while the first copy was held.
    pub duplicate: u64,
    /// Never arrived while the window waited.
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Slot {
    seq: Option<u16>,
    payload: Vec<u8>,
}

/// The window. [`Reorder::push`] each packet; what is ready is handed to the callback in
/// sequence order. [`Reorder::flush`] releases everything held (the end of a chunk).
#[derive(Debug, Default)]
pub struct Reorder {
    next: Option<u16>,
    slots: [Slot; DEPTH],
    held: usize,
    stats: ReorderStats,
}

impl Reorder {
    /// An empty window; the first packet sets the expected sequence.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> ReorderStats {
        self.stats
    }

    /// Takes one packet; releases what is in order through `out`.
    pub fn push(&mut self, seq: u16, payload: &[u8], mut out: impl FnMut(&[u8])) {
        let next = *self.next.get_or_insert(seq);
        let ahead = seq.wrapping_sub(next);
        if ahead >= 0x8000 {
            self.stats.late += 1;
            return;
        }
        if usize::from(ahead) >= DEPTH {
            // Far ahead (a jump, or a long loss): release what is held, restart at `seq`.
            self.flush(&mut out);
            self.stats.lost += u64::from(seq.wrapping_sub(self.next.unwrap_or(seq)));
            self.next = Some(seq);
            return self.push(seq, payload, out);
        }
        let slot = &mut self.slots[usize::from(seq) % DEPTH];
        if slot.seq == Some(seq) {
            self.stats.duplicate += 1;
            return;
        }
        slot.seq = Some(seq);
        slot.payload.clear();
        slot.payload.extend_from_slice(payload);
        self.held += 1;
        self.release(&mut out);
        // A full window with a hole at its front: give up on the hole.
        while self.held >= DEPTH - 1 {
            self.skip_one();
            self.release(&mut out);
        }
    }

    /// Releases everything held, in order, counting the holes as lost.
    pub fn flush(&mut self, mut out: impl FnMut(&[u8])) {
        while self.held > 0 {
            self.release(&mut out);
            if self.held > 0 {
                self.skip_one();
            }
        }
    }

    fn skip_one(&mut self) {
        if let Some(next) = self.next {
            self.stats.lost += 1;
            self.next = Some(next.wrapping_add(1));
        }
    }

    fn release(&mut self, out: &mut impl FnMut(&[u8])) {
        while let Some(next) = self.next {
            let slot = &mut self.slots[usize::from(next) % DEPTH];
            if slot.seq != Some(next) {
                return;
            }
            slot.seq = None;
            self.held -= 1;
            self.stats.released += 1;
            out(&slot.payload);
            self.next = Some(next.wrapping_add(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u16], flush: bool) -> (Vec<u16>, ReorderStats) {
        let mut r = Reorder::new();
        let mut got = Vec::new();
        for &s in seqs {
            r.push(s, &s.to_be_bytes(), |p| got.push(u16::from_be_bytes([p[0], p[1]])));
        }
        if flush {
            r.flush(|p| got.push(u16::from_be_bytes([p[0], p[1]])));
        }
        (got, r.stats())
    }

    #[test]
    fn in_order_passes_at_once() {
        let (got, st) = run(&[10, 11, 12], false);
        assert_eq!(got, [10, 11, 12]);
        assert_eq!(st, ReorderStats { released: 3, ..ReorderStats::default() });
    }

    #[test]
    fn swapped_packets_are_put_back_in_order() {
        let (got, st) = run(&[1, 3, 2, 4], false);
        assert_eq!(got, [1, 2, 3, 4]);
        assert_eq!(st.lost + st.late + st.duplicate, 0);
    }

    #[test]
    fn duplicates_and_late_packets_are_dropped() {
        // A copy of a packet still held is a duplicate; one of a packet already released is
        // behind the window (late), like any packet that comes after its turn.
        let (got, st) = run(&[5, 7, 7, 6, 4], false);
        assert_eq!(got, [5, 6, 7]);
        assert_eq!((st.duplicate, st.late), (1, 1));
    }

    #[test]
    fn a_hole_is_given_up_when_the_window_fills_and_on_flush() {
        let (got, st) = run(&[1, 3, 4, 5], false);
        assert_eq!(got, [1, 3, 4, 5]);
        assert_eq!(st.lost, 1);
        let (got, st) = run(&[1, 3], true);
        assert_eq!(got, [1, 3]);
        assert_eq!(st.lost, 1);
        // 2 arriving after it was given up is late.
        let (got, st) = run(&[1, 3, 4, 5, 2], false);
        assert_eq!(got, [1, 3, 4, 5]);
        assert_eq!(st.late, 1);
    }

    #[test]
    fn wraps_and_jumps() {
        let (got, _) = run(&[65534, 0, 65535, 1], false);
        assert_eq!(got, [65534, 65535, 0, 1]);
        let (got, st) = run(&[100, 101, 5000, 5001], false);
        assert_eq!(got, [100, 101, 5000, 5001]);
        assert_eq!(st.lost, 5000 - 102);
    }
}
