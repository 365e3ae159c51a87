//! Twilio webhooks over real HTTP against the running `precall` binary: the seed's five
//! regression tests and the hostile cases around them, in the seed's poll flow
//! (`TWILIO_HOLD_MODE=poll`; the stream hold mode is tested in `twilio_stream.rs`).

mod support;

use std::time::Duration;

use precall_twilio::RequestValidator;
use support::pg::PgServer;
use support::precall::{Answer, Precall, request};
use support::{free_tcp_port, wait_for};

const TOKEN: &str = "test-auth-token-0123456789";

/// A precall with Twilio signatures on, reachable at `base`.
struct Node {
    p: Precall,
    base: String,
}

fn node(extra: &[(&str, &str)]) -> Node {
    node_on(free_tcp_port(), extra)
}

fn node_on(port: u16, extra: &[(&str, &str)]) -> Node {
    let base = format!("http://127.0.0.1:{port}");
    let mut env: Vec<(&str, String)> = vec![
        ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
        ("PUBLIC_BASE_URL", base.clone()),
        ("ENABLE_SIP_HANDLER", "false".to_owned()),
        ("SHARDS", "1".to_owned()),
        ("TWILIO_HOLD_MODE", "poll".to_owned()),
        // These tests poll; the push has its own (tests/twilio_push.rs), against a fake API.
        ("TWILIO_PUSH", "false".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Node { p: Precall::start_on(port, &env), base }
}

fn form(params: &[(&str, &str)]) -> String {
    params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn call_params(sid: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CallSid", sid.to_owned()),
        ("AccountSid", "AC00000000000000000000000000000000".to_owned()),
        ("From", "+12349013030".to_owned()),
        ("To", "+18005551212".to_owned()),
        ("Caller", "+12349013030".to_owned()),
        ("Called", "+18005551212".to_owned()),
        ("CallStatus", "ringing".to_owned()),
        ("Direction", "inbound".to_owned()),
        ("ApiVersion", "2010-04-01".to_owned()),
        ("FromCity", "".to_owned()),
        ("CallerName", "O'Brien & <Sons>".to_owned()),
    ]
}

impl Node {
    /// POSTs a form to `target`, signed for this node's public URL.
    fn signed(&self, target: &str, params: &[(&str, String)]) -> Answer {
        let owned: Vec<(String, String)> =
            params.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let sig = RequestValidator::new(TOKEN).compute(&format!("{}{target}", self.base), &owned);
        self.post(target, params, Some(&sig), &[])
    }

    fn post(
        &self,
        target: &str,
        params: &[(&str, String)],
        signature: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(sig) = signature {
            headers.push(("X-Twilio-Signature", sig));
        }
        headers.extend_from_slice(extra);
        request(self.p.http_port, "POST", target, &headers, form(&pairs).as_bytes()).unwrap()
    }

    fn voice(&self, sid: &str) -> Answer {
        self.signed("/twilio/voice", &call_params(sid))
    }

    fn poll(&self, sid: &str) -> Answer {
        self.signed(&format!("/twilio/poll?call_id={sid}"), &call_params(sid))
    }

    fn poll_target(&self, target: &str) -> Answer {
        self.signed(target, &call_params(SID))
    }

    fn metric(&self, line_start: &str) -> u64 {
        let (_, text) = self.p.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(line_start).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("metric {line_start} missing"))
    }
}

fn assert_xml(a: &Answer) {
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.head.to_ascii_lowercase().contains("content-type: text/xml"), "{}", a.head);
    assert!(
        a.body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response>"),
        "{}",
        a.body
    );
}

fn assert_hold(a: &Answer, base: &str, sid: &str, greeting: bool) {
    assert_xml(a);
    // The poll URL, naming the next hold segment once the hold clip is loaded.
    let redirect = format!("<Redirect method=\"POST\">{base}/twilio/poll?call_id={sid}");
    let at = a.body.find(&redirect).unwrap_or_else(|| panic!("{}", a.body));
    let rest = &a.body[at + redirect.len()..];
    assert!(rest.starts_with("</Redirect>") || rest.starts_with("&amp;hold="), "{}", a.body);
    // The hold clip whole, or one segment of it: either way a finite play.
    let whole = format!("<Play loop=\"1\">{base}/audio/hold.wav</Play>");
    let segment = format!("<Play loop=\"1\">{base}/audio/hold/");
    assert!(a.body.contains(&whole) || a.body.contains(&segment), "{}", a.body);
    assert_eq!(
        a.body.contains(&format!("<Play>{base}/audio/greeting.wav</Play>")),
        greeting,
        "{}",
        a.body
    );
    assert!(!a.body.contains("<Hangup"), "{}", a.body);
}

const SID: &str = "CA0123456789abcdef0123456789abcdef";

#[test]
fn valid_inbound_answers_greeting_hold_and_redirect() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    let a = n.voice(SID);
    assert_hold(&a, &n.base, SID, true);
    // The hold is finite and the redirect follows it, in this order.
    let play = a.body.find("<Play loop=\"1\">").unwrap();
    assert!(play < a.body.find("<Redirect").unwrap());
}

#[test]
fn bad_or_missing_signature_is_403() {
    let n = node(&[]);
    let a = n.post("/twilio/voice", &call_params(SID), Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ="), &[]);
    assert_eq!(a.status, 403, "{a:?}");
    let a = n.post("/twilio/voice", &call_params(SID), None, &[]);
    assert_eq!(a.status, 403, "{a:?}");
    // Signed, then tampered with.
    let mut params = call_params(SID);
    let owned: Vec<(String, String)> =
        params.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let sig = RequestValidator::new(TOKEN).compute(&format!("{}/twilio/voice", n.base), &owned);
    params[3].1 = "+19005550000".into();
    assert_eq!(n.post("/twilio/voice", &params, Some(&sig), &[]).status, 403);
    assert!(n.metric("precall_errors_total{kind=\"signature\"}") >= 3);
    // The poll URL's query is signed too.
    let poll = n.signed(&format!("/twilio/poll?call_id={SID}"), &call_params(SID));
    let forged = n.post(
        "/twilio/poll?call_id=CAother",
        &call_params(SID),
        Some(
            &RequestValidator::new(TOKEN)
                .compute(&format!("{}/twilio/poll?call_id={SID}", n.base), &[]),
        ),
        &[],
    );
    assert_eq!(poll.status, 200);
    assert_eq!(forged.status, 403);
}

/// 16-bit samples of a PCM WAV (the data chunk after a 44-byte header).
fn pcm16(wav: &[u8]) -> Vec<i16> {
    wav[44..].chunks(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect()
}

fn get_bytes(n: &Node, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", n.p.http_port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw[..at]));
    raw[at..].to_vec()
}

#[test]
fn hold_goes_on_where_it_stopped_from_one_poll_to_the_next() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    let hold_segment = |body: &str| -> String {
        let start = body.find("<Play loop=\"1\">").unwrap() + "<Play loop=\"1\">".len();
        body[start..start + body[start..].find("</Play>").unwrap()].to_owned()
    };
    // The hold clip loads at start; until then it plays whole.
    let first = wait_for("the hold clip's segments", Duration::from_secs(10), || {
        Some(n.voice(SID)).filter(|a| a.body.contains("/audio/hold/"))
    });
    let seg0 = hold_segment(&first.body);
    assert!(seg0.starts_with(&format!("{}/audio/hold/", n.base)) && seg0.ends_with("/0.wav"));
    let next = format!("/twilio/poll?call_id={SID}&amp;hold=1");
    assert!(first.body.contains(&next), "the redirect names the next segment: {}", first.body);
    let second = n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=1"));
    let seg1 = hold_segment(&second.body);
    assert!(seg1.ends_with("/1.wav"), "{}", second.body);
    assert!(second.body.contains("&amp;hold=2"), "{}", second.body);

    // The two segments are the clip's first 2 s and the 2 s after (one poll interval each),
    // as the shipped hold clip has them (µ-law rounding aside).
    let clip = pcm16(&get_bytes(&n, "/audio/hold.wav"));
    let a = pcm16(&get_bytes(&n, seg0.strip_prefix(&n.base).unwrap()));
    let b = pcm16(&get_bytes(&n, seg1.strip_prefix(&n.base).unwrap()));
    assert_eq!((a.len(), b.len()), (16_000, 16_000));
    let close = |x: &[i16], y: &[i16]| {
        x.iter()
            .zip(y)
            .all(|(&p, &q)| (i32::from(p) - i32::from(q)).abs() <= 64 + i32::from(q).abs() / 16)
    };
    assert!(close(&a, &clip[..16_000]), "segment 0 is the clip's start");
    assert!(close(&b, &clip[16_000..32_000]), "segment 1 goes on where segment 0 stopped");
    // An unknown segment is a 404, not a crash.
    let (status, _) = n.p.get("/audio/hold/0000/1.wav");
    assert_eq!(status, 404);
}

#[test]
fn poll_while_processing_keeps_holding() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    n.voice(SID);
    let a = n.poll(SID);
    assert_hold(&a, &n.base, SID, false);
}

#[test]
fn poll_when_completed_connects_the_stream() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "0"), ("ELEVENLABS_AGENT_ID", "agent_e2e")]);
    n.voice(SID);
    let a = wait_for("the clone to complete", Duration::from_secs(10), || {
        Some(n.poll(SID)).filter(|a| a.body.contains("<Connect>"))
    });
    assert_xml(&a);
    // The stream URL reaches the media port (PUBLIC_BASE_URL is a direct http:// address).
    let ws = format!("ws://127.0.0.1:{}/twilio/media", n.p.media_port);
    assert!(a.body.contains(&format!("<Stream url=\"{ws}\">")), "{}", a.body);
    assert!(
        a.body.contains(&format!("<Parameter name=\"call_id\" value=\"{SID}\" />")),
        "{}",
        a.body
    );
    assert!(a.body.contains("<Parameter name=\"agent_id\" value=\"agent_e2e\" />"), "{}", a.body);
    assert!(a.body.contains("<Parameter name=\"voice_id\" value=\"sim-default-"), "{}", a.body);
    assert!(a.body.contains("<Parameter name=\"caller\" value=\"+12349013030\" />"), "{}", a.body);
    // When the stream closes, Twilio asks the poll URL what next.
    let connect_end = a.body.find("</Connect>").unwrap();
    let redirect =
        format!("<Redirect method=\"POST\">{}/twilio/poll?call_id={SID}</Redirect>", n.base);
    assert_eq!(a.body.find(&redirect), Some(connect_end + "</Connect>".len()), "{}", a.body);
}

#[test]
fn poll_when_failed_says_error_and_hangs_up() {
    let n = node(&[
        ("SIMULATED_CLONE_DELAY_MS", "0"),
        ("SIMULATED_CLONE_OUTCOME", "failed"),
        ("ERROR_MESSAGE", "Sorry & goodbye <now>"),
    ]);
    n.voice(SID);
    let a = wait_for("the clone to fail", Duration::from_secs(10), || {
        Some(n.poll(SID)).filter(|a| a.body.contains("<Hangup"))
    });
    assert_xml(&a);
    assert!(a.body.contains("<Say>Sorry &amp; goodbye &lt;now&gt;</Say><Hangup />"), "{}", a.body);
}

#[test]
fn unknown_call_on_poll_ends_politely() {
    let n = node(&[]);
    let a = n.poll("CAffffffffffffffffffffffffffffffff");
    assert_xml(&a);
    assert!(a.body.contains("<Say>") && a.body.contains("<Hangup />"), "{}", a.body);
}

#[test]
fn malformed_and_oversized_bodies() {
    let n = node(&[]);
    let sig = RequestValidator::new(TOKEN).compute(&format!("{}/twilio/voice", n.base), &[]);
    let headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Twilio-Signature", sig.as_str()),
    ];
    let a =
        request(n.p.http_port, "POST", "/twilio/voice", &headers, b"CallSid=%zz&From=%").unwrap();
    assert_eq!(a.status, 400, "{a:?}");
    let big = vec![b'a'; 64 * 1024 + 1];
    let a = request(n.p.http_port, "POST", "/twilio/voice", &headers, &big).unwrap();
    assert_eq!(a.status, 413, "{a:?}");
    // A signed request without CallSid is a 400, not a 500.
    let a = n.signed("/twilio/voice", &[("From", "+1".to_owned())]);
    assert_eq!(a.status, 400, "{a:?}");
    let a = n.signed("/twilio/poll", &[]);
    assert_eq!(a.status, 400, "{a:?}");
    // Wrong method.
    let a = request(n.p.http_port, "GET", "/twilio/voice", &[], b"").unwrap();
    assert_eq!(a.status, 405);
    // And it still serves.
    assert_eq!(n.p.get("/health").0, 200);
}

#[test]
fn same_call_sid_twice_starts_one_clone_job() {
    // Failed clones are retried by the next *different* call (no backoff here), so the counter
    // shows whether the repeat started a job of its own.
    let n = node(&[
        ("SIMULATED_CLONE_DELAY_MS", "0"),
        ("SIMULATED_CLONE_OUTCOME", "failed"),
        ("CLONE_RETRY_MS", "0"),
    ]);
    let failed = "precall_clone_jobs_total{result=\"failed\"}";
    n.voice(SID);
    wait_for("the first job", Duration::from_secs(10), || (n.metric(failed) == 1).then_some(()));
    let again = n.voice(SID);
    assert_xml(&again);
    assert!(
        again.body.contains("<Hangup />"),
        "the repeat answers the call's state: {}",
        again.body
    );
    let other = "CA11111111111111111111111111111111";
    n.voice(other);
    wait_for("the other call's job", Duration::from_secs(10), || {
        (n.metric(failed) == 2).then_some(())
    });
    assert_eq!(n.metric(failed), 2, "one job per call id, the repeat started none");
}

/// Twilio calls on TwiML hold count in the active-calls gauge: while their polls come, until
/// their end is reported, and no longer than their next poll is due when none comes (the
/// caller hung up unseen, or the poll went to another node).
#[test]
fn twilio_calls_on_hold_are_in_the_active_calls_gauge() {
    let gauge = "precall_active_calls{protocol=\"twilio\",shard=\"control\"}";
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000"), ("STATUS_POLL_INTERVAL_MS", "500")]);
    assert_eq!(n.metric(gauge), 0);
    let (a, b) = ("CA00000000000000000000000000000a01", "CA00000000000000000000000000000a02");
    assert_hold(&n.voice(a), &n.base, a, true);
    assert_hold(&n.voice(b), &n.base, b, true);
    assert_eq!(n.metric(gauge), 2);
    // The last hold answer for `a` comes after this instant.
    let last_hold = std::time::Instant::now();
    assert_hold(&n.poll(a), &n.base, a, false);
    assert_eq!(n.metric(gauge), 2, "a poll keeps its call counted once");
    let mut status = call_params(b);
    status[6].1 = "completed".into();
    assert_eq!(n.signed("/twilio/status", &status).status, 200);
    assert_eq!(n.metric(gauge), 1, "an ended call leaves at once");
    // No poll for `a`: it leaves once its next poll is overdue (2 × 0.5 s + 15 s of slack).
    wait_for("the unpolled call to leave the gauge", Duration::from_secs(40), || {
        (n.metric(gauge) == 0).then_some(())
    });
    assert!(last_hold.elapsed() >= Duration::from_secs(16), "not before its poll was overdue");
}

#[test]
fn poll_after_the_call_ended_hangs_up() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    n.voice(SID);
    let mut status = call_params(SID);
    status[6].1 = "completed".into();
    status.push(("CallDuration", "12".into()));
    let a = n.signed("/twilio/status", &status);
    assert_eq!(a.status, 200, "{a:?}");
    let a = n.poll(SID);
    assert_xml(&a);
    assert!(a.body.ends_with("<Hangup /></Response>"), "{}", a.body);
    assert!(!a.body.contains("<Say>"), "a silent hang-up: {}", a.body);
    assert_eq!(n.metric("precall_calls_total{protocol=\"twilio\",outcome=\"abandoned\"}"), 1);
}

#[test]
fn many_headers_are_accepted() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    let names: Vec<String> = (0..64).map(|i| format!("X-Forwarded-Extra-{i}")).collect();
    let extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let params = call_params(SID);
    let owned: Vec<(String, String)> =
        params.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let sig = RequestValidator::new(TOKEN).compute(&format!("{}/twilio/voice", n.base), &owned);
    let a = n.post("/twilio/voice", &params, Some(&sig), &extra);
    assert_hold(&a, &n.base, SID, true);
}

#[test]
fn without_a_token_webhooks_are_refused_unless_skipping_is_explicit() {
    let port = free_tcp_port();
    let base = format!("http://127.0.0.1:{port}");
    let p = Precall::start_on(
        port,
        &[("PUBLIC_BASE_URL", base.clone()), ("ENABLE_SIP_HANDLER", "false".into())],
    );
    let n = Node { p, base };
    assert_eq!(n.post("/twilio/voice", &call_params(SID), None, &[]).status, 403);
    drop(n);
    let port = free_tcp_port();
    let base = format!("http://127.0.0.1:{port}");
    let p = Precall::start_on(
        port,
        &[
            ("PUBLIC_BASE_URL", base.clone()),
            ("ENABLE_SIP_HANDLER", "false".into()),
            ("TWILIO_SKIP_SIGNATURE", "true".into()),
        ],
    );
    let n = Node { p, base };
    assert_eq!(n.post("/twilio/voice", &call_params(SID), None, &[]).status, 200);
}

/// The Python interpreter with Twilio's own helper library (tests/run.sh installs it).
fn twilio_python() -> String {
    let path = std::env::var("PRECALL_TWILIO_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/twilio-venv/bin/python").to_owned()
    });
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: run `bash tests/run.sh`, which installs Twilio's Python library \
         into target/twilio-venv (or set PRECALL_TWILIO_PYTHON)"
    );
    path
}

#[test]
fn a_request_signed_by_twilios_own_library_is_accepted() {
    let n = node(&[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    let params = call_params(SID);
    let url = format!("{}/twilio/voice", n.base);
    let script = "import json,sys\nfrom twilio.request_validator import RequestValidator\n\
                  d=json.load(sys.stdin)\nprint(RequestValidator(d['token']).compute_signature(d['url'], d['params']))";
    let input = serde_json::json!({
        "token": TOKEN,
        "url": url,
        "params": params.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let mut child = std::process::Command::new(twilio_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let sig = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let a = n.post("/twilio/voice", &params, Some(&sig), &[]);
    assert_hold(&a, &n.base, SID, true);
}

#[test]
fn a_call_recorded_before_a_restart_is_still_there_after_it() {
    let pg = PgServer::start();
    let port = free_tcp_port();
    let env = [("DATABASE_URL", pg.url()), ("SIMULATED_CLONE_DELAY_MS", "0".to_owned())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let n = node_on(port, &env);
    n.voice(SID);
    wait_for("the clone to complete", Duration::from_secs(10), || {
        Some(n.poll(SID)).filter(|a| a.body.contains("<Connect>"))
    });
    assert!(n.p.stop().success());

    let n = node_on(port, &env);
    let a = n.poll(SID);
    assert!(
        a.body.contains("<Connect>"),
        "the call and its clone survived the restart: {}",
        a.body
    );
    // A new call to the same profile reuses the completed clone at once.
    let a = n.voice("CA22222222222222222222222222222222");
    assert!(a.body.contains("<Connect>") && a.body.contains("<Play>"), "{}", a.body);
}

#[test]
fn a_database_outage_is_not_heard_by_a_caller_on_hold() {
    let mut pg = PgServer::start();
    let env = [("DATABASE_URL", pg.url()), ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let n = node(&env);
    assert_hold(&n.voice(SID), &n.base, SID, true);
    assert_hold(&n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=1")), &n.base, SID, false);
    let store_errors = n.metric("precall_errors_total{kind=\"store\"}");

    // The database goes away: the caller's polls keep holding, segment after segment.
    pg.stop();
    for segment in 2..5 {
        let a = n.poll_target(&format!("/twilio/poll?call_id={SID}&hold={segment}"));
        assert_hold(&a, &n.base, SID, false);
        let next = format!("&amp;hold={}", segment + 1);
        assert!(a.body.contains(&next), "the hold goes on from segment {segment}: {}", a.body);
    }
    assert!(n.metric("precall_errors_total{kind=\"store\"}") >= store_errors + 3);
    // A poll that does not come from a hold segment (the one after a stream) has nothing to
    // bound a hold by: it ends the call as before.
    let a = n.poll(SID);
    assert!(a.body.contains("<Hangup />"), "{}", a.body);
    // /health says so at its next probe of the store (every 500 ms).
    wait_for("/health to say the store is down", Duration::from_secs(10), || {
        (n.p.get("/health").0 == 503).then_some(())
    });

    // Back: the next polls answer from the record again, and the call is still holding.
    pg.restart();
    wait_for("the store to answer again", Duration::from_secs(20), || {
        (n.p.get("/health").0 == 200).then_some(())
    });
    let a = n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=5"));
    assert_hold(&a, &n.base, SID, false);
    // A call placed now is recorded as usual.
    assert_hold(
        &n.voice("CA33333333333333333333333333333333"),
        &n.base,
        "CA33333333333333333333333333333333",
        true,
    );
}

/// A GET that must be answered within `limit`: its status, or `None` when it was not.
fn get_within(port: u16, path: &str, limit: Duration) -> Option<u16> {
    support::precall::request_within(port, "GET", path, &[], b"", limit).ok().map(|a| a.status)
}

/// A hung database (PostgreSQL frozen: its connections stay open, nothing answers) is an
/// outage like a stopped one: a caller on hold keeps holding, a new call gets greeting and
/// hold and is recorded once the database answers again, and /health and /metrics, which never
/// wait for the store or the side runtime, answer throughout, a flood of them included.
#[test]
fn a_hung_database_is_an_outage_and_health_and_metrics_never_wait_for_it() {
    let pg = PgServer::start();
    let env = [
        ("DATABASE_URL", pg.url()),
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
        // A store step gets 3 s of it (store_deadline).
        ("CONTROL_REQUEST_TIMEOUT_MS", "4000".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let n = node(&env);
    assert_hold(&n.voice(SID), &n.base, SID, true);
    assert_hold(&n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=1")), &n.base, SID, false);

    // Six clients flood /health and /metrics for the rest of the test; each answer must come
    // within two seconds (they wait for neither the store nor the side runtime).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = n.p.http_port;
    let flood: Vec<_> = (0..6)
        .map(|i| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/health" } else { "/metrics" };
                let (mut answered, mut late) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match get_within(port, path, Duration::from_secs(2)) {
                        Some(200 | 503) => answered += 1,
                        _ => late += 1,
                    }
                }
                (answered, late)
            })
        })
        .collect();

    pg.freeze();
    wait_for("/health to say the store hangs", Duration::from_secs(15), || {
        (get_within(port, "/health", Duration::from_secs(1)) == Some(503)).then_some(())
    });
    // The caller on hold keeps holding; a new call is answered and journaled.
    let a = n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=2"));
    assert_hold(&a, &n.base, SID, false);
    let new_call = "CA44444444444444444444444444444444";
    assert_hold(&n.voice(new_call), &n.base, new_call, true);
    assert!(n.metric("precall_journal_entries") >= 1);

    pg.thaw();
    wait_for("the journal to reach the store", Duration::from_secs(20), || {
        (n.metric("precall_journal_entries") == 0
            && get_within(port, "/health", Duration::from_secs(1)) == Some(200))
        .then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, late): (u64, u64) =
        flood.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(late, 0, "every /health and /metrics was answered within two seconds");
    assert!(answered > 0);
    let recorded =
        |id: &str| pg.count(&format!("SELECT count(*) FROM calls WHERE call_id = '{id}'"));
    assert_eq!(recorded(new_call), 1, "the call answered during the hang is recorded");
    let inbound = pg.count(&format!(
        "SELECT count(*) FROM call_events WHERE call_id = '{new_call}' AND kind = 'inbound'"
    ));
    assert_eq!(inbound, 1);
    // And a call now is recorded as usual.
    let after = "CA55555555555555555555555555555555";
    assert_hold(&n.voice(after), &n.base, after, true);
    assert_eq!(recorded(after), 1);
}

#[test]
fn a_database_outage_past_the_hold_limit_ends_the_hold() {
    let mut pg = PgServer::start();
    let env = [
        ("DATABASE_URL", pg.url()),
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
        ("STATUS_POLL_INTERVAL_MS", "1000".to_owned()),
        ("MAX_HOLD_MS", "3000".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let n = node(&env);
    n.voice(SID);
    pg.stop();
    // Segment 2 is 2 s into the hold: still holding. Segment 3 is the limit: the error message.
    assert_hold(&n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=2")), &n.base, SID, false);
    let a = n.poll_target(&format!("/twilio/poll?call_id={SID}&hold=3"));
    assert_xml(&a);
    assert!(a.body.contains("<Say>") && a.body.contains("<Hangup />"), "{}", a.body);
}

// ---- Clone jobs: leases, takeover, failures and voice slots (issue 13, points 2 and 4) ----

#[path = "../control/clone/tests/fake/mod.rs"]
mod fake_elevenlabs;

use fake_elevenlabs::{Fake, Reply};

/// The lease columns of the one clone job in `pg`: (owner, lease_until − started_at in ms).
fn lease_of_the_job(rt: &tokio::runtime::Runtime, url: &str) -> Option<(String, i64)> {
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        let row = client
            .query_opt(
                "SELECT lease_owner, (EXTRACT(EPOCH FROM lease_until - started_at) * 1000)::bigint \
                 FROM clone_jobs WHERE status = 'processing' ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .ok()??;
        Some((row.get::<_, Option<String>>(0)?, row.get::<_, Option<i64>>(1)?))
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

#[test]
fn a_node_killed_mid_clone_hands_its_job_to_another_node() {
    let pg = PgServer::start();
    let url = pg.url();
    let shared = [("DATABASE_URL", url.as_str()), ("CLONE_LEASE_MS", "1000")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env = shared.to_vec();
        env.extend_from_slice(extra);
        env
    };
    // Node A clones slowly (it will die mid-clone); node B quickly.
    let a = node(&with(&[("SIMULATED_CLONE_DELAY_MS", "600000"), ("NODE_ID", "node-a")]));
    let b = node(&with(&[("SIMULATED_CLONE_DELAY_MS", "200"), ("NODE_ID", "node-b")]));
    assert_hold(&a.voice(SID), &a.base, SID, true);

    // While A lives it renews its lease (by then its first lease has long lapsed) and B,
    // sweeping every 250 ms, never runs the job: a slow clone is not run twice.
    let rt = runtime();
    wait_for("node A to renew its lease a few times", Duration::from_secs(20), || {
        lease_of_the_job(&rt, &url).filter(|(_, ms)| *ms > 3_000)
    });
    assert_eq!(lease_of_the_job(&rt, &url).map(|(owner, _)| owner).as_deref(), Some("node-a"));
    assert_eq!(b.p.metric_line("precall_clone_takeovers_total"), Some(0));
    assert_hold(&b.poll(SID), &b.base, SID, false);

    // A crashes: B takes the job over within about a lease and the caller (whose polls now
    // reach B, as Kamailio or a load balancer would send them) connects to the voice.
    let status = a.p.kill();
    assert!(!status.success());
    let connected =
        wait_for("node B to take the job over and connect", Duration::from_secs(20), || {
            Some(b.poll(SID)).filter(|x| x.body.contains("<Connect>"))
        });
    assert!(connected.body.contains("value=\"sim-default-1\""), "the same job: {}", connected.body);
    assert_eq!(b.p.metric_line("precall_clone_takeovers_total"), Some(1));
    assert_eq!(b.metric("precall_clone_jobs_total{result=\"completed\"}"), 1);
}

#[test]
fn a_stopping_node_hands_its_clone_job_back_at_once() {
    let pg = PgServer::start();
    let url = pg.url();
    // A long lease: B takes the job over only because A hands it back when it stops.
    let shared = [("DATABASE_URL", url.as_str()), ("CLONE_LEASE_MS", "600000")];
    let mut env_a = shared.to_vec();
    env_a.push(("SIMULATED_CLONE_DELAY_MS", "600000"));
    let mut env_b = shared.to_vec();
    env_b.push(("SIMULATED_CLONE_DELAY_MS", "200"));
    let a = node(&env_a);
    let b = node(&env_b);
    a.voice(SID);
    assert!(a.p.stop().success());
    // B's sweep runs every 2 s with this lease; the job completes right after.
    let connected = wait_for("node B to run the handed-back job", Duration::from_secs(20), || {
        Some(b.poll(SID)).filter(|x| x.body.contains("<Connect>"))
    });
    assert_xml(&connected);
    assert_eq!(b.p.metric_line("precall_clone_takeovers_total"), Some(1));
}

/// A sample file in a fresh temporary directory, as a `file://` URL.
fn sample_file(tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("precall-samples-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.wav"));
    let tone: Vec<i16> = (0..8_000).map(|i| ((i % 40) * 500 - 10_000) as i16).collect();
    std::fs::write(&path, support::wav_pcm16(&tone)).unwrap();
    format!("file://{}", path.display())
}

/// A node cloning with ElevenLabs at `fake`, the default profile's samples at `samples`.
fn elevenlabs_node(fake: &Fake, samples: &str, extra: &[(&str, &str)]) -> Node {
    let base = fake.base();
    let mut env = vec![
        ("ELEVENLABS_API_KEY", "test-xi-key"),
        ("ELEVENLABS_API_BASE", base.as_str()),
        ("ELEVENLABS_AGENT_ID", "agent_e2e"),
        ("VOICE_SAMPLE_URLS", samples),
    ];
    env.extend_from_slice(extra);
    node(&env)
}

fn end_call(n: &Node, sid: &str) {
    let mut status = call_params(sid);
    status[6].1 = "completed".into();
    assert_eq!(n.signed("/twilio/status", &status).status, 200);
}

fn poll_until_connected(n: &Node, sid: &str) -> Answer {
    wait_for("the clone to complete", Duration::from_secs(20), || {
        Some(n.poll(sid)).filter(|a| a.body.contains("<Connect>"))
    })
}

const SID2: &str = "CA2222222222222222222222222222222a";
const SID3: &str = "CA3333333333333333333333333333333a";
const SID4: &str = "CA4444444444444444444444444444444a";

#[test]
fn a_full_voice_library_frees_the_oldest_unused_voice_then_backs_off_when_none_is_free() {
    let pg = PgServer::start();
    let url = pg.url();
    let rt = runtime();
    // Room for one voice at the provider.
    let fake = rt.block_on(Fake::library(1, &[]));
    let keep = [("DATABASE_URL", url.as_str()), ("CLONE_DELETE_REPLACED", "false")];

    // First samples: voice-1; the call ends.
    let n = elevenlabs_node(&fake, &sample_file("a"), &keep);
    n.voice(SID);
    let a = poll_until_connected(&n, SID);
    assert!(a.body.contains("value=\"voice-1\""), "{}", a.body);
    end_call(&n, SID);
    drop(n);

    // New samples: the library is full (400 voice_limit_reached); voice-1 is unused now (no
    // call on it, the profile's samples are others), so it is deleted and the clone retried.
    let n = elevenlabs_node(&fake, &sample_file("b"), &keep);
    n.voice(SID2);
    let a = poll_until_connected(&n, SID2);
    assert!(a.body.contains("value=\"voice-2\""), "{}", a.body);
    assert_eq!(fake.deletions(), ["voice-1"]);
    assert_eq!(fake.voices(), ["voice-2"]);
    assert_eq!(n.metric("precall_voices_deleted_total{why=\"slot\"}"), 1);
    drop(n);

    // Third samples while the caller on voice-2 still talks: nothing is free. The clone fails
    // permanently; the caller hears the error; /health and /metrics say why; the next call
    // gets the error at once without asking the provider again.
    let n = elevenlabs_node(&fake, &sample_file("c"), &keep);
    n.voice(SID3);
    let a = wait_for("the clone to fail", Duration::from_secs(20), || {
        Some(n.poll(SID3)).filter(|a| a.body.contains("<Hangup />"))
    });
    assert!(a.body.contains("<Say>"), "the error message: {}", a.body);
    let (status, health) = n.p.get("/health");
    assert_eq!(status, 200, "a failing profile does not take the node out: {health}");
    assert!(
        health.contains("voice_limit_reached") && health.contains("\"permanent\":true"),
        "{health}"
    );
    assert_eq!(n.metric("precall_clone_failures_total{kind=\"permanent\"}"), 1);
    assert_eq!(n.p.metric("precall_clone_backoff"), 1);
    let adds = fake.api_requests().len();
    let a = n.voice(SID4);
    assert!(a.body.contains("<Say>") && a.body.contains("<Hangup />"), "{}", a.body);
    assert_eq!(fake.api_requests().len(), adds, "a permanent failure is not retried per call");
    assert_eq!(fake.voices(), ["voice-2"], "the voice in use is kept");
}

#[test]
fn a_voice_replaced_by_new_samples_is_deleted_once_no_call_is_on_it() {
    let pg = PgServer::start();
    let url = pg.url();
    let rt = runtime();
    let fake = rt.block_on(Fake::library(10, &[]));
    let db = [("DATABASE_URL", url.as_str())];
    let n = elevenlabs_node(&fake, &sample_file("old"), &db);
    n.voice(SID);
    poll_until_connected(&n, SID);
    drop(n);

    let n = elevenlabs_node(&fake, &sample_file("new"), &db);
    n.voice(SID2);
    let a = poll_until_connected(&n, SID2);
    assert!(a.body.contains("value=\"voice-2\""), "{}", a.body);
    // The caller on voice-1 is still connected: it is kept.
    assert!(fake.deletions().is_empty());
    end_call(&n, SID);
    // The voice sweep runs every 30 s; this node's first ran at its start, so restart to see
    // the next one at once.
    drop(n);
    let n = elevenlabs_node(&fake, &sample_file("new"), &db);
    wait_for("voice-1 to be deleted", Duration::from_secs(20), || {
        (fake.deletions() == ["voice-1"]).then_some(())
    });
    assert_eq!(fake.voices(), ["voice-2"]);
    // The node counts the deletion once the provider has answered it: a moment after the
    // fake saw the request.
    let deleted = || n.metric("precall_voices_deleted_total{why=\"replaced\"}");
    wait_for("the deletion to be counted", Duration::from_secs(5), || {
        (deleted() >= 1).then_some(())
    });
    assert_eq!(deleted(), 1);
    assert_eq!(fake.deletions(), ["voice-1"], "deleted once");
}

#[test]
fn each_permanent_provider_error_backs_off_and_is_explained() {
    let cases = [
        (
            Reply::json(
                401,
                r#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
            ),
            "rejected the API key",
        ),
        (
            Reply::json(
                401,
                r#"{"detail":{"status":"quota_exceeded","message":"Quota exceeded"}}"#,
            ),
            "quota is exceeded",
        ),
        (
            Reply::json(
                422,
                r#"{"detail":[{"loc":["body","files"],"msg":"audio too short","type":"value_error"}]}"#,
            ),
            "audio too short",
        ),
        (
            Reply::json(200, r#"{"voice_id":"v-unverified","requires_verification":true}"#),
            "requires verification",
        ),
    ];
    let rt = runtime();
    for (reply, reason) in cases {
        let fake = rt.block_on(Fake::start(vec![reply]));
        let n = elevenlabs_node(&fake, &sample_file("perm"), &[]);
        n.voice(SID);
        let a = wait_for("the clone to fail", Duration::from_secs(20), || {
            Some(n.poll(SID)).filter(|a| a.body.contains("<Hangup />"))
        });
        assert!(a.body.contains("<Say>"), "{reason}: {}", a.body);
        let (_, health) = n.p.get("/health");
        assert!(
            health.contains(reason) && health.contains("\"permanent\":true"),
            "{reason}: {health}"
        );
        assert_eq!(n.metric("precall_clone_failures_total{kind=\"permanent\"}"), 1, "{reason}");
        // The next caller is told at once; the provider is not asked again.
        let a = n.voice(SID2);
        assert!(a.body.contains("<Hangup />"), "{reason}: {}", a.body);
        assert_eq!(fake.api_requests().len(), 1, "{reason}: not retried per call");
    }
}

#[test]
fn a_transient_provider_error_backs_off_then_the_next_call_retries() {
    let rt = runtime();
    // Four 503s exhaust the provider's attempts; then it answers.
    let fake = rt.block_on(Fake::start(vec![
        Reply::text(503, "busy"),
        Reply::text(503, "busy"),
        Reply::text(503, "busy"),
        Reply::text(503, "busy"),
        Reply::json(200, r#"{"voice_id":"v-after","requires_verification":false}"#),
    ]));
    let n = elevenlabs_node(&fake, &sample_file("transient"), &[("CLONE_RETRY_MS", "1500")]);
    n.voice(SID);
    wait_for("the clone to fail", Duration::from_secs(30), || {
        Some(n.poll(SID)).filter(|a| a.body.contains("<Hangup />"))
    });
    let (_, health) = n.p.get("/health");
    assert!(health.contains("503") && health.contains("\"permanent\":false"), "{health}");
    assert_eq!(n.metric("precall_clone_failures_total{kind=\"transient\"}"), 1);
    // Within the backoff a new call is told at once; after it, a call retries and connects.
    let a = n.voice(SID2);
    assert!(a.body.contains("<Hangup />"), "{}", a.body);
    wait_for("the backoff to end", Duration::from_secs(20), || {
        n.p.get("/health").1.contains("\"backing_off\":[]").then_some(())
    });
    assert_hold(&n.voice(SID3), &n.base, SID3, true);
    let a = poll_until_connected(&n, SID3);
    assert!(a.body.contains("value=\"v-after\""), "{}", a.body);
}

#[test]
fn a_reused_voice_deleted_at_the_provider_is_found_before_a_call_is_sent_to_it() {
    let rt = runtime();
    let fake = rt.block_on(Fake::library(10, &[]));
    let n = elevenlabs_node(&fake, &sample_file("check"), &[("CLONE_VERIFY_AFTER_MS", "1")]);
    n.voice(SID);
    let a = poll_until_connected(&n, SID);
    assert!(a.body.contains("value=\"voice-1\""), "{}", a.body);

    // Somebody deletes voice-1 in the provider's dashboard. The next caller is not sent to it:
    // the check finds it gone, and the call holds while the profile is cloned anew. (A voice is
    // due a check once it is older than CLONE_VERIFY_AFTER_MS, 1 ms here: the condition waited
    // for is the clock itself, since the poll above may have come within that millisecond.)
    fake.forget("voice-1");
    let due = std::time::Instant::now() + Duration::from_millis(3);
    wait_for("voice-1 to be due a check", Duration::from_secs(1), || {
        (std::time::Instant::now() >= due).then_some(())
    });
    assert_hold(&n.voice(SID2), &n.base, SID2, true);
    let a = poll_until_connected(&n, SID2);
    assert!(a.body.contains("value=\"voice-2\""), "{}", a.body);
    assert_eq!(n.metric("precall_voice_checks_total{result=\"gone\"}"), 1);

    // A voice that is there connects the inbound call at once, after its check (a call within
    // the same millisecond as voice-2's creation is not due one: callers until one is).
    let mut calls = 0;
    let a = wait_for("a call to check voice-2", Duration::from_secs(10), || {
        calls += 1;
        let a = n.voice(&format!("CA{calls:032}"));
        (n.metric("precall_voice_checks_total{result=\"usable\"}") == 1).then_some(a)
    });
    assert!(a.body.contains("<Connect>") && a.body.contains("value=\"voice-2\""), "{}", a.body);
    assert_eq!(n.metric("precall_voice_checks_total{result=\"gone\"}"), 1);
}

#[test]
fn a_database_outage_under_webhook_load_hangs_up_nobody_and_loses_no_record() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut pg = PgServer::start();
    let url = pg.url();
    let env = [("DATABASE_URL", url.as_str()), ("SIMULATED_CLONE_DELAY_MS", "600000")];
    let n = Arc::new(node(&env));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let during = Arc::new(AtomicUsize::new(0));
    let outage = Arc::new(AtomicBool::new(false));
    // Callers arrive one after another all along; each also polls its first hold segment
    // and every third hangs up (status callback).
    let caller = {
        let (n, stop, sent, during, outage) = (
            Arc::clone(&n),
            Arc::clone(&stop),
            Arc::clone(&sent),
            Arc::clone(&during),
            Arc::clone(&outage),
        );
        std::thread::spawn(move || {
            let mut heard = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let i = sent.load(Ordering::Acquire);
                let sid = format!("CA{i:032}");
                let in_outage = outage.load(Ordering::Acquire);
                let a = n.voice(&sid);
                let p = n.signed(&format!("/twilio/poll?call_id={sid}&hold=2"), &call_params(&sid));
                let mut ended = 200;
                if i % 3 == 0 {
                    let mut status = call_params(&sid);
                    status[6].1 = "completed".into();
                    ended = n.signed("/twilio/status", &status).status;
                }
                heard.push((sid, a, p, ended));
                sent.fetch_add(1, Ordering::AcqRel);
                if in_outage {
                    during.fetch_add(1, Ordering::AcqRel);
                }
            }
            heard
        })
    };
    wait_for("calls before the outage", Duration::from_secs(20), || {
        (sent.load(Ordering::Acquire) >= 10).then_some(())
    });
    // The pool and the side runtime's queue are on /metrics.
    assert_eq!(n.metric("precall_db_connections{state=\"max\"}"), 8);
    assert!(n.p.metric_line("precall_control_queue_depth").is_some());
    pg.stop();
    outage.store(true, Ordering::Release);
    wait_for("/health to see the outage", Duration::from_secs(20), || {
        (n.p.get("/health").0 == 503).then_some(())
    });
    wait_for("calls during the outage", Duration::from_secs(30), || {
        (during.load(Ordering::Acquire) >= 15).then_some(())
    });
    assert!(n.p.metric_line("precall_journal_entries").unwrap() > 0, "calls were journaled");
    pg.restart();
    outage.store(false, Ordering::Release);
    wait_for("the journal to be replayed", Duration::from_secs(30), || {
        (n.p.metric_line("precall_journal_entries") == Some(0)).then_some(())
    });
    let after = sent.load(Ordering::Acquire);
    wait_for("calls after the outage", Duration::from_secs(20), || {
        (sent.load(Ordering::Acquire) >= after + 10).then_some(())
    });
    stop.store(true, Ordering::Release);
    let heard = caller.join().unwrap();

    // Nobody heard the error message or was hung up; every hang-up was taken (200).
    for (sid, a, p, ended) in &heard {
        assert!(!a.body.contains("<Hangup") && a.body.contains("<Redirect"), "{sid}: {}", a.body);
        assert!(!p.body.contains("<Hangup") && p.body.contains("<Redirect"), "{sid}: {}", p.body);
        assert_eq!(*ended, 200, "{sid}");
    }
    // Every call is recorded, and every hang-up with it.
    let rt = runtime();
    let (calls, ended) = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let calls: i64 = client.query_one("SELECT count(*) FROM calls", &[]).await.unwrap().get(0);
        let ended: i64 = client
            .query_one("SELECT count(*) FROM calls WHERE status = 'ended'", &[])
            .await
            .unwrap()
            .get(0);
        (calls, ended)
    });
    assert_eq!(calls as usize, heard.len(), "every call sent is recorded");
    assert_eq!(ended as usize, heard.len().div_ceil(3), "every hang-up is recorded");
    assert!(n.p.metric_line("precall_journal_replayed_total").unwrap() >= 15);
}

#[test]
fn two_nodes_racing_on_one_call_and_one_profile_record_it_once_and_clone_once() {
    use std::sync::{Arc, Barrier};
    let pg = PgServer::start();
    let url = pg.url();
    let env = [("DATABASE_URL", url.as_str()), ("SIMULATED_CLONE_DELAY_MS", "600000")];
    let nodes = Arc::new([node(&env), node(&env)]);
    // Eight rounds: both nodes get the same CallSid at the same moment (Twilio's retry of a
    // webhook that timed out, a second load balancer path), and a second caller of the same
    // profile arrives on each node at once.
    let answers: Vec<Answer> = (0..8)
        .flat_map(|round| {
            let start = Arc::new(Barrier::new(4));
            let sids =
                [format!("CA{round:032}"), format!("CB{round:032}"), format!("CC{round:032}")];
            let jobs: Vec<_> = [(0, 0), (1, 0), (0, 1), (1, 2)]
                .into_iter()
                .map(|(node, sid)| {
                    let (nodes, start, sid) =
                        (Arc::clone(&nodes), Arc::clone(&start), sids[sid].clone());
                    std::thread::spawn(move || {
                        start.wait();
                        nodes[node].voice(&sid)
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().unwrap()).collect::<Vec<_>>()
        })
        .collect();
    for a in &answers {
        assert!(a.body.contains("<Redirect") && !a.body.contains("<Hangup"), "{}", a.body);
    }
    let count = |sql: &str| pg.count(sql);
    assert_eq!(count("SELECT count(*) FROM calls"), 24, "each CallSid is recorded once");
    assert_eq!(count("SELECT count(*) FROM clone_jobs"), 1, "one job for the profile's samples");
    assert_eq!(count("SELECT count(*) FROM call_events WHERE kind = 'clone_started'"), 1);
    assert_eq!(count("SELECT count(*) FROM call_events WHERE kind = 'inbound'"), 24);
    assert_eq!(count("SELECT count(*) FROM calls WHERE clone_job_id IS NULL"), 0);
    let running: u64 =
        nodes.iter().map(|n| n.p.metric_line("precall_clone_jobs_running").unwrap()).sum();
    assert_eq!(running, 1, "one node runs the job");
}

#[test]
fn during_a_database_outage_a_profile_with_a_voice_still_reaches_the_agent() {
    let mut pg = PgServer::start();
    let url = pg.url();
    let env = [("DATABASE_URL", url.as_str()), ("SIMULATED_CLONE_DELAY_MS", "0")];
    let n = node(&env);
    n.voice(SID);
    poll_until_connected(&n, SID);
    pg.stop();
    wait_for("/health to see the outage", Duration::from_secs(20), || {
        (n.p.get("/health").0 == 503).then_some(())
    });
    // The node has seen the profile's completed clone: the caller is put through at once.
    let a = n.voice(SID2);
    assert!(
        a.body.contains("<Connect>") && a.body.contains("value=\"sim-default-1\""),
        "{}",
        a.body
    );
    pg.restart();
    wait_for("the journal to be replayed", Duration::from_secs(30), || {
        (n.p.metric_line("precall_journal_entries") == Some(0)
            && n.p.metric_line("precall_journal_replayed_total") == Some(1))
        .then_some(())
    });
    let rt = runtime();
    let status = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT status, clone_job_id FROM calls WHERE call_id = $1", &[&SID2])
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, Option<i64>>(1))
    });
    assert_eq!(status, ("connected".to_owned(), Some(1)), "recorded as it happened");
}
