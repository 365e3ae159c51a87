//! Shared harness of the end-to-end tests: a real PostgreSQL per test, free ports, polling
//! with deadlines.
#![allow(dead_code)]

pub mod pg;
pub mod precall;

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Ports the tests pick for their listeners: below Linux's ephemeral range (32768-60999 by
/// default), so nothing that binds port 0 or connects out (an embedded demo agent, a clip
/// fetch, SIPp) can take one between the pick and the bind. A counter spreads the picks of one
/// test binary; the process id spreads those of concurrent binaries.
const PICK_FIRST: u16 = 20_000;
const PICK_COUNT: u16 = 12_000;

fn pick(bindable: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % u32::from(PICK_COUNT)) * 7;
    for _ in 0..PICK_COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PICK_FIRST + ((offset + n) % u32::from(PICK_COUNT)) as u16;
        if bindable(port) {
            return port;
        }
    }
    panic!("no free port in {PICK_FIRST}..{}", PICK_FIRST + PICK_COUNT);
}

/// A loopback TCP port nobody listens on right now (nor on UDP, so either use is safe).
pub fn free_tcp_port() -> u16 {
    pick(|p| {
        TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
    })
}

/// A loopback UDP port nobody is bound to right now (nor listens on TCP).
pub fn free_udp_port() -> u16 {
    free_tcp_port()
}

/// The real SIPp placing `calls` calls at `rate` per second (all of them up at once at most)
/// at `target` with `scenario`, from a free loopback port, every offer's media at
/// `127.0.0.1:media_port`; stops by itself after `timeout_s` (a hung call fails). Output
/// goes nowhere but stderr, which is piped for the failure message. Add arguments, then
/// `.output()` or `.spawn()`.
pub fn sipp(
    target: &str,
    scenario: &Path,
    media_port: u16,
    calls: u32,
    rate: u32,
    timeout_s: u32,
) -> Command {
    let mut cmd = Command::new("sipp");
    cmd.arg(target)
        .arg("-sf")
        .arg(scenario)
        .args(["-i", "127.0.0.1", "-p", &free_udp_port().to_string()])
        .args(["-set", "rtp_ip", "127.0.0.1", "-set", "rtp_port", &media_port.to_string()])
        .args(["-m", &calls.to_string(), "-r", &rate.to_string(), "-l", &calls.to_string()])
        .args(["-timeout", &format!("{timeout_s}s"), "-timeout_error"])
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        // Yield the core between polls; this is a poll interval, not a wait for an outcome.
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// A 16-bit mono 8 kHz PCM WAV of `samples` (the writer the hold segments use).
pub fn wav_pcm16(samples: &[i16]) -> Vec<u8> {
    ::precall::hold_segments::wav_pcm16(samples)
}
