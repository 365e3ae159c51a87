//! The demo agent: a faithful, local speaker of the ElevenLabs Agents protocol, so that a
//! newcomer with no account hears greeting, hold, then their own voice.
//!
//! `precall demo-agent ADDR` runs it alone; with neither `AGENT_WS_URL` nor
//! `ELEVENLABS_AGENT_ID` set, `precall` starts one on a loopback port and bridges calls to it.
//! Per conversation (one thread each: it is a demo, not a production path): it waits for
//! `conversation_initiation_client_data`, answers `conversation_initiation_metadata`
//! (`ulaw_8000` both ways), pings every few seconds and checks the pongs, and speaks what
//! [`echo::Echo`] decides. A client message that breaks the protocol closes the socket with
//! 1008 and says why, as the real service does.

pub mod echo;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use echo::{Echo, Say};

/// How often the demo agent pings.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long it waits for the client's first message.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it waits for caller audio before closing (the real service: 60 s, 1002).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running demo agent.
#[derive(Debug)]
pub struct DemoAgent {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DemoAgent {
    /// Listens on `addr` and serves conversations until dropped.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let ids = Arc::new(AtomicU64::new(1));
        let thread = std::thread::Builder::new().name("demo-agent".into()).spawn(move || {
            // Blocking accepts; `Drop` sets the flag and connects once to wake this loop.
            for stream in listener.incoming() {
                if flag.load(Ordering::Acquire) {
                    return;
                }
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: back off rather than spin.
                        tracing::warn!(error = %e, "demo agent accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let peer = stream.peer_addr().ok();
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let flag = Arc::clone(&flag);
                let _ = std::thread::Builder::new()
                    .name("demo-agent-conv".into())
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        if let Err(e) = converse(stream, id, &flag) {
                            tracing::debug!(?peer, error = %e, "demo agent conversation ended");
                        }
                    });
            }
        })?;
        Ok(Self { addr, stop, thread: Some(thread) })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its conversation endpoint, for `AGENT_WS_URL`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/convai/conversation", self.addr)
    }
}

impl Drop for DemoAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the blocking accept, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn close(ws: &mut WebSocket<TcpStream>, code: CloseCode, why: &str) {
    let _ = ws.close(Some(CloseFrame { code, reason: why.to_owned().into() }));
    let _ = ws.flush();
}

fn converse(stream: TcpStream, id: u64, stop: &AtomicBool) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let mut ws = tungstenite::accept(stream).map_err(|e| format!("handshake: {e}"))?;
    ws.get_ref().set_read_timeout(Some(Duration::from_millis(10))).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // The first message must be the initiation.
    loop {
        if started.elapsed() > INIT_TIMEOUT {
            close(&mut ws, CloseCode::Policy, "no conversation_initiation_client_data");
            return Err("no initiation".into());
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] != "conversation_initiation_client_data" {
                    close(&mut ws, CloseCode::Policy, "invalid_message: initiation expected");
                    return Err("first message was not the initiation".into());
                }
                break;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let metadata = serde_json::json!({
        "type": "conversation_initiation_metadata",
        "conversation_initiation_metadata_event": {
            "conversation_id": format!("demo_{id}"),
            "agent_output_audio_format": "ulaw_8000",
            "user_input_audio_format": "ulaw_8000",
        }
    });
    send(&mut ws, metadata.to_string())?;
    let mut echo = Echo::new(Instant::now());
    let mut next_ping = Instant::now() + PING_EVERY;
    let mut ping_id = 0u64;
    let mut last_input = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        while let Some(say) = echo.poll(now) {
            let msg = match say {
                Say::Audio(event_id, audio) => serde_json::json!({
                    "type": "audio",
                    "audio_event": { "audio_base_64": B64.encode(audio), "event_id": event_id },
                }),
                Say::Interruption(event_id) => serde_json::json!({
                    "type": "interruption",
                    "interruption_event": { "event_id": event_id },
                }),
            };
            send(&mut ws, msg.to_string())?;
        }
        if now >= next_ping {
            ping_id += 1;
            next_ping = now + PING_EVERY;
            let ping = serde_json::json!({ "type": "ping", "ping_event": { "event_id": ping_id, "ping_ms": null } });
            send(&mut ws, ping.to_string())?;
        }
        if now.duration_since(last_input) > IDLE_TIMEOUT {
            close(&mut ws, CloseCode::Protocol, "transport_receive_timeout");
            return Err("no caller audio for 60 s".into());
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = match serde_json::from_str(t.as_str()) {
                    Ok(v) => v,
                    Err(_) => {
                        close(&mut ws, CloseCode::Policy, "invalid_message");
                        return Err("not JSON".into());
                    }
                };
                if let Some(chunk) = v["user_audio_chunk"].as_str() {
                    let Ok(audio) = B64.decode(chunk) else {
                        close(&mut ws, CloseCode::Policy, "invalid_message: audio is not base64");
                        return Err("bad base64".into());
                    };
                    last_input = Instant::now();
                    echo.hear(last_input, &audio);
                } else if v["type"] == "pong" && v["event_id"].as_u64() != Some(ping_id) {
                    close(&mut ws, CloseCode::Policy, "invalid_message: pong event_id");
                    return Err("pong for the wrong ping".into());
                }
            }
            Ok(Message::Close(_)) => return Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
    close(&mut ws, CloseCode::Normal, "demo agent stopping");
    Ok(())
}

fn send(ws: &mut WebSocket<TcpStream>, text: String) -> Result<(), String> {
    ws.send(Message::text(text)).map_err(|e| e.to_string())
}
