//! Process metrics, rendered as Prometheus text by `/metrics`.
//!
//! Plain atomics: the control plane updates them from the side runtime and HTTP coroutines,
//! and a scrape reads them without a lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use precall_api::Protocol;
use precall_controller::CallRecord;

/// A histogram with fixed buckets (upper bounds in seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

const CLONE_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];
const HOLD_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0];

const WEBHOOK_BUCKETS: &[f64] =
    &[0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A Twilio webhook route, for `precall_webhook_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/twilio/voice`.
    Voice,
    /// `/twilio/poll`.
    Poll,
    /// `/twilio/status`.
    Status,
}

const ROUTES: [(Route, &str); 3] =
    [(Route::Voice, "voice"), (Route::Poll, "poll"), (Route::Status, "status")];

/// Kinds of errors counted in `precall_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Missing or invalid Twilio signature (403).
    Signature,
    /// Malformed request (400).
    BadRequest,
    /// The controller's queue was full (503).
    Overloaded,
    /// The controller did not answer in time.
    Timeout,
    /// The store failed.
    Store,
    /// A request named a call precall does not know.
    UnknownCall,
}

const ERROR_KINDS: [(ErrorKind, &str); 6] = [
    (ErrorKind::Signature, "signature"),
    (ErrorKind::BadRequest, "bad_request"),
    (ErrorKind::Overloaded, "overloaded"),
    (ErrorKind::Timeout, "timeout"),
    (ErrorKind::Store, "store"),
    (ErrorKind::UnknownCall, "unknown_call"),
];

/// How a call ended, for `precall_calls_total`.
const OUTCOMES: [&str; 3] = ["connected", "failed", "abandoned"];
const PROTOCOLS: [Protocol; 2] = [Protocol::Twilio, Protocol::Sip];

/// Why this node deleted a voice at the provider, for `precall_voices_deleted_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoiceDeletion {
    /// New samples (or a removed profile) left it unused (`CLONE_DELETE_REPLACED`).
    Replaced,
    /// The voice library was full (`voice_limit_reached`): the oldest unused voice went.
    Slot,
    /// Another node's run of the same job was recorded first: this run's voice is a spare.
    Duplicate,
}

/// The results of a voice check, in `precall_voice_checks_total`'s order.
const VOICE_CHECKS: [&str; 3] = ["usable", "gone", "error"];

const DELETIONS: [(VoiceDeletion, &str); 3] = [
    (VoiceDeletion::Replaced, "replaced"),
    (VoiceDeletion::Slot, "slot"),
    (VoiceDeletion::Duplicate, "duplicate"),
];

/// A sample set whose last clone failed, as this node saw it: new calls of the profile get
/// the error message until `retry_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneBackoff {
    /// The job's failure reason.
    pub reason: String,
    /// Whether it is permanent (bad key, quota, full voice library, rejected samples).
    pub permanent: bool,
    /// When the next call may try again.
    pub retry_at: precall_api::Timestamp,
}

/// Reads a connection pool's use: (open, in use, maximum).
pub struct PoolProbe(pub Box<dyn Fn() -> (usize, usize, usize) + Send + Sync>);

impl std::fmt::Debug for PoolProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolProbe")
    }
}

/// All process metrics.
#[derive(Debug)]
pub struct Metrics {
    calls_ended: [[AtomicU64; 3]; 2],
    clone_jobs: [AtomicU64; 2],
    /// Failed clone jobs by kind: transient, permanent.
    clone_failures: [AtomicU64; 2],
    clone_running: AtomicU64,
    clone_takeovers: AtomicU64,
    clone_leases_lost: AtomicU64,
    calls_forgotten: AtomicU64,
    journal_len: AtomicU64,
    journal_replayed: AtomicU64,
    voices_deleted: [AtomicU64; 3],
    /// Checks of reused voices: usable, gone, error.
    voice_checks: [AtomicU64; 3],
    /// Profiles whose clone is backing off after a failure, by profile id.
    backoffs: std::sync::Mutex<std::collections::BTreeMap<String, CloneBackoff>>,
    clone_duration: Histogram,
    hold_time: Histogram,
    webhooks: [Histogram; 3],
    errors: [AtomicU64; 6],
    pushes: [AtomicU64; 3],
    /// Reads the database pool's use (open, in use, maximum), with PostgreSQL.
    pool: std::sync::OnceLock<PoolProbe>,
    /// The HTTP server's open connections (set once the server is bound).
    http_connections: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    /// Twilio calls this node holds in poll mode (TwiML hold, no media on a shard).
    twilio_holds: TwilioHolds,
}

/// How long past twice the poll interval a held Twilio call stays counted without a poll.
const HOLD_GAUGE_SLACK: Duration = Duration::from_secs(15);

/// Twilio calls on hold in poll mode, as this node last answered them: each hold answer
/// counts the call until its next poll is due (plus slack), so a call whose caller hung up,
/// or whose next poll went to another node, drops out by itself, and nothing drifts.
#[derive(Debug, Default)]
struct TwilioHolds {
    inner: std::sync::Mutex<HoldsInner>,
}

#[derive(Debug, Default)]
struct HoldsInner {
    until: std::collections::HashMap<precall_api::CallId, std::time::Instant>,
    /// Entries after the last sweep of lapsed ones: the next sweep comes at twice this.
    swept_at: usize,
}

impl TwilioHolds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldsInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hold(&self, call_id: &precall_api::CallId, until: std::time::Instant) {
        let mut h = self.lock();
        h.until.insert(call_id.clone(), until);
        // Amortized: a sweep every time the map doubles, so memory follows the live count.
        if h.until.len() > (2 * h.swept_at).max(1024) {
            let now = std::time::Instant::now();
            h.until.retain(|_, t| *t > now);
            h.swept_at = h.until.len();
        }
    }

    fn leave(&self, call_id: &precall_api::CallId) {
        self.lock().until.remove(call_id);
    }

    fn count(&self) -> usize {
        let now = std::time::Instant::now();
        let mut h = self.lock();
        h.until.retain(|_, t| *t > now);
        h.swept_at = h.until.len();
        h.until.len()
    }
}

/// The results of a live-call push, in `precall_twilio_pushes_total`'s order.
const PUSH_RESULTS: [&str; 3] = ["updated", "already_ended", "failed"];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            calls_ended: Default::default(),
            clone_jobs: Default::default(),
            clone_failures: Default::default(),
            clone_running: AtomicU64::new(0),
            clone_takeovers: AtomicU64::new(0),
            clone_leases_lost: AtomicU64::new(0),
            calls_forgotten: AtomicU64::new(0),
            journal_len: AtomicU64::new(0),
            journal_replayed: AtomicU64::new(0),
            voices_deleted: Default::default(),
            voice_checks: Default::default(),
            backoffs: std::sync::Mutex::default(),
            clone_duration: Histogram::new(CLONE_BUCKETS),
            hold_time: Histogram::new(HOLD_BUCKETS),
            webhooks: [
                Histogram::new(WEBHOOK_BUCKETS),
                Histogram::new(WEBHOOK_BUCKETS),
                Histogram::new(WEBHOOK_BUCKETS),
            ],
            errors: Default::default(),
            pushes: Default::default(),
            http_connections: std::sync::OnceLock::new(),
            pool: std::sync::OnceLock::new(),
            twilio_holds: TwilioHolds::default(),
        }
    }
}

fn protocol_index(p: Protocol) -> usize {
    match p {
        Protocol::Twilio => 0,
        Protocol::Sip => 1,
    }
}

impl Metrics {
    /// Counts an ended call by protocol and outcome, and its hold time.
    pub fn call_ended(&self, rec: &CallRecord) {
        let outcome = if rec.connected_at.is_some() {
            0
        } else if rec.failure.is_some() {
            1
        } else {
            2
        };
        self.calls_ended[protocol_index(rec.protocol)][outcome].fetch_add(1, Ordering::Relaxed);
        if let Some(end) = rec.connected_at.or(rec.ended_at) {
            self.hold_time.observe(end.since(rec.started_at));
        }
    }

    /// A Twilio call was answered hold in poll mode; its next poll is due within `next`.
    pub fn twilio_holding(&self, call_id: &precall_api::CallId, next: Duration) {
        // Slack for what plays before the redirect besides a poll's segment (the greeting of
        // the first answer, a hold clip not cut into segments), Twilio's fetches, a late poll.
        let slack = next.saturating_mul(2).saturating_add(HOLD_GAUGE_SLACK);
        let now = std::time::Instant::now();
        let until = now.checked_add(slack).unwrap_or(now + HOLD_GAUGE_SLACK);
        self.twilio_holds.hold(call_id, until);
    }

    /// A Twilio call left poll-mode hold here (connected to a stream, hung up, ended).
    pub fn twilio_left_hold(&self, call_id: &precall_api::CallId) {
        self.twilio_holds.leave(call_id);
    }

    /// Twilio calls this node holds in poll mode now.
    pub fn twilio_holding_now(&self) -> usize {
        self.twilio_holds.count()
    }

    /// Counts a live-call push by its result (`updated`, `already_ended`, `failed`).
    pub fn push(&self, result: &str) {
        if let Some(i) = PUSH_RESULTS.iter().position(|r| *r == result) {
            self.pushes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a finished clone job and its duration; `failed` tells whether (and how) it
    /// failed.
    pub fn clone_finished(&self, failed: Option<bool>, took: Duration) {
        self.clone_jobs[usize::from(failed.is_some())].fetch_add(1, Ordering::Relaxed);
        if let Some(permanent) = failed {
            self.clone_failures[usize::from(permanent)].fetch_add(1, Ordering::Relaxed);
        }
        self.clone_duration.observe(took);
    }

    /// A clone job started running on this node (`false`: it stopped).
    pub fn clone_running(&self, started: bool) {
        if started {
            self.clone_running.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self
                .clone_running
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        }
    }

    /// Clone jobs running on this node now.
    pub fn clones_running(&self) -> u64 {
        self.clone_running.load(Ordering::Relaxed)
    }

    /// This node took over a job whose node's lease lapsed.
    pub fn clone_taken_over(&self) {
        self.clone_takeovers.fetch_add(1, Ordering::Relaxed);
    }

    /// This node lost the lease of a job it ran (another node took it over).
    pub fn clone_lease_lost(&self) {
        self.clone_leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts call records deleted for their age (`CALL_RETENTION_DAYS`).
    pub fn calls_forgotten(&self, n: usize) {
        self.calls_forgotten.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The journal's size now.
    pub fn journal_len(&self, n: usize) {
        self.journal_len.store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A journaled entry reached the store.
    pub fn journal_replayed(&self) {
        self.journal_replayed.fetch_add(1, Ordering::Relaxed);
    }

    /// This node deleted a voice at the provider.
    pub fn voice_deleted(&self, why: VoiceDeletion) {
        let i = DELETIONS.iter().position(|(w, _)| *w == why).unwrap_or(0);
        self.voices_deleted[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a check of a reused voice: `usable`, `gone` (or unusable), or `error`.
    pub fn voice_check(&self, result: &str) {
        if let Some(i) = VOICE_CHECKS.iter().position(|r| *r == result) {
            self.voice_checks[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lock_backoffs(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, CloneBackoff>> {
        // Each change is one insert or remove: a poisoned map is still consistent.
        self.backoffs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A profile's clone failed and backs off (`None`: it completed, the backoff is over).
    pub fn clone_backoff(&self, profile: &str, backoff: Option<CloneBackoff>) {
        let mut map = self.lock_backoffs();
        match backoff {
            Some(b) => map.insert(profile.to_owned(), b),
            None => map.remove(profile),
        };
    }

    /// The profiles backing off at `now`, by profile id (expired ones are dropped).
    pub fn clone_backoffs(&self, now: precall_api::Timestamp) -> Vec<(String, CloneBackoff)> {
        let mut map = self.lock_backoffs();
        map.retain(|_, b| b.retry_at > now);
        map.iter().map(|(p, b)| (p.clone(), b.clone())).collect()
    }

    /// Records how long a webhook took to answer.
    pub fn webhook(&self, route: Route, took: Duration) {
        let i = ROUTES.iter().position(|(r, _)| *r == route).unwrap_or(0);
        self.webhooks[i].observe(took);
    }

    /// Reads the database pool for `precall_db_connections`.
    pub fn watch_pool(&self, probe: PoolProbe) {
        let _ = self.pool.set(probe);
    }

    /// Reads the HTTP server's open-connection count for `precall_http_connections`.
    pub fn watch_http_connections(&self, open: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let _ = self.http_connections.set(open);
    }

    /// Counts an error.
    pub fn error(&self, kind: ErrorKind) {
        let i = ERROR_KINDS.iter().position(|(k, _)| *k == kind).unwrap_or(0);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Appends this registry in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP precall_calls_total Calls that ended, by protocol and outcome.\n");
        out.push_str("# TYPE precall_calls_total counter\n");
        for p in PROTOCOLS {
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                let n = self.calls_ended[protocol_index(p)][i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "precall_calls_total{{protocol=\"{p}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP precall_clone_jobs_total Clone jobs this node ran, by result.\n");
        out.push_str("# TYPE precall_clone_jobs_total counter\n");
        for (i, result) in ["completed", "failed"].iter().enumerate() {
            let n = self.clone_jobs[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "precall_clone_jobs_total{{result=\"{result}\"}} {n}");
        }
        out.push_str("# HELP precall_clone_failures_total Failed clone jobs this node ran, by kind (permanent: bad key, quota, full voice library, rejected samples; they back off for CLONE_RETRY_PERMANENT_MS).\n");
        out.push_str("# TYPE precall_clone_failures_total counter\n");
        for (i, kind) in ["transient", "permanent"].iter().enumerate() {
            let n = self.clone_failures[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "precall_clone_failures_total{{kind=\"{kind}\"}} {n}");
        }
        let counters = [
            (
                "precall_clone_jobs_running",
                "gauge",
                "Clone jobs running on this node now (each under a lease it renews).",
                &self.clone_running,
            ),
            (
                "precall_clone_takeovers_total",
                "counter",
                "Clone jobs this node took over after their node's lease lapsed (it died or stopped).",
                &self.clone_takeovers,
            ),
            (
                "precall_clone_leases_lost_total",
                "counter",
                "Clone jobs this node stopped because another node took them over (its lease lapsed: the database was away too long).",
                &self.clone_leases_lost,
            ),
            (
                "precall_calls_forgotten_total",
                "counter",
                "Call records (and their events) this node deleted for their age (CALL_RETENTION_DAYS; in memory also calls that never got an end).",
                &self.calls_forgotten,
            ),
            (
                "precall_journal_entries",
                "gauge",
                "Calls, ends and events this node answered during a store outage and keeps, in order, until the store takes them (at most 100,000).",
                &self.journal_len,
            ),
            (
                "precall_journal_replayed_total",
                "counter",
                "Journaled entries the store took once it was back.",
                &self.journal_replayed,
            ),
        ];
        for (name, kind, help, n) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", n.load(Ordering::Relaxed));
        }
        out.push_str("# HELP precall_voices_deleted_total Voices this node deleted at the provider, by why.\n");
        out.push_str("# TYPE precall_voices_deleted_total counter\n");
        for ((_, why), n) in DELETIONS.iter().zip(&self.voices_deleted) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(out, "precall_voices_deleted_total{{why=\"{why}\"}} {n}");
        }
        out.push_str("# HELP precall_voice_checks_total Reused voices confirmed at the provider before a call (CLONE_VERIFY_AFTER_MS), by result (error: the check failed and the call went on).\n");
        out.push_str("# TYPE precall_voice_checks_total counter\n");
        for (result, n) in VOICE_CHECKS.iter().zip(&self.voice_checks) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(out, "precall_voice_checks_total{{result=\"{result}\"}} {n}");
        }
        out.push_str("# HELP precall_clone_backoff Profiles whose last clone failed and whose new calls get the error message until the backoff ends (1), by kind; the reason is in /health.\n");
        out.push_str("# TYPE precall_clone_backoff gauge\n");
        for (profile, b) in self.clone_backoffs(precall_api::Timestamp::now()) {
            let kind = if b.permanent { "permanent" } else { "transient" };
            let _ = writeln!(
                out,
                "precall_clone_backoff{{profile=\"{}\",kind=\"{kind}\"}} 1",
                label_value(&profile)
            );
        }
        out.push_str("# HELP precall_twilio_pushes_total Live-call pushes to Twilio's REST API (poll hold mode), by result.\n");
        out.push_str("# TYPE precall_twilio_pushes_total counter\n");
        for (i, result) in PUSH_RESULTS.iter().enumerate() {
            let n = self.pushes[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "precall_twilio_pushes_total{{result=\"{result}\"}} {n}");
        }
        out.push_str("# HELP precall_clone_duration_seconds Time from clone start to result.\n");
        out.push_str("# TYPE precall_clone_duration_seconds histogram\n");
        self.clone_duration.render(out, "precall_clone_duration_seconds", "");
        out.push_str("# HELP precall_hold_seconds Time callers spent on hold.\n");
        out.push_str("# TYPE precall_hold_seconds histogram\n");
        self.hold_time.render(out, "precall_hold_seconds", "");
        out.push_str("# HELP precall_webhook_seconds Time to answer a Twilio webhook.\n");
        out.push_str("# TYPE precall_webhook_seconds histogram\n");
        for ((_, name), h) in ROUTES.iter().zip(&self.webhooks) {
            h.render(out, "precall_webhook_seconds", &format!("route=\"{name}\""));
        }
        if let Some(open) = self.http_connections.get() {
            out.push_str("# HELP precall_http_connections HTTP connections open now (HTTP_MAX_CONNECTIONS caps them).\n");
            out.push_str("# TYPE precall_http_connections gauge\n");
            let _ = writeln!(out, "precall_http_connections {}", open.load(Ordering::Relaxed));
        }
        if let Some(probe) = self.pool.get() {
            let (open, busy, max) = (probe.0)();
            out.push_str("# HELP precall_db_connections PostgreSQL pool connections: open, in use, and the most it opens (DATABASE_POOL_SIZE).\n");
            out.push_str("# TYPE precall_db_connections gauge\n");
            for (state, n) in [("open", open), ("in_use", busy), ("max", max)] {
                let _ = writeln!(out, "precall_db_connections{{state=\"{state}\"}} {n}");
            }
        }
        out.push_str("# HELP precall_errors_total Errors answered, by kind.\n");
        out.push_str("# TYPE precall_errors_total counter\n");
        for ((_, name), n) in ERROR_KINDS.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "precall_errors_total{{kind=\"{name}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 5.0]);
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(3));
        h.observe(Duration::from_secs(9));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 12.5\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("x\ny"), "x\\ny");
    }

    #[test]
    fn backoffs_expire_and_clear() {
        let m = Metrics::default();
        let b = |until, permanent| CloneBackoff {
            reason: "r".into(),
            permanent,
            retry_at: precall_api::Timestamp(until),
        };
        m.clone_backoff("a", Some(b(100, true)));
        m.clone_backoff("b", Some(b(200, false)));
        let names = |now| {
            m.clone_backoffs(precall_api::Timestamp(now))
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(99), ["a", "b"]);
        assert_eq!(names(100), ["b"], "a backoff ends at its retry_at");
        m.clone_backoff("b", None);
        assert!(names(0).is_empty(), "a completed clone clears it");
    }
}
