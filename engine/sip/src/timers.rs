//! The RFC 3261 timers a UAS (plus its BYE and refresh client transactions) runs over UDP, and
//! the one queue that yields the endpoint's next deadline.
//!
//! | Timer | RFC 3261 | Initial value | Meaning |
//! |---|---|---|---|
//! | A | §17.1.1.2 | T1, doubling | retransmit our refreshing re-INVITE |
//! | B | §17.1.1.2 | 64*T1 | our re-INVITE timed out (also bounds Proceeding) |
//! | D | §17.1.1.2 | 32 s (64*T1 after a 2xx, RFC 6026) | resend our ACK to repeated finals |
//! | E | §17.1.2.2 | T1, doubling to T2 (T2 once a provisional arrived) | retransmit our BYE or UPDATE |
//! | F | §17.1.2.2 | 64*T1 | our BYE or UPDATE timed out |
//! | K | §17.1.2.2 | T4 | absorb retransmitted responses to our BYE or UPDATE |
//! | G | §17.2.1 | T1, doubling to T2 | retransmit a non-2xx final response to INVITE |
//! | H | §17.2.1 | 64*T1 | give up waiting for the ACK of that response |
//! | I | §17.2.1 | T4 | absorb retransmitted ACKs |
//! | J | §17.2.2 | 64*T1 | absorb retransmitted non-INVITE requests |
//! | L | RFC 6026 §8.7 | 64*T1 | absorb retransmitted INVITEs after a 2xx |
//! | 2xx | §13.3.1.4 | T1, doubling to T2 | retransmit our 2xx until its ACK |
//! | 2xx give-up | §13.3.1.4 | 64*T1 | no ACK: send BYE, end the call |
//! | refresh | RFC 4028 §10 | half the session interval | we refresh the session |
//! | expiry | RFC 4028 §10 | interval − min(32 s, interval/3) | the caller's refresh is overdue: BYE |
//!
//! Timer C (proxies) does not apply.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// T1, T2 and T4 (RFC 3261 §17.1.1.1, Table 4), taken from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimerValues {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl TimerValues {
    /// 64*T1: Timers B, F, H, J, L and the 2xx give-up.
    pub fn t1x64(&self) -> Duration {
        self.t1 * 64
    }

    /// The next interval of a doubling retransmission timer (E, G, 2xx).
    pub fn double(&self, interval: Duration) -> Duration {
        (interval * 2).min(self.t2)
    }
}

/// Deadlines of many owners in one heap. Entries are never removed: an owner whose deadline
/// moved finds nothing due when the stale entry pops (a spurious, harmless wake-up), and every
/// change of a deadline pushes the new one, so the true next deadline is always present.
#[derive(Debug)]
pub(crate) struct TimerQueue<K: Ord> {
    heap: BinaryHeap<Reverse<(Instant, u64, K)>>,
    seq: u64,
}

impl<K: Ord + Copy> TimerQueue<K> {
    pub fn new() -> Self {
        Self { heap: BinaryHeap::new(), seq: 0 }
    }

    pub fn schedule(&mut self, at: Instant, owner: K) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, owner)));
    }

    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse((_, _, k))| k),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_caps_at_t2() {
        let t = TimerValues {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        };
        let mut i = t.t1;
        let mut seen = vec![i];
        for _ in 0..5 {
            i = t.double(i);
            seen.push(i);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(t.t1x64(), Duration::from_secs(32));
    }

    #[test]
    fn queue_yields_in_order() {
        let base = Instant::now();
        let mut q = TimerQueue::new();
        q.schedule(base + Duration::from_secs(2), 2u8);
        q.schedule(base + Duration::from_secs(1), 1u8);
        assert_eq!(q.next(), Some(base + Duration::from_secs(1)));
        assert_eq!(q.pop_due(base), None);
        assert_eq!(q.pop_due(base + Duration::from_secs(5)), Some(1));
        assert_eq!(q.pop_due(base + Duration::from_secs(5)), Some(2));
        assert_eq!(q.next(), None);
    }
}
