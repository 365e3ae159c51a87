//! A Twilio media edge for the end-to-end tests: it follows the TwiML precall answers as Twilio
//! does (`<Connect><Stream url>` with its `<Parameter>`s), opens the stream with a signed
//! upgrade, says `connected` and `start`, sends the caller's audio as paced `media` (20 ms of
//! µ-law each, sequence numbers, chunks and timestamps as strings), plays what precall sends
//! in real time from a buffer, echoes each `mark` once the audio before it has played (at once
//! after a `clear`, which empties the buffer), and records everything it got.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use precall_twilio::RequestValidator;
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

/// The `<Stream>` of a TwiML answer: its URL and parameters.
#[derive(Debug, Clone)]
pub struct StreamTwiml {
    pub url: String,
    pub params: Vec<(String, String)>,
    /// The `<Redirect>` after `</Connect>`, if any.
    pub redirect: Option<String>,
}

/// Reads the `<Connect><Stream>` out of a TwiML document, as Twilio would.
pub fn stream_of(twiml: &str) -> Option<StreamTwiml> {
    let doc = roxmltree::Document::parse(twiml).expect("TwiML is XML");
    let stream = doc.descendants().find(|n| n.has_tag_name("Stream"))?;
    let params = stream
        .children()
        .filter(|n| n.has_tag_name("Parameter"))
        .map(|p| {
            (p.attribute("name").unwrap().to_owned(), p.attribute("value").unwrap().to_owned())
        })
        .collect();
    let connect = stream.parent().unwrap();
    let redirect = connect
        .next_sibling_element()
        .filter(|n| n.has_tag_name("Redirect"))
        .and_then(|n| n.text())
        .map(str::to_owned);
    Some(StreamTwiml { url: stream.attribute("url").unwrap().to_owned(), params, redirect })
}

/// What a stream session got.
#[derive(Debug, Default)]
pub struct Session {
    /// Each outbound media frame, with when it arrived (since the stream opened).
    pub media: Vec<(Duration, Vec<u8>)>,
    /// When each `clear` arrived.
    pub clears: Vec<Duration>,
    /// Marks received, with when.
    pub marks: Vec<(Duration, String)>,
    /// Messages that break the protocol (a test fails on any).
    pub violations: Vec<String>,
    /// precall closed the socket (with this close code), and when.
    pub closed: Option<(Option<u16>, Duration)>,
}

/// Why a stream could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The upgrade was answered with this HTTP status.
    Status(u16),
    Other(String),
}

pub struct Stream {
    ws: WebSocket<TcpStream>,
    pub stream_sid: String,
    pub call_sid: String,
    opened: Instant,
    seq: u64,
    chunk: u64,
    /// When the audio precall sent so far will have played.
    playing_until: Instant,
    pending_marks: Vec<(String, Instant)>,
    pub session: Session,
}

const ACCOUNT: &str = "AC00000000000000000000000000000000";

/// Opens the stream of `twiml` for call `call_sid`, signing the upgrade with `token` (or a
/// wrong signature with `None`).
pub fn open(twiml: &StreamTwiml, token: Option<&str>) -> Result<Stream, OpenError> {
    open_with(twiml, token, None)
}

/// [`open`], with the socket's receive buffer set to `rcvbuf` bytes before it connects (a
/// small one plays a slow Twilio: its TCP window closes after a few kilobytes).
pub fn open_with(
    twiml: &StreamTwiml,
    token: Option<&str>,
    rcvbuf: Option<usize>,
) -> Result<Stream, OpenError> {
    let url = &twiml.url;
    let host = url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap();
    let addr: std::net::SocketAddr = host.parse().expect("an ip:port stream URL");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| OpenError::Other(e.to_string()))?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).map_err(|e| OpenError::Other(e.to_string()))?;
    }
    socket.connect(&addr.into()).map_err(|e| OpenError::Other(e.to_string()))?;
    let tcp: TcpStream = socket.into();
    let mut req = url.as_str().into_client_request().unwrap();
    let sig = match token {
        Some(t) => RequestValidator::new(t).compute(url, &[]),
        None => "bm90IGEgc2lnbmF0dXJl".to_owned(),
    };
    req.headers_mut().insert("X-Twilio-Signature", sig.parse().unwrap());
    let (ws, _) = tungstenite::client(req, tcp).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
            OpenError::Status(r.status().as_u16())
        }
        other => OpenError::Other(other.to_string()),
    })?;
    let now = Instant::now();
    Ok(Stream {
        ws,
        stream_sid: "MZ0123456789abcdef0123456789abcdef".to_owned(),
        call_sid: String::new(),
        opened: now,
        seq: 0,
        chunk: 0,
        playing_until: now,
        pending_marks: Vec::new(),
        session: Session::default(),
    })
}

impl Stream {
    fn send(&mut self, v: Value) {
        let _ = self.ws.send(Message::text(v.to_string()));
    }

    fn next_seq(&mut self) -> String {
        self.seq += 1;
        self.seq.to_string()
    }

    /// `connected`, then `start` with the TwiML's parameters as `customParameters`.
    pub fn start(&mut self, call_sid: &str, params: &[(String, String)]) {
        self.call_sid = call_sid.to_owned();
        self.send(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
        let custom: serde_json::Map<String, Value> =
            params.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let seq = self.next_seq();
        let sid = self.stream_sid.clone();
        self.send(json!({
            "event": "start", "sequenceNumber": seq, "streamSid": sid,
            "start": {"streamSid": sid, "accountSid": ACCOUNT, "callSid": call_sid,
                      "tracks": ["inbound"], "customParameters": custom,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
        }));
    }

    /// One 20 ms frame of caller audio.
    pub fn media(&mut self, frame: &[u8]) {
        self.chunk += 1;
        let seq = self.next_seq();
        let ts = ((self.chunk - 1) * 20).to_string();
        let (sid, chunk) = (self.stream_sid.clone(), self.chunk.to_string());
        self.send(json!({"event": "media", "sequenceNumber": seq, "streamSid": sid,
            "media": {"track": "inbound", "chunk": chunk, "timestamp": ts, "payload": B64.encode(frame)}}));
    }

    pub fn dtmf(&mut self, digit: char) {
        let seq = self.next_seq();
        let sid = self.stream_sid.clone();
        self.send(json!({"event": "dtmf", "streamSid": sid, "sequenceNumber": seq,
            "dtmf": {"track": "inbound_track", "digit": digit.to_string()}}));
    }

    /// `stop` (the caller hung up), then the socket closes.
    pub fn stop(&mut self) {
        let seq = self.next_seq();
        let sid = self.stream_sid.clone();
        let call = self.call_sid.clone();
        self.send(json!({"event": "stop", "sequenceNumber": seq, "streamSid": sid,
            "stop": {"accountSid": ACCOUNT, "callSid": call}}));
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }

    /// Talks for `d`: one frame of `caller` audio every 20 ms (when given), reading and playing
    /// what precall sends. Returns early when precall closes the stream.
    pub fn run_for(&mut self, d: Duration, caller: Option<&dyn Fn(u64) -> Vec<u8>>) {
        let until = Instant::now() + d;
        let mut next = Instant::now();
        while self.session.closed.is_none() {
            let now = Instant::now();
            if now >= until {
                return;
            }
            if let Some(f) = caller {
                if now >= next {
                    let frame = f(self.chunk);
                    self.media(&frame);
                    next += Duration::from_millis(20);
                }
            }
            self.echo_played_marks(now);
            let wait = next.min(until).saturating_duration_since(Instant::now());
            let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(20));
            self.ws.get_ref().set_read_timeout(Some(wait)).unwrap();
            let read = self.ws.read();
            self.on_read(read);
        }
    }

    /// Handles one read; `false` when nothing (more) is there to read now.
    fn on_read(&mut self, read: tungstenite::Result<Message>) -> bool {
        match read {
            Ok(Message::Text(t)) => self.on_text(t.as_str()),
            Ok(Message::Close(frame)) => {
                let code = frame.map(|f| u16::from(f.code));
                self.session.closed = Some((code, self.opened.elapsed()));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return false;
            }
            Err(_) => self.session.closed = Some((None, self.opened.elapsed())),
        }
        true
    }

    /// For many streams on one thread: from now on the socket never blocks; drive it with
    /// [`Stream::media`] and [`Stream::pump`].
    pub fn set_nonblocking(&mut self) {
        self.ws.get_ref().set_nonblocking(true).unwrap();
    }

    /// Reads whatever has arrived, echoes the marks that have played and sends what is
    /// buffered, without waiting (after [`Stream::set_nonblocking`]).
    pub fn pump(&mut self) {
        while self.session.closed.is_none() {
            let read = self.ws.read();
            if !self.on_read(read) {
                break;
            }
        }
        self.echo_played_marks(Instant::now());
        let _ = self.ws.flush();
    }

    fn echo_played_marks(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) =
            self.pending_marks.drain(..).partition(|(_, at)| *at <= now);
        self.pending_marks = later;
        for (name, _) in due {
            let seq = self.next_seq();
            let sid = self.stream_sid.clone();
            self.send(json!({"event": "mark", "sequenceNumber": seq, "streamSid": sid, "mark": {"name": name}}));
        }
    }

    fn on_text(&mut self, text: &str) {
        let at = self.opened.elapsed();
        let now = Instant::now();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.session.violations.push(format!("not JSON: {text}"));
            return;
        };
        if v["streamSid"] != self.stream_sid.as_str() {
            self.session.violations.push(format!("wrong or missing streamSid: {v}"));
        }
        match v["event"].as_str() {
            Some("media") => match v["media"]["payload"].as_str().map(|p| B64.decode(p)) {
                Some(Ok(audio)) => {
                    if audio.len() != 160 {
                        self.session.violations.push(format!("{} bytes, not 20 ms", audio.len()));
                    }
                    self.playing_until = self.playing_until.max(now) + Duration::from_millis(20);
                    self.session.media.push((at, audio));
                }
                _ => self.session.violations.push(format!("media without base64 payload: {v}")),
            },
            Some("mark") => match v["mark"]["name"].as_str() {
                Some(name) => {
                    self.session.marks.push((at, name.to_owned()));
                    self.pending_marks.push((name.to_owned(), self.playing_until.max(now)));
                }
                None => self.session.violations.push(format!("mark without a name: {v}")),
            },
            Some("clear") => {
                self.session.clears.push(at);
                // Twilio drops its buffer and returns every pending mark.
                self.playing_until = now;
                for m in &mut self.pending_marks {
                    m.1 = now;
                }
            }
            _ => self.session.violations.push(format!("unexpected message: {v}")),
        }
    }
}
