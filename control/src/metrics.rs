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

/// All process metrics.
#[derive(Debug)]
pub struct Metrics {
    calls_ended: [[AtomicU64; 3]; 2],
    clone_jobs: [AtomicU64; 2],
    clone_duration: Histogram,
    hold_time: Histogram,
    webhooks: [Histogram; 3],
    errors: [AtomicU64; 6],
    pushes: [AtomicU64; 3],
    /// The HTTP server's open connections (set once the server is bound).
    http_connections: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

/// The results of a live-call push, in `precall_twilio_pushes_total`'s order.
const PUSH_RESULTS: [&str; 3] = ["updated", "already_ended", "failed"];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            calls_ended: Default::default(),
            clone_jobs: Default::default(),
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

    /// Counts a live-call push by its result (`updated`, `already_ended`, `failed`).
    pub fn push(&self, result: &str) {
        if let Some(i) = PUSH_RESULTS.iter().position(|r| *r == result) {
            self.pushes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a finished clone job and its duration.
    pub fn clone_finished(&self, ok: bool, took: Duration) {
        self.clone_jobs[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        self.clone_duration.observe(took);
    }

    /// Records how long a webhook took to answer.
    pub fn webhook(&self, route: Route, took: Duration) {
        let i = ROUTES.iter().position(|(r, _)| *r == route).unwrap_or(0);
        self.webhooks[i].observe(took);
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
}
