//! Overload admission: whether a shard takes new calls, from its measured headroom.
//!
//! Three readings, each a reason to answer a new INVITE `503` + `Retry-After` before any record
//! is made (and a dispatcher's OPTIONS probe `503`, so Kamailio sends new calls elsewhere):
//! * **the media clock runs late**: more than [`LATE_SHARE_PERCENT`] of the clock's ticks in
//!   the last window woke more than `max_clock_late` after their grid instant. Every call up
//!   hears that as jitter or skipped frames; a new call would make it worse for all;
//! * **the SIP lane of the inbox is deep**: datagrams forwarded by the other shard wait longer
//!   than SIP's own retransmission timers can hide;
//!
//! (`SHARD_MAX_CALLS` is checked apart, when the shard sees the new call: a full shard still
//! answers probes `200`, since the calls it has are fine.)
//!
//! Shedding for the clock is a rate, not a stop (AIMD, as RFC 7339's rate-based overload
//! control): when the clock turns late the shard goes on admitting new calls at 90 % of the
//! rate it admitted in the window before, a quarter less for every further window that is
//! still late, a tenth of the first rate more for every window on time, and all of them once
//! back at that rate. A shard at its limit therefore keeps taking nearly its capacity and
//! refuses only the excess. Refusing everything (the first rule) made a saturated shard flip
//! between admitting a burst and refusing all: at twice its capacity it admitted a quarter of
//! its best rate (docs/PERFORMANCE.md, carrier scale). A clock late because of the calls
//! already up (too many held calls) still ends at refusing all: the rate decays while late.
//!
//! Sans-IO: the shard feeds it instants, depths and admitted calls; the unit tests drive it
//! with made-up ones. Shedding lasts at least one whole window (so a node that recovers for one
//! tick does not flap between refusing and admitting).

use std::time::{Duration, Instant};

/// Length of one measuring window.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// Share of late ticks in a window above which the clock counts as overloaded.
pub(crate) const LATE_SHARE_PERCENT: u64 = 1;

/// Fewest ticks in a window for its share to count (a shard with few calls ticks rarely).
const MIN_TICKS: u64 = 20;

/// Fewest late ticks in a window that count as overload (one scheduling hiccup is not).
const MIN_LATE: u64 = 3;

/// Why new calls are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overload {
    /// The media clock ran late (`ADMIT_CLOCK_LATE_MS`).
    Clock,
    /// The SIP lane of the inbox is deeper than `ADMIT_INBOX_DEPTH`.
    Inbox,
}

impl Overload {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Clock => "clock",
            Self::Inbox => "inbox",
        }
    }

    /// The value of the `precall_shard_overload` gauge (0 is "admitting").
    pub(crate) fn code(this: Option<Self>) -> u64 {
        match this {
            None => 0,
            Some(Self::Clock) => 1,
            Some(Self::Inbox) => 2,
        }
    }
}

/// The limits (settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// A clock tick later than this is a late tick. `Duration::ZERO` turns the clock reading off.
    pub(crate) max_clock_late: Duration,
    /// A deeper SIP lane refuses calls. `0` turns the reading off.
    pub(crate) max_inbox_depth: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    ticks: u64,
    late: u64,
    /// New calls admitted in the window.
    admitted: u64,
}

impl Window {
    fn overloaded(&self) -> bool {
        self.ticks >= MIN_TICKS
            && self.late >= MIN_LATE
            && self.late * 100 > self.ticks * LATE_SHARE_PERCENT
    }
}

/// The admission state of one shard.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    /// Start of the current window (the first reading).
    started: Option<Instant>,
    current: Window,
    previous: Window,
    /// Shedding for the clock until at least this instant.
    clock_until: Option<Instant>,
    /// While shedding for the clock: the calls per window still admitted, the rate admitted
    /// before shedding began, and the tokens (calls) admissible now.
    cap: Option<Cap>,
}

/// The admission rate while the clock sheds (a token bucket whose rate follows AIMD).
#[derive(Debug, Clone, Copy)]
struct Cap {
    /// Calls per window admitted now.
    rate: f64,
    /// Calls per window admitted before shedding began.
    base: f64,
    tokens: f64,
    refilled: Instant,
    /// The rate was already cut in the current window.
    cut_this_window: bool,
}

/// Share of the last rate still admitted when the clock turns late.
const FIRST_CUT: f64 = 0.9;
/// Share kept for every further window still late.
const LATE_CUT: f64 = 0.75;
/// Share of the first rate added back for every window on time.
const STEP_UP: f64 = 0.1;
/// Tokens held at most, as a share of a window's rate (a burst admitted at once).
const BURST: f64 = 0.05;

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            started: None,
            current: Window::default(),
            previous: Window::default(),
            clock_until: None,
            cap: None,
        }
    }

    /// A new call was admitted at `now`.
    pub(crate) fn on_admitted(&mut self, now: Instant) {
        self.roll(now);
        self.current.admitted += 1;
        if let Some(cap) = &mut self.cap {
            cap.tokens -= 1.0;
        }
    }

    /// The clock was found late at `now` (mid-window or at a window's end): start or tighten
    /// the rate, at most once per window.
    fn clock_late(&mut self, now: Instant) {
        self.clock_until = Some(now + WINDOW);
        match &mut self.cap {
            None => {
                let base = self.previous.admitted.max(self.current.admitted) as f64;
                let rate = base * FIRST_CUT;
                self.cap =
                    Some(Cap { rate, base, tokens: 0.0, refilled: now, cut_this_window: true });
            }
            Some(cap) if !cap.cut_this_window => {
                cap.rate *= LATE_CUT;
                cap.cut_this_window = true;
            }
            Some(_) => {}
        }
    }

    /// One media-clock tick at `now` for frames due at `due`.
    pub(crate) fn on_clock_tick(&mut self, now: Instant, due: Instant) {
        self.roll(now);
        self.current.ticks += 1;
        let late = now.saturating_duration_since(due);
        if !self.limits.max_clock_late.is_zero() && late > self.limits.max_clock_late {
            self.current.late += 1;
        }
        // The current window already shows overload: no need to wait for its end.
        if self.current.overloaded() {
            self.clock_late(now);
        }
    }

    /// Moves the windows on to `now`.
    fn roll(&mut self, now: Instant) {
        let start = *self.started.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed < WINDOW {
            return;
        }
        // The window that just ended becomes the previous one; a gap of more than one window
        // means nothing ticked in between (no calls): an empty previous window.
        self.previous = if elapsed < 2 * WINDOW { self.current } else { Window::default() };
        self.current = Window::default();
        self.started = Some(now);
        if let Some(cap) = &mut self.cap {
            cap.cut_this_window = false;
        }
        if self.previous.overloaded() {
            self.clock_late(now);
        } else if let Some(cap) = &mut self.cap {
            // A window on time: give back a step of the first rate (at least one call).
            cap.rate += (cap.base * STEP_UP).max(1.0);
            if cap.rate >= cap.base || elapsed >= 2 * WINDOW {
                self.cap = None;
            }
        }
    }

    /// Whether the next new call is refused (the shard is shedding and no call is admissible
    /// at its current rate), and why. [`Self::check`] says whether the shard sheds at all.
    pub(crate) fn refuse(&mut self, now: Instant, inbox_depth: usize) -> Option<Overload> {
        let state = self.check(now, inbox_depth);
        if state != Some(Overload::Clock) {
            return state;
        }
        let Some(cap) = &mut self.cap else { return state };
        let elapsed = now.saturating_duration_since(cap.refilled).as_secs_f64();
        cap.refilled = now;
        let burst = (cap.rate * BURST).max(1.0);
        cap.tokens = (cap.tokens + cap.rate * elapsed / WINDOW.as_secs_f64()).min(burst);
        (cap.tokens < 1.0).then_some(Overload::Clock)
    }

    /// Whether the shard sheds now, and why (the inbox first: it is the newer reading). While
    /// shedding for the clock some calls are still admitted (see [`Self::refuse`]).
    pub(crate) fn check(&mut self, now: Instant, inbox_depth: usize) -> Option<Overload> {
        self.roll(now);
        if self.limits.max_inbox_depth > 0 && inbox_depth > self.limits.max_inbox_depth {
            return Some(Overload::Inbox);
        }
        match self.clock_until {
            Some(until) if now < until => Some(Overload::Clock),
            // Past the shedding window, but still below the first rate: still shedding.
            Some(_) if self.cap.is_some() => Some(Overload::Clock),
            Some(_) => {
                self.clock_until = None;
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn admission() -> Admission {
        Admission::new(Limits { max_clock_late: 10 * MS, max_inbox_depth: 512 })
    }

    /// `n` ticks 5 ms apart from `start` (a shard's streams spread over the clock's phases),
    /// each `late` after its grid instant; returns the last tick's instant.
    fn ticks(a: &mut Admission, start: Instant, n: u32, late: Duration) -> Instant {
        let mut t = start;
        for i in 1..=n {
            let due = start + 5 * MS * i;
            t = due + late;
            a.on_clock_tick(t, due);
        }
        t
    }

    #[test]
    fn a_punctual_clock_admits() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 200, 2 * MS);
        assert_eq!(a.check(t, 0), None);
    }

    #[test]
    fn a_clock_late_on_more_than_one_tick_in_a_hundred_sheds_for_a_window() {
        let mut a = admission();
        let t0 = Instant::now();
        // 50 punctual ticks, then 3 late ones: 3 of 53 is over 1 %.
        let t = ticks(&mut a, t0, 50, MS);
        assert_eq!(a.check(t, 0), None);
        let t = ticks(&mut a, t, 3, 15 * MS);
        assert_eq!(a.check(t, 0), Some(Overload::Clock));
        // Punctual again: still shedding for a whole window...
        let t = ticks(&mut a, t, 100, MS);
        assert_eq!(a.check(t, 0), Some(Overload::Clock));
        // ...and admitted once punctual windows have gone by.
        let t = ticks(&mut a, t, 600, MS);
        assert_eq!(a.check(t, 0), None);
    }

    #[test]
    fn one_late_tick_among_many_is_not_overload() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 150, MS);
        let t = ticks(&mut a, t, 1, 40 * MS);
        assert_eq!(a.check(t, 0), None);
        let t = ticks(&mut a, t, 150, MS);
        assert_eq!(a.check(t, 0), None);
    }

    #[test]
    fn few_ticks_are_not_a_measurement() {
        let mut a = admission();
        let t0 = Instant::now();
        // A shard with one call: 5 late ticks in a window of 5 decide nothing.
        let t = ticks(&mut a, t0, 5, 30 * MS);
        assert_eq!(a.check(t, 0), None);
    }

    #[test]
    fn a_deep_inbox_refuses_at_once_and_only_while_deep() {
        let mut a = admission();
        let t = Instant::now();
        assert_eq!(a.check(t, 513), Some(Overload::Inbox));
        assert_eq!(a.check(t, 512), None);
    }

    #[test]
    fn zero_turns_the_clock_and_inbox_readings_off() {
        let mut a = Admission::new(Limits { max_clock_late: Duration::ZERO, max_inbox_depth: 0 });
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 100, 50 * MS);
        assert_eq!(a.check(t, 100_000), None);
    }

    /// `n` calls admitted evenly over `span` from `start` when admission lets them in;
    /// returns how many were admitted.
    fn offer(a: &mut Admission, start: Instant, span: Duration, n: u32) -> u32 {
        let mut admitted = 0;
        for i in 0..n {
            let t = start + span * i / n;
            if a.refuse(t, 0).is_none() {
                a.on_admitted(t);
                admitted += 1;
            }
        }
        admitted
    }

    /// One window of ticks every 5 ms, each `late`, with `calls` offered meanwhile; returns the
    /// calls admitted and the window's end.
    fn window(a: &mut Admission, start: Instant, late: Duration, calls: u32) -> (u32, Instant) {
        let mut admitted = 0;
        for i in 1..=200u32 {
            let due = start + 5 * MS * i;
            a.on_clock_tick(due + late, due);
            admitted += offer(a, due - 5 * MS + late, 5 * MS, calls / 200);
        }
        (admitted, start + WINDOW)
    }

    #[test]
    fn a_late_clock_keeps_admitting_most_of_the_last_rate_and_cuts_it_while_late() {
        let mut a = admission();
        let t0 = Instant::now();
        // On time, 1,000 calls offered in a window: all admitted.
        let (first, t) = window(&mut a, t0, MS, 1_000);
        assert_eq!(first, 1_000);
        assert_eq!(a.check(t, 0), None);
        // Late from now on, twice as many offered: about 90 % of the last rate gets in (not
        // zero), and each further late window a quarter less.
        // (The first 20 ticks of the window, before the share counts, admit freely.)
        let (second, t) = window(&mut a, t, 15 * MS, 2_000);
        assert!((800..=1_150).contains(&second), "{second}");
        assert_eq!(a.check(t, 0), Some(Overload::Clock));
        let (third, t) = window(&mut a, t, 15 * MS, 2_000);
        assert!(third < second && (550..=800).contains(&third), "{second} then {third}");
        // On time again: a tenth of the first rate back per window, then all of it.
        let mut rates = Vec::new();
        let mut t = t;
        while rates.last() != Some(&2_000) && rates.len() < 10 {
            let (n, end) = window(&mut a, t, MS, 2_000);
            rates.push(n);
            t = end;
        }
        assert!(rates.windows(2).all(|w| w[1] > w[0]), "{rates:?}");
        assert!(rates.len() >= 4 && rates.last() == Some(&2_000), "{rates:?}");
        assert_eq!(a.check(t, 0), None);
    }

    #[test]
    fn a_clock_late_with_no_new_calls_refuses_them_until_it_keeps_time() {
        let mut a = admission();
        let t0 = Instant::now();
        // Held calls alone make the clock late: nothing was admitted, so nothing is.
        let (_, t) = window(&mut a, t0, 15 * MS, 0);
        assert_eq!(a.refuse(t, 0), Some(Overload::Clock));
        let (admitted, _) = window(&mut a, t, 15 * MS, 200);
        assert_eq!(admitted, 0);
    }

    #[test]
    fn an_idle_gap_forgets_an_old_overload() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 40, 30 * MS);
        assert_eq!(a.check(t, 0), Some(Overload::Clock));
        // No tick for 5 s (the calls ended): the old window does not count any more.
        assert_eq!(a.check(t + 5 * WINDOW, 0), None);
    }
}
