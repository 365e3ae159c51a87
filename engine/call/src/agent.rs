//! The ElevenLabs Agents WebSocket protocol, sans-IO: the messages precall sends and the
//! server messages it understands (`shared/PROTOCOLS.md` §2, from the `elevenlabs` SDK 2.78
//! and `agent.asyncapi.yaml`).
//!
//! [`parse_server`] turns one text frame into a [`ServerMessage`]; unknown `type`s are
//! [`ServerMessage::Unknown`], never an error. The `client_*` functions write the client
//! messages; base64 is encoded straight into the output string (no intermediate buffer).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

/// An audio format an agent is configured for (both directions are set in the agent itself,
/// never per conversation: read them from `conversation_initiation_metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentFormat {
    /// G.711 µ-law, 8 kHz: passed through untouched to and from PCMU callers.
    Ulaw8000,
    /// Signed 16-bit little-endian mono PCM at this rate (8,000 to 48,000 Hz).
    Pcm(u32),
}

impl AgentFormat {
    /// Parses `ulaw_8000`, `pcm_8000`, `pcm_16000`, `pcm_22050`, `pcm_24000`, `pcm_44100`,
    /// `pcm_48000`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ulaw_8000" => Some(Self::Ulaw8000),
            "pcm_8000" => Some(Self::Pcm(8000)),
            "pcm_16000" => Some(Self::Pcm(16_000)),
            "pcm_22050" => Some(Self::Pcm(22_050)),
            "pcm_24000" => Some(Self::Pcm(24_000)),
            "pcm_44100" => Some(Self::Pcm(44_100)),
            "pcm_48000" => Some(Self::Pcm(48_000)),
            _ => None,
        }
    }

    /// The name as the agent configuration spells it.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::Ulaw8000 => "ulaw_8000".to_owned(),
            Self::Pcm(rate) => format!("pcm_{rate}"),
        }
    }
}

/// A server message precall acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The conversation started, with the agent's fixed audio formats.
    Metadata {
        /// The agent's conversation id (for logs and the call's events).
        conversation_id: String,
        /// What the agent sends.
        output: AgentFormat,
        /// What the agent wants from the caller.
        input: AgentFormat,
    },
    /// Agent speech, base64-decoded.
    Audio {
        /// Increasing per response; an interruption drops audio with an id up to its own.
        event_id: u64,
        /// Audio bytes in the output format.
        audio: Vec<u8>,
    },
    /// The caller spoke over the agent: stop playing.
    Interruption {
        /// Audio with this id or lower is dropped.
        event_id: u64,
    },
    /// Keepalive; answer with [`client_pong`] at once.
    Ping {
        /// Echoed in the pong.
        event_id: u64,
    },
    /// What the agent said (text).
    AgentResponse(String),
    /// What the agent heard the caller say.
    UserTranscript(String),
    /// The agent asks the client to run a tool: precall has none and says so.
    ClientToolCall {
        /// Echoed in the result.
        tool_call_id: String,
        /// For logs.
        tool_name: String,
    },
    /// The server reports an error (a close usually follows).
    Error {
        /// `error_type`, `code` and `message` joined for logs and the call record.
        message: String,
    },
    /// Any other type (about 20 exist): ignored and counted.
    Unknown(String),
}

/// Why a text frame is not a server message at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON, or a known type without its required fields.
    #[error("malformed {kind} message: {reason}")]
    Malformed {
        /// The `type` field, or `frame` when there was none.
        kind: String,
        /// serde's or our reason.
        reason: String,
    },
    /// `conversation_initiation_metadata` names a format precall cannot convert.
    #[error("unsupported agent audio format {0:?}")]
    UnsupportedFormat(String),
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MetadataMsg {
    conversation_initiation_metadata_event: MetadataEvent,
}
#[derive(Deserialize)]
struct MetadataEvent {
    #[serde(default)]
    conversation_id: String,
    agent_output_audio_format: String,
    user_input_audio_format: String,
}
#[derive(Deserialize)]
struct AudioMsg<'a> {
    #[serde(borrow)]
    audio_event: AudioEvent<'a>,
}
#[derive(Deserialize)]
struct AudioEvent<'a> {
    #[serde(borrow)]
    audio_base_64: std::borrow::Cow<'a, str>,
    event_id: u64,
}
#[derive(Deserialize)]
struct InterruptionMsg {
    interruption_event: EventId,
}
#[derive(Deserialize)]
struct PingMsg {
    ping_event: EventId,
}
#[derive(Deserialize)]
struct EventId {
    event_id: u64,
}
#[derive(Deserialize)]
struct AgentResponseMsg {
    agent_response_event: AgentResponseEvent,
}
#[derive(Deserialize)]
struct AgentResponseEvent {
    agent_response: String,
}
#[derive(Deserialize)]
struct UserTranscriptMsg {
    user_transcription_event: UserTranscriptEvent,
}
#[derive(Deserialize)]
struct UserTranscriptEvent {
    user_transcript: String,
}
#[derive(Deserialize)]
struct ToolCallMsg {
    client_tool_call: ToolCall,
}
#[derive(Deserialize)]
struct ToolCall {
    tool_call_id: String,
    #[serde(default)]
    tool_name: String,
}
#[derive(Deserialize)]
struct ErrorMsg {
    #[serde(default)]
    error_event: Option<serde_json::Value>,
}

fn malformed(kind: &str, e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Malformed { kind: kind.to_owned(), reason: e.to_string() }
}

/// Parses one text frame from the agent.
pub fn parse_server(text: &str) -> Result<ServerMessage, ProtocolError> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| malformed("frame", e))?;
    let Some(kind) = env.kind else {
        return Err(malformed("frame", "no type field"));
    };
    let kind = kind.as_ref();
    Ok(match kind {
        "conversation_initiation_metadata" => {
            let m: MetadataMsg = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            let ev = m.conversation_initiation_metadata_event;
            let output = AgentFormat::parse(&ev.agent_output_audio_format)
                .ok_or(ProtocolError::UnsupportedFormat(ev.agent_output_audio_format.clone()))?;
            let input = AgentFormat::parse(&ev.user_input_audio_format)
                .ok_or(ProtocolError::UnsupportedFormat(ev.user_input_audio_format.clone()))?;
            ServerMessage::Metadata { conversation_id: ev.conversation_id, output, input }
        }
        "audio" => {
            let m: AudioMsg<'_> = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            let audio = B64
                .decode(m.audio_event.audio_base_64.as_bytes())
                .map_err(|e| malformed(kind, e))?;
            ServerMessage::Audio { event_id: m.audio_event.event_id, audio }
        }
        "interruption" => {
            let m: InterruptionMsg = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            ServerMessage::Interruption { event_id: m.interruption_event.event_id }
        }
        "ping" => {
            let m: PingMsg = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            ServerMessage::Ping { event_id: m.ping_event.event_id }
        }
        "agent_response" => {
            let m: AgentResponseMsg = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            ServerMessage::AgentResponse(m.agent_response_event.agent_response)
        }
        "user_transcript" => {
            let m: UserTranscriptMsg =
                serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            ServerMessage::UserTranscript(m.user_transcription_event.user_transcript)
        }
        "client_tool_call" => {
            let m: ToolCallMsg = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            ServerMessage::ClientToolCall {
                tool_call_id: m.client_tool_call.tool_call_id,
                tool_name: m.client_tool_call.tool_name,
            }
        }
        "error" => {
            let m: ErrorMsg = serde_json::from_str(text).map_err(|e| malformed(kind, e))?;
            ServerMessage::Error { message: error_text(m.error_event.as_ref()) }
        }
        other => ServerMessage::Unknown(other.to_owned()),
    })
}

fn error_text(ev: Option<&serde_json::Value>) -> String {
    let Some(ev) = ev else { return "error event without details".to_owned() };
    let field = |k: &str| match ev.get(k) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Null) | None => None,
        Some(v) => Some(v.to_string()),
    };
    [field("error_type"), field("code"), field("message"), field("reason")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ")
}

/// What the first client message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiation<'a> {
    /// `conversation_config_override.tts.voice_id`: the cloned voice.
    pub voice_id: &'a str,
    /// `conversation_config_override.agent.first_message`, when the profile has one.
    pub first_message: Option<&'a str>,
    /// `dynamic_variables`, name and value.
    pub dynamic_variables: &'a [(&'a str, &'a str)],
}

/// `conversation_initiation_client_data`, the first message on the socket.
#[must_use]
pub fn client_initiation(init: &Initiation<'_>) -> String {
    let mut agent = serde_json::Map::new();
    if let Some(first) = init.first_message {
        agent.insert("first_message".into(), first.into());
    }
    let mut over = serde_json::Map::new();
    over.insert("tts".into(), serde_json::json!({ "voice_id": init.voice_id }));
    if !agent.is_empty() {
        over.insert("agent".into(), agent.into());
    }
    let vars: serde_json::Map<String, serde_json::Value> = init
        .dynamic_variables
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "type": "conversation_initiation_client_data",
        "conversation_config_override": over,
        "dynamic_variables": vars,
    })
    .to_string()
}

/// `{"user_audio_chunk":"<base64>"}` (no `type` field), base64 written straight into `out`.
pub fn client_audio(audio: &[u8], out: &mut String) {
    out.clear();
    out.reserve(22 + audio.len().div_ceil(3) * 4);
    out.push_str("{\"user_audio_chunk\":\"");
    B64.encode_string(audio, out);
    out.push_str("\"}");
}

/// `{"type":"pong","event_id":N}`.
#[must_use]
pub fn client_pong(event_id: u64) -> String {
    format!("{{\"type\":\"pong\",\"event_id\":{event_id}}}")
}

/// `client_tool_result` with `is_error: true`: precall runs no client tools.
#[must_use]
pub fn client_tool_error(tool_call_id: &str) -> String {
    serde_json::json!({
        "type": "client_tool_result",
        "tool_call_id": tool_call_id,
        "result": "this client has no tools",
        "is_error": true,
    })
    .to_string()
}

/// `contextual_update` (the caller's DTMF: there is no client DTMF message).
#[must_use]
pub fn client_contextual_update(text: &str) -> String {
    serde_json::json!({ "type": "contextual_update", "text": text }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_formats() {
        let m = parse_server(r#"{"type":"conversation_initiation_metadata","conversation_initiation_metadata_event":{"conversation_id":"c1","agent_output_audio_format":"pcm_16000","user_input_audio_format":"ulaw_8000"}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Metadata {
                conversation_id: "c1".into(),
                output: AgentFormat::Pcm(16_000),
                input: AgentFormat::Ulaw8000
            }
        );
        let bad = parse_server(
            r#"{"type":"conversation_initiation_metadata","conversation_initiation_metadata_event":{"agent_output_audio_format":"mp3_44100","user_input_audio_format":"ulaw_8000"}}"#,
        );
        assert_eq!(bad, Err(ProtocolError::UnsupportedFormat("mp3_44100".into())));
        for f in ["ulaw_8000", "pcm_8000", "pcm_22050", "pcm_44100", "pcm_48000"] {
            assert_eq!(AgentFormat::parse(f).unwrap().name(), f);
        }
    }

    #[test]
    fn audio_interruption_ping_and_the_rest() {
        let a = parse_server(
            r#"{"type":"audio","audio_event":{"audio_base_64":"AAEC/w==","event_id":7}}"#,
        );
        assert_eq!(a, Ok(ServerMessage::Audio { event_id: 7, audio: vec![0, 1, 2, 255] }));
        let i = parse_server(r#"{"type":"interruption","interruption_event":{"event_id":7}}"#);
        assert_eq!(i, Ok(ServerMessage::Interruption { event_id: 7 }));
        let p = parse_server(r#"{"type":"ping","ping_event":{"event_id":3,"ping_ms":null}}"#);
        assert_eq!(p, Ok(ServerMessage::Ping { event_id: 3 }));
        let r = parse_server(
            r#"{"type":"agent_response","agent_response_event":{"agent_response":"Hi"}}"#,
        );
        assert_eq!(r, Ok(ServerMessage::AgentResponse("Hi".into())));
        let u = parse_server(
            r#"{"type":"user_transcript","user_transcription_event":{"user_transcript":"yo"}}"#,
        );
        assert_eq!(u, Ok(ServerMessage::UserTranscript("yo".into())));
        let t = parse_server(
            r#"{"type":"client_tool_call","client_tool_call":{"tool_call_id":"t1","tool_name":"x","parameters":{}}}"#,
        );
        assert_eq!(
            t,
            Ok(ServerMessage::ClientToolCall { tool_call_id: "t1".into(), tool_name: "x".into() })
        );
        let e = parse_server(
            r#"{"type":"error","error_event":{"code":1008,"message":"override not allowed","error_type":"override_error"}}"#,
        );
        assert_eq!(
            e,
            Ok(ServerMessage::Error {
                message: "override_error: 1008: override not allowed".into()
            })
        );
        let x = parse_server(r#"{"type":"vad_score","vad_score_event":{"vad_score":0.1}}"#);
        assert_eq!(x, Ok(ServerMessage::Unknown("vad_score".into())));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            "",
            "[]",
            "{}",
            "nope",
            r#"{"type":"audio"}"#,
            r#"{"type":"audio","audio_event":{"audio_base_64":"!!","event_id":1}}"#,
            r#"{"type":"ping","ping_event":{"event_id":-1}}"#,
        ] {
            assert!(matches!(parse_server(bad), Err(ProtocolError::Malformed { .. })), "{bad}");
        }
    }

    #[test]
    fn client_messages() {
        let vars = [("caller_number", "+1555"), ("call_id", "c\"1")];
        let init = client_initiation(&Initiation {
            voice_id: "v1",
            first_message: Some("Hello"),
            dynamic_variables: &vars,
        });
        let v: serde_json::Value = serde_json::from_str(&init).unwrap();
        assert_eq!(v["type"], "conversation_initiation_client_data");
        assert_eq!(v["conversation_config_override"]["tts"]["voice_id"], "v1");
        assert_eq!(v["conversation_config_override"]["agent"]["first_message"], "Hello");
        assert_eq!(v["dynamic_variables"]["call_id"], "c\"1");
        let plain = client_initiation(&Initiation {
            voice_id: "v1",
            first_message: None,
            dynamic_variables: &[],
        });
        let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert!(v["conversation_config_override"].get("agent").is_none());
        let mut s = String::new();
        client_audio(&[0xFF, 0xFF, 0x7F], &mut s);
        assert_eq!(s, r#"{"user_audio_chunk":"//9/"}"#);
        assert_eq!(client_pong(42), r#"{"type":"pong","event_id":42}"#);
        let t: serde_json::Value = serde_json::from_str(&client_tool_error("t1")).unwrap();
        assert_eq!(
            (t["type"].as_str(), t["is_error"].as_bool()),
            (Some("client_tool_result"), Some(true))
        );
        let c: serde_json::Value =
            serde_json::from_str(&client_contextual_update("DTMF 5")).unwrap();
        assert_eq!(c["text"], "DTMF 5");
    }
}
