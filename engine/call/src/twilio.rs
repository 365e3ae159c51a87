//! Twilio Media Streams messages (`<Connect><Stream>`), parsed and built without I/O.
//!
//! Twilio sends text frames of JSON: `connected`, `start`, `media`, `mark`, `dtmf`, `stop`
//! (numbers as strings); precall sends `media` (base64 µ-law 8 kHz, one 20 ms frame each),
//! `mark` and `clear`, always with the stream's `streamSid`. Facts: `shared/PROTOCOLS.md` §1.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

/// Longest `streamSid`, `callSid` or `accountSid` accepted (Twilio's are 34 characters).
const MAX_SID: usize = 64;

/// A message from Twilio.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// The first message: protocol and version.
    Connected,
    /// The stream's metadata.
    Start(StreamStartInfo),
    /// Caller audio (µ-law 8 kHz), decoded into the buffer given to [`parse`].
    Media {
        /// `media.chunk`: 1 for the first, one more for each.
        chunk: u64,
    },
    /// A mark precall sent came back: the audio before it was played (or cleared).
    Mark(String),
    /// The caller pressed a key.
    Dtmf(char),
    /// The stream is over (the call ended on Twilio's side).
    Stop,
    /// A message of another type: ignored, counted.
    Other,
}

/// What a `start` message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStartInfo {
    /// `start.streamSid` (`MZ…`), put in every message precall sends.
    pub stream_sid: String,
    /// `start.callSid`.
    pub call_sid: String,
    /// `start.accountSid`.
    pub account_sid: String,
    /// `start.customParameters.call_id`: precall's call id, from the `<Parameter>`.
    pub call_id: String,
    /// `start.customParameters.greeting` is `1`: the stream is the call's first answer.
    pub greeting: bool,
    /// `start.customParameters.caller`: the caller's number, for the agent.
    pub caller: String,
    /// `start.customParameters.dialed`: the number called, for the agent.
    pub dialed: String,
}

/// A message that is not what the protocol says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Not JSON, or a field of the wrong type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A required field is missing or empty.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A field has a value precall does not accept.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(default, borrow)]
    start: Option<RawStart<'a>>,
    #[serde(default, borrow)]
    media: Option<RawMedia<'a>>,
    #[serde(default)]
    mark: Option<RawMark>,
    #[serde(default)]
    dtmf: Option<RawDtmf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawStart<'a> {
    #[serde(default)]
    stream_sid: String,
    #[serde(default)]
    call_sid: String,
    #[serde(default)]
    account_sid: String,
    #[serde(default)]
    custom_parameters: std::collections::HashMap<String, String>,
    #[serde(default, borrow)]
    media_format: Option<RawFormat<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFormat<'a> {
    #[serde(default, borrow)]
    encoding: &'a str,
    #[serde(default)]
    sample_rate: u32,
}

#[derive(Deserialize)]
struct RawMedia<'a> {
    #[serde(default, borrow)]
    track: Option<&'a str>,
    #[serde(default, borrow)]
    chunk: Option<&'a str>,
    #[serde(borrow)]
    payload: &'a str,
}

#[derive(Deserialize)]
struct RawMark {
    name: String,
}

#[derive(Deserialize)]
struct RawDtmf {
    digit: String,
}

fn sid(value: String, name: &'static str) -> Result<String, StreamError> {
    if value.is_empty() {
        return Err(StreamError::Missing(name));
    }
    if value.len() > MAX_SID || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(StreamError::Invalid(format!("{name} {value:?} is not a Twilio id")));
    }
    Ok(value)
}

/// Parses one text frame from Twilio. A `media` payload is decoded into `audio` (cleared
/// first), so the caller's buffer is reused for every frame.
pub fn parse(text: &str, audio: &mut Vec<u8>) -> Result<StreamEvent, StreamError> {
    let raw: Raw<'_> =
        serde_json::from_str(text).map_err(|e| StreamError::Malformed(e.to_string()))?;
    Ok(match raw.event {
        "connected" => StreamEvent::Connected,
        "start" => {
            let start = raw.start.ok_or(StreamError::Missing("start"))?;
            if let Some(f) = &start.media_format {
                if f.encoding != "audio/x-mulaw" || f.sample_rate != 8000 {
                    return Err(StreamError::Invalid(format!(
                        "media format {} at {} Hz, not audio/x-mulaw at 8000 Hz",
                        f.encoding, f.sample_rate
                    )));
                }
            }
            let mut params = start.custom_parameters;
            let call_id = params.remove("call_id").unwrap_or_default();
            if call_id.is_empty() {
                return Err(StreamError::Missing("start.customParameters.call_id"));
            }
            StreamEvent::Start(StreamStartInfo {
                stream_sid: sid(start.stream_sid, "start.streamSid")?,
                call_sid: sid(start.call_sid, "start.callSid")?,
                account_sid: sid(start.account_sid, "start.accountSid")?,
                call_id,
                greeting: params.get("greeting").is_some_and(|g| g == "1"),
                caller: params.remove("caller").unwrap_or_default(),
                dialed: params.remove("dialed").unwrap_or_default(),
            })
        }
        "media" => {
            let media = raw.media.ok_or(StreamError::Missing("media"))?;
            if media.track.is_some_and(|t| t != "inbound" && t != "inbound_track") {
                return Ok(StreamEvent::Other);
            }
            let chunk = media.chunk.and_then(|c| c.parse().ok()).unwrap_or(0);
            audio.clear();
            B64.decode_vec(media.payload, audio)
                .map_err(|e| StreamError::Malformed(format!("media payload: {e}")))?;
            StreamEvent::Media { chunk }
        }
        "mark" => StreamEvent::Mark(raw.mark.ok_or(StreamError::Missing("mark"))?.name),
        "dtmf" => {
            let digit = raw.dtmf.ok_or(StreamError::Missing("dtmf"))?.digit;
            let mut chars = digit.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) if c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D') => {
                    StreamEvent::Dtmf(c)
                }
                _ => return Err(StreamError::Invalid(format!("dtmf digit {digit:?}"))),
            }
        }
        "stop" => StreamEvent::Stop,
        _ => StreamEvent::Other,
    })
}

/// `{"event":"media","streamSid":…,"media":{"payload":…}}` for one frame of µ-law, written
/// into `out` (cleared first).
pub fn media_message(stream_sid: &str, payload: &[u8], out: &mut String) {
    out.clear();
    out.push_str(r#"{"event":"media","streamSid":""#);
    out.push_str(stream_sid);
    out.push_str(r#"","media":{"payload":""#);
    B64.encode_string(payload, out);
    out.push_str(r#""}}"#);
}

/// The mark name for "the first `frames` agent frames", and back.
pub fn mark_name(frames: u64) -> String {
    format!("precall-{frames}")
}

/// The frame count a [`mark_name`] stands for; `None` for marks precall did not send.
pub fn parse_mark_name(name: &str) -> Option<u64> {
    name.strip_prefix("precall-")?.parse().ok()
}

/// `{"event":"mark",…}`: Twilio echoes it once the audio sent before it has played.
pub fn mark_message(stream_sid: &str, name: &str) -> String {
    serde_json::json!({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})
        .to_string()
}

/// `{"event":"clear",…}`: Twilio drops the audio it has buffered (and echoes pending marks).
pub fn clear_message(stream_sid: &str) -> String {
    serde_json::json!({"event": "clear", "streamSid": stream_sid}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"event":"start","sequenceNumber":"1","start":{"streamSid":"MZ0123456789abcdef0123456789abcdef","accountSid":"AC0123456789abcdef0123456789abcdef","callSid":"CA0123456789abcdef0123456789abcdef","tracks":["inbound"],"customParameters":{"call_id":"CA0123456789abcdef0123456789abcdef","greeting":"1"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ0123456789abcdef0123456789abcdef"}"#;

    #[test]
    fn parses_what_twilio_sends() {
        let mut audio = Vec::new();
        assert_eq!(
            parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#, &mut audio),
            Ok(StreamEvent::Connected)
        );
        let StreamEvent::Start(s) = parse(START, &mut audio).unwrap() else { panic!() };
        assert_eq!(s.stream_sid, "MZ0123456789abcdef0123456789abcdef");
        assert_eq!(s.call_id, s.call_sid);
        assert!(s.greeting);
        let media = r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"7","timestamp":"140","payload":"/////w=="},"streamSid":"MZ1"}"#;
        assert_eq!(parse(media, &mut audio), Ok(StreamEvent::Media { chunk: 7 }));
        assert_eq!(audio, [0xFF; 4]);
        assert_eq!(
            parse(
                r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"precall-12"}}"#,
                &mut audio
            ),
            Ok(StreamEvent::Mark("precall-12".into()))
        );
        assert_eq!(
            parse(
                r##"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"#"}}"##,
                &mut audio
            ),
            Ok(StreamEvent::Dtmf('#'))
        );
        assert_eq!(
            parse(
                r#"{"event":"stop","sequenceNumber":"6","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#,
                &mut audio
            ),
            Ok(StreamEvent::Stop)
        );
        assert_eq!(parse(r#"{"event":"future","x":1}"#, &mut audio), Ok(StreamEvent::Other));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let mut audio = Vec::new();
        assert!(matches!(parse("not json", &mut audio), Err(StreamError::Malformed(_))));
        let no_call = START.replace(r#""call_id":"CA0123456789abcdef0123456789abcdef","#, "");
        assert_eq!(
            parse(&no_call, &mut audio),
            Err(StreamError::Missing("start.customParameters.call_id"))
        );
        let bad_sid = START
            .replace("MZ0123456789abcdef0123456789abcdef\",\"accountSid", "M\\\"Z\",\"accountSid");
        assert!(matches!(parse(&bad_sid, &mut audio), Err(StreamError::Invalid(_))));
        let pcm = START.replace("audio/x-mulaw", "audio/l16");
        assert!(matches!(parse(&pcm, &mut audio), Err(StreamError::Invalid(_))));
        let bad_b64 = r#"{"event":"media","media":{"chunk":"1","payload":"***"}}"#;
        assert!(matches!(parse(bad_b64, &mut audio), Err(StreamError::Malformed(_))));
        let bad_digit = r#"{"event":"dtmf","dtmf":{"digit":"12"}}"#;
        assert!(matches!(parse(bad_digit, &mut audio), Err(StreamError::Invalid(_))));
    }

    #[test]
    fn builds_what_twilio_expects() {
        let mut out = String::new();
        media_message("MZ1", &[0xFF, 0x7F, 0x00], &mut out);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["event"], "media");
        assert_eq!(v["streamSid"], "MZ1");
        assert_eq!(B64.decode(v["media"]["payload"].as_str().unwrap()).unwrap(), [0xFF, 0x7F, 0]);
        let v: serde_json::Value = serde_json::from_str(&mark_message("MZ1", "precall-3")).unwrap();
        assert_eq!(v["mark"]["name"], "precall-3");
        assert_eq!(parse_mark_name(v["mark"]["name"].as_str().unwrap()), Some(3));
        assert_eq!(parse_mark_name("someone-else"), None);
        let v: serde_json::Value = serde_json::from_str(&clear_message("MZ1")).unwrap();
        assert_eq!((v["event"].as_str(), v["streamSid"].as_str()), (Some("clear"), Some("MZ1")));
    }
}
