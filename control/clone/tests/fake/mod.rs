//! A fake ElevenLabs API (and sample host) speaking HTTP/1.1 by hand over a real socket.
//!
//! - `POST /v1/voices/add` answers the scripted [`Reply`]s in order (the last one repeats) and
//!   records every request;
//! - `GET <path>` answers what [`Fake::serve`] registered (optionally chunked), else `404`;
//! - requests are parsed by hand: request line, headers, then a `Content-Length` or chunked
//!   body; `100 Continue` is sent only when the client asks with `Expect`, and connections are
//!   kept alive until the client closes them.
//!
//! A request is recorded before it is answered, so once the client has its answer (or gave up
//! on it) the record is there: tests never wait for the server.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The add-voice path.
pub const ADD_VOICE: &str = "/v1/voices/add";

/// How the fake answers one add-voice request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// An answer with a status, extra headers and a body.
    Status { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// Read the request, then never answer (the connection stays open).
    Hang,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: &str) -> Self {
        Self::Status {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, body: &str) -> Self {
        Self::Status {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Status { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// How many headers of that name.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count()
    }

    /// The multipart/form-data parts of the body, in order. Panics on a malformed body.
    pub fn multipart(&self) -> Vec<FormPart> {
        let ct = self.header("content-type").expect("content-type header");
        let (kind, params) = parse_header_value(ct);
        assert_eq!(kind, "multipart/form-data", "content type {ct}");
        let boundary = params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| v.clone())
            .expect("boundary parameter");
        assert!(!boundary.is_empty() && boundary.len() <= 70, "RFC 2046 boundary length");
        parse_multipart(&self.body, &boundary)
    }
}

/// One part of a multipart/form-data body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormPart {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

impl FormPart {
    /// The data as UTF-8 text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.data).expect("text part is UTF-8")
    }
}

#[derive(Clone)]
struct Served {
    bytes: Vec<u8>,
    chunked: bool,
}

#[derive(Default)]
struct State {
    replies: VecDeque<Reply>,
    last_reply: Option<Reply>,
    files: HashMap<String, Served>,
    requests: Vec<Request>,
    /// The account's voice library, when the fake keeps one ([`Fake::library`]).
    library: Option<Library>,
}

/// A voice library with room for `limit` voices: add-voice creates `voice-<n>` while there is
/// room and answers ElevenLabs' `400 voice_limit_reached` when full; `DELETE` and `GET
/// /v1/voices/{id}` read and change it.
#[derive(Default)]
struct Library {
    limit: usize,
    voices: Vec<String>,
    made: usize,
}

/// `/v1/voices/` — one voice's URL prefix.
pub const VOICES: &str = "/v1/voices/";

/// The running fake; it stops with the test's runtime.
#[derive(Clone)]
pub struct Fake {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Fake {
    /// Listens on 127.0.0.1 (a free port) and answers add-voice requests with `replies`.
    pub async fn start(replies: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State { replies: replies.into(), ..State::default() }));
        let accept_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(stream, Arc::clone(&accept_state)));
            }
        });
        Self { addr, state }
    }

    /// Listens like [`Fake::start`] with no scripted replies, keeping a voice library with
    /// room for `limit` voices, holding `existing` already.
    pub async fn library(limit: usize, existing: &[&str]) -> Self {
        let fake = Self::start(Vec::new()).await;
        fake.state.lock().unwrap().library = Some(Library {
            limit,
            voices: existing.iter().map(|v| (*v).to_owned()).collect(),
            made: 0,
        });
        fake
    }

    /// The voices in the library now.
    pub fn voices(&self) -> Vec<String> {
        self.state.lock().unwrap().library.as_ref().map(|l| l.voices.clone()).unwrap_or_default()
    }

    /// Removes a voice from the library behind precall's back (a deletion in the dashboard).
    pub fn forget(&self, voice: &str) {
        if let Some(library) = self.state.lock().unwrap().library.as_mut() {
            library.voices.retain(|v| v != voice);
        }
    }

    /// The voice ids deleted with `DELETE /v1/voices/{id}`, in order (found or not).
    pub fn deletions(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "DELETE")
            .filter_map(|r| r.target.strip_prefix(VOICES).map(str::to_owned))
            .collect()
    }

    /// `http://127.0.0.1:<port>` (no trailing slash), the `api_base` to configure.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `bytes` at `GET path` with a `Content-Length`.
    pub fn serve(&self, path: &str, bytes: &[u8]) {
        self.insert_file(path, bytes, false);
    }

    /// Serves `bytes` at `GET path` chunked, without a `Content-Length`.
    pub fn serve_chunked(&self, path: &str, bytes: &[u8]) {
        self.insert_file(path, bytes, true);
    }

    fn insert_file(&self, path: &str, bytes: &[u8], chunked: bool) {
        self.state
            .lock()
            .unwrap()
            .files
            .insert(path.to_owned(), Served { bytes: bytes.to_vec(), chunked });
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The add-voice requests received, in order.
    pub fn api_requests(&self) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.target == ADD_VOICE).collect()
    }
}

async fn serve_connection(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    loop {
        let request = match read_request(&mut stream, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = {
            let mut st = state.lock().unwrap();
            st.requests.push(request.clone());
            let voice = request.target.strip_prefix(VOICES).filter(|v| *v != "add");
            if let (Some(library), Some(voice)) = (st.library.as_mut(), voice) {
                Answer::Reply(library.voice(&request.method, voice))
            } else if request.method == "POST"
                && request.target == ADD_VOICE
                && st.replies.is_empty()
                && st.library.is_some()
            {
                Answer::Reply(st.library.as_mut().map(Library::add).unwrap_or(Reply::Hang))
            } else if request.method == "POST" && request.target == ADD_VOICE {
                let next = st.replies.pop_front().or_else(|| st.last_reply.clone());
                if let Some(r) = &next {
                    st.last_reply = Some(r.clone());
                }
                Answer::Reply(next.unwrap_or_else(|| Reply::text(500, "fake: no reply scripted")))
            } else if request.method == "GET" {
                match st.files.get(&request.target) {
                    Some(served) if served.chunked => Answer::Chunked(served.bytes.clone()),
                    Some(served) => Answer::Reply(Reply::Status {
                        status: 200,
                        headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                        body: served.bytes.clone(),
                    }),
                    None => Answer::Reply(Reply::text(404, "not found")),
                }
            } else {
                Answer::Reply(Reply::text(405, "method not allowed"))
            }
        };
        let reply = match reply {
            Answer::Reply(r) => r,
            Answer::Chunked(bytes) => {
                if write_chunked(&mut stream, &bytes).await.is_err() || close {
                    return;
                }
                continue;
            }
        };
        match reply {
            Reply::Hang => {
                // Keep the socket open and silent until the runtime ends.
                std::future::pending::<()>().await;
            }
            Reply::Status { status, headers, body } => {
                let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
                for (n, v) in &headers {
                    out.push_str(&format!("{n}: {v}\r\n"));
                }
                out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&body);
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
        if close {
            return;
        }
    }
}

impl Library {
    fn add(&mut self) -> Reply {
        if self.voices.len() >= self.limit {
            return Reply::json(
                400,
                r#"{"detail":{"status":"voice_limit_reached","message":"You have reached your maximum amount of custom voices"}}"#,
            );
        }
        self.made += 1;
        let id = format!("voice-{}", self.made);
        self.voices.push(id.clone());
        Reply::json(
            200,
            &format!(
                r#"{{"voice_id":"{id}","requires_verification":false,"library_voice_match":null}}"#
            ),
        )
    }

    fn voice(&mut self, method: &str, id: &str) -> Reply {
        let Some(at) = self.voices.iter().position(|v| v == id) else {
            return Reply::json(
                400,
                r#"{"detail":{"status":"voice_not_found","message":"A voice with the voice_id was not found."}}"#,
            );
        };
        match method {
            "DELETE" => {
                self.voices.remove(at);
                Reply::json(200, r#"{"status":"ok"}"#)
            }
            "GET" => Reply::json(
                200,
                &format!(
                    r#"{{"voice_id":"{id}","name":"v","category":"cloned","voice_verification":{{"requires_verification":false,"is_verified":false}},"safety_control":"NONE"}}"#
                ),
            ),
            _ => Reply::text(405, "method not allowed"),
        }
    }
}

enum Answer {
    Reply(Reply),
    Chunked(Vec<u8>),
}

async fn write_chunked(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
    for chunk in bytes.chunks(4096) {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
        stream.write_all(chunk).await?;
        stream.write_all(b"\r\n").await?;
    }
    stream.write_all(b"0\r\n\r\n").await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

const HEAD_MAX: usize = 64 << 10;
const BODY_MAX: usize = 64 << 20;

/// Reads one request; `None` when the client closed the connection between requests.
/// Bytes past the request stay in `buf` for the next one (keep-alive).
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > HEAD_MAX {
            return Err(invalid("request head too large"));
        }
        if read_more(stream, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(invalid("connection closed mid-head"))
            };
        }
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("head not UTF-8"))?.to_owned();
    buf.drain(..head_end + 4);

    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("bad request line"));
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| invalid("bad header"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
        body: Vec::new(),
    };

    if request.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }

    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        request.body = read_chunked_body(stream, buf).await?;
    } else if let Some(len) = request.header("content-length") {
        let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
        if len > BODY_MAX {
            return Err(invalid("body too large"));
        }
        while buf.len() < len {
            if read_more(stream, buf).await? == 0 {
                return Err(invalid("connection closed mid-body"));
            }
        }
        request.body = buf.drain(..len).collect();
    }
    Ok(Some(request))
}

async fn read_chunked_body(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if read_more(stream, buf).await? == 0 {
                return Err(invalid("closed in chunk size"));
            }
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).map_err(|_| invalid("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("chunk size"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            loop {
                if let Some(i) = find(buf, b"\r\n") {
                    buf.drain(..i + 2);
                    if i == 0 {
                        return Ok(body);
                    }
                    continue;
                }
                if read_more(stream, buf).await? == 0 {
                    return Err(invalid("closed in trailers"));
                }
            }
        }
        if body.len() + size > BODY_MAX {
            return Err(invalid("body too large"));
        }
        while buf.len() < size + 2 {
            if read_more(stream, buf).await? == 0 {
                return Err(invalid("closed in chunk"));
            }
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(invalid("chunk not CRLF-terminated"));
        }
        buf.drain(..size + 2);
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.reserve(16 << 10);
    stream.read_buf(buf).await
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `type/subtype; k=v; k2="quoted \" v"` -> (lowercased type, params).
fn parse_header_value(value: &str) -> (String, Vec<(String, String)>) {
    let (kind, rest) = value.split_once(';').unwrap_or((value, ""));
    (kind.trim().to_ascii_lowercase(), parse_params(rest))
}

/// Parameters `; k=v; k="q;uoted"` with quoted strings and backslash escapes.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ';' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(e) = chars.next() {
                                value.push(e);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ';' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim().to_owned();
            }
        }
        out.push((key.trim().to_ascii_lowercase(), value));
    }
}

/// RFC 7578 / RFC 2046 body: `--b CRLF part CRLF --b CRLF part … CRLF --b--`.
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<FormPart> {
    let opening = format!("--{boundary}\r\n");
    assert!(body.starts_with(opening.as_bytes()), "body starts with the boundary");
    let delimiter = format!("\r\n--{boundary}");
    let mut pos = opening.len();
    let mut parts = Vec::new();
    loop {
        let end = pos
            + find(&body[pos..], delimiter.as_bytes()).expect("every part ends with a delimiter");
        parts.push(parse_part(&body[pos..end]));
        let after = end + delimiter.len();
        match &body[after..after + 2] {
            b"--" => {
                let tail = &body[after + 2..];
                assert!(tail.is_empty() || tail == b"\r\n", "nothing after the close");
                return parts;
            }
            b"\r\n" => pos = after + 2,
            other => panic!("bad bytes after delimiter: {other:?}"),
        }
    }
}

fn parse_part(part: &[u8]) -> FormPart {
    let split = find(part, b"\r\n\r\n").expect("part headers end");
    let head = std::str::from_utf8(&part[..split]).expect("part headers UTF-8");
    let data = part[split + 4..].to_vec();
    let mut name = None;
    let mut filename = None;
    let mut content_type = None;
    for line in head.split("\r\n") {
        let (hname, hvalue) = line.split_once(':').expect("part header");
        if hname.eq_ignore_ascii_case("content-disposition") {
            let (kind, params) = parse_header_value(hvalue);
            assert_eq!(kind, "form-data");
            for (k, v) in params {
                match k.as_str() {
                    "name" => name = Some(v),
                    "filename" => filename = Some(v),
                    other => panic!("unexpected disposition parameter {other}"),
                }
            }
        } else if hname.eq_ignore_ascii_case("content-type") {
            content_type = Some(hvalue.trim().to_owned());
        } else {
            panic!("unexpected part header {hname}");
        }
    }
    FormPart { name: name.expect("part has a name"), filename, content_type, data }
}
