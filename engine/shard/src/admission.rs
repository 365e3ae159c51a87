//! Overload admission: whether a shard takes new calls, from its measured headroom.
//!
//! Five readings, each a reason to answer a new INVITE `503` + `Retry-After` before any record
//! is made (and a dispatcher's OPTIONS probe `503`, so Kamailio sends new calls elsewhere):
//! * **the media clock runs late**: more than [`LATE_SHARE_PERCENT`] of the clock's ticks in
//!   the last window woke more than `max_clock_late` after their grid instant, while the shard
//!   was busy at least `clock_busy_percent` of that window. Every call up hears that as
//!   jitter or skipped frames; a new call would make it worse for all. (A shard late while
//!   mostly idle is late because the machine does not run it, not because of its calls: see
//!   [`BUSY_SHARE_PERCENT`].)
//! * **SIP datagrams wait too long** ([`LAG_INTERVAL`]): every datagram the shard handled
//!   in the last interval had waited more than `max_sip_lag` since the kernel received it (in
//!   the socket's queue, and in the inbox when another shard forwarded it), while the shard
//!   was busy at least `clock_busy_percent` of that interval: a standing queue of its own
//!   making, which a shard merely descheduled for a moment does not leave;
//! * **the SIP lane of the inbox is deep**: datagrams forwarded by the other shard wait longer
//!   than SIP's own retransmission timers can hide;
//! * **the SIP socket's kernel queue is over [`SOCKET_QUEUE_PERCENT`] full**: the shard reads
//!   slower than the trunk sends;
//! * **too many calls wait for their first plan** ([`setup_full`]): checked for each INVITE
//!   on its own, not held for a window (only the clock's reading is; the lag's needs an
//!   interval to begin, and ends at the first datagram on time).
//!
//! (`SHARD_MAX_CALLS` is checked apart, when the shard sees the new call: a full shard still
//! answers probes `200`, since the calls it has are fine.)
//!
//! Sans-IO: the shard feeds it instants, depths and a CPU clock; the unit tests drive it with
//! made-up ones. Shedding on the clock lasts at least one whole window (so a node that
//! recovers for one tick does not flap between refusing and admitting).

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

/// Least share of a window the shard's thread must have spent on the CPU for its late ticks
/// (and of an interval, for its late SIP datagrams) to count as overload: the default of
/// `ADMIT_CLOCK_BUSY_PERCENT`.
///
/// Lateness has two causes. The shard's own work (too many calls, a burst of signalling) is
/// what refusing new calls cures; it shows as a busy thread. The machine not running the
/// thread (other processes on the cores, a hypervisor's steal) is not cured by refusing: a
/// shard with 4 calls and 1 % of a core was measured late on over 1 % of its ticks with four
/// CPU hogs beside it on this 2-core box, and refused every new call for seconds while its
/// calls were 4. Below a quarter of a core busy, the shard admits whatever its clock says.
/// (At the load where the clock sheds in `benches/carrier_load.py`, a shard is busy for
/// more than half of each second.)
pub(crate) const BUSY_SHARE_PERCENT: u8 = 25;

/// How long every SIP datagram handled must have waited more than `max_sip_lag` before new
/// calls are refused (`ADMIT_SIP_LAG_MS`), the interval of CoDel (RFC 8289) for the same
/// question: a queue that stands, not one that drains.
///
/// Why the lag: past capacity a shard's work grows faster than the calls it admits. Measured
/// with `benches/carrier_load.py` at 18,000 calls/s asked on a node that carried 12,000 with 0
/// refusals: the BYEs of admitted calls waited in the socket's queue, so each call sent its
/// greeting's RTP for longer (6.8 packets per call against 0.1 on time; the greeting now
/// waits for the ACK, but a call's dialog and timers still live as long as its BYE waits),
/// which was more work still, and the node settled at 2,000 to 9,000 calls/s admitted. The queue's fill (the
/// socket reading) and the inbox's depth say it late: half of an 8 MiB buffer is some 200 ms
/// of a full trunk; the age of what is read says it at once, whichever queue it sat in.
/// A shard descheduled for a moment reads datagrams that waited, then catches up within the
/// interval: a datagram on time ends the reading.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_millis(100);

/// The default of `ADMIT_SIP_LAG_MS`: a twenty-fifth of SIP's T1 (500 ms), far below what a
/// caller's retransmissions notice.
pub(crate) const SIP_LAG: Duration = Duration::from_millis(20);

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
    /// SIP datagrams waited longer than `ADMIT_SIP_LAG_MS` for a whole [`LAG_INTERVAL`].
    Lag,
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
            Self::Lag => "lag",
        }
    }

    /// The value of the `precall_shard_overload` gauge (0 is "admitting").
    pub(crate) fn code(this: Option<Self>) -> u64 {
        match this {
            None => 0,
            Some(Self::Clock) => 1,
            Some(Self::Inbox) => 2,
            Some(Self::Socket) => 3,
            Some(Self::Lag) => 4,
        }
    }
}

/// The limits (settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// A clock tick later than this is a late tick. `Duration::ZERO` turns the clock reading off.
    pub(crate) max_clock_late: Duration,
    /// Late ticks (and late SIP datagrams) count only in a window (an interval) where the
    /// shard's thread was on the CPU at least this share of the time (see
    /// [`BUSY_SHARE_PERCENT`]). `0`: every late tick counts.
    pub(crate) clock_busy_percent: u8,
    /// A deeper SIP lane refuses calls. `0` turns the reading off.
    pub(crate) max_inbox_depth: usize,
    /// SIP datagrams that all waited longer than this for [`LAG_INTERVAL`] refuse calls
    /// (`ADMIT_SIP_LAG_MS`). `Duration::ZERO` turns the reading off.
    pub(crate) max_sip_lag: Duration,
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
    /// Whether the window's ticks were late often enough to count (before the busy share).
    fn late_often(&self) -> bool {
        self.ticks >= MIN_TICKS
            && self.late >= MIN_LATE
            && self.late * 100 > self.ticks * LATE_SHARE_PERCENT
    }
}

/// Whether a thread that spent `cpu` on the CPU over `wall` was busy at least `percent` of
/// it: enough for its clock's lateness to be its own doing ([`BUSY_SHARE_PERCENT`]).
fn busy(cpu: Duration, wall: Duration, percent: u8) -> bool {
    cpu.as_nanos() * 100 >= wall.as_nanos() * u128::from(percent)
}

/// The CPU time the shard's thread has used so far (`CLOCK_THREAD_CPUTIME_ID` on the shard;
/// a made-up clock in the tests). Read when a window starts, and when one with enough late
/// ticks is judged (at its late ticks and at its end): never on a punctual tick.
/// `None` where the system does not tell: the thread then counts as busy, so the clock
/// reading works as it would without the busy share.
pub(crate) type CpuClock = Box<dyn FnMut() -> Option<Duration>>;

/// The calling thread's CPU time so far (user and system), if the system tells it.
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a timespec that lives for the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    (rc == 0).then(|| Duration::new(secs, nanos))
}

/// The admission state of one shard.
pub(crate) struct Admission {
    limits: Limits,
    /// Start of the current window (the first reading), and the thread's CPU time then.
    started: Option<(Instant, Option<Duration>)>,
    current: Window,
    /// Shedding for the clock until at least this instant.
    clock_until: Option<Instant>,
    /// Since when every SIP datagram handled had waited longer than `max_sip_lag`, and the
    /// thread's CPU time then.
    lag_since: Option<(Instant, Option<Duration>)>,
    /// The late datagrams have lasted an interval on a busy thread: refusing until one is on
    /// time.
    lag_tripped: bool,
    /// When the last SIP datagram was handled (a lag reading older than an interval is stale).
    lag_seen: Option<Instant>,
    cpu: CpuClock,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .field("started", &self.started)
            .field("current", &self.current)
            .field("clock_until", &self.clock_until)
            .field("lag_since", &self.lag_since)
            .finish_non_exhaustive()
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits, cpu: CpuClock) -> Self {
        Self {
            limits,
            started: None,
            current: Window::default(),
            clock_until: None,
            lag_since: None,
            lag_tripped: false,
            lag_seen: None,
            cpu,
        }
    }

    /// A SIP datagram handled at `now` that had waited `lag` since the kernel received it.
    pub(crate) fn on_sip_lag(&mut self, now: Instant, lag: Duration) {
        if self.limits.max_sip_lag.is_zero() {
            return;
        }
        if self.lag_seen.is_some_and(|at| now.saturating_duration_since(at) >= LAG_INTERVAL) {
            // Nothing handled for an interval: whatever stood then, a new reading starts.
            self.lag_since = None;
            self.lag_tripped = false;
        }
        self.lag_seen = Some(now);
        if lag <= self.limits.max_sip_lag {
            self.lag_since = None;
            self.lag_tripped = false;
            return;
        }
        let Some((since, cpu_since)) = self.lag_since else {
            self.lag_since = Some((now, (self.cpu)()));
            return;
        };
        let waited = now.saturating_duration_since(since);
        if self.lag_tripped || waited < LAG_INTERVAL {
            return;
        }
        // An interval of late datagrams: the shard's own doing only if its thread was busy
        // (as for the clock: a shard the machine does not run reads late datagrams however
        // few calls it takes). If it was not, the next interval is judged afresh, so the CPU
        // clock is read at most once an interval.
        let percent = self.limits.clock_busy_percent;
        let cpu = if percent == 0 { None } else { (self.cpu)() };
        self.lag_tripped = match (percent, cpu_since, cpu) {
            (0, _, _) => true,
            (_, Some(then), Some(cpu)) => busy(cpu.saturating_sub(then), waited, percent),
            // No CPU clock: every late interval counts.
            _ => true,
        };
        if !self.lag_tripped {
            self.lag_since = Some((now, cpu));
        }
    }

    /// Whether every SIP datagram of the last [`LAG_INTERVAL`] or more waited too long, on a
    /// busy thread, and the last one was handled within an interval.
    fn lagging(&self, now: Instant) -> bool {
        self.lag_tripped
            && self.lag_seen.is_some_and(|at| now.saturating_duration_since(at) < LAG_INTERVAL)
    }

    /// Whether the current window, from its start to `now`, shows the shard's own overload:
    /// late ticks, and a busy thread.
    fn current_overloaded(&mut self, now: Instant) -> bool {
        if !self.current.late_often() {
            return false;
        }
        let percent = self.limits.clock_busy_percent;
        if percent == 0 {
            return true;
        }
        let Some((start, cpu_start)) = self.started else { return false };
        match (cpu_start, (self.cpu)()) {
            (Some(then), Some(cpu)) => {
                busy(cpu.saturating_sub(then), now.saturating_duration_since(start), percent)
            }
            // No CPU clock: every late window counts, as without the busy share.
            _ => true,
        }
    }

    /// One media-clock tick at `now` for frames due at `due`.
    pub(crate) fn on_clock_tick(&mut self, now: Instant, due: Instant) {
        self.roll(now);
        self.current.ticks += 1;
        let late = now.saturating_duration_since(due);
        if self.limits.max_clock_late.is_zero() || late <= self.limits.max_clock_late {
            return;
        }
        self.current.late += 1;
        // The current window already shows overload: no need to wait for its end. Judged at
        // late ticks only, and not while shedding, so the CPU clock is read at most once per
        // late tick (a window whose thread becomes busy later is judged when it ends).
        let shedding = self.clock_until.is_some_and(|until| until > now);
        if !shedding && self.current_overloaded(now) {
            self.clock_until = Some(now + WINDOW);
        }
    }

    /// Moves the windows on to `now`.
    fn roll(&mut self, now: Instant) {
        let Some((start, _)) = self.started else {
            self.started = Some((now, (self.cpu)()));
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < WINDOW {
            return;
        }
        // The window that just ended is judged; a gap of more than one window means
        // nothing ticked in between (no calls): nothing to judge.
        if elapsed < 2 * WINDOW && self.current_overloaded(now) {
            self.clock_until = Some(now + WINDOW);
        }
        self.current = Window::default();
        self.started = Some((now, (self.cpu)()));
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
        if self.lagging(now) {
            return Some(Overload::Lag);
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
    use std::{cell::Cell, rc::Rc};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    const LIMITS: Limits = Limits {
        max_clock_late: Duration::from_millis(10),
        clock_busy_percent: BUSY_SHARE_PERCENT,
        max_inbox_depth: 512,
        max_sip_lag: SIP_LAG,
        max_setup_depth: 64,
    };

    /// A shard's admission with a made-up CPU clock: each tick of [`ticks`] adds `busy`
    /// percent of its 5 ms to the thread's CPU time.
    struct Shard {
        a: Admission,
        cpu: Rc<Cell<Duration>>,
        busy: u32,
    }

    /// A shard idle by the made-up clock, whose admission reads `clock` instead.
    fn shard_reading(clock: CpuClock) -> Shard {
        Shard { a: Admission::new(LIMITS, clock), cpu: Rc::default(), busy: 0 }
    }

    fn shard_with(limits: Limits, busy: u32) -> Shard {
        let cpu = Rc::new(Cell::new(Duration::ZERO));
        let read = Rc::clone(&cpu);
        Shard { a: Admission::new(limits, Box::new(move || Some(read.get()))), cpu, busy }
    }

    /// A shard whose thread never runs, and how often its admission read the CPU clock.
    fn idle_counting_reads() -> (Shard, Rc<Cell<u32>>) {
        let reads = Rc::new(Cell::new(0u32));
        let counted = Rc::clone(&reads);
        let shard = shard_reading(Box::new(move || {
            counted.set(counted.get() + 1);
            Some(Duration::ZERO)
        }));
        (shard, reads)
    }

    /// A shard busy 60 % of the time: its late ticks are its own doing.
    fn admission() -> Shard {
        shard_with(LIMITS, 60)
    }

    /// `n` ticks 5 ms apart from `start` (a shard's streams spread over the clock's phases),
    /// each `late` after its grid instant; returns the last tick's instant.
    fn ticks(s: &mut Shard, start: Instant, n: u32, late: Duration) -> Instant {
        let mut t = start;
        for i in 1..=n {
            let due = start + 5 * MS * i;
            t = due + late;
            s.cpu.set(s.cpu.get() + 5 * MS * s.busy / 100);
            s.a.on_clock_tick(t, due);
        }
        t
    }

    #[test]
    fn the_setup_queue_refuses_from_its_limit_and_admits_below_it() {
        let limits = LIMITS;
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
        assert_eq!(a.a.check(t, 0, 0), None);
    }

    #[test]
    fn a_clock_late_on_more_than_one_tick_in_a_hundred_sheds_for_a_window() {
        let mut a = admission();
        let t0 = Instant::now();
        // 50 punctual ticks, then 3 late ones: 3 of 53 is over 1 %.
        let t = ticks(&mut a, t0, 50, MS);
        assert_eq!(a.a.check(t, 0, 0), None);
        let t = ticks(&mut a, t, 3, 15 * MS);
        assert_eq!(a.a.check(t, 0, 0), Some(Overload::Clock));
        // Punctual again: still shedding for a whole window...
        let t = ticks(&mut a, t, 100, MS);
        assert_eq!(a.a.check(t, 0, 0), Some(Overload::Clock));
        // ...and admitted once punctual windows have gone by.
        let t = ticks(&mut a, t, 600, MS);
        assert_eq!(a.a.check(t, 0, 0), None);
    }

    #[test]
    fn one_late_tick_among_many_is_not_overload() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 150, MS);
        let t = ticks(&mut a, t, 1, 40 * MS);
        assert_eq!(a.a.check(t, 0, 0), None);
        let t = ticks(&mut a, t, 150, MS);
        assert_eq!(a.a.check(t, 0, 0), None);
    }

    #[test]
    fn a_late_clock_on_a_mostly_idle_shard_is_the_machine_not_the_calls() {
        // Every tick 30 ms late, for three windows, on a shard busy 1 % of the time (other
        // processes hold the cores): refusing would not cure it.
        let mut a = shard_with(LIMITS, 1);
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 600, 30 * MS);
        assert_eq!(a.a.check(t, 0, 0), None);
        // The same lateness with the thread busy from the edge of the share on: shedding.
        a.busy = u32::from(BUSY_SHARE_PERCENT);
        let t = ticks(&mut a, t, 250, 30 * MS);
        assert_eq!(a.a.check(t, 0, 0), Some(Overload::Clock));
    }

    #[test]
    fn a_punctual_clock_reads_the_cpu_clock_once_a_window() {
        let (mut a, reads) = idle_counting_reads();
        // 600 ticks 5 ms apart: 3 s, three windows and the start of a fourth.
        ticks(&mut a, Instant::now(), 600, MS);
        assert!(reads.get() <= 4, "{} reads of the CPU clock", reads.get());
    }

    #[test]
    fn without_a_cpu_clock_every_late_clock_counts() {
        let mut a = shard_reading(Box::new(|| None));
        let t = ticks(&mut a, Instant::now(), 40, 30 * MS);
        assert_eq!(a.a.check(t, 0, 0), Some(Overload::Clock));
    }

    #[test]
    fn the_thread_cpu_clock_reads_and_moves_forward() {
        let first = thread_cpu_time().expect("Linux tells a thread's CPU time");
        // Work until the clock moves (its resolution is the kernel's, far under a second).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            if thread_cpu_time().unwrap() > first {
                break;
            }
            assert!(Instant::now() < deadline, "the thread's CPU clock stood still for 5 s");
        }
    }

    #[test]
    fn a_busy_share_of_zero_counts_every_late_clock() {
        let mut a = shard_with(Limits { clock_busy_percent: 0, ..LIMITS }, 0);
        let t = ticks(&mut a, Instant::now(), 40, 30 * MS);
        assert_eq!(a.a.check(t, 0, 0), Some(Overload::Clock));
    }

    #[test]
    fn the_busy_share_is_judged_over_the_window() {
        assert!(busy(250 * MS, WINDOW, 25));
        assert!(!busy(249 * MS, WINDOW, 25));
        assert!(busy(Duration::ZERO, Duration::ZERO, 25), "no time: the late ticks decide");
        assert!(!busy(Duration::ZERO, WINDOW, 25));
        assert!(busy(Duration::ZERO, WINDOW, 0), "0: every late clock counts");
    }

    #[test]
    fn few_ticks_are_not_a_measurement() {
        let mut a = admission();
        let t0 = Instant::now();
        // A shard with one call: 5 late ticks in a window of 5 decide nothing.
        let t = ticks(&mut a, t0, 5, 30 * MS);
        assert_eq!(a.a.check(t, 0, 0), None);
    }

    #[test]
    fn a_deep_inbox_refuses_at_once_and_only_while_deep() {
        let mut a = admission();
        let t = Instant::now();
        assert_eq!(a.a.check(t, 513, 0), Some(Overload::Inbox));
        assert_eq!(a.a.check(t, 512, 0), None);
    }

    #[test]
    fn a_full_socket_queue_refuses_at_once_and_only_while_full() {
        let mut a = admission();
        let t = Instant::now();
        assert_eq!(a.a.check(t, 0, SOCKET_QUEUE_PERCENT + 1), Some(Overload::Socket));
        // The socket is the first reason named (its queue is in front of the inbox).
        assert_eq!(a.a.check(t, 513, SOCKET_QUEUE_PERCENT + 1), Some(Overload::Socket));
        assert_eq!(a.a.check(t, 0, SOCKET_QUEUE_PERCENT), None);
    }

    #[test]
    fn zero_turns_the_clock_and_inbox_readings_off() {
        let mut a = shard_with(
            Limits {
                max_clock_late: Duration::ZERO,
                clock_busy_percent: 0,
                max_inbox_depth: 0,
                max_sip_lag: Duration::ZERO,
                max_setup_depth: 0,
            },
            100,
        );
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 100, 50 * MS);
        let t = datagrams(&mut a, t, 200, WINDOW);
        assert_eq!(a.a.check(t, 100_000, 0), None);
    }

    #[test]
    fn an_idle_gap_forgets_an_old_overload() {
        let mut a = admission();
        let t0 = Instant::now();
        let t = ticks(&mut a, t0, 40, 30 * MS);
        assert_eq!(a.a.check(t, 0, 0), Some(Overload::Clock));
        // No tick for 5 s (the calls ended): the old window does not count any more.
        assert_eq!(a.a.check(t + 5 * WINDOW, 0, 0), None);
    }

    /// `n` SIP datagrams handled 1 ms apart from `start`, each `lag` old, each ms adding `busy`
    /// percent of it to the thread's CPU time; the last one's instant.
    fn datagrams(s: &mut Shard, start: Instant, n: u32, lag: Duration) -> Instant {
        let mut t = start;
        for i in 0..n {
            t = start + i * MS;
            s.cpu.set(s.cpu.get() + MS * s.busy / 100);
            s.a.on_sip_lag(t, lag);
        }
        t
    }

    #[test]
    fn sip_datagrams_late_for_a_whole_interval_refuse_until_one_is_on_time() {
        let mut s = admission();
        let t0 = Instant::now();
        // Late, but not yet for an interval: a burst after a pause is not a standing queue.
        let t = datagrams(&mut s, t0, 99, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), None);
        let t = datagrams(&mut s, t + MS, 2, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), Some(Overload::Lag));
        // One datagram on time (the lag at the limit is on time) ends it at once.
        s.a.on_sip_lag(t + MS, SIP_LAG);
        assert_eq!(s.a.check(t + MS, 0, 0), None);
    }

    #[test]
    fn one_datagram_on_time_in_an_interval_is_no_standing_queue() {
        let mut s = admission();
        let t0 = Instant::now();
        // Half a second of datagrams 50 ms late on a busy thread, every 40th on time (the
        // queue drains): never refused.
        for i in 0..500u32 {
            let t = t0 + i * MS;
            s.cpu.set(s.cpu.get() + MS * s.busy / 100);
            s.a.on_sip_lag(t, if i % 40 == 0 { MS } else { 50 * MS });
            assert_eq!(s.a.check(t, 0, 0), None, "datagram {i}");
        }
        // The same thread with no datagram on time for an interval: refused.
        let t = datagrams(&mut s, t0 + 500 * MS, 101, 50 * MS);
        assert_eq!(s.a.check(t, 0, 0), Some(Overload::Lag));
    }

    #[test]
    fn late_datagrams_on_a_mostly_idle_shard_are_the_machine_not_the_calls() {
        let (mut s, reads) = idle_counting_reads();
        // A second of late datagrams on a thread that never ran: not refused, and the CPU
        // clock read about once an interval, not once a datagram.
        let t = datagrams(&mut s, Instant::now(), 1000, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), None);
        assert!(reads.get() <= 12, "{} reads of the CPU clock", reads.get());
        // The same on a thread busy from the edge of the share on: refused.
        let mut s = shard_with(LIMITS, u32::from(BUSY_SHARE_PERCENT));
        let t = datagrams(&mut s, Instant::now(), 150, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), Some(Overload::Lag));
    }

    #[test]
    fn an_old_lag_reading_on_a_quiet_shard_does_not_refuse() {
        let mut s = admission();
        let t = datagrams(&mut s, Instant::now(), 150, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), Some(Overload::Lag));
        // No datagram since: nothing says the queue still stands.
        assert_eq!(s.a.check(t + LAG_INTERVAL, 0, 0), None);
        // A late one after the quiet interval starts a new reading, which needs an interval
        // of its own.
        let t = datagrams(&mut s, t + 2 * LAG_INTERVAL, 50, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), None);
        let t = datagrams(&mut s, t + MS, 60, 3 * SIP_LAG);
        assert_eq!(s.a.check(t, 0, 0), Some(Overload::Lag));
    }
}
