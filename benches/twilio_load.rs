//! Twilio webhook load over real HTTP against the real `precall` binary: signed
//! `POST /twilio/voice` (a fresh CallSid each) and then signed `POST /twilio/poll` for the calls
//! created, over keep-alive HTTP/1.1 connections, first with the in-memory store, then with a
//! throwaway PostgreSQL (started like the tests start it). Prints requests, errors, requests/s
//! and latency percentiles per store and phase.
//!
//! Run: `cargo bench -p precall --bench twilio_load`
//! Knobs: `TWILIO_LOAD_SECS` (seconds per phase, default 10), `TWILIO_LOAD_CONNS` (concurrent
//! client connections, one thread each, default 32), `TWILIO_LOAD_MAX` (most requests per phase,
//! default 2 000 000), `TWILIO_LOAD_PG_POOL` (precall's `DATABASE_POOL_SIZE` in the PostgreSQL
//! run; default: precall's own default, 8).
//!
//! The load goes to 127.0.0.1 only, is bounded in time and count, and stops by itself; precall
//! gets SIGTERM at the end (and SIGKILL if the bench panics).
//!
//! precall runs with `SIMULATED_CLONE_DELAY_MS=600000` (and long hold and job timeouts), so every
//! poll takes the "still processing" path: read the call, its clone job and its profile, answer
//! hold + redirect. An answer counts as ok only when it is a 200 whose body starts with `<?xml`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use precall_twilio::RequestValidator;
use support::free_tcp_port;
use support::pg::PgServer;
use support::precall::Precall;

const TOKEN: &str = "bench-auth-token-0123456789";
/// A request that takes longer than this counts as an error (and its connection is replaced).
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Distinct error answers kept as samples per phase.
const ERROR_SAMPLES: usize = 3;

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?}: expected a number")),
        Err(_) => default,
    }
}

/// Form encoding as Twilio sends it.
fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The form Twilio posts for an inbound call (and again on the redirect to the poll URL).
fn call_params(sid: &str, status: &str) -> Vec<(String, String)> {
    [
        ("CallSid", sid),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
        ("Caller", "+12349013030"),
        ("Called", "+18005551212"),
        ("CallStatus", status),
        ("Direction", "inbound"),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// One keep-alive HTTP/1.1 connection; reconnects after an error or a `Connection: close`.
struct Client {
    port: u16,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    connects: u64,
}

/// What came back.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Client {
    fn new(port: u16) -> Self {
        Self { port, stream: None, buf: Vec::with_capacity(8192), connects: 0 }
    }

    fn connect(&mut self) -> std::io::Result<()> {
        if self.stream.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(READ_TIMEOUT))?;
            s.set_write_timeout(Some(READ_TIMEOUT))?;
            self.stream = Some(s);
            self.buf.clear();
            self.connects += 1;
        }
        Ok(())
    }

    /// Sends `req` (a complete request) and reads one response.
    fn exchange(&mut self, req: &[u8]) -> std::io::Result<Reply> {
        let r = self.try_exchange(req);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn try_exchange(&mut self, req: &[u8]) -> std::io::Result<Reply> {
        self.connect()?;
        let s = self.stream.as_mut().expect("connected");
        s.write_all(req)?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before the response head",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| std::io::Error::other("response head is not UTF-8"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
        let mut length = 0usize;
        let mut close = false;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("bad Content-Length {value:?}")))?;
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        while self.buf.len() < head_end + length {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside the response body",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        if close || self.buf.len() > head_end + length {
            // Closed by the server, or bytes nobody asked for: start over on a new connection.
            self.stream = None;
        }
        Ok(Reply { status, body })
    }
}

/// Builds a signed form POST to `target`.
fn signed_request(validator: &RequestValidator, base: &str, target: &str, sid: &str) -> Vec<u8> {
    let status = if target.starts_with("/twilio/poll") { "in-progress" } else { "ringing" };
    let params = call_params(sid, status);
    let sig = validator.compute(&format!("{base}{target}"), &params);
    let body =
        params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&");
    let mut out = format!(
        "POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Twilio-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// What one client thread saw.
#[derive(Default)]
struct ThreadResult {
    requests: u64,
    errors: u64,
    hangups: u64,
    /// Latencies of the ok answers, in nanoseconds.
    latencies: Vec<u64>,
    samples: Vec<String>,
    /// CallSids that got an ok answer to /twilio/voice.
    created: Vec<String>,
    connects: u64,
    /// The slowest ok answer: nanoseconds, and when it was sent (since the phase's start).
    slowest: (u64, Duration),
}

/// Figures of one phase.
struct PhaseResult {
    requests: u64,
    errors: u64,
    hangups: u64,
    elapsed: Duration,
    latencies: Vec<u64>,
    samples: Vec<String>,
    created: Vec<String>,
    connects: u64,
    slowest: (u64, Duration),
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Voice,
    Poll,
}

struct Load {
    port: u16,
    base: String,
    conns: usize,
    secs: u64,
    max: u64,
}

/// A run-unique CallSid prefix, so that a PostgreSQL or a node reused across runs never sees
/// a CallSid twice.
fn sid_nonce() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

impl Load {
    fn run(&self, phase: Phase, sids: &Arc<Vec<String>>) -> PhaseResult {
        let budget = Arc::new(AtomicU64::new(self.max));
        let seq = Arc::new(AtomicU64::new(0));
        let nonce = sid_nonce();
        let start_line = Arc::new(Barrier::new(self.conns + 1));
        let deadline_slot = Arc::new(std::sync::OnceLock::<Instant>::new());
        let mut handles = Vec::with_capacity(self.conns);
        for t in 0..self.conns {
            let (budget, seq, start_line, deadline_slot, sids) = (
                budget.clone(),
                seq.clone(),
                start_line.clone(),
                deadline_slot.clone(),
                sids.clone(),
            );
            let (port, base, stride, secs) = (self.port, self.base.clone(), self.conns, self.secs);
            handles.push(std::thread::spawn(move || {
                let validator = RequestValidator::new(TOKEN);
                let mut client = Client::new(port);
                let _ = client.connect();
                let mut r =
                    ThreadResult { latencies: Vec::with_capacity(1 << 16), ..Default::default() };
                start_line.wait();
                let deadline = *deadline_slot.get().expect("deadline set before the start");
                let phase_start = deadline - Duration::from_secs(secs);
                let mut i = t;
                while Instant::now() < deadline {
                    if budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                        .is_err()
                    {
                        break;
                    }
                    let (sid, target) = match phase {
                        Phase::Voice => {
                            let n = seq.fetch_add(1, Ordering::Relaxed);
                            (format!("CA{nonce:016x}{n:016x}"), "/twilio/voice".to_owned())
                        }
                        Phase::Poll => {
                            let sid = sids[i % sids.len()].clone();
                            // Client t polls sids t, t + conns, t + 2·conns, … (wrapping).
                            i += stride;
                            let target = format!("/twilio/poll?call_id={sid}");
                            (sid, target)
                        }
                    };
                    let req = signed_request(&validator, &base, &target, &sid);
                    let sent = Instant::now();
                    let reply = client.exchange(&req);
                    let took = sent.elapsed();
                    r.requests += 1;
                    match reply {
                        Ok(a) if a.status == 200 && a.body.starts_with(b"<?xml") => {
                            let ns = took.as_nanos() as u64;
                            r.latencies.push(ns);
                            if ns > r.slowest.0 {
                                r.slowest = (ns, sent.duration_since(phase_start));
                            }
                            if find(&a.body, b"<Hangup").is_some() {
                                r.hangups += 1;
                            }
                            if phase == Phase::Voice {
                                r.created.push(sid);
                            }
                        }
                        Ok(a) => {
                            r.errors += 1;
                            if r.samples.len() < ERROR_SAMPLES {
                                let body = String::from_utf8_lossy(&a.body);
                                r.samples.push(format!(
                                    "{} {}",
                                    a.status,
                                    body.chars().take(120).collect::<String>().trim_end()
                                ));
                            }
                        }
                        Err(e) => {
                            r.errors += 1;
                            if r.samples.len() < ERROR_SAMPLES {
                                r.samples.push(format!("I/O: {e}"));
                            }
                        }
                    }
                }
                r.connects = client.connects;
                r
            }));
        }
        // Every client is connected; the clock starts now.
        let started = Instant::now();
        deadline_slot.set(started + Duration::from_secs(self.secs)).expect("set once");
        start_line.wait();
        let mut out = PhaseResult {
            requests: 0,
            errors: 0,
            hangups: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            samples: Vec::new(),
            created: Vec::new(),
            connects: 0,
            slowest: (0, Duration::ZERO),
        };
        for h in handles {
            let r = h.join().expect("client thread");
            out.requests += r.requests;
            out.errors += r.errors;
            out.hangups += r.hangups;
            out.latencies.extend(r.latencies);
            for s in r.samples {
                if out.samples.len() < ERROR_SAMPLES && !out.samples.contains(&s) {
                    out.samples.push(s);
                }
            }
            out.created.extend(r.created);
            out.connects += r.connects;
            if r.slowest.0 > out.slowest.0 {
                out.slowest = r.slowest;
            }
        }
        out.elapsed = started.elapsed();
        out.latencies.sort_unstable();
        out
    }
}

fn fmt_ns(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{:.0}µs", ns as f64 / 1e3)
    } else {
        format!("{:.2}ms", ns as f64 / 1e6)
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[allow(clippy::print_stdout)] // a benchmark's report is its stdout
fn report(name: &str, r: &PhaseResult) {
    let ok = r.requests - r.errors;
    let secs = r.elapsed.as_secs_f64();
    println!(
        "  {name}: requests {} ok {ok} errors {} in {secs:.2}s → {:.0} ok/s",
        r.requests,
        r.errors,
        ok as f64 / secs
    );
    println!(
        "    latency (ok answers): p50 {}  p99 {}  p99.9 {}  max {} (sent at +{:.2}s)",
        fmt_ns(percentile(&r.latencies, 0.50)),
        fmt_ns(percentile(&r.latencies, 0.99)),
        fmt_ns(percentile(&r.latencies, 0.999)),
        fmt_ns(r.slowest.0),
        r.slowest.1.as_secs_f64(),
    );
    println!("    connections opened: {}, hang-up answers: {}", r.connects, r.hangups);
    for s in &r.samples {
        println!("    error sample: {s}");
    }
}

/// The server's own view after a store's run: non-zero error counters and mean webhook time.
#[allow(clippy::print_stdout)] // a benchmark's report is its stdout
fn server_view(p: &Precall) {
    let (status, text) = p.get("/metrics");
    if status != 200 {
        println!("    /metrics answered {status}");
        return;
    }
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    for line in text.lines().filter(|l| l.starts_with("precall_errors_total{")) {
        if value(line).unwrap_or(0.0) > 0.0 {
            println!("    server: {line}");
        }
    }
    for route in ["voice", "poll"] {
        let find_metric = |suffix: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!("precall_webhook_seconds_{suffix}{{route=\"{route}\""))
                })
                .and_then(value)
        };
        if let (Some(sum), Some(count)) = (find_metric("sum"), find_metric("count")) {
            if count > 0.0 {
                println!(
                    "    server: /twilio/{route} handler mean {} over {count:.0} requests",
                    fmt_ns((sum / count * 1e9) as u64)
                );
            }
        }
    }
}

#[allow(clippy::print_stdout)] // a benchmark's report is its stdout
fn bench_store(name: &str, database_url: Option<String>, conns: usize, secs: u64, max: u64) {
    let port = free_tcp_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut env: Vec<(&str, String)> = vec![
        ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
        ("PUBLIC_BASE_URL", base.clone()),
        ("ENABLE_SIP_HANDLER", "false".to_owned()),
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
        ("MAX_HOLD_MS", "3600000".to_owned()),
        ("CLONE_JOB_TIMEOUT_MS", "3600000".to_owned()),
        ("LOG_LEVEL", "warn".to_owned()),
        // The figures in docs/PERFORMANCE.md are of the poll flow's webhooks.
        ("TWILIO_HOLD_MODE", "poll".to_owned()),
        ("TWILIO_PUSH", "false".to_owned()),
    ];
    if let Some(url) = database_url {
        env.push(("DATABASE_URL", url));
        if let Ok(pool) = std::env::var("TWILIO_LOAD_PG_POOL") {
            env.push(("DATABASE_POOL_SIZE", pool));
        }
    }
    let precall = Precall::start_on(port, &env);
    println!("{name} store: {conns} keep-alive connections, {secs}s per phase");
    let load = Load { port, base, conns, secs, max };
    let voice = load.run(Phase::Voice, &Arc::new(Vec::new()));
    report("POST /twilio/voice (fresh CallSid each)", &voice);
    if voice.created.is_empty() {
        println!("  no call was created; skipping the poll phase");
    } else {
        let calls = voice.created.len();
        let poll = load.run(Phase::Poll, &Arc::new(voice.created));
        report(&format!("POST /twilio/poll (over the {calls} calls created)"), &poll);
    }
    server_view(&precall);
    let status = precall.stop();
    println!("  precall exited after SIGTERM: {status}");
}

#[allow(clippy::print_stdout)] // a benchmark's report is its stdout
fn main() {
    // `cargo bench` passes `--bench`; any filter argument is ignored: this bench runs whole.
    let secs = env_num("TWILIO_LOAD_SECS", 10).max(1);
    let conns = env_num("TWILIO_LOAD_CONNS", 32).clamp(1, 1024) as usize;
    let max = env_num("TWILIO_LOAD_MAX", 2_000_000).max(1);
    println!(
        "twilio_load: signed webhooks over loopback HTTP/1.1 keep-alive; precall with \
         SIMULATED_CLONE_DELAY_MS=600000 (polls stay in the processing path), LOG_LEVEL=warn"
    );
    bench_store("in-memory", None, conns, secs, max);
    let pg = PgServer::start();
    let pool = std::env::var("TWILIO_LOAD_PG_POOL").unwrap_or_else(|_| "8 (default)".to_owned());
    let name = format!("PostgreSQL (throwaway, fsync=off; DATABASE_POOL_SIZE {pool})");
    bench_store(&name, Some(pg.url()), conns, secs, max);
    drop(pg);
}
