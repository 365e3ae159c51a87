//! The `precall` binary as a user runs it: `--help`, bad configuration, start on embedded
//! defaults, `/health`, `/metrics`, SIGTERM, and PostgreSQL across a restart.

mod support;

use std::net::TcpStream;
use std::process::{Command, Output};

use support::precall::{BIN, Precall};
use support::{free_tcp_port, pg::PgServer};

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
