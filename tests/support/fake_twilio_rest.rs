//! A local fake of Twilio's REST API for the live-call push: `POST
//! /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`. It records every request and checks
//! what Twilio checks (basic auth, the form body, `Twiml` xor `Url`, 4,000 characters of inline
//! TwiML, absolute URLs), answering from a script per call (default `200`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Update {
    pub at: Instant,
    pub account: String,
    pub call_sid: String,
    /// `user:password` from the basic auth header.
    pub auth: String,
    pub form: Vec<(String, String)>,
    /// What the fake answered.
    pub status: u16,
}

impl Update {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
pub struct RestLog {
    pub updates: Vec<Update>,
    /// What broke the API's rules (a test fails on any).
    pub violations: Vec<String>,
    /// Statuses to answer per CallSid, in order; then 200.
    pub script: HashMap<String, Vec<u16>>,
}

pub struct FakeRest {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<RestLog>>,
}

impl FakeRest {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(RestLog::default()));
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let l = Arc::clone(&l);
                std::thread::spawn(move || serve(stream, &l));
            }
        });
        Self { addr, log }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers `statuses` to the next requests for `call_sid`.
    pub fn script(&self, call_sid: &str, statuses: &[u16]) {
        self.log.lock().unwrap().script.insert(call_sid.to_owned(), statuses.to_vec());
    }

    pub fn updates_for(&self, call_sid: &str) -> Vec<Update> {
        self.log
            .lock()
            .unwrap()
            .updates
            .iter()
            .filter(|u| u.call_sid == call_sid)
            .cloned()
            .collect()
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(stream: TcpStream, log: &Mutex<RestLog>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request_line = line.trim_end().to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, answer) = handle(&request_line, &headers, &body, log);
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn handle(
    request_line: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    log: &Mutex<RestLog>,
) -> (u16, String) {
    let mut log = log.lock().unwrap();
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (account, call_sid) = match segs.as_slice() {
        ["2010-04-01", "Accounts", account, "Calls", call] if call.ends_with(".json") => {
            (account.to_string(), call.trim_end_matches(".json").to_owned())
        }
        _ => {
            log.violations.push(format!("unexpected request {request_line}"));
            return (404, r#"{"code":20404}"#.into());
        }
    };
    if method != "POST" {
        log.violations.push(format!("{method} instead of POST"));
    }
    let auth = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| B64.decode(b).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if auth.is_empty() {
        log.violations.push("no basic auth".into());
    }
    if !headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
    {
        log.violations.push(format!("content type {:?}", headers.get("content-type")));
    }
    let form: Vec<(String, String)> = String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let has = |k: &str| form.iter().any(|(n, _)| n == k);
    if has("Twiml") == has("Url") {
        log.violations.push(format!("exactly one of Twiml and Url: {form:?}"));
    }
    if let Some((_, twiml)) = form.iter().find(|(k, _)| k == "Twiml") {
        if twiml.chars().count() > 4000 {
            log.violations.push("inline TwiML over 4,000 characters (32018)".into());
        }
        if roxmltree::Document::parse(twiml).is_err() {
            log.violations.push(format!("TwiML is not XML: {twiml}"));
        }
        for piece in twiml.split(['>', '<', '"']) {
            if piece.contains("/twilio/") && !(piece.starts_with("http") || piece.starts_with("ws"))
            {
                log.violations.push(format!("relative URL in TwiML (15004): {piece}"));
            }
        }
    }
    let status = match log.script.get_mut(&call_sid) {
        Some(s) if !s.is_empty() => s.remove(0),
        _ => 200,
    };
    log.updates.push(Update {
        at: Instant::now(),
        account,
        call_sid: call_sid.clone(),
        auth,
        form,
        status,
    });
    let answer = match status {
        200 => format!(r#"{{"sid":"{call_sid}","status":"in-progress"}}"#),
        404 => {
            r#"{"code":20404,"message":"The requested resource was not found","status":404}"#.into()
        }
        429 => r#"{"code":20429,"message":"Too Many Requests","status":429}"#.into(),
        s => format!(r#"{{"code":20500,"status":{s}}}"#),
    };
    (status, answer)
}
