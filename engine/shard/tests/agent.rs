//! The agent bridge through a real shard over real sockets: a raw-SIP caller sending RTP, a
//! fake control plane that says "connect" at the first status check, and a strict fake
//! ElevenLabs agent (it records every message that breaks `PROTOCOLS.md` §2, and the test
//! fails on any). What the caller hears is checked on its own RTP socket; what the agent hears
//! is checked by content. Waits are receives or polls with a deadline.

mod support;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use precall_api::{
    AudioInstruction, CallContext, CallId, CallInstructions, CloneStatus, ControlError,
    MediaEventKind, StatusPollInstruction, WebSocketInstruction,
};
use precall_engine::{
    AgentTarget, Engine, EngineConfig, MediaPlan, PlanReply, ShardControl, ShardPlan,
};
use precall_media::{Codec, EncodedClip, RtpPacket, g711};
use serde_json::Value;
use support::{Uac, eventually, sdp_port};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

#[path = "../../../tests/support/fake_agent.rs"]
mod fake_agent;

use fake_agent::{
    Behaviour, CALLER_HZ, FakeAgent, TONE_A_HZ, TONE_B_HZ, audio, frequency, send, ulaw_tone,
};

fn target(agent: &FakeAgent) -> AgentTarget {
    AgentTarget {
        url: format!("ws://{}/v1/convai/conversation?agent_id=test", agent.addr),
        host: "127.0.0.1".into(),
        addr: agent.addr,
        tls: false,
    }
}

/// Holds every call at first; at the first status check connects it to its agent.
#[derive(Default)]
struct Control {
    agents: Mutex<HashMap<String, AgentTarget>>,
    ended: Mutex<Vec<(String, String)>>,
    events: Mutex<Vec<(String, MediaEventKind, String)>>,
}

fn clip(hz: f32, seconds: f32) -> Arc<EncodedClip> {
    let n = (8000.0 * seconds) as usize;
    let pcm: Vec<i16> = (0..n)
        .map(|i| ((i as f32 * hz * std::f32::consts::TAU / 8000.0).sin() * 8000.0) as i16)
        .collect();
    Arc::new(EncodedClip::from_pcm(&pcm))
}

const HOLD_HZ: f32 = 250.0;
const ERROR_HZ: f32 = 2000.0;

fn plan(call_id: CallId, agent: Option<AgentTarget>) -> ShardPlan {
    let mut ins = CallInstructions {
        call_id: call_id.clone(),
        clone_status: CloneStatus::Processing,
        greeting_audio: None,
        hold_audio: Some(AudioInstruction { url: "mem://hold".into(), loops: 0 }),
        status_poll: Some(StatusPollInstruction {
            call_id,
            interval: Duration::from_millis(300),
            hold_remaining: Duration::from_secs(60),
        }),
        websocket: None,
        error_message: None,
        should_hangup: false,
    };
    if let Some(t) = &agent {
        ins.clone_status = CloneStatus::Completed;
        ins.status_poll = None;
        ins.websocket = Some(WebSocketInstruction {
            url: t.url.clone(),
            agent_id: "test".into(),
            voice_id: "cloned-voice".into(),
            first_message: None,
        });
    }
    ShardPlan {
        instructions: ins,
        media: MediaPlan {
            greeting: None,
            hold: Some(clip(HOLD_HZ, 0.5)),
            error: Some(clip(ERROR_HZ, 0.3)),
        },
        agent: agent.map(Ok),
    }
}

impl ShardControl for Control {
    fn inbound(&self, ctx: CallContext, reply: PlanReply) -> Result<(), ControlError> {
        thread::spawn(move || reply(Ok(plan(ctx.call_id, None))));
        Ok(())
    }
    fn check_status(&self, call_id: CallId, reply: PlanReply) -> Result<(), ControlError> {
        let agent = self.agents.lock().unwrap().get(call_id.as_str()).cloned();
        thread::spawn(move || reply(Ok(plan(call_id, agent))));
        Ok(())
    }
    fn call_ended(&self, call_id: CallId, reason: String) -> Result<(), ControlError> {
        self.ended.lock().unwrap().push((call_id.as_str().to_owned(), reason));
        Ok(())
    }
    fn call_event(
        &self,
        call_id: CallId,
        kind: MediaEventKind,
        detail: String,
    ) -> Result<(), ControlError> {
        self.events.lock().unwrap().push((call_id.as_str().to_owned(), kind, detail));
        Ok(())
    }
}

fn start(control: Arc<Control>, shards: usize, tls_ca: Option<std::path::PathBuf>) -> Engine {
    let cfg = EngineConfig {
        shards,
        sip: Some("127.0.0.1:0".parse().unwrap()),
        rtp_ports: 41000..=41999,
        agent_connect_timeout: Duration::from_secs(1),
        agent_first_audio_timeout: Duration::from_secs(2),
        agent_tls_ca_file: tls_ca,
        ..EngineConfig::default()
    };
    Engine::start(cfg, control).unwrap()
}

/// One received RTP packet.
struct Got {
    at: Instant,
    seq: u16,
    ts: u32,
    marker: bool,
    payload: Vec<u8>,
}

/// A caller's media: sends a tone (A-law, the codec it offers first) every 20 ms to precall
/// and records what it receives, until `stop`.
struct CallerMedia {
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl CallerMedia {
    fn start(sock: UdpSocket, to: SocketAddr) -> Self {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
        let tx = sock.try_clone().unwrap();
        let s2 = Arc::clone(&stop);
        thread::spawn(move || {
            let tone: Vec<u8> = (0..8000)
                .map(|i| {
                    g711::alaw_encode(
                        ((i as f32 * CALLER_HZ * std::f32::consts::TAU / 8000.0).sin() * 6000.0)
                            as i16,
                    )
                })
                .collect();
            let start = Instant::now();
            let mut n: u32 = 0;
            while !s2.load(std::sync::atomic::Ordering::Acquire) {
                let mut pkt = vec![0x80, 8, (n >> 8) as u8, n as u8];
                pkt.extend((n * 160).to_be_bytes());
                pkt.extend(0x1234_5678u32.to_be_bytes());
                let at = (n as usize * 160) % 8000;
                pkt.extend(&tone[at..at + 160]);
                let _ = tx.send_to(&pkt, to);
                n += 1;
                // Real-time pacing of the caller's own stream.
                let next = start + Duration::from_millis(20 * u64::from(n));
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
            }
        });
        thread::spawn(move || {
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 2048];
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if let Ok(p) = RtpPacket::new_checked(&buf[..n]) {
                        g.lock().unwrap().push(Got {
                            at: Instant::now(),
                            seq: p.sequence().0,
                            ts: p.timestamp().0,
                            marker: p.marker(),
                            payload: p.payload().to_vec(),
                        });
                    }
                }
            }
        });
        Self { got, stop }
    }
}

impl Drop for CallerMedia {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Places a call whose agent is `agent`; returns the caller, its dialog and its media.
fn call(
    engine: &Engine,
    control: &Control,
    call_id: &str,
    agent: &AgentTarget,
) -> (Uac, support::Dialog, CallerMedia) {
    control.agents.lock().unwrap().insert(call_id.to_owned(), agent.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let d = uac.invite(call_id, rtp.local_addr().unwrap().port());
    uac.ack(&d);
    let to = SocketAddr::from(([127, 0, 0, 1], sdp_port(&d.answer_sdp)));
    (uac, d, CallerMedia::start(rtp, to))
}

fn ended_with(control: &Control, call_id: &str) -> Option<String> {
    control.ended.lock().unwrap().iter().find(|(id, _)| id == call_id).map(|(_, r)| r.clone())
}

#[test]
fn a_call_is_bridged_both_ways_interrupted_and_ended_by_the_agent() {
    let control = Arc::new(Control::default());
    let engine = start(control.clone(), 2, None);
    let agent = FakeAgent::start(Behaviour::Talk);
    let (uac, d, media) = call(&engine, &control, "bridge-1@test", &target(&agent));
    // The agent closes after 2 s of caller audio; precall plays its last words, then BYE.
    uac.await_bye(&d.call_id);
    eventually("the end recorded", || ended_with(&control, &d.call_id).is_some());
    assert_eq!(ended_with(&control, &d.call_id).as_deref(), Some("completed"));
    drop(media.stop.clone());
    let log = agent.log.lock().unwrap();
    assert!(log.violations.is_empty(), "protocol violations: {:?}", log.violations);
    let init = log.init.as_ref().unwrap();
    assert_eq!(init["conversation_config_override"]["tts"]["voice_id"], "cloned-voice");
    assert_eq!(init["dynamic_variables"]["call_id"], "bridge-1@test");
    assert_eq!(init["dynamic_variables"]["caller_number"], "+12345678901");
    assert_eq!(init["dynamic_variables"]["dialed_number"], "+18005551212");
    assert_eq!(log.pongs, vec![7], "the ping was answered");
    // What the agent heard: the caller's 700 Hz tone, transcoded from A-law to µ-law.
    let heard: Vec<u8> = log.heard.iter().copied().filter(|&b| b != 0xFF).collect();
    assert!(heard.len() >= 8000, "{} bytes of caller audio", heard.len());
    let hz = frequency(Codec::Pcmu, &heard[800..]);
    assert!((CALLER_HZ - 30.0..CALLER_HZ + 30.0).contains(&hz), "the agent heard {hz} Hz");
    drop(log);
    let events = control.events.lock().unwrap();
    assert!(
        events.iter().any(
            |(_, k, t)| *k == MediaEventKind::AgentResponse && t == "Hello from the fake agent"
        )
    );
    assert!(events.iter().any(|(_, k, _)| *k == MediaEventKind::AgentConnected));
    drop(events);

    // What the caller heard: hold, then tone A (cut by the interruption: about 300 ms, not
    // 1 s), never the late audio, then tone B (400 ms), then silence; paced and continuous.
    let got = media.got.lock().unwrap();
    assert!(got.len() > 100);
    let kind = |p: &[u8]| -> &'static str {
        if p.iter().all(|&b| b == Codec::Pcma.silence()) {
            return "silence";
        }
        let hz = frequency(Codec::Pcma, p);
        if (HOLD_HZ - 60.0..HOLD_HZ + 60.0).contains(&hz) {
            "hold"
        } else if (TONE_A_HZ - 100.0..TONE_A_HZ + 100.0).contains(&hz) {
            "a"
        } else if (TONE_B_HZ - 60.0..TONE_B_HZ + 60.0).contains(&hz) {
            "b"
        } else {
            "other"
        }
    };
    let kinds: Vec<&str> = got.iter().map(|g| kind(&g.payload)).collect();
    let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
    let first_a = kinds.iter().position(|k| *k == "a").expect("the agent was heard");
    assert!(
        kinds[..first_a].iter().all(|k| *k == "hold"),
        "hold until the agent: {:?}",
        &kinds[..first_a]
    );
    assert!(
        (8..=30).contains(&count("a")),
        "tone A frames: {} (interrupted after ~300 ms)",
        count("a")
    );
    assert_eq!(count("b"), 20, "tone B: 400 ms");
    let last_a = kinds.iter().rposition(|k| *k == "a").unwrap();
    let first_b = kinds.iter().position(|k| *k == "b").unwrap();
    assert!(last_a < first_b, "no audio of the interrupted response after the interruption");
    assert!(got[first_a].marker, "the agent's first frame starts a talkspurt");
    assert!(got[first_b].marker || kinds[first_b - 1] == "a", "a new talkspurt is marked");
    let mut skipped = 0;
    for w in got.windows(2) {
        assert_eq!(w[1].seq, w[0].seq.wrapping_add(1), "sequence continuous");
        // +160 per packet, continuous from hold into the agent; a frame the shard skipped
        // because it woke a period late advances the timestamp over it (rare, loaded box).
        let step = w[1].ts.wrapping_sub(w[0].ts);
        assert!(step >= 160 && step % 160 == 0, "timestamp step {step}");
        skipped += usize::from(step != 160);
    }
    assert!(skipped * 50 <= got.len(), "{skipped} skipped frames");
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(
        (Duration::from_millis(18)..Duration::from_millis(22)).contains(&mean),
        "mean inter-arrival {mean:?}"
    );
    drop(got);
    // The engine measured what it added each way. Toward the caller it is part of the whole
    // delay (a frame's grid instant comes after the agent audio it carries); toward the agent
    // not always (a late chunk deadline drains a packet that waited in the kernel, so the
    // whole delay, counted from that drain, can be the shorter).
    let health = engine.health();
    let samples = |counts: &[u64]| counts.iter().sum::<u64>();
    let (mut added_caller, mut whole_caller) = (0, 0);
    for h in &health {
        assert!(samples(&h.added_to_agent.counts) <= samples(&h.latency_to_agent.counts));
        assert!(samples(&h.added_to_caller.counts) <= samples(&h.latency_to_caller.counts));
        added_caller += h.added_to_caller.sum_us;
        whole_caller += h.latency_to_caller.sum_us;
    }
    let to_agent: u64 = health.iter().map(|h| samples(&h.added_to_agent.counts)).sum();
    let to_caller: u64 = health.iter().map(|h| samples(&h.added_to_caller.counts)).sum();
    assert!(to_agent >= 20, "{to_agent} chunks measured (2 s of caller audio)");
    assert!(to_caller >= 2, "{to_caller} agent talkspurts measured");
    assert!(added_caller <= whole_caller, "{added_caller} µs added of {whole_caller}");
    engine.shutdown().unwrap();
}

#[test]
fn an_agent_that_refuses_the_override_gets_the_error_clip_and_bye() {
    let control = Arc::new(Control::default());
    let engine = start(control.clone(), 1, None);
    let agent = FakeAgent::start(Behaviour::RefuseOverride);
    let (uac, d, media) = call(&engine, &control, "refused@test", &target(&agent));
    uac.await_bye(&d.call_id);
    eventually("the end recorded", || ended_with(&control, &d.call_id).is_some());
    assert_eq!(ended_with(&control, &d.call_id).as_deref(), Some("agent_rejected"));
    let events = control.events.lock().unwrap();
    let failed: Vec<&String> = events
        .iter()
        .filter(|(_, k, _)| *k == MediaEventKind::AgentFailed)
        .map(|(_, _, t)| t)
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("1008") && failed[0].contains("override_error"), "{failed:?}");
    let got = media.got.lock().unwrap();
    let error = got
        .iter()
        .filter(|g| {
            (ERROR_HZ - 150.0..ERROR_HZ + 150.0).contains(&frequency(Codec::Pcma, &g.payload))
        })
        .count();
    assert_eq!(error, 15, "the whole 300 ms error clip before the BYE");
    drop(got);
    engine.shutdown().unwrap();
}

#[test]
fn dead_and_flooding_agents_do_not_disturb_other_calls_on_the_shard() {
    let control = Arc::new(Control::default());
    let engine = start(control.clone(), 1, None);
    let dead = FakeAgent::start(Behaviour::Dead);
    let flood = FakeAgent::start(Behaviour::Flood);
    let talk = FakeAgent::start(Behaviour::Talk);
    // A call to a working agent, and beside it on the same shard a dead and a flooding one.
    let (uac_ok, d_ok, media_ok) = call(&engine, &control, "steady@test", &target(&talk));
    let (uac_dead, d_dead, _m1) = call(&engine, &control, "dead@test", &target(&dead));
    let (_uac_flood, _d_flood, _m2) = call(&engine, &control, "flood@test", &target(&flood));
    // The dead agent never answers the handshake: AGENT_CONNECT_TIMEOUT_MS, error clip, BYE.
    uac_dead.await_bye(&d_dead.call_id);
    eventually("dead call recorded", || ended_with(&control, &d_dead.call_id).is_some());
    assert_eq!(ended_with(&control, &d_dead.call_id).as_deref(), Some("agent_unavailable"));
    uac_ok.await_bye(&d_ok.call_id);
    let got = media_ok.got.lock().unwrap();
    let gaps: Vec<f64> =
        got.windows(2).map(|w| (w[1].at - w[0].at).as_secs_f64() * 1000.0).collect();
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[sorted.len() * 99 / 100];
    let max = sorted[sorted.len() - 1];
    eprintln!(
        "steady call beside a dead and a flooding agent: {} packets, inter-arrival p99 {p99:.2} ms, max {max:.2} ms",
        got.len()
    );
    // Loose on purpose (a shared CI box): a stalled shard would show gaps of seconds.
    assert!(max < 250.0, "a frame of the steady call waited {max:.1} ms");
    for w in got.windows(2) {
        assert_eq!(w[1].seq, w[0].seq.wrapping_add(1));
    }
    drop(got);
    assert!(
        engine.health()[0].agent_audio_overflow_bytes > 0
            || engine.health()[0].agent_messages_in > 100
    );
    engine.shutdown().unwrap();
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, made with openssl (rustls
/// wants a CA:FALSE end-entity certificate with a subjectAltName).
fn test_pki(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=precall test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn a_wss_agent_is_reached_over_tls_with_a_test_ca() {
    use futures_rustls::rustls;
    use rustls::pki_types::pem::PemObject;
    let dir = std::env::temp_dir().join(format!("precall-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    test_pki(&dir);
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let heard = Arc::new(Mutex::new(0usize));
    let h = Arc::clone(&heard);
    thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(server_cfg).unwrap();
        let Ok(mut ws) = tungstenite::accept(rustls::StreamOwned::new(conn, tcp)) else { return };
        let _init = ws.read();
        send(
            &mut ws,
            serde_json::json!({"type": "conversation_initiation_metadata", "conversation_initiation_metadata_event": {
            "conversation_id": "tls", "agent_output_audio_format": "ulaw_8000", "user_input_audio_format": "ulaw_8000"}}),
        );
        send(&mut ws, audio(1, &ulaw_tone(TONE_A_HZ, 400, 8000.0)));
        while let Ok(msg) = ws.read() {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if let Some(c) = v["user_audio_chunk"].as_str() {
                    *h.lock().unwrap() += B64.decode(c).map_or(0, |a| a.len());
                }
            }
            if *h.lock().unwrap() >= 8000 {
                let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }));
                let _ = ws.flush();
            }
        }
    });
    let control = Arc::new(Control::default());
    let engine = start(control.clone(), 1, Some(dir.join("ca.pem")));
    let target = AgentTarget {
        url: format!("wss://127.0.0.1:{}/v1/convai/conversation?agent_id=test", addr.port()),
        host: "127.0.0.1".into(),
        addr,
        tls: true,
    };
    let (uac, d, media) = call(&engine, &control, "tls@test", &target);
    uac.await_bye(&d.call_id);
    eventually("the end recorded", || ended_with(&control, &d.call_id).is_some());
    assert_eq!(ended_with(&control, &d.call_id).as_deref(), Some("completed"));
    assert!(*heard.lock().unwrap() >= 8000, "the agent heard the caller over TLS");
    let got = media.got.lock().unwrap();
    let tone = got
        .iter()
        .filter(|g| {
            (TONE_A_HZ - 100.0..TONE_A_HZ + 100.0).contains(&frequency(Codec::Pcma, &g.payload))
        })
        .count();
    assert_eq!(tone, 20, "the agent's 400 ms over TLS");
    drop(got);
    engine.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn caller_dtmf_is_recorded_once_and_told_to_the_agent() {
    let control = Arc::new(Control::default());
    let engine = start(control.clone(), 1, None);
    let agent = FakeAgent::start(Behaviour::Talk);
    let (uac, d, media) = call(&engine, &control, "dtmf@test", &target(&agent));
    eventually("the bridge", || {
        control.events.lock().unwrap().iter().any(|(_, k, _)| *k == MediaEventKind::AgentConnected)
    });
    // RFC 4733: key 5, three end packets with one timestamp (as phones send them), PT 101.
    // Sent from a second socket of the caller's address: RTP latching is still "first source"
    // (strict RTP, issue 12, will want them from the latched source).
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = SocketAddr::from(([127, 0, 0, 1], sdp_port(&d.answer_sdp)));
    for i in 0..3u16 {
        let mut pkt = vec![0x80, 101, 0x10, i as u8];
        pkt.extend(777_777u32.to_be_bytes());
        pkt.extend(0x0bad_cafeu32.to_be_bytes());
        pkt.extend([5, 0x80 | 10, 0x03, 0x20]);
        sock.send_to(&pkt, to).unwrap();
    }
    eventually("the DTMF event", || {
        control
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|(_, k, t)| *k == MediaEventKind::Dtmf && t == "5")
    });
    uac.await_bye(&d.call_id);
    let dtmf = control
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, k, _)| *k == MediaEventKind::Dtmf)
        .count();
    assert_eq!(dtmf, 1, "three end packets are one key press");
    let log = agent.log.lock().unwrap();
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    assert!(log.updates.iter().any(|u| u.contains('5')), "the agent was told: {:?}", log.updates);
    drop(log);
    drop(media);
    engine.shutdown().unwrap();
}
