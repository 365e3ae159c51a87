//! The `precall` binary as a user runs it: `--help`, bad configuration, start on embedded
//! defaults, `/health`, `/metrics`, SIGTERM, and PostgreSQL across a restart.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::{free_tcp_port, free_udp_port, pg::PgServer, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_precall");

/// A running `precall`, stopped with SIGTERM when dropped.
struct Precall {
    child: Option<Child>,
    http_port: u16,
}

impl Precall {
    fn start(env: &[(&str, String)]) -> Self {
        let http_port = free_tcp_port();
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HTTP_HOST", "127.0.0.1")
            .env("HTTP_PORT", http_port.to_string())
            .env("SIP_HOST", "127.0.0.1")
            .env("SIP_PORT", free_udp_port().to_string())
            .env("SHARDS", "2")
            .env("SHARD_PIN_CORES", "false")
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn precall");
        let p = Self { child: Some(child), http_port };
        wait_for("precall to answer /health", Duration::from_secs(30), || {
            http(p.http_port, "GET", "/health", "").ok().filter(|(status, _)| *status == 200)
        });
        p
    }

    fn get(&self, path: &str) -> (u16, String) {
        http(self.http_port, "GET", path, "").expect("HTTP request")
    }

    /// SIGTERM, then the exit status (bounded wait).
    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: the pid is our own child's, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        wait_for("precall to exit after SIGTERM", Duration::from_secs(20), || {
            child.try_wait().unwrap()
        })
    }
}

impl Drop for Precall {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {raw:?}")))?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(args).current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn help_lists_every_variable() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for var in precall::config::VARS {
        assert!(text.contains(var.name), "--help lacks {}", var.name);
    }
    assert!(text.contains("ENABLE_SIP_HANDLER") && text.contains("[5060]"), "{text}");
}

#[test]
fn bad_configuration_names_the_variable() {
    let out = run(&[], &[("HTTP_PORT", "eighty")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("HTTP_PORT") && err.contains("expected"), "{err}");

    let out = run(&["--frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serves_health_and_metrics_and_stops_on_sigterm() {
    let p = Precall::start(&[]);
    let (status, body) = p.get("/health");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"]["kind"], "memory");
    let shards = health["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    assert!(shards.iter().all(|s| s["alive"] == true), "{body}");

    let (status, metrics) = p.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("precall_calls_total{protocol=\"sip\",outcome=\"connected\"} 0"));
    assert!(metrics.contains("precall_active_calls{protocol=\"sip\",shard=\"1\"} 0"), "{metrics}");
    assert_eq!(p.get("/nope").0, 404);

    let port = p.http_port;
    let status = p.stop();
    assert!(status.success(), "precall exited with {status}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the HTTP port is closed");
}

#[test]
fn unreachable_database_stops_the_start_with_a_message() {
    let port = free_tcp_port().to_string();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/postgres");
    let out = run(
        &[],
        &[("DATABASE_URL", url.as_str()), ("HTTP_PORT", "0"), ("ENABLE_SIP_HANDLER", "false")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(!err.contains("hunter2"), "the password is never printed: {err}");
}

#[test]
fn postgres_health_reports_the_store() {
    let pg = PgServer::start();
    let p = Precall::start(&[("DATABASE_URL", pg.url())]);
    let (status, body) = p.get("/health");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["store"]["kind"], "postgres");
    assert!(p.stop().success());
}
