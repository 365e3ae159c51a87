//! The engine with real shards and real sockets on 127.0.0.1. Nothing sleeps to wait: each
//! wait polls a condition until a deadline.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use std::sync::Arc;

use precall_api::{CallContext, CallId, ControlError, MediaEventKind};
use precall_engine::{
    Engine, EngineConfig, EngineError, PlanReply, SendError, ShardControl, ShardMsg,
};

const DEADLINE: Duration = Duration::from_secs(10);

/// These tests place no calls: a control plane that refuses them is enough.
#[derive(Debug)]
struct NoControl;

impl ShardControl for NoControl {
    fn inbound(&self, _: CallContext, _: PlanReply) -> Result<(), ControlError> {
        Err(ControlError::Stopped)
    }
    fn check_status(&self, _: CallId, _: PlanReply) -> Result<(), ControlError> {
        Err(ControlError::Stopped)
    }
    fn call_ended(&self, _: CallId, _: String) -> Result<(), ControlError> {
        Ok(())
    }
    fn call_event(&self, _: CallId, _: MediaEventKind, _: String) -> Result<(), ControlError> {
        Ok(())
    }
}

fn no_control() -> Arc<dyn ShardControl> {
    Arc::new(NoControl)
}

fn config(shards: usize, sip: Option<SocketAddr>) -> EngineConfig {
    EngineConfig { shards, pin_cores: false, sip, ..EngineConfig::default() }
}

fn localhost_any() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

/// Polls `cond` until it holds or the deadline passes.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn two_shards_receive_datagrams_and_release_the_port_on_shutdown() {
    let engine = Engine::start(config(2, localhost_any()), no_control()).unwrap();
    assert_eq!(engine.shard_count(), 2);
    let addr = engine.sip_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let health = engine.health();
    assert_eq!(health.len(), 2);
    assert!(health.iter().all(|h| h.alive && h.active_calls == 0), "{health:?}");
    assert_eq!(health.iter().map(|h| h.shard).collect::<Vec<_>>(), [0, 1]);

    let clients: Vec<UdpSocket> = (0..4).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    for i in 0..200 {
        let msg = format!("OPTIONS sip:precall@{addr} SIP/2.0\r\nCall-ID: {i}\r\n\r\n");
        clients[i % 4].send_to(msg.as_bytes(), addr).unwrap();
    }
    eventually("200 datagrams counted", || {
        engine.health().iter().map(|h| h.datagrams_in).sum::<u64>() == 200
    });

    engine.shutdown().unwrap();
    // The sockets are closed: a plain socket without SO_REUSEPORT may take the port again.
    UdpSocket::bind(addr).expect("SIP port still held after shutdown");
}

#[test]
fn shards_run_without_a_sip_socket() {
    let engine = Engine::start(config(2, None), no_control()).unwrap();
    assert_eq!(engine.sip_addr(), None);
    assert!(engine.health().iter().all(|h| h.alive && h.datagrams_in == 0));
    engine.shutdown().unwrap();
}

#[test]
fn a_taken_port_is_a_bind_error_and_start_returns_promptly() {
    // std sockets do not set SO_REUSEPORT, so the shards cannot share this port.
    let squatter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    let started = Instant::now();
    let err = Engine::start(config(2, Some(taken)), no_control()).unwrap_err();
    match err {
        EngineError::Bind { shard: 0, addr, ref source } => {
            assert_eq!(addr, taken);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
    // start() joins every thread it spawned before returning the error.
    assert!(started.elapsed() < DEADLINE);
}

#[test]
fn a_stopped_shard_refuses_messages_while_the_others_run() {
    let engine = Engine::start(config(2, localhost_any()), no_control()).unwrap();
    engine.send(0, ShardMsg::Stop).unwrap();
    eventually("shard 0 to stop", || !engine.health()[0].alive);
    assert_eq!(engine.send(0, ShardMsg::Stop), Err(SendError::Stopped));
    assert!(engine.health()[1].alive);
    assert_eq!(engine.send(2, ShardMsg::Stop), Err(SendError::NoSuchShard { shard: 2, shards: 2 }));
    engine.shutdown().unwrap();
}

#[test]
fn invalid_configs_are_refused_before_starting() {
    let err = Engine::start(config(0, None), no_control()).unwrap_err();
    assert!(matches!(err, EngineError::InvalidConfig { .. }), "{err:?}");
    let cfg = EngineConfig { rtp_ports: 20000..=20001, ..config(2, localhost_any()) };
    let err = Engine::start(cfg, no_control()).unwrap_err();
    assert!(matches!(err, EngineError::InvalidConfig { .. }), "{err:?}");
}

#[test]
fn dropping_the_engine_stops_the_shards() {
    let engine = Engine::start(config(1, localhost_any()), no_control()).unwrap();
    let addr = engine.sip_addr().unwrap();
    drop(engine);
    UdpSocket::bind(addr).expect("SIP port still held after drop");
}
