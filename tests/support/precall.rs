//! Runs the real `precall` binary for a test and talks HTTP to it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_tcp_port, free_udp_port, wait_for};

pub const BIN: &str = env!("CARGO_BIN_EXE_precall");

/// The environment a test's `precall` keeps although the test clears the rest: where an
/// instrumented build (`tests/coverage.sh`) writes its coverage profile.
pub fn keep_coverage_env(cmd: &mut Command) {
    if let Some(file) = std::env::var_os("LLVM_PROFILE_FILE") {
        cmd.env("LLVM_PROFILE_FILE", file);
    }
}

/// A running `precall`, stopped with SIGTERM when dropped.
pub struct Precall {
    child: Option<Child>,
    pub http_port: u16,
    /// The Twilio Media Streams port (`MEDIA_WS_PORT`).
    pub media_port: u16,
    /// The SIP port (`SIP_PORT`).
    pub sip_port: u16,
}

impl Precall {
    /// Starts on a free HTTP port.
    pub fn start(env: &[(&str, String)]) -> Self {
        Self::start_on(free_tcp_port(), env)
    }

    /// Starts with HTTP on `http_port` (other settings from `env`) and waits for `/health`.
    pub fn start_on(http_port: u16, env: &[(&str, String)]) -> Self {
        Self::spawn(http_port, env, &[200])
    }

    /// Starts on a free HTTP port and waits for `/health` to answer, whatever it says (a node
    /// whose database is down answers 503).
    pub fn start_unready(env: &[(&str, String)]) -> Self {
        Self::spawn(free_tcp_port(), env, &[200, 503])
    }

    fn spawn(http_port: u16, env: &[(&str, String)], ready: &[u16]) -> Self {
        let media_port = env
            .iter()
            .find(|(k, _)| *k == "MEDIA_WS_PORT")
            .map_or_else(free_tcp_port, |(_, v)| v.parse().expect("MEDIA_WS_PORT"));
        let sip_port = env
            .iter()
            .find(|(k, _)| *k == "SIP_PORT")
            .map_or_else(free_udp_port, |(_, v)| v.parse().expect("SIP_PORT"));
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HTTP_HOST", "127.0.0.1")
            .env("HTTP_PORT", http_port.to_string())
            .env("SIP_HOST", "127.0.0.1")
            .env("SIP_PORT", sip_port.to_string())
            .env("MEDIA_WS_PORT", media_port.to_string())
            .env("SHARDS", "2")
            .env("SHARD_PIN_CORES", "false")
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        keep_coverage_env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn precall");
        let p = Self { child: Some(child), http_port, media_port, sip_port };
        wait_for("precall to answer /health", Duration::from_secs(30), || {
            http(p.http_port, "GET", "/health", "")
                .ok()
                .filter(|(status, _)| ready.contains(status))
        });
        p
    }

    /// The process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.http_port, "GET", path, "").expect("HTTP request")
    }

    /// The value of an unlabelled metric, from `/metrics`.
    pub fn metric_line(&self, name: &str) -> Option<u64> {
        let (_, metrics) = self.get("/metrics");
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
    }

    /// The sum of one metric's samples over all its label sets, from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, metrics) = self.get("/metrics");
        metrics
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Sends SIGTERM and returns at once (a graceful stop begins).
    pub fn sigterm(&self) {
        if let Some(child) = &self.child {
            // SAFETY: the pid is our own child's, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Waits (bounded by `deadline`) for the process to exit by itself.
    pub fn wait_exit(mut self, deadline: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_for("precall to exit", deadline, || child.try_wait().unwrap())
    }

    /// SIGKILL (a node crash: nothing is handed back), then the exit status.
    pub fn kill(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        child.kill().expect("SIGKILL precall");
        child.wait().expect("reap precall")
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: the pid is our own child's, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        wait_for("precall to exit after SIGTERM", Duration::from_secs(20), || {
            child.try_wait().unwrap()
        })
    }
}

impl Drop for Precall {
    /// A graceful stop first (so an instrumented build writes its profile), a kill if it
    /// takes more than a few seconds (a test that failed may leave calls up).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: the pid is our own child's, not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while c.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::park_timeout(Duration::from_millis(20));
            }
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// The head, raw.
    pub head: String,
    /// The body.
    pub body: String,
}

/// One HTTP/1.1 request with `Connection: close` and the given extra headers.
pub fn request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    request_within(port, method, target, headers, body, Duration::from_secs(20))
}

/// [`request`], answered within `limit` (else an error).
pub fn request_within(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    limit: Duration,
) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(limit))?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    s.write_all(&out)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {raw:?}")))?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    Ok(Answer { status, head: head.to_owned(), body: body.to_owned() })
}

/// A form request; returns status and body.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let a = request(
        port,
        method,
        path,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )?;
    Ok((a.status, a.body))
}

/// `application/x-www-form-urlencoded` of `params`.
pub fn form(params: &[(&str, &str)]) -> String {
    let enc = |v: &str| -> String {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

/// A Twilio webhook as Twilio sends it: a form POST to `target` on `port`, signed with `token`
/// over `public_base` + `target`.
pub fn signed_webhook(
    port: u16,
    public_base: &str,
    token: &str,
    target: &str,
    params: &[(&str, &str)],
) -> Answer {
    let owned: Vec<(String, String)> =
        params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let sig = precall_twilio::RequestValidator::new(token)
        .compute(&format!("{public_base}{target}"), &owned);
    let headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Twilio-Signature", sig.as_str()),
    ];
    request(port, "POST", target, &headers, form(params).as_bytes()).expect("webhook")
}
