//! The call flow on a fake clock: every phase, the switch-over to the agent and every way a
//! call ends, in milliseconds. The harness plays the shard's part: it performs actions
//! (recording them), ticks the media clock every 20 ms and jumps to the flow's deadlines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use precall_api::{
    CallId, CallInstructions, CloneStatus, ControlError, MediaEventKind, Protocol,
    SpeechInstruction, StatusPollInstruction, WebSocketInstruction,
};
use precall_call::{
    Action, AgentTarget, CallFlow, CallInfo, FlowConfig, MediaPlan, Phase, ShardPlan, reason,
};
use precall_media::{Codec, EncodedClip, g711};

const TICK: Duration = Duration::from_millis(20);

fn clip(value: i16, frames: usize) -> Arc<EncodedClip> {
    Arc::new(EncodedClip::from_pcm(&vec![value; frames * 160]))
}

struct Clips {
    greeting: Arc<EncodedClip>,
    hold: Arc<EncodedClip>,
    error: Arc<EncodedClip>,
}

fn clips() -> Clips {
    Clips { greeting: clip(1000, 5), hold: clip(2000, 10), error: clip(-3000, 4) }
}

fn media(c: &Clips) -> MediaPlan {
    MediaPlan {
        greeting: Some(c.greeting.clone()),
        hold: Some(c.hold.clone()),
        error: Some(c.error.clone()),
    }
}

fn base(call_id: &CallId) -> CallInstructions {
    CallInstructions {
        call_id: call_id.clone(),
        clone_status: CloneStatus::Processing,
        greeting_audio: None,
        hold_audio: None,
        status_poll: Some(StatusPollInstruction {
            call_id: call_id.clone(),
            interval: Duration::from_millis(500),
            hold_remaining: Duration::from_secs(5),
        }),
        websocket: None,
        error_message: None,
        should_hangup: false,
    }
}

fn hold_plan(c: &Clips) -> ShardPlan {
    ShardPlan { instructions: base(&"c1".into()), media: media(c), agent: None }
}

fn target() -> AgentTarget {
    AgentTarget {
        url: "ws://agent/v1/convai/conversation?agent_id=a".into(),
        host: "agent".into(),
        addr: "127.0.0.1:9".parse().unwrap(),
        tls: false,
    }
}

fn connect_plan(c: &Clips) -> ShardPlan {
    let mut ins = base(&"c1".into());
    ins.clone_status = CloneStatus::Completed;
    ins.status_poll = None;
    ins.websocket = Some(WebSocketInstruction {
        url: target().url,
        agent_id: "a".into(),
        voice_id: "voice-1".into(),
        first_message: Some("Hi there".into()),
    });
    ShardPlan { instructions: ins, media: media(c), agent: Some(Ok(target())) }
}

fn fail_plan(c: &Clips) -> ShardPlan {
    let mut ins = base(&"c1".into());
    ins.clone_status = CloneStatus::Failed;
    ins.status_poll = None;
    ins.should_hangup = true;
    ins.error_message = Some(SpeechInstruction { text: "sorry".into(), audio_url: None });
    ShardPlan {
        instructions: ins,
        media: MediaPlan { greeting: None, hold: None, error: Some(c.error.clone()) },
        agent: None,
    }
}

/// What the caller's leg received on one tick.
#[derive(Debug, Clone, PartialEq)]
enum Sent {
    Frame { first: u8, marker: bool },
    Nothing,
}

struct Harness {
    flow: CallFlow,
    now: Instant,
    start: Instant,
    actions: Vec<(Duration, Action)>,
    sent: Vec<(Duration, Sent, Vec<u8>)>,
    ended: bool,
    codec: Codec,
    next_tick: Instant,
    /// Answer `Mark` at once, as an RTP leg does; `false` plays a Twilio leg: marks wait.
    auto_heard: bool,
}

impl Harness {
    fn new() -> Self {
        Self::with(FlowConfig { rtp_timeout: Duration::from_secs(60), ..FlowConfig::default() })
    }

    fn with(cfg: FlowConfig) -> Self {
        let now = Instant::now();
        let info = CallInfo {
            call_id: "c1".into(),
            caller: "+15550001".into(),
            dialed: "+15550002".into(),
            protocol: Protocol::Sip,
        };
        let mut h = Self {
            flow: CallFlow::new(now, info, cfg),
            now,
            start: now,
            actions: Vec::new(),
            sent: Vec::new(),
            ended: false,
            codec: Codec::Pcmu,
            next_tick: now,
            auto_heard: true,
        };
        h.drain();
        h
    }

    fn at(&self) -> Duration {
        self.now - self.start
    }

    /// Performs actions as the shard would: answers at once, ends the leg on hang-up.
    fn drain(&mut self) {
        while let Some(a) = self.flow.poll_action() {
            let at = self.at();
            self.actions.push((at, a.clone()));
            match a {
                Action::Answer => self.flow.handle_answered(self.now, self.codec),
                Action::Hangup | Action::Reject { .. } => {
                    self.flow.handle_leg_ended();
                    self.ended = true;
                }
                Action::Mark(n) if self.auto_heard => self.flow.handle_heard(n),
                _ => {}
            }
        }
    }

    /// Advances to `until`, ticking media every 20 ms and running deadlines on the way.
    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let deadline = self.flow.poll_timeout();
            let next = [Some(self.next_tick), deadline].into_iter().flatten().min().unwrap();
            if next > until {
                self.now = until;
                return;
            }
            self.now = next.max(self.now);
            if deadline.is_some_and(|d| d <= self.now) {
                self.flow.handle_timeout(self.now);
            }
            if self.next_tick <= self.now {
                self.next_tick += TICK;
                let at = self.at();
                let got = match self.flow.poll_frame(self.now) {
                    Some(f) => {
                        (Sent::Frame { first: f.payload[0], marker: f.marker }, f.payload.to_vec())
                    }
                    None => (Sent::Nothing, Vec::new()),
                };
                self.sent.push((at, got.0, got.1));
            }
            self.drain();
        }
    }

    fn input(&mut self, f: impl FnOnce(&mut CallFlow, Instant)) {
        let now = self.now;
        f(&mut self.flow, now);
        self.drain();
    }

    fn agent(&mut self, json: &str) {
        let now = self.now;
        self.flow.handle_agent_text(now, json);
        self.drain();
    }

    fn agent_sent(&self) -> Vec<String> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::SendAgent(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    fn has(&self, want: &Action) -> bool {
        self.actions.iter().any(|(_, a)| a == want)
    }

    fn records(&self, kind: MediaEventKind) -> Vec<String> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Record(k, d) if *k == kind => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    /// What was sent on the ticks after `from`.
    fn frames_since(&self, from: Duration) -> Vec<Sent> {
        self.sent.iter().filter(|(at, _, _)| *at > from).map(|(_, s, _)| s.clone()).collect()
    }

    /// Sends caller RTP for `frames` ticks (a tone encoded in the call's codec).
    fn caller_speaks(&mut self, seq: &mut u16, frames: usize, value: i16) {
        for _ in 0..frames {
            let payload = [self.codec.encode(value); 160];
            let s = *seq;
            self.input(|f, now| f.handle_rtp(now, s, &payload));
            *seq = seq.wrapping_add(1);
            self.run_for(TICK);
        }
    }
}

fn ulaw(v: i16) -> u8 {
    g711::ulaw_encode(v)
}

fn audio_msg(event_id: u64, bytes: &[u8]) -> String {
    format!(
        r#"{{"type":"audio","audio_event":{{"audio_base_64":"{}","event_id":{event_id}}}}}"#,
        B64.encode(bytes)
    )
}

const METADATA_ULAW: &str = r#"{"type":"conversation_initiation_metadata","conversation_initiation_metadata_event":{"conversation_id":"conv1","agent_output_audio_format":"ulaw_8000","user_input_audio_format":"ulaw_8000"}}"#;

/// A call held until the clone is ready, then connected and opened.
fn connected(h: &mut Harness, c: &Clips) {
    h.input(|f, now| f.handle_plan(now, Ok(hold_plan(c))));
    assert_eq!(h.flow.phase(), Phase::Holding);
    h.run_for(Duration::from_millis(600));
    assert!(h.has(&Action::CheckStatus), "a status check after the poll interval");
    h.input(|f, now| f.handle_status(now, Ok(connect_plan(c))));
    assert_eq!(h.flow.phase(), Phase::Connecting);
    assert!(h.has(&Action::ConnectAgent(target())));
    h.run_for(Duration::from_millis(100));
    h.input(|f, now| f.handle_agent_open(now));
    h.agent(METADATA_ULAW);
}

#[test]
fn hold_connect_first_audio_interruption_agent_end_bye() {
    let c = clips();
    let mut h = Harness::new();
    connected(&mut h, &c);
    // Greeting (5 frames) then hold, never a gap: every tick since the answer sent a frame.
    let before: Vec<Sent> = h.sent.iter().map(|(_, s, _)| s.clone()).collect();
    assert!(before.iter().all(|s| matches!(s, Sent::Frame { .. })), "hold had a gap: {before:?}");
    assert_eq!(before[0], Sent::Frame { first: ulaw(1000), marker: true });
    assert_eq!(before[5], Sent::Frame { first: ulaw(2000), marker: false });
    // The initiation: cloned voice, first message, dynamic variables.
    let init: serde_json::Value = serde_json::from_str(&h.agent_sent()[0]).unwrap();
    assert_eq!(init["type"], "conversation_initiation_client_data");
    assert_eq!(init["conversation_config_override"]["tts"]["voice_id"], "voice-1");
    assert_eq!(init["conversation_config_override"]["agent"]["first_message"], "Hi there");
    assert_eq!(init["dynamic_variables"]["caller_number"], "+15550001");
    assert_eq!(init["dynamic_variables"]["dialed_number"], "+15550002");
    assert_eq!(init["dynamic_variables"]["call_id"], "c1");
    assert_eq!(init["dynamic_variables"]["protocol"], "sip");
    assert_eq!(h.records(MediaEventKind::AgentConnected).len(), 1);

    // Hold plays on until the first agent audio, then the agent's frames, marked.
    h.run_for(Duration::from_millis(200));
    assert_eq!(h.flow.phase(), Phase::Connecting);
    let switch = h.at();
    h.agent(&audio_msg(1, &[ulaw(5000); 800]));
    assert_eq!(h.flow.phase(), Phase::Bridged);
    h.run_for(Duration::from_millis(60));
    let after = h.frames_since(switch);
    assert_eq!(after[0], Sent::Frame { first: ulaw(5000), marker: true }, "{after:?}");
    assert_eq!(after[1], Sent::Frame { first: ulaw(5000), marker: false });

    // Interruption: queued agent audio is gone before the next frame, and late audio of that
    // response too; a newer response plays.
    h.agent(r#"{"type":"interruption","interruption_event":{"event_id":1}}"#);
    assert_eq!(h.flow.agent_queued(), 0);
    h.agent(&audio_msg(1, &[ulaw(5000); 800]));
    assert_eq!(h.flow.agent_queued(), 0);
    let cut = h.at();
    h.run_for(Duration::from_millis(40));
    // The line stays live with silence while the agent is quiet.
    let quiet = Sent::Frame { first: 0xFF, marker: false };
    assert_eq!(h.frames_since(cut), vec![quiet.clone(), quiet]);
    h.agent(&audio_msg(2, &[ulaw(-7000); 330]));
    let next = h.at();
    h.run_for(Duration::from_millis(60));
    let spurt = h.frames_since(next);
    assert_eq!(spurt[0], Sent::Frame { first: ulaw(-7000), marker: true });
    assert_eq!(spurt.len(), 3);
    // 330 bytes: two full frames and a last one padded with silence.
    let last = &h.sent.last().unwrap().2;
    assert_eq!(&last[..10], &[ulaw(-7000); 10]);
    assert!(last[10..].iter().all(|&b| b == 0xFF));

    // The agent ends the conversation after more speech: it plays out, then BYE.
    h.agent(&audio_msg(3, &[ulaw(4000); 480]));
    h.input(|f, now| f.handle_agent_closed(now, Some(1000), "bye"));
    assert!(!h.ended);
    h.run_for(Duration::from_millis(100));
    assert!(h.ended, "BYE after the last audio");
    assert_eq!(h.flow.end_reason(), Some(reason::COMPLETED));
    let played = h
        .sent
        .iter()
        .filter(|(_, s, _)| {
            *s == Sent::Frame { first: ulaw(4000), marker: false }
                || *s == Sent::Frame { first: ulaw(4000), marker: true }
        })
        .count();
    assert_eq!(played, 3, "the agent's last words were all played");
    assert!(h.has(&Action::CloseAgent));
    assert_eq!(h.flow.stats().interruptions, 1);
}

fn marks(h: &Harness) -> Vec<u64> {
    h.actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Mark(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[test]
fn a_buffering_leg_hangs_up_only_once_the_last_words_were_heard() {
    let c = clips();
    let mut h = Harness::new();
    h.auto_heard = false;
    connected(&mut h, &c);
    // Three frames of a response: one mark at its end, asking about all three.
    h.agent(&audio_msg(1, &[ulaw(5000); 480]));
    h.run_for(Duration::from_millis(100));
    assert_eq!(marks(&h), vec![3]);
    assert_eq!(h.flow.stats().agent_frames_sent, 3);
    assert_eq!(h.flow.stats().agent_frames_heard, 0);
    // Interrupted while the leg still holds them: the leg is told to drop them.
    h.agent(r#"{"type":"interruption","interruption_event":{"event_id":1}}"#);
    assert!(h.has(&Action::ClearLeg));
    // The leg's echo after its clear: heard (or dropped) up to 3.
    h.input(|f, _| f.handle_heard(3));
    assert_eq!(h.flow.stats().agent_frames_heard, 3);
    // The last response, then the agent's normal end: no hang-up before the echo.
    h.agent(&audio_msg(2, &[ulaw(4000); 320]));
    h.input(|f, now| f.handle_agent_closed(now, Some(1000), "bye"));
    h.run_for(Duration::from_millis(200));
    assert!(!h.ended, "the caller has not heard the last words yet");
    assert_eq!(marks(&h), vec![3, 5]);
    // A count beyond what was lent is capped; the echo of the last mark ends the call.
    h.input(|f, _| f.handle_heard(99));
    assert!(h.ended);
    assert_eq!(h.flow.end_reason(), Some(reason::COMPLETED));
    assert_eq!(h.flow.stats().agent_frames_heard, 5);
}

#[test]
fn a_leg_that_never_confirms_is_hung_up_after_the_heard_timeout() {
    let c = clips();
    let mut h = Harness::with(FlowConfig {
        rtp_timeout: Duration::from_secs(60),
        heard_timeout: Duration::from_secs(2),
        ..FlowConfig::default()
    });
    h.auto_heard = false;
    connected(&mut h, &c);
    h.agent(&audio_msg(1, &[ulaw(5000); 160]));
    h.input(|f, now| f.handle_agent_closed(now, Some(1000), "bye"));
    h.run_for(Duration::from_millis(1900));
    assert!(!h.ended);
    h.run_for(Duration::from_millis(200));
    assert!(h.ended, "hung up once the heard timeout passed");
    assert_eq!(h.flow.end_reason(), Some(reason::COMPLETED));
}

#[test]
fn news_from_the_control_plane_checks_at_once_instead_of_at_the_next_poll() {
    let c = clips();
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Ok(hold_plan(&c))));
    h.run_for(Duration::from_millis(100));
    let checks = |h: &Harness| h.actions.iter().filter(|(_, a)| *a == Action::CheckStatus).count();
    assert_eq!(checks(&h), 0, "the poll interval is 500 ms");
    // The clone job finished: a check now.
    h.input(|f, now| f.handle_recheck(now));
    h.run_for(Duration::from_millis(1));
    assert_eq!(checks(&h), 1);
    // News while that check is in flight: its (stale) hold answer is followed by another check
    // at once, not after the interval.
    h.input(|f, now| f.handle_recheck(now));
    h.input(|f, now| f.handle_status(now, Ok(hold_plan(&c))));
    h.run_for(Duration::from_millis(1));
    assert_eq!(checks(&h), 2);
    h.input(|f, now| f.handle_status(now, Ok(connect_plan(&c))));
    assert_eq!(h.flow.phase(), Phase::Connecting);
    // Not holding any more: news changes nothing.
    h.input(|f, now| f.handle_recheck(now));
    h.run_for(Duration::from_millis(600));
    assert_eq!(checks(&h), 2);
}

#[test]
fn a_caller_who_puts_the_call_on_hold_is_not_hung_up_for_sending_no_rtp() {
    let c = clips();
    let mut h =
        Harness::with(FlowConfig { rtp_timeout: Duration::from_secs(5), ..FlowConfig::default() });
    // A long hold limit: nothing but the RTP timeout could end this call.
    let mut plan = hold_plan(&c);
    plan.instructions.status_poll.as_mut().unwrap().hold_remaining = Duration::from_secs(3600);
    h.input(|f, now| f.handle_plan(now, Ok(plan)));
    h.run_for(Duration::from_secs(2));
    // re-INVITE with a=inactive (or recvonly, or c=0.0.0.0): no RTP is coming, by design.
    h.input(|f, now| f.handle_caller_hold(now, true));
    for _ in 0..20 {
        h.run_for(Duration::from_secs(1));
        // Status checks go on; answer them so the call keeps holding.
        if h.has(&Action::CheckStatus) {
            h.input(|f, now| f.handle_status(now, Ok(hold_plan(&c))));
            h.actions.retain(|(_, a)| *a != Action::CheckStatus);
        }
    }
    assert!(!h.ended, "hung up a held call for its missing RTP");
    // Off hold and still silent: the timeout runs again, from the resumption.
    h.input(|f, now| f.handle_caller_hold(now, false));
    h.run_for(Duration::from_millis(4900));
    assert!(!h.ended);
    h.run_for(Duration::from_millis(200));
    assert!(h.ended);
    assert_eq!(h.flow.end_reason(), Some(reason::RTP_TIMEOUT));
}

#[test]
fn ping_tool_call_transcripts_and_unknown_events() {
    let c = clips();
    let mut h = Harness::new();
    connected(&mut h, &c);
    h.agent(r#"{"type":"ping","ping_event":{"event_id":41,"ping_ms":null}}"#);
    assert_eq!(h.agent_sent().last().unwrap(), r#"{"type":"pong","event_id":41}"#);
    h.agent(r#"{"type":"client_tool_call","client_tool_call":{"tool_call_id":"t9","tool_name":"lookup","parameters":{}}}"#);
    let r: serde_json::Value = serde_json::from_str(h.agent_sent().last().unwrap()).unwrap();
    assert_eq!((r["tool_call_id"].as_str(), r["is_error"].as_bool()), (Some("t9"), Some(true)));
    h.agent(r#"{"type":"agent_response","agent_response_event":{"agent_response":"Hello!"}}"#);
    h.agent(r#"{"type":"user_transcript","user_transcription_event":{"user_transcript":"hi"}}"#);
    assert_eq!(h.records(MediaEventKind::AgentResponse), vec!["Hello!"]);
    assert_eq!(h.records(MediaEventKind::UserTranscript), vec!["hi"]);
    h.agent(r#"{"type":"vad_score","vad_score_event":{"vad_score":0.9}}"#);
    h.agent(r#"{"type":"guardrail_triggered"}"#);
    h.agent("not json");
    assert_eq!(h.flow.stats().agent_unknown, 2);
    assert_eq!(h.flow.stats().agent_malformed, 1);
    assert!(h.flow.phase() != Phase::Ending, "unknown events are never an error");
}

#[test]
fn caller_audio_streams_in_chunks_and_silence_keeps_the_agent_fed() {
    let c = clips();
    let mut h = Harness::new();
    connected(&mut h, &c);
    // No caller RTP: silent chunks every AGENT_CHUNK_MS.
    let sent_before = h.agent_sent().len();
    h.run_for(Duration::from_millis(400));
    let silent: Vec<String> = h.agent_sent()[sent_before..].to_vec();
    assert!(silent.len() >= 9, "{} chunks in 400 ms", silent.len());
    let v: serde_json::Value = serde_json::from_str(&silent[0]).unwrap();
    let bytes = B64.decode(v["user_audio_chunk"].as_str().unwrap()).unwrap();
    assert_eq!(bytes, vec![0xFF; 320], "40 ms of µ-law silence");
    // The caller speaks: their audio, in order, despite a swapped pair.
    let mark = h.agent_sent().len();
    let mut seq = 100u16;
    h.caller_speaks(&mut seq, 2, 1200);
    let payload = [ulaw(-1200); 160];
    h.input(|f, now| f.handle_rtp(now, 103, &payload));
    h.input(|f, now| f.handle_rtp(now, 102, &payload));
    h.run_for(Duration::from_millis(60));
    let mut heard = Vec::new();
    for m in &h.agent_sent()[mark..] {
        let v: serde_json::Value = serde_json::from_str(m).unwrap();
        heard.extend(B64.decode(v["user_audio_chunk"].as_str().unwrap()).unwrap());
    }
    let speech: Vec<u8> = heard.iter().copied().filter(|&b| b != 0xFF).collect();
    assert_eq!(speech.len(), 4 * 160);
    assert!(speech[..320].iter().all(|&b| b == ulaw(1200)));
    assert!(speech[320..].iter().all(|&b| b == ulaw(-1200)));
    assert_eq!(h.flow.stats().caller_lost, 0);
}

#[test]
fn pcma_caller_and_pcm_16k_agent_are_converted_both_ways() {
    let c = clips();
    let mut h = Harness::new();
    h.codec = Codec::Pcma;
    h.input(|f, now| f.handle_plan(now, Ok(connect_plan(&c))));
    assert_eq!(h.flow.phase(), Phase::Connecting, "a ready clone connects at once");
    h.input(|f, now| f.handle_agent_open(now));
    h.agent(r#"{"type":"conversation_initiation_metadata","conversation_initiation_metadata_event":{"conversation_id":"x","agent_output_audio_format":"pcm_16000","user_input_audio_format":"pcm_16000"}}"#);
    // Agent: 200 ms of a 16 kHz constant becomes 8 kHz A-law.
    let pcm: Vec<u8> = std::iter::repeat_n(6000i16, 3200).flat_map(|s| s.to_le_bytes()).collect();
    h.agent(&audio_msg(1, &pcm));
    assert!(h.flow.agent_queued() >= 1500, "{}", h.flow.agent_queued());
    // The greeting (5 frames) plays to its end first; then the agent.
    h.run_for(Duration::from_millis(100));
    assert_eq!(h.sent.len(), 6);
    assert!(h.sent[..5].iter().all(|(_, _, p)| p[0] == g711::alaw_encode(1000)));
    // Past the resampler's first milliseconds, the level is the agent's.
    h.run_for(Duration::from_millis(60));
    let last = &h.sent.last().unwrap().2;
    let v = g711::alaw_decode(last[80]);
    assert!((5500..6500).contains(&v), "{v}");
    // Caller: A-law frames reach the agent as 16 kHz PCM (640 bytes per 20 ms).
    let mark = h.agent_sent().len();
    let mut seq = 1;
    h.caller_speaks(&mut seq, 4, 3000);
    let mut bytes = Vec::new();
    for m in &h.agent_sent()[mark..] {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(m) {
            if let Some(a) = v["user_audio_chunk"].as_str() {
                bytes.extend(B64.decode(a).unwrap());
            }
        }
    }
    assert!(bytes.len() >= 3 * 640, "{}", bytes.len());
    let loud = bytes.chunks(2).filter(|p| i16::from_le_bytes([p[0], p[1]]) > 2500).count();
    assert!(loud > 500, "{loud} loud samples");
}

#[test]
fn dtmf_is_recorded_and_told_to_the_agent() {
    let c = clips();
    let mut h = Harness::new();
    connected(&mut h, &c);
    h.input(|f, _| f.handle_dtmf('5'));
    assert_eq!(h.records(MediaEventKind::Dtmf), vec!["5"]);
    let v: serde_json::Value = serde_json::from_str(h.agent_sent().last().unwrap()).unwrap();
    assert_eq!(v["type"], "contextual_update");
    assert!(v["text"].as_str().unwrap().contains('5'));
}

#[test]
fn a_flooding_agent_is_bounded() {
    let c = clips();
    let mut h = Harness::with(FlowConfig {
        agent_buffer: Duration::from_secs(2),
        rtp_timeout: Duration::from_secs(3),
        ..FlowConfig::default()
    });
    connected(&mut h, &c);
    for id in 1..=50 {
        h.agent(&audio_msg(id, &[ulaw(100); 8000]));
    }
    assert_eq!(h.flow.agent_queued(), 16_000, "2 s at most");
    assert_eq!(h.flow.stats().agent_overflow_bytes, 50 * 8000 - 16_000);
}

/// Runs a call to its agent, applies `fail`, and checks the error clip then BYE.
fn agent_failure(fail: impl FnOnce(&mut Harness), want: &str) {
    let c = clips();
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Ok(hold_plan(&c))));
    h.run_for(Duration::from_millis(600));
    h.input(|f, now| f.handle_status(now, Ok(connect_plan(&c))));
    fail(&mut h);
    assert_eq!(h.flow.end_reason(), Some(want));
    h.run_for(Duration::from_millis(200));
    let error = h
        .sent
        .iter()
        .filter(|(_, s, _)| matches!(s, Sent::Frame { first, .. } if *first == ulaw(-3000)))
        .count();
    assert_eq!(error, 4, "the whole error clip");
    assert!(h.ended, "BYE after the error clip");
    assert_eq!(h.records(MediaEventKind::AgentFailed).len(), 1, "the reason is recorded once");
    assert!(h.has(&Action::CloseAgent), "the agent leg is dropped");
}

#[test]
fn agent_connect_failure_is_agent_unavailable() {
    agent_failure(
        |h| h.input(|f, now| f.handle_agent_failed(now, "connection refused")),
        reason::AGENT_UNAVAILABLE,
    );
}

#[test]
fn agent_connect_timeout_is_agent_unavailable() {
    agent_failure(|h| h.run_for(Duration::from_secs(6)), reason::AGENT_UNAVAILABLE);
}

#[test]
fn no_first_audio_in_time_is_agent_unavailable() {
    agent_failure(
        |h| {
            h.input(|f, now| f.handle_agent_open(now));
            h.agent(METADATA_ULAW);
            h.run_for(Duration::from_secs(11));
        },
        reason::AGENT_UNAVAILABLE,
    );
}

#[test]
fn a_refused_override_is_agent_rejected() {
    agent_failure(
        |h| {
            h.input(|f, now| f.handle_agent_open(now));
            h.input(|f, now| f.handle_agent_closed(now, Some(1008), "override_error"));
        },
        reason::AGENT_REJECTED,
    );
    // A normal close before any audio is a configuration problem too.
    agent_failure(
        |h| {
            h.input(|f, now| f.handle_agent_open(now));
            h.agent(METADATA_ULAW);
            h.input(|f, now| f.handle_agent_closed(now, Some(1000), ""));
        },
        reason::AGENT_REJECTED,
    );
}

#[test]
fn errors_mid_conversation_are_agent_error() {
    for fail in [
        (|h: &mut Harness| h.input(|f, now| f.handle_agent_closed(now, Some(1011), "internal")))
            as fn(&mut Harness),
        |h: &mut Harness| {
            h.input(|f, now| f.handle_agent_closed(now, Some(1002), "transport_receive_timeout"))
        },
        |h: &mut Harness| h.input(|f, now| f.handle_agent_closed(now, None, "")),
        |h: &mut Harness| {
            h.agent(r#"{"type":"error","error_event":{"code":1011,"message":"boom","error_type":"internal"}}"#)
        },
        |h: &mut Harness| h.input(|f, now| f.handle_agent_failed(now, "connection reset")),
    ] {
        agent_failure(
            |h| {
                h.input(|f, now| f.handle_agent_open(now));
                h.agent(METADATA_ULAW);
                h.agent(&audio_msg(1, &[ulaw(100); 160]));
                fail(h);
            },
            reason::AGENT_ERROR,
        );
    }
}

#[test]
fn control_plane_failures() {
    let c = clips();
    // No plan: 503 for overload, 500 otherwise.
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Err(ControlError::Overloaded)));
    assert!(h.has(&Action::Reject { code: 503, reason: "Service Unavailable" }));
    // The database away: 503 too, so the carrier retries (elsewhere); a query error is a 500.
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Err(ControlError::StoreUnavailable("refused".into()))));
    assert!(h.has(&Action::Reject { code: 503, reason: "Service Unavailable" }));
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Err(ControlError::Store("syntax".into()))));
    assert!(h.has(&Action::Reject { code: 500, reason: "Server Internal Error" }));
    // The plan never comes.
    let mut h = Harness::new();
    h.run_for(Duration::from_secs(12));
    assert!(h.has(&Action::Reject { code: 500, reason: "Server Internal Error" }));
    assert_eq!(h.flow.end_reason(), Some(reason::NO_PLAN));
    // A failed clone at the first answer: answered into the error clip, then BYE.
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Ok(fail_plan(&c))));
    assert!(h.has(&Action::Answer));
    h.run_for(Duration::from_millis(200));
    assert!(h.ended);
    assert_eq!(h.sent.iter().filter(|(_, s, _)| matches!(s, Sent::Frame { .. })).count(), 4);
    // Failed at a status check.
    let mut h = Harness::new();
    h.input(|f, now| f.handle_plan(now, Ok(hold_plan(&c))));
    h.run_for(Duration::from_millis(600));
    h.input(|f, now| f.handle_status(now, Ok(fail_plan(&c))));
    assert_eq!(h.flow.phase(), Phase::Ending);
    h.run_for(Duration::from_millis(200));
    assert!(h.ended);
    assert_eq!(h.flow.end_reason(), Some(reason::FAILED));
}

#[test]
fn status_checks_failing_past_the_hold_limit_end_the_call_and_a_lost_reply_is_retried() {
    let c = clips();
    let mut h = Harness::with(FlowConfig {
        plan_timeout: Duration::from_secs(1),
        rtp_timeout: Duration::from_secs(60),
        ..FlowConfig::default()
    });
    h.input(|f, now| f.handle_plan(now, Ok(hold_plan(&c))));
    // The first status check is never answered: after the plan timeout another goes out.
    h.run_for(Duration::from_millis(2100));
    let checks = h.actions.iter().filter(|(_, a)| *a == Action::CheckStatus).count();
    assert_eq!(checks, 2, "{:?}", h.actions);
    // Every later check fails; past hold_remaining + one interval the call ends itself.
    for _ in 0..30 {
        h.input(|f, now| f.handle_status(now, Err(ControlError::Timeout)));
        h.run_for(Duration::from_millis(600));
        if h.ended {
            break;
        }
    }
    assert!(h.ended);
    assert_eq!(h.flow.end_reason(), Some(reason::HOLD_TIMEOUT));
}

#[test]
fn rtp_timeout_and_caller_hangup() {
    let c = clips();
    let mut h =
        Harness::with(FlowConfig { rtp_timeout: Duration::from_secs(3), ..FlowConfig::default() });
    h.input(|f, now| f.handle_plan(now, Ok(hold_plan(&c))));
    h.run_for(Duration::from_secs(2));
    h.input(|f, now| f.handle_rtp_seen(now));
    h.run_for(Duration::from_millis(2900));
    assert!(!h.ended, "RTP refreshed the timeout");
    h.run_for(Duration::from_millis(200));
    assert!(h.ended);
    assert_eq!(h.flow.end_reason(), Some(reason::RTP_TIMEOUT));
    // The caller hangs up mid-bridge: the agent socket is closed, nothing else is sent.
    let mut h = Harness::new();
    connected(&mut h, &c);
    h.input(|f, _| f.handle_leg_ended());
    assert!(h.has(&Action::CloseAgent));
    assert_eq!(h.flow.phase(), Phase::Ended);
    assert_eq!(h.flow.poll_timeout(), None);
}

#[test]
fn a_chunk_sent_after_its_deadline_says_how_late() {
    let c = clips();
    let mut h = Harness::new();
    connected(&mut h, &c);
    h.agent(&audio_msg(1, &[ulaw(5000); 160]));
    h.flow.take_latencies();
    // One caller frame, then every deadline run 3 ms late (as a busy shard would), until the
    // chunk holding that frame goes out.
    let payload = [h.codec.encode(1000); 160];
    h.input(|f, now| f.handle_rtp(now, 1, &payload));
    let mut added = None;
    for _ in 0..10 {
        let due = h.flow.poll_timeout().expect("a chunk deadline while bridged");
        let late = due + Duration::from_millis(3);
        h.flow.handle_timeout(late);
        h.now = late;
        if let Some(d) = h.flow.take_latencies().to_agent_added {
            added = Some(d);
            break;
        }
    }
    assert_eq!(added, Some(Duration::from_millis(3)));
}

#[test]
fn latencies_are_measured_at_the_engines_clock() {
    let c = clips();
    let mut h = Harness::new();
    connected(&mut h, &c);
    h.run_for(Duration::from_millis(7));
    h.agent(&audio_msg(1, &[ulaw(5000); 1600]));
    let mut seq = 1;
    h.caller_speaks(&mut seq, 3, 1000);
    let mut seen = precall_call::Latencies::default();
    for _ in 0..10 {
        h.run_for(TICK);
        let l = h.flow.take_latencies();
        seen.to_agent = seen.to_agent.or(l.to_agent);
        seen.to_agent_added = seen.to_agent_added.or(l.to_agent_added);
        seen.to_caller = seen.to_caller.or(l.to_caller);
        seen.first_audio = seen.first_audio.or(l.first_audio);
    }
    // Agent audio waits for the call's next 20 ms tick at most; caller audio for its chunk.
    assert!(seen.to_caller.unwrap() <= TICK, "{seen:?}");
    assert!(seen.to_agent.unwrap() <= Duration::from_millis(40), "{seen:?}");
    // The harness runs each deadline on time: nothing added beyond the chunking.
    assert_eq!(seen.to_agent_added, Some(Duration::ZERO), "{seen:?}");
    // From connect (the clone ready) to the agent's first frame: `connected` opens the agent
    // 100 ms after the connect, its audio comes 7 ms later, and the next tick sends it.
    let first = seen.first_audio.unwrap();
    assert!((Duration::from_millis(107)..=Duration::from_millis(127)).contains(&first), "{seen:?}");
}
