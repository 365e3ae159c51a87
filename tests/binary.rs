//! The `precall` binary as a user runs it: `--help`, bad configuration, start on embedded
//! defaults, `/health`, `/metrics`, SIGTERM, and PostgreSQL across a restart.

mod support;

use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use support::pg::PgServer;
use support::precall::{BIN, Precall, keep_coverage_env};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(args).current_dir(std::env::temp_dir());
    keep_coverage_env(&mut cmd);
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
    // The scrape's own connection is open while it is answered.
    assert!(p.metric_line("precall_http_connections").is_some_and(|n| n >= 1), "{metrics}");
    assert_eq!(p.get("/nope").0, 404);
    let clip =
        support::precall::request(p.http_port, "GET", "/audio/greeting.wav", &[], b"").unwrap();
    assert_eq!(clip.status, 200);
    assert!(clip.head.to_ascii_lowercase().contains("content-type: audio/wav"), "{}", clip.head);
    assert!(clip.body.starts_with("RIFF"));
    assert_eq!(p.get("/audio/missing.wav").0, 404);

    let port = p.http_port;
    let status = p.stop();
    assert!(status.success(), "precall exited with {status}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the HTTP port is closed");
}

#[test]
fn a_node_started_while_its_database_is_down_waits_for_it() {
    let mut pg = PgServer::start();
    let url = pg.url();
    pg.stop();
    let p = Precall::start_unready(&[
        ("DATABASE_URL", url.clone()),
        ("ENABLE_SIP_HANDLER", "false".into()),
    ]);
    let (status, body) = p.get("/health");
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["store"]["kind"], "postgres");
    assert_eq!(health["store"]["ok"], false);
    let why = health["store"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("unavailable"), "{body}");
    assert!(!body.contains("hunter2") && !body.contains("password"), "{body}");

    // The database comes up: the node finds it, migrates, and serves.
    pg.restart();
    support::wait_for("the node to reach its database", Duration::from_secs(30), || {
        (p.get("/health").0 == 200).then_some(())
    });
    assert!(p.stop().success());
}

#[test]
fn a_database_that_refuses_the_node_stops_the_start_with_a_message() {
    let pg = PgServer::start();
    // A user the server does not know: not "down", a mistake to fix.
    let url = format!("postgres://nobody:hunter2@127.0.0.1:{}/postgres", pg.port());
    let out = run(
        &[],
        &[("DATABASE_URL", url.as_str()), ("HTTP_PORT", "0"), ("ENABLE_SIP_HANDLER", "false")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("the store refused to start"), "{err}");
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

#[test]
fn health_is_503_while_the_database_is_down() {
    let pg = PgServer::start();
    let p = Precall::start(&[("DATABASE_URL", pg.url())]);
    drop(pg);
    let body =
        support::wait_for("/health to report the store down", Duration::from_secs(30), || {
            let (status, body) = p.get("/health");
            (status == 503).then_some(body)
        });
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unavailable");
    assert_eq!(health["store"]["ok"], false);
    assert!(health["store"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    // The process itself keeps serving.
    assert_eq!(p.get("/metrics").0, 200);
    assert!(p.stop().success());
}

#[test]
fn the_readme_documents_every_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md at the workspace root");
    for var in precall::config::VARS {
        let row = format!("| `{}` | `{}` |", var.name, var.default);
        assert!(readme.contains(&row), "README's configuration table lacks {row}");
    }
}

#[test]
fn a_second_instance_on_the_same_ports_refuses_to_start() {
    let first = Precall::start(&[("SIMULATED_CLONE_DELAY_MS", "0".to_owned())]);
    let (sip, media) = (first.sip_port, first.media_port);
    for (var, port) in [("HTTP_PORT", first.http_port), ("MEDIA_WS_PORT", media), ("SIP_PORT", sip)]
    {
        let mut env = vec![
            ("HTTP_HOST", "127.0.0.1".to_owned()),
            ("SIP_HOST", "127.0.0.1".to_owned()),
            ("HTTP_PORT", support::free_tcp_port().to_string()),
            ("MEDIA_WS_PORT", support::free_tcp_port().to_string()),
            ("SIP_PORT", support::free_udp_port().to_string()),
            ("SHARD_PIN_CORES", "false".to_owned()),
        ];
        env.retain(|(k, _)| *k != var);
        env.push((var, port.to_string()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run(&[], &env);
        assert_eq!(out.status.code(), Some(1), "{var}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var) && err.contains("already in use"), "{var}: {err}");
    }
    // The first one never noticed.
    assert_eq!(first.get("/health").0, 200);
}

#[test]
fn call_records_past_their_retention_are_deleted() {
    let pg = PgServer::start();
    let url = pg.url();
    // A first start migrates the database.
    drop(Precall::start(&[("DATABASE_URL", url.clone())]));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let count = |sql: &str| pg.count(sql);
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "INSERT INTO calls (call_id, protocol, caller_number, recipient_number, profile_id, \
                 status, started_at, ended_at) VALUES \
                 ('CA-31-days', 'twilio', '+1555', '+1800', 'default', 'ended', \
                  now() - interval '31 days', now() - interval '31 days'), \
                 ('CA-29-days', 'twilio', '+1555', '+1800', 'default', 'ended', \
                  now() - interval '29 days', now() - interval '29 days'); \
                 INSERT INTO call_events (call_id, at, kind) VALUES \
                 ('CA-31-days', now() - interval '31 days', 'inbound'), \
                 ('CA-29-days', now() - interval '29 days', 'inbound');",
            )
            .await
            .unwrap();
    });
    // The default CALL_RETENTION_DAYS is 30; the first sweep runs at start.
    let p = Precall::start(&[("DATABASE_URL", url.clone())]);
    support::wait_for("the 31-day-old call to go", Duration::from_secs(30), || {
        (count("SELECT count(*) FROM calls WHERE call_id = 'CA-31-days'") == 0).then_some(())
    });
    assert_eq!(count("SELECT count(*) FROM call_events WHERE call_id = 'CA-31-days'"), 0);
    assert_eq!(count("SELECT count(*) FROM calls WHERE call_id = 'CA-29-days'"), 1);
    assert_eq!(count("SELECT count(*) FROM call_events WHERE call_id = 'CA-29-days'"), 1);
    assert_eq!(p.metric_line("precall_calls_forgotten_total"), Some(1));
}

#[test]
fn metrics_can_have_a_listener_of_their_own() {
    let port = support::free_tcp_port();
    let p = Precall::start(&[("METRICS_ADDR", format!("127.0.0.1:{port}"))]);
    let (status, body) = support::precall::http(port, "GET", "/metrics", "").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("precall_calls_total"), "{body}");
    assert_eq!(support::precall::http(port, "GET", "/health", "").unwrap().0, 200);
    assert_eq!(support::precall::http(port, "POST", "/twilio/voice", "").unwrap().0, 404);
    // The control plane's port keeps /health for the load balancer, not the metrics.
    assert_eq!(p.get("/metrics").0, 404);
    assert_eq!(p.get("/health").0, 200);
    assert!(p.stop().success());
}
