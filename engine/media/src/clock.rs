//! The per-shard media clock: tells the shard which RTP streams owe a frame, so that one
//! timer per shard drives every call's playout.
//!
//! The 20 ms period is divided into `phases` evenly spaced instants (20 by default: one per
//! millisecond). Each stream is pinned to one phase and is due at `start + offset + n × period`.
//! Streams are spread over the phases so that a wake-up sends a small batch, never every
//! stream at once: a new stream takes the least loaded phase, ties broken by a "largest gap"
//! order (0, 10, 5, 15, 2, … for 20 phases: each next phase is the one farthest from those
//! already chosen, smallest index first). With only additions, every phase then holds
//! ⌊N/phases⌋ or ⌈N/phases⌉ streams. Removals can leave phases unevenly loaded; later
//! additions fill the light ones first. Streams never move between phases (that would jolt
//! their packet spacing).
//!
//! Being late never causes a burst: a stream that is overdue by several periods is reported
//! once, with the number of frames it `skipped`, and is next due at its following grid point.

use std::time::{Duration, Instant};

/// Handle of a stream registered with a [`MediaClock`]. Stale handles (of removed streams)
/// are recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamSlot {
    index: u32,
    generation: u32,
}

/// One stream that owes a frame now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The stream.
    pub stream: StreamSlot,
    /// Whole periods that passed since this frame was due (0 when on time). Those frames are
    /// not sent; advance the RTP timestamp over them ([`crate::RtpSender::skip`]) so the
    /// receiver's timing stays right.
    pub skipped: u32,
    /// The grid instant this frame is sent for (the latest one at or before `now`): how late
    /// the send is, is measured from here.
    pub at: Instant,
}

#[derive(Debug)]
struct Phase {
    offset: Duration,
    members: Vec<u32>,
    /// Earliest `next_due` among `members` (None when empty).
    next_due: Option<Instant>,
}

#[derive(Debug)]
struct Stream {
    phase: u16,
    /// Position in its phase's `members`.
    position: u32,
    next_due: Instant,
}

#[derive(Debug)]
struct Entry {
    generation: u32,
    stream: Option<Stream>,
}

/// Per-shard, sans-IO media clock. Drive it with:
///
/// 1. [`MediaClock::add_stream`] when a call starts sending, [`MediaClock::remove_stream`]
///    when it stops;
/// 2. arm the shard's one timer at [`MediaClock::poll_timeout`];
/// 3. when it fires (or whenever the shard wakes), call [`MediaClock::poll_due`] with the
///    current time and send one frame for each stream it reports; then go back to 2.
///
/// It never reads the clock, allocates only when a stream is added to a phase that never held
/// that many, and reports each stream at most once per period.
#[derive(Debug)]
pub struct MediaClock {
    period: Duration,
    start: Instant,
    phases: Vec<Phase>,
    /// Phase indices, best spread first; used to break load ties.
    spread_order: Vec<u16>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    len: usize,
}

impl MediaClock {
    /// Phases per period used by [`MediaClock::new`].
    pub const DEFAULT_PHASES: u16 = 20;

    /// A clock with [`Self::DEFAULT_PHASES`] phases per `period` (20 ms for G.711 frames),
    /// whose grid starts at `start`.
    ///
    /// # Panics
    /// If `period` is zero.
    #[must_use]
    pub fn new(period: Duration, start: Instant) -> Self {
        Self::with_phases(period, Self::DEFAULT_PHASES, start)
    }

    /// A clock with `phases` send instants per period (at least 1). More phases spread the
    /// sends more finely at the price of more wake-ups.
    ///
    /// # Panics
    /// If `period` is zero.
    #[must_use]
    pub fn with_phases(period: Duration, phases: u16, start: Instant) -> Self {
        assert!(!period.is_zero(), "media clock period must be positive");
        let count = phases.max(1);
        let phases = (0..count)
            .map(|p| Phase {
                offset: period * u32::from(p) / u32::from(count),
                members: Vec::new(),
                next_due: None,
            })
            .collect();
        Self {
            period,
            start,
            phases,
            spread_order: largest_gap_order(count),
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// The period.
    #[must_use]
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Streams registered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no stream is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Registers a stream; its first frame is due at its phase's first instant at or after
    /// `now` (within one period).
    pub fn add_stream(&mut self, now: Instant) -> StreamSlot {
        let phase_index = self.pick_phase();
        let next_due = self.first_due_at_or_after(phase_index, now);
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.entries.push(Entry { generation: 0, stream: None });
                u32::try_from(self.entries.len() - 1).expect("fewer than 2^32 streams per shard")
            }
        };
        let phase = &mut self.phases[usize::from(phase_index)];
        let position = u32::try_from(phase.members.len()).expect("fewer than 2^32 streams");
        phase.members.push(index);
        phase.next_due = Some(phase.next_due.map_or(next_due, |d| d.min(next_due)));
        let entry = &mut self.entries[index as usize];
        entry.stream = Some(Stream { phase: phase_index, position, next_due });
        self.len += 1;
        StreamSlot { index, generation: entry.generation }
    }

    /// Unregisters a stream. Returns false for a handle that is not (or no longer) registered.
    pub fn remove_stream(&mut self, slot: StreamSlot) -> bool {
        let Some(entry) = self.entries.get_mut(slot.index as usize) else {
            return false;
        };
        if entry.generation != slot.generation {
            return false;
        }
        let Some(stream) = entry.stream.take() else {
            return false;
        };
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(slot.index);
        self.len -= 1;

        let phase = &mut self.phases[usize::from(stream.phase)];
        phase.members.swap_remove(stream.position as usize);
        if let Some(&moved) = phase.members.get(stream.position as usize) {
            if let Some(s) = self.entries[moved as usize].stream.as_mut() {
                s.position = stream.position;
            }
        }
        let entries = &self.entries;
        phase.next_due = phase
            .members
            .iter()
            .filter_map(|&m| entries[m as usize].stream.as_ref().map(|s| s.next_due))
            .min();
        true
    }

    /// The next instant at which some stream is due, or `None` with no streams. It may be in
    /// the past: then call [`MediaClock::poll_due`] at once.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.phases.iter().filter_map(|p| p.next_due).min()
    }

    /// Appends to `out` (which it does not clear) every stream due at `now`, each once, in
    /// phase order. Each reported stream becomes due again at its next grid instant after
    /// `now`. Allocates nothing once `out` has grown to the shard's stream count.
    pub fn poll_due(&mut self, now: Instant, out: &mut Vec<Due>) {
        let period_ns = self.period.as_nanos();
        for phase in &mut self.phases {
            if phase.next_due.is_none_or(|d| d > now) {
                continue;
            }
            let mut earliest: Option<Instant> = None;
            for &index in &phase.members {
                let entry = &mut self.entries[index as usize];
                let Some(stream) = entry.stream.as_mut() else { continue };
                if stream.next_due <= now {
                    let late = now.duration_since(stream.next_due).as_nanos() / period_ns;
                    let skipped = u32::try_from(late).unwrap_or(u32::MAX);
                    let at = stream.next_due + nanos(period_ns * late);
                    stream.next_due += nanos(period_ns * (late + 1));
                    out.push(Due {
                        stream: StreamSlot { index, generation: entry.generation },
                        skipped,
                        at,
                    });
                }
                earliest = Some(earliest.map_or(stream.next_due, |e| e.min(stream.next_due)));
            }
            phase.next_due = earliest;
        }
    }

    /// The least loaded phase, ties broken by the spread order.
    fn pick_phase(&self) -> u16 {
        let mut best = self.spread_order[0];
        let mut best_load = usize::MAX;
        for &p in &self.spread_order {
            let load = self.phases[usize::from(p)].members.len();
            if load < best_load {
                best = p;
                best_load = load;
            }
        }
        best
    }

    /// First instant `start + offset + n × period` (n ≥ 0) that is at or after `now`.
    fn first_due_at_or_after(&self, phase: u16, now: Instant) -> Instant {
        let first = self.start + self.phases[usize::from(phase)].offset;
        if now <= first {
            return first;
        }
        let period_ns = self.period.as_nanos();
        let periods = now.duration_since(first).as_nanos().div_ceil(period_ns);
        first + nanos(periods * period_ns)
    }
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// Orders `0..count` so that every prefix is spread out around the circle: start at 0, then
/// repeatedly take the index farthest (circularly) from all taken ones, the smallest on ties.
fn largest_gap_order(count: u16) -> Vec<u16> {
    let n = usize::from(count);
    let mut taken = vec![false; n];
    // Circular distance from each index to the nearest taken one.
    let mut distance = vec![usize::MAX; n];
    let mut order = Vec::with_capacity(n);
    let mut next = 0usize;
    for _ in 0..n {
        taken[next] = true;
        order.push(u16::try_from(next).unwrap_or(u16::MAX));
        for (i, d) in distance.iter_mut().enumerate() {
            let straight = i.abs_diff(next);
            *d = (*d).min(straight.min(n - straight));
        }
        next = (0..n).filter(|&i| !taken[i]).max_by_key(|&i| (distance[i], n - i)).unwrap_or(0);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs the clock like a shard whose timer fires exactly on time, until `end`, and returns
    /// every (stream, send instant, skipped).
    fn drive(clock: &mut MediaClock, end: Instant) -> Vec<(StreamSlot, Instant, u32)> {
        let mut sent = Vec::new();
        let mut due = Vec::new();
        while let Some(t) = clock.poll_timeout() {
            if t >= end {
                break;
            }
            due.clear();
            clock.poll_due(t, &mut due);
            assert!(!due.is_empty(), "a wake-up at poll_timeout finds work");
            sent.extend(due.iter().map(|d| (d.stream, t, d.skipped)));
        }
        sent
    }

    #[test]
    fn spread_order_for_twenty_phases() {
        let order = largest_gap_order(20);
        assert_eq!(&order[..4], &[0, 10, 5, 15]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_eq!(largest_gap_order(1), vec![0]);
    }

    #[test]
    fn fifty_streams_for_one_second_send_fifty_frames_each_spread_out() {
        let start = Instant::now();
        let mut clock = MediaClock::new(PERIOD, start);
        let streams: Vec<_> = (0..50).map(|_| clock.add_stream(start)).collect();
        let sent = drive(&mut clock, start + Duration::from_secs(1));

        for s in &streams {
            let times: Vec<Instant> =
                sent.iter().filter(|(x, ..)| x == s).map(|&(_, t, _)| t).collect();
            assert_eq!(times.len(), 50, "stream {s:?}");
            // On time: exactly one period apart, never twice in one period.
            assert!(times.windows(2).all(|w| w[1] - w[0] == PERIOD));
        }
        assert!(sent.iter().all(|&(.., skipped)| skipped == 0));

        // Per 1 ms bucket of the period, at most ceil(50 / 20) = 3 streams.
        let mut buckets = [0usize; 20];
        for &(_, t, _) in sent.iter().filter(|&&(_, t, _)| t < start + PERIOD) {
            buckets[((t - start).as_micros() / 1000) as usize] += 1;
        }
        assert_eq!(buckets.iter().sum::<usize>(), 50);
        assert!(buckets.iter().all(|&b| b == 2 || b == 3), "{buckets:?}");
    }

    #[test]
    fn late_wake_up_reports_each_stream_once_with_skipped_frames() {
        let start = Instant::now();
        let mut clock = MediaClock::new(PERIOD, start);
        let streams: Vec<_> = (0..40).map(|_| clock.add_stream(start)).collect();
        let mut due = Vec::new();
        // Nothing polled for 65 ms: every stream owed 3 or 4 frames.
        let now = start + ms(65);
        clock.poll_due(now, &mut due);
        assert_eq!(due.len(), 40);
        for s in &streams {
            assert_eq!(due.iter().filter(|d| d.stream == *s).count(), 1);
        }
        assert!(due.iter().all(|d| d.skipped == 2 || d.skipped == 3), "{due:?}");
        // Each is sent for its latest grid instant: less than one period before now.
        assert!(due.iter().all(|d| d.at <= now && now - d.at < PERIOD), "{due:?}");
        // Polling again at the same instant yields nothing: no burst.
        due.clear();
        clock.poll_due(now, &mut due);
        assert!(due.is_empty());
        // The next deadline is in the future and on the grid (a 1 ms phase boundary).
        let next = clock.poll_timeout().unwrap();
        assert!(next > now && next <= now + PERIOD);
        assert_eq!((next - start).as_micros() % 1000, 0);
        // Resuming on time, every stream sends once per period again, without skips.
        // (now, now + 200 ms] holds exactly ten instants of every phase.
        let sent = drive(&mut clock, now + ms(200) + Duration::from_nanos(1));
        assert_eq!(sent.len(), 40 * 10);
        assert!(sent.iter().all(|&(.., skipped)| skipped == 0));
    }

    #[test]
    fn a_slightly_late_stream_sends_one_frame_and_keeps_its_grid() {
        let start = Instant::now();
        let mut clock = MediaClock::new(PERIOD, start);
        let s = clock.add_stream(start);
        let mut due = Vec::new();
        clock.poll_due(start + ms(7), &mut due);
        assert_eq!(due, vec![Due { stream: s, skipped: 0, at: start }]);
        assert_eq!(clock.poll_timeout(), Some(start + PERIOD));
    }

    #[test]
    fn a_stream_added_mid_period_waits_for_its_phase() {
        let start = Instant::now();
        let mut clock = MediaClock::new(PERIOD, start);
        let a = clock.add_stream(start); // phase 0
        let b = clock.add_stream(start + ms(3)); // phase 10: due at 10 ms
        let c = clock.add_stream(start + ms(12)); // phase 5: next at 25 ms
        let mut due = Vec::new();
        clock.poll_due(start, &mut due);
        assert_eq!(due, vec![Due { stream: a, skipped: 0, at: start }]);
        assert_eq!(clock.poll_timeout(), Some(start + ms(10)));
        due.clear();
        clock.poll_due(start + ms(10), &mut due);
        assert_eq!(due, vec![Due { stream: b, skipped: 0, at: start + ms(10) }]);
        assert_eq!(clock.poll_timeout(), Some(start + ms(20)));
        due.clear();
        clock.poll_due(start + ms(25), &mut due);
        assert_eq!(due.len(), 2);
        assert!(due.contains(&Due { stream: a, skipped: 0, at: start + ms(20) }));
        assert!(due.contains(&Due { stream: c, skipped: 0, at: start + ms(25) }));
    }

    #[test]
    fn removal_frees_the_phase_and_stale_handles_are_ignored() {
        let start = Instant::now();
        let mut clock = MediaClock::new(PERIOD, start);
        assert_eq!(clock.poll_timeout(), None);
        let a = clock.add_stream(start);
        let b = clock.add_stream(start);
        assert_eq!(clock.len(), 2);
        assert!(clock.remove_stream(a));
        assert!(!clock.remove_stream(a));
        assert_eq!(clock.poll_timeout(), Some(start + ms(10)), "only b's phase remains");
        // The freed entry is reused with a new generation; the old handle stays dead.
        let c = clock.add_stream(start);
        assert_ne!(c, a);
        assert!(!clock.remove_stream(a));
        assert_eq!(clock.poll_timeout(), Some(start), "c took the empty phase 0");
        let mut due = Vec::new();
        clock.poll_due(start + ms(10), &mut due);
        assert_eq!(due.len(), 2);
        assert!(clock.remove_stream(b) && clock.remove_stream(c));
        assert!(clock.is_empty());
        assert_eq!(clock.poll_timeout(), None);
    }

    #[test]
    fn swap_removed_members_keep_working() {
        let start = Instant::now();
        let mut clock = MediaClock::with_phases(PERIOD, 1, start);
        let s: Vec<_> = (0..5).map(|_| clock.add_stream(start)).collect();
        assert!(clock.remove_stream(s[1]));
        assert!(clock.remove_stream(s[4])); // was moved into position 1
        let mut due = Vec::new();
        clock.poll_due(start, &mut due);
        let got: Vec<_> = due.iter().map(|d| d.stream).collect();
        assert_eq!(got.len(), 3);
        for x in [s[0], s[2], s[3]] {
            assert!(got.contains(&x));
        }
    }

    #[test]
    fn steady_state_polling_does_not_grow_the_output_vec() {
        let start = Instant::now();
        let mut clock = MediaClock::new(PERIOD, start);
        for _ in 0..100 {
            clock.add_stream(start);
        }
        let mut due = Vec::with_capacity(100);
        let cap = due.capacity();
        let mut now = start;
        for _ in 0..1000 {
            now = clock.poll_timeout().unwrap();
            due.clear();
            clock.poll_due(now, &mut due);
        }
        assert_eq!(due.capacity(), cap);
        assert!(now >= start + ms(190));
    }
}
