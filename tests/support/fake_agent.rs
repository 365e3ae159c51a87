//! A strict fake ElevenLabs agent, shared by the engine's bridge tests and the end-to-end SIPp
//! test: it speaks the server side of `PROTOCOLS.md` §2 and records every client message that
//! breaks it (the tests fail on any), and what it heard of the caller.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use precall_media::{Codec, g711};
use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// What a fake agent does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Metadata, a ping, a 1 s tone (faster than real time), an interruption after 300 ms,
    /// late audio of the interrupted response, a second tone, then close 1000 once it has
    /// heard 2 s of the caller.
    Talk,
    /// Closes with 1008 after the initiation, as ElevenLabs does when the voice override is
    /// not allowed.
    RefuseOverride,
    /// Accepts TCP and never answers.
    Dead,
    /// Sends audio as fast as the socket takes it, for 3 s.
    Flood,
}

#[derive(Debug, Default)]
pub struct AgentLog {
    pub violations: Vec<String>,
    pub init: Option<Value>,
    /// Caller audio as the agent received it (µ-law).
    pub heard: Vec<u8>,
    pub pongs: Vec<u64>,
    /// `contextual_update` texts.
    pub updates: Vec<String>,
    pub connections: usize,
}

pub struct FakeAgent {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<AgentLog>>,
}

pub const TONE_A_HZ: f32 = 1000.0;
pub const TONE_B_HZ: f32 = 400.0;
pub const CALLER_HZ: f32 = 700.0;

pub fn ulaw_tone(hz: f32, ms: usize, amp: f32) -> Vec<u8> {
    (0..ms * 8)
        .map(|i| {
            g711::ulaw_encode(((i as f32 * hz * std::f32::consts::TAU / 8000.0).sin() * amp) as i16)
        })
        .collect()
}

/// Zero crossings per second of µ-law or A-law audio, halved: its dominant frequency.
pub fn frequency(codec: Codec, audio: &[u8]) -> f32 {
    let pcm: Vec<i16> = audio.iter().map(|&b| codec.decode(b)).collect();
    let crossings = pcm.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
    crossings as f32 / 2.0 / (pcm.len() as f32 / 8000.0)
}

pub fn send(ws: &mut WebSocket<impl Read + Write>, v: Value) {
    let _ = ws.send(Message::text(v.to_string()));
}

pub fn audio(event_id: u64, bytes: &[u8]) -> Value {
    serde_json::json!({"type": "audio", "audio_event": {"audio_base_64": B64.encode(bytes), "event_id": event_id}})
}

/// Reads and checks one client message; `false` when the socket is done.
fn read_client(ws: &mut WebSocket<impl Read + Write>, log: &Mutex<AgentLog>, ping: u64) -> bool {
    match ws.read() {
        Ok(Message::Text(t)) => {
            let mut log = log.lock().unwrap();
            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                log.violations.push(format!("not JSON: {t}"));
                return true;
            };
            if let Some(chunk) = v.get("user_audio_chunk") {
                if v.as_object().map(|o| o.len()) != Some(1) {
                    log.violations.push(format!("user_audio_chunk with other fields: {v}"));
                }
                match chunk.as_str().map(|c| B64.decode(c)) {
                    Some(Ok(a)) => log.heard.extend(a),
                    _ => log.violations.push("user_audio_chunk is not base64".into()),
                }
            } else {
                match v["type"].as_str() {
                    Some("pong") => match v["event_id"].as_u64() {
                        Some(id) if id == ping => log.pongs.push(id),
                        _ => log.violations.push(format!("pong for no ping: {v}")),
                    },
                    Some("contextual_update") => match v["text"].as_str() {
                        Some(t) => log.updates.push(t.to_owned()),
                        None => log.violations.push(format!("contextual_update without text: {v}")),
                    },
                    Some("client_tool_result" | "user_activity") => {}
                    _ => log.violations.push(format!("unexpected message: {v}")),
                }
            }
            true
        }
        Ok(Message::Close(_)) => false,
        Ok(_) => true,
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            true
        }
        Err(_) => false,
    }
}

fn converse(stream: TcpStream, behaviour: Behaviour, log: &Mutex<AgentLog>) {
    log.lock().unwrap().connections += 1;
    if behaviour == Behaviour::Dead {
        // Hold the connection open, say nothing.
        let mut stream = stream;
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).is_ok_and(|n| n > 0) {}
        return;
    }
    let Ok(mut ws) = tungstenite::accept(stream) else { return };
    // The first message: the initiation with the cloned voice.
    let init = match ws.read() {
        Ok(Message::Text(t)) => serde_json::from_str::<Value>(t.as_str()).unwrap_or_default(),
        _ => Value::Null,
    };
    {
        let mut l = log.lock().unwrap();
        if init["type"] != "conversation_initiation_client_data"
            || init["conversation_config_override"]["tts"]["voice_id"].as_str().is_none()
        {
            l.violations.push(format!("first message is not a valid initiation: {init}"));
        }
        l.init = Some(init);
    }
    if behaviour == Behaviour::RefuseOverride {
        let _ =
            ws.close(Some(CloseFrame { code: CloseCode::Policy, reason: "override_error".into() }));
        let _ = ws.flush();
        while ws.read().is_ok() {}
        return;
    }
    send(
        &mut ws,
        serde_json::json!({"type": "conversation_initiation_metadata", "conversation_initiation_metadata_event": {
        "conversation_id": "conv_test", "agent_output_audio_format": "ulaw_8000", "user_input_audio_format": "ulaw_8000"}}),
    );
    send(
        &mut ws,
        serde_json::json!({"type": "ping", "ping_event": {"event_id": 7, "ping_ms": null}}),
    );
    ws.get_ref().set_read_timeout(Some(Duration::from_millis(5))).ok();
    let start = Instant::now();
    match behaviour {
        Behaviour::Flood => {
            ws.get_ref().set_nonblocking(true).ok();
            let mut id = 1;
            while start.elapsed() < Duration::from_secs(3) {
                let _ = ws.send(Message::text(audio(id, &[0x55; 8000]).to_string()));
                id += 1;
            }
            ws.get_ref().set_nonblocking(false).ok();
            while read_client(&mut ws, log, 7) {}
        }
        Behaviour::Talk => {
            let tone = ulaw_tone(TONE_A_HZ, 1000, 8000.0);
            for (i, piece) in tone.chunks(1600).enumerate() {
                send(&mut ws, audio(1 + i as u64, piece));
            }
            send(
                &mut ws,
                serde_json::json!({"type": "agent_response", "agent_response_event": {"agent_response": "Hello from the fake agent"}}),
            );
            let mut stage = 0;
            loop {
                if !read_client(&mut ws, log, 7) {
                    return;
                }
                let t = start.elapsed();
                if stage == 0 && t >= Duration::from_millis(300) {
                    send(
                        &mut ws,
                        serde_json::json!({"type": "interruption", "interruption_event": {"event_id": 5}}),
                    );
                    // Late audio of the interrupted response: must never be heard.
                    send(&mut ws, audio(5, &ulaw_tone(TONE_A_HZ, 200, 8000.0)));
                    send(&mut ws, audio(6, &ulaw_tone(TONE_B_HZ, 400, 8000.0)));
                    stage = 1;
                }
                if stage == 1 && log.lock().unwrap().heard.len() >= 16_000 {
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "conversation ended".into(),
                    }));
                    let _ = ws.flush();
                    stage = 2;
                }
            }
        }
        Behaviour::RefuseOverride | Behaviour::Dead => {}
    }
}

impl FakeAgent {
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(AgentLog::default()));
        let l = Arc::clone(&log);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let l = Arc::clone(&l);
                thread::spawn(move || converse(stream, behaviour, &l));
            }
        });
        Self { addr, log }
    }
}
