//! Overload admission: whether a shard takes new calls, from its measured headroom.
//!
//! Three readings, each a reason to answer a new INVITE `503` + `Retry-After` before any record
//! is made (and a dispatcher's OPTIONS probe `503`, so Kamailio sends new calls elsewhere):
//! * **the media clock runs late**: more than [`LATE_SHARE_PERCENT`] of the clock's ticks in
//!   the last window woke more than `max_clock_late` after their grid instant. Every call up
//!   hears that as jitter or skipped frames; a new call would make it worse for all;
//! * **the SIP lane of the inbox is deep**: datagrams forwarded by the other shard wait longer
//!   than SIP's own retransmission timers can hide;
//! * **too many calls wait for their first plan** ([`setup_full`]): checked for each INVITE
//!   on its own, not held for a window (the two above are).
//!
//! (`SHARD_MAX_CALLS` is checked apart, when the shard sees the new call: a full shard still
//! answers probes `200`, since the calls it has are fine.)
//!
//! Sans-IO: the shard feeds it instants and depths; the unit tests drive it with made-up ones.
//! Shedding on the clock lasts at least one whole window (so a node that recovers for one tick does not flap
//! between refusing and admitting).

use std::time::{Duration, Instant};

/// Length of one measuring window.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// Share of late ticks in a window above which the clock counts as overloaded.
pub(crate) const LATE_SHARE_PERCENT: u64 = 1;

/// A SIP socket whose unread datagrams take more than this share of its receive buffer
/// refuses new calls while they do. The shard reads the socket slower than datagrams arrive
/// (a trunk past the node's capacity, or a shard receiving a whole trunk's traffic); a fuller
/// buffer drops datagrams, among them the ACKs and BYEs of calls already admitted, whose
/// retransmissions are more load: measured with one shard at 21,000 calls/s asked, 1,336/s
/// were completed and 30,160 failed. Refusing new INVITEs (statelessly, a few µs each) lets
/// the shard catch up while the queue still has room. Half the 8 MiB buffer is about 4,000
/// datagrams, 100 to 200 ms of a full trunk's traffic; a quarter was also tripped by a shard
/// merely descheduled for a moment at 15,000 calls/s on this 2-core box (675 calls refused).
pub(crate) const SOCKET_QUEUE_PERCENT: u32 = 50;

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
    /// The SIP socket's kernel receive queue is fuller than [`SOCKET_QUEUE_PERCENT`].
    Socket,
}

impl Overload {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Clock => "clock",
            Self::Inbox => "inbox",
            Self::Socket => "socket",
        }
    }

    /// The value of the `precall_shard_overload` gauge (0 is "admitting").
    pub(crate) fn code(this: Option<Self>) -> u64 {
        match this {
            None => 0,
            Some(Self::Clock) => 1,
            Some(Self::Inbox) => 2,
            Some(Self::Socket) => 3,
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
    /// This many calls waiting for the control plane's first plan refuse the next one, at
    /// once and only while so many wait (`ADMIT_SETUP_DEPTH`; see [`setup_full`]). `0`: off.
    pub(crate) max_setup_depth: usize,
}

/// Whether `waiting` calls awaiting their first plan fill the setup queue.
///
/// A bound on the work in flight, not a rate: past the node's capacity the calls that wait
/// for the controller grow without end (Little's law: at twice the rate it can plan, the queue
/// and every call's setup time double each second), until file descriptors and RTP ports run
/// out and admitted calls fail. With the queue bounded a new call is either planned within
/// `max_setup_depth / rate` or refused `503` at once, and the admitted rate stays at what the
/// controller plans: no window of refusing everything, no burst of admitting everything after.
pub(crate) fn setup_full(limits: &Limits, waiting: usize) -> bool {
    limits.max_setup_depth > 0 && waiting >= limits.max_setup_depth
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    ticks: u64,
    late: u64,
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
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            started: None,
            current: Window::default(),
            previous: Window::default(),
            clock_until: None,
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
            self.clock_until = Some(now + WINDOW);
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
        if self.previous.overloaded() {
            self.clock_until = Some(now + WINDOW);
        }
    }

    /// Whether a new call is refused now, and why (the queues first: they are the newer
    /// readings). `socket_queue_percent` is the SIP socket's last reading, if any.
    pub(crate) fn check(
        &mut self,
        now: Instant,
        inbox_depth: usize,
        socket_queue_percent: u32,
    ) -> Option<Overload> {
        self.roll(now);
        if socket_queue_percent > SOCKET_QUEUE_PERCENT {
            return Some(Overload::Socket);
        }
        if self.limits.max_inbox_depth > 0 && inbox_depth > self.limits.max_inbox_depth {
            return Some(Overload::Inbox);
        }
        match self.clock_until {
            Some(until) if now < until => Some(Overload::Clock),
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
        Admission::new(Limits {
            max_clock_late: 10 * MS,
            max_inbox_depth: 512,
            max_setup_depth: 64,
        })
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
    fn the_setup_queue_refuses_from_its_limit_and_admits_below_it() {
        let limits = admission().limits;
        assert!(!setup_full(&limits, 0));
        assert!(!setup_full(&limits, 63));
        assert!(setup_full(&limits, 64));
        assert!(setup_full(&limits, 10_000));
        let off = Limits { max_setup_depth: 0, ..limits };
        assert!(!setup_full(&off, usize::MAX), "0 turns the reading off");
    }

    #[test]
    fn a_punctual_clock_admits() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 200, 2 * MS);
        assert_eq!(a.check(t, 0, 0), None);
    }

    #[test]
    fn a_clock_late_on_more_than_one_tick_in_a_hundred_sheds_for_a_window() {
        let mut a = admission();
        let t0 = Instant::now();
        // 50 punctual ticks, then 3 late ones: 3 of 53 is over 1 %.
        let t = ticks(&mut a, t0, 50, MS);
        assert_eq!(a.check(t, 0, 0), None);
        let t = ticks(&mut a, t, 3, 15 * MS);
        assert_eq!(a.check(t, 0, 0), Some(Overload::Clock));
        // Punctual again: still shedding for a whole window...
        let t = ticks(&mut a, t, 100, MS);
        assert_eq!(a.check(t, 0, 0), Some(Overload::Clock));
        // ...and admitted once punctual windows have gone by.
        let t = ticks(&mut a, t, 600, MS);
        assert_eq!(a.check(t, 0, 0), None);
    }

    #[test]
    fn one_late_tick_among_many_is_not_overload() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 150, MS);
        let t = ticks(&mut a, t, 1, 40 * MS);
        assert_eq!(a.check(t, 0, 0), None);
        let t = ticks(&mut a, t, 150, MS);
        assert_eq!(a.check(t, 0, 0), None);
    }

    #[test]
    fn few_ticks_are_not_a_measurement() {
        let mut a = admission();
        let t0 = Instant::now();
        // A shard with one call: 5 late ticks in a window of 5 decide nothing.
        let t = ticks(&mut a, t0, 5, 30 * MS);
        assert_eq!(a.check(t, 0, 0), None);
    }

    #[test]
    fn a_deep_inbox_refuses_at_once_and_only_while_deep() {
        let mut a = admission();
        let t = Instant::now();
        assert_eq!(a.check(t, 513, 0), Some(Overload::Inbox));
        assert_eq!(a.check(t, 512, 0), None);
    }

    #[test]
    fn a_full_socket_queue_refuses_at_once_and_only_while_full() {
        let mut a = admission();
        let t = Instant::now();
        assert_eq!(a.check(t, 0, SOCKET_QUEUE_PERCENT + 1), Some(Overload::Socket));
        // The socket is the first reason named (its queue is in front of the inbox).
        assert_eq!(a.check(t, 513, SOCKET_QUEUE_PERCENT + 1), Some(Overload::Socket));
        assert_eq!(a.check(t, 0, SOCKET_QUEUE_PERCENT), None);
    }

    #[test]
    fn zero_turns_the_clock_and_inbox_readings_off() {
        let mut a = Admission::new(Limits {
            max_clock_late: Duration::ZERO,
            max_inbox_depth: 0,
            max_setup_depth: 0,
        });
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 100, 50 * MS);
        assert_eq!(a.check(t, 100_000, 0), None);
    }

    #[test]
    fn an_idle_gap_forgets_an_old_overload() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 40, 30 * MS);
        assert_eq!(a.check(t, 0, 0), Some(Overload::Clock));
        // No tick for 5 s (the calls ended): the old window does not count any more.
        assert_eq!(a.check(t + 5 * WINDOW, 0, 0), None);
    }
}
