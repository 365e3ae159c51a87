//! Twilio calls reach the agent over Media Streams, end to end: the real `precall` binary, a
//! media edge that behaves as Twilio does (`support/fake_twilio.rs`: it follows the TwiML's
//! `<Stream url>`, signs the upgrade, paces the caller's audio and echoes marks as it plays)
//! and the strict fake agent. Both hold modes; the stream refusals; the end and the fallback
//! when a stream breaks.

mod support;

#[path = "support/fake_agent.rs"]
mod fake_agent;
#[path = "support/fake_twilio.rs"]
mod fake_twilio;

use std::time::Duration;

use fake_agent::{Behaviour, CALLER_HZ, FakeAgent, TONE_A_HZ, TONE_B_HZ, frequency, ulaw_tone};
use fake_twilio::{OpenError, StreamTwiml, open, open_with, stream_of};
use precall_media::Codec;
use support::precall::{Answer, Precall, request, signed_webhook};
use support::{free_tcp_port, wait_for};

const TOKEN: &str = "stream-test-token-0123456789";
const SID: &str = "CA0123456789abcdef0123456789abcdef";
const GREETING_HZ: f32 = 300.0;

struct Node {
    p: Precall,
    base: String,
}

/// A node with signatures on and the fake agent behind `AGENT_WS_URL`; the greeting is a
/// short tone of our own (the default greeting is 5.8 s of speech).
fn node(agent: &FakeAgent, extra: &[(&str, &str)]) -> Node {
    let port = free_tcp_port();
    let base = format!("http://127.0.0.1:{port}");
    let greeting =
        std::env::temp_dir().join(format!("precall-greeting-{}.wav", std::process::id()));
    std::fs::write(&greeting, wav_tone(GREETING_HZ, 400)).unwrap();
    let mut env: Vec<(&str, String)> = vec![
        ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
        ("PUBLIC_BASE_URL", base.clone()),
        ("ENABLE_SIP_HANDLER", "false".to_owned()),
        ("STATUS_POLL_INTERVAL_MS", "200".to_owned()),
        ("AGENT_WS_URL", format!("ws://{}/v1/convai/conversation", agent.addr)),
        ("GREETING_AUDIO_URL", format!("file://{}", greeting.display())),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Node { p: Precall::start_on(port, &env), base }
}

/// A 16-bit 8 kHz mono WAV of a tone.
fn wav_tone(hz: f32, ms: u32) -> Vec<u8> {
    let samples: Vec<i16> = (0..ms * 8)
        .map(|i| ((i as f32 * hz * std::f32::consts::TAU / 8000.0).sin() * 8000.0) as i16)
        .collect();
    support::wav_pcm16(&samples)
}

impl Node {
    /// A signed webhook, as Twilio sends it.
    fn webhook(&self, target: &str, sid: &str) -> Answer {
        let params = [
            ("CallSid", sid),
            ("AccountSid", "AC00000000000000000000000000000000"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
            ("CallStatus", "ringing"),
            ("Direction", "inbound"),
            ("ApiVersion", "2010-04-01"),
        ];
        let a = signed_webhook(self.p.http_port, &self.base, TOKEN, target, &params);
        assert_eq!(a.status, 200, "{a:?}");
        a
    }

    fn voice(&self, sid: &str) -> Answer {
        self.webhook("/twilio/voice", sid)
    }

    /// What Twilio does when the stream closes: runs the `<Redirect>` after `</Connect>`.
    fn redirect(&self, st: &StreamTwiml, sid: &str) -> Answer {
        let url = st.redirect.as_deref().expect("a <Redirect> after </Connect>");
        let target = url.strip_prefix(&self.base).expect("the redirect is to this node");
        self.webhook(target, sid)
    }

    fn stream_url(&self) -> String {
        format!("ws://127.0.0.1:{}/twilio/media", self.p.media_port)
    }
}

fn caller_frame(chunk: u64) -> Vec<u8> {
    // A continuous 700 Hz tone, 20 ms per frame.
    let all = ulaw_tone(CALLER_HZ, 40, 6000.0);
    let phase = (chunk % 2) as usize * 160;
    all[phase..phase + 160].to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Heard {
    Greeting,
    ToneA,
    ToneB,
    Silence,
    Other,
}

fn classify(frame: &[u8]) -> Heard {
    if frame.iter().all(|&b| b == 0xFF || b == 0x7F) {
        return Heard::Silence;
    }
    let f = frequency(Codec::Pcmu, frame);
    let near = |hz: f32| (f - hz).abs() < hz * 0.15;
    if near(TONE_A_HZ) {
        Heard::ToneA
    } else if near(TONE_B_HZ) {
        Heard::ToneB
    } else if near(GREETING_HZ) {
        Heard::Greeting
    } else {
        Heard::Other
    }
}

fn parameter<'a>(st: &'a StreamTwiml, name: &str) -> Option<&'a str> {
    st.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn stream_mode_plays_greeting_and_hold_then_bridges_the_agent_both_ways() {
    let agent = FakeAgent::start(Behaviour::Talk);
    let n = node(&agent, &[("SIMULATED_CLONE_DELAY_MS", "1500")]);

    // The webhook answers the stream at once; the TwiML's URL reaches the media port.
    let a = n.voice(SID);
    let st = stream_of(&a.body).expect("a <Connect><Stream>");
    assert_eq!(st.url, n.stream_url(), "{}", a.body);
    assert!(!a.body.contains("<Play"), "no TwiML hold in stream mode: {}", a.body);
    assert_eq!(parameter(&st, "call_id"), Some(SID));
    assert_eq!(parameter(&st, "greeting"), Some("1"));
    assert_eq!(parameter(&st, "caller"), Some("+12349013030"));
    assert_eq!(
        st.redirect.as_deref(),
        Some(format!("{}/twilio/poll?call_id={SID}", n.base).as_str())
    );

    let mut s = open(&st, Some(TOKEN)).expect("the signed upgrade is accepted");
    s.start(SID, &st.params);
    // The caller presses a key once the agent is on (the clone takes 1.5 s).
    s.run_for(Duration::from_millis(2500), Some(&caller_frame));
    s.dtmf('5');
    s.run_for(Duration::from_secs(20), Some(&caller_frame));
    let session = &s.session;
    assert_eq!(session.closed.map(|c| c.0), Some(Some(1000)), "precall closed the stream");
    assert!(session.violations.is_empty(), "{:?}", session.violations);

    // What the caller heard, in order: the greeting, hold, the agent.
    let heard: Vec<(Duration, Heard)> =
        session.media.iter().map(|(at, f)| (*at, classify(f))).collect();
    let first_agent =
        heard.iter().position(|(_, h)| *h == Heard::ToneA).expect("the agent's audio");
    assert!(heard[..5].iter().all(|(_, h)| *h == Heard::Greeting), "{:?}", &heard[..5]);
    let hold = heard[..first_agent].iter().filter(|(_, h)| *h == Heard::Other).count();
    assert!(hold >= 25, "about 1 s of hold music before the agent, got {hold} frames");
    // Paced in real time: one 20 ms frame per 20 ms, never a burst, never a long gap.
    let (t0, t1) = (heard[0].0, heard[first_agent - 1].0);
    let span = (t1 - t0).as_secs_f64();
    let expected = (first_agent - 1) as f64 * 0.020;
    assert!((span - expected).abs() < expected * 0.1, "{first_agent} frames over {span:.3} s");
    let worst_gap = heard.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    assert!(worst_gap < Duration::from_millis(150), "a gap of {worst_gap:?} in the stream");

    // The interruption cleared Twilio's buffer; nothing of the interrupted response after it,
    // and the next response played.
    let clear = *session.clears.first().expect("a clear on interruption");
    assert!(clear > heard[first_agent].0);
    assert!(
        heard.iter().all(|(at, h)| *h != Heard::ToneA || *at < clear),
        "tone A after the clear"
    );
    assert!(heard.iter().any(|(at, h)| *h == Heard::ToneB && *at > clear), "the second response");
    // The last words were heard (their mark came back) before the stream closed.
    assert!(!session.marks.is_empty());
    let last_b = heard.iter().rev().find(|(_, h)| *h == Heard::ToneB).unwrap().0;
    assert!(session.closed.unwrap().1 >= last_b);

    // The agent heard the caller, and was asked for the cloned voice.
    let log = agent.log.lock().unwrap();
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    assert!(log.heard.len() >= 16_000, "the agent heard {} bytes", log.heard.len());
    let f = frequency(Codec::Pcmu, &log.heard[4000..12_000]);
    assert!((f - CALLER_HZ).abs() < 50.0, "the agent heard {f} Hz");
    let init = log.init.as_ref().unwrap();
    assert!(
        init["conversation_config_override"]["tts"]["voice_id"]
            .as_str()
            .unwrap()
            .starts_with("sim-")
    );
    assert_eq!(init["dynamic_variables"]["protocol"], "twilio");
    assert_eq!(init["dynamic_variables"]["caller_number"], "+12349013030");
    assert!(
        log.updates.iter().any(|u| u.contains("key 5")),
        "DTMF told to the agent: {:?}",
        log.updates
    );
    drop(log);

    // Twilio then runs the <Redirect>: the call is over, it hangs up without the error.
    let a = n.redirect(&st, SID);
    assert!(a.body.contains("<Hangup />") && !a.body.contains("<Say>"), "{}", a.body);
}

#[test]
fn poll_mode_holds_in_twiml_and_streams_only_the_agent() {
    let agent = FakeAgent::start(Behaviour::Talk);
    let n = node(
        &agent,
        &[
            ("TWILIO_HOLD_MODE", "poll"),
            ("TWILIO_PUSH", "false"),
            ("SIMULATED_CLONE_DELAY_MS", "300"),
        ],
    );
    let a = n.voice(SID);
    assert!(a.body.contains("<Play>") && a.body.contains("<Redirect"), "{}", a.body);
    let a = wait_for("the clone to complete", Duration::from_secs(10), || {
        Some(n.webhook(&format!("/twilio/poll?call_id={SID}"), SID))
            .filter(|a| a.body.contains("<Connect>"))
    });
    let st = stream_of(&a.body).unwrap();
    assert_eq!(st.url, n.stream_url());
    assert_eq!(parameter(&st, "greeting"), None, "Twilio played the greeting itself");
    assert!(parameter(&st, "voice_id").is_some_and(|v| v.starts_with("sim-")));

    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    s.run_for(Duration::from_secs(20), Some(&caller_frame));
    assert_eq!(s.session.closed.map(|c| c.0), Some(Some(1000)));
    assert!(s.session.violations.is_empty(), "{:?}", s.session.violations);
    let heard: Vec<Heard> = s.session.media.iter().map(|(_, f)| classify(f)).collect();
    assert!(!heard.contains(&Heard::Greeting), "no greeting over the stream in poll mode");
    assert!(heard.contains(&Heard::ToneA) && heard.contains(&Heard::ToneB));
    assert!(agent.log.lock().unwrap().heard.len() >= 16_000);
    let a = n.redirect(&st, SID);
    assert!(a.body.contains("<Hangup />"), "{}", a.body);
}

#[test]
fn the_clone_finishing_reaches_the_held_stream_at_once_not_at_the_next_poll() {
    let agent = FakeAgent::start(Behaviour::Talk);
    // Polls 30 s apart: only the clone job's own news can bring the agent within the run.
    let n =
        node(&agent, &[("SIMULATED_CLONE_DELAY_MS", "800"), ("STATUS_POLL_INTERVAL_MS", "30000")]);
    let st = stream_of(&n.voice(SID).body).unwrap();
    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    let mut heard_agent = false;
    for _ in 0..100 {
        s.run_for(Duration::from_millis(100), Some(&caller_frame));
        if s.session.media.iter().any(|(_, f)| classify(f) == Heard::ToneA) {
            heard_agent = true;
            break;
        }
    }
    assert!(heard_agent, "the agent was not heard within 10 s of a 0.8 s clone");
    assert_eq!(agent.log.lock().unwrap().connections, 1);
}

#[test]
fn a_slow_twilio_socket_never_stalls_the_shard() {
    let agent = FakeAgent::start(Behaviour::Talk);
    // One shard, so the slow stream and the healthy one share its loop and media clock.
    let n = node(&agent, &[("SIMULATED_CLONE_DELAY_MS", "600000"), ("SHARDS", "1")]);
    let dropped = |n: &Node| {
        let (_, m) = n.p.get("/metrics");
        m.lines()
            .filter_map(|l| l.strip_prefix("precall_twilio_stream_frames_dropped_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    // The slow one: a 4 KiB receive window, and it never reads.
    let slow_sid = "CA22222222222222222222222222222222";
    let st_slow = stream_of(&n.voice(slow_sid).body).unwrap();
    let mut slow = open_with(&st_slow, Some(TOKEN), Some(4096)).unwrap();
    slow.start(slow_sid, &st_slow.params);
    let st = stream_of(&n.voice(SID).body).unwrap();
    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    // The healthy stream plays on while the slow one's queue fills and overflows.
    let mut overflowed = false;
    for _ in 0..120 {
        s.run_for(Duration::from_millis(500), Some(&caller_frame));
        slow.media(&caller_frame(0));
        if dropped(&n) > 0 {
            overflowed = true;
            break;
        }
    }
    assert!(overflowed, "the slow stream's queue never filled");
    s.run_for(Duration::from_secs(2), Some(&caller_frame));
    assert!(s.session.closed.is_none() && s.session.violations.is_empty());
    let worst = s.session.media.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    assert!(worst < Duration::from_millis(150), "the healthy stream had a gap of {worst:?}");
    let span = s.session.media.last().unwrap().0 - s.session.media[0].0;
    let expected = span.as_millis() as usize / 20;
    assert!(
        s.session.media.len() + 5 >= expected,
        "{} frames over {span:?}",
        s.session.media.len()
    );
}

#[test]
fn a_failed_clone_closes_the_stream_and_twilio_says_the_error() {
    let agent = FakeAgent::start(Behaviour::Talk);
    let n =
        node(&agent, &[("SIMULATED_CLONE_DELAY_MS", "800"), ("SIMULATED_CLONE_OUTCOME", "failed")]);
    let st = stream_of(&n.voice(SID).body).unwrap();
    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    s.run_for(Duration::from_secs(10), Some(&caller_frame));
    assert_eq!(s.session.closed.map(|c| c.0), Some(Some(1000)), "precall closed the stream");
    assert!(s.session.media.len() >= 25, "greeting and hold played until the clone failed");
    assert_eq!(agent.log.lock().unwrap().connections, 0, "no agent for a failed clone");
    // The TwiML after </Connect>: the error message, then the hang-up.
    let a = n.redirect(&st, SID);
    assert!(a.body.contains("<Say>") && a.body.contains("<Hangup />"), "{}", a.body);
}

#[test]
fn streams_that_are_not_twilios_or_not_the_calls_are_refused() {
    let agent = FakeAgent::start(Behaviour::Talk);
    let n = node(&agent, &[("SIMULATED_CLONE_DELAY_MS", "600000")]);
    let st = stream_of(&n.voice(SID).body).unwrap();

    // A bad signature: 403 before the upgrade. A wrong path: 404.
    assert!(matches!(open(&st, None), Err(OpenError::Status(403))));
    let elsewhere =
        StreamTwiml { url: st.url.replace("/twilio/media", "/twilio/other"), ..st.clone() };
    assert!(matches!(open(&elsewhere, Some(TOKEN)), Err(OpenError::Status(404))));
    // A plain HTTP request to the media port is not an upgrade: 400.
    let a = request(n.p.media_port, "GET", "/twilio/media", &[], b"").unwrap();
    assert_eq!(a.status, 400, "{a:?}");

    // An unknown call id, and a CallSid that is not the call's: closed without media.
    let unknown = "CA99999999999999999999999999999999";
    let cases: [(&str, Vec<(String, String)>); 2] = [
        (unknown, vec![("call_id".into(), unknown.into())]),
        ("CA11111111111111111111111111111111", st.params.clone()),
    ];
    for (call_sid, params) in cases {
        let mut s = open(&st, Some(TOKEN)).unwrap();
        s.start(call_sid, &params);
        s.run_for(Duration::from_secs(10), None);
        assert!(s.session.closed.is_some(), "the stream for {call_sid} was not closed");
        assert!(s.session.media.is_empty(), "media sent to a refused stream");
    }

    // The call itself still holds (a refused stream did not end it) and its own stream works.
    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    s.run_for(Duration::from_millis(600), Some(&caller_frame));
    assert!(s.session.closed.is_none());
    assert!(s.session.media.len() >= 20, "greeting and hold over the stream");

    // A broken stream (no stop, no close): Twilio runs the <Redirect>, and the poll flow goes on
    // from where the call is: still holding.
    drop(s);
    wait_for("the broken stream to be noticed", Duration::from_secs(10), || {
        let (_, m) = n.p.get("/metrics");
        let open: u64 = m
            .lines()
            .filter_map(|l| l.strip_prefix("precall_twilio_streams{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        (open == 0).then_some(())
    });
    let a = n.redirect(&st, SID);
    assert!(a.body.contains("<Play") && a.body.contains("<Redirect"), "{}", a.body);

    // A stream ended by Twilio's stop records the call's end: the next poll hangs up.
    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    s.run_for(Duration::from_millis(300), Some(&caller_frame));
    s.stop();
    let a = wait_for("the end to be recorded", Duration::from_secs(10), || {
        Some(n.redirect(&st, SID)).filter(|a| a.body.contains("<Hangup />"))
    });
    assert!(!a.body.contains("<Say>"), "{}", a.body);
}

#[test]
fn a_call_arriving_during_a_database_outage_holds_on_its_stream_and_reaches_the_agent_after() {
    let mut pg = support::pg::PgServer::start();
    let agent = FakeAgent::start(Behaviour::Talk);
    let n = node(&agent, &[("DATABASE_URL", &pg.url()), ("SIMULATED_CLONE_DELAY_MS", "300")]);
    pg.stop();
    wait_for("/health to see the outage", Duration::from_secs(20), || {
        (n.p.get("/health").0 == 503).then_some(())
    });
    // The call arrives now (the default stream hold mode): answered with its stream, the
    // stream's plan is the outage answer, and the caller hears greeting and hold.
    let st = stream_of(&n.voice(SID).body).unwrap();
    let mut s = open(&st, Some(TOKEN)).unwrap();
    s.start(SID, &st.params);
    s.run_for(Duration::from_millis(1_500), Some(&caller_frame));
    assert!(s.session.closed.is_none(), "the stream holds through the outage");
    assert!(s.session.media.len() > 20, "greeting and hold are played");
    // The database is back: the journal records the call, its clone runs, the agent speaks.
    pg.restart();
    let mut heard_agent = false;
    for _ in 0..150 {
        s.run_for(Duration::from_millis(100), Some(&caller_frame));
        if s.session.media.iter().any(|(_, f)| classify(f) == Heard::ToneA) {
            heard_agent = true;
            break;
        }
    }
    assert!(heard_agent, "the agent was not heard within 15 s of the database's return");
    assert!(s.session.closed.is_none());
    assert_eq!(n.p.metric_line("precall_journal_entries"), Some(0));
}
