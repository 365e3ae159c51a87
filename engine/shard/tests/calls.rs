//! SIP calls through real shards over real sockets on 127.0.0.1: a raw-SIP caller (std
//! `UdpSocket`), a fake control plane that answers with hold plans and small generated clips,
//! and checks of the RTP the caller receives. Nothing sleeps to wait: every wait is a receive
//! with a deadline or a poll of a condition with a deadline.

use std::{
    net::UdpSocket,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use precall_api::{
    AudioInstruction, CallContext, CallId, CallInstructions, CloneStatus, ControlError,
    MediaEventKind, SpeechInstruction, StatusPollInstruction,
};
use precall_engine::{Engine, EngineConfig, MediaPlan, PlanReply, ShardControl, ShardPlan};
use precall_media::{Codec, EncodedClip, RtpPacket};

mod support;

use support::{Dialog, Uac, eventually, header, sdp_port, status};

/// A control plane in memory: plans every call as "hold", or parks the inbound replies.
#[derive(Default)]
struct FakeControl {
    park: bool,
    /// Status checks answer "failed: say the error and hang up".
    fail_on_poll: bool,
    parked: Mutex<Vec<PlanReply>>,
    inbound: Mutex<Vec<CallContext>>,
    polls: Mutex<u32>,
    ended: Mutex<Vec<(String, String)>>,
    /// The next this many call-end reports are refused as `Overloaded` (a full queue).
    refuse_ends: Mutex<u32>,
}

impl std::fmt::Debug for FakeControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeControl")
    }
}

/// `seconds` of a sine at `hz`, loud enough to be far from G.711 silence.
fn sine(hz: f32, seconds: f32) -> Arc<EncodedClip> {
    let n = (8000.0 * seconds) as usize;
    let pcm: Vec<i16> = (0..n)
        .map(|i| ((i as f32 * hz * std::f32::consts::TAU / 8000.0).sin() * 8000.0) as i16)
        .collect();
    Arc::new(EncodedClip::from_pcm(&pcm))
}

fn hold_plan(call_id: CallId, greeting: bool) -> ShardPlan {
    let audio = |url: &str, loops| Some(AudioInstruction { url: url.to_owned(), loops });
    ShardPlan {
        instructions: CallInstructions {
            call_id: call_id.clone(),
            clone_status: CloneStatus::Processing,
            greeting_audio: if greeting { audio("mem://greeting", 1) } else { None },
            hold_audio: audio("mem://hold", 0),
            status_poll: Some(StatusPollInstruction {
                call_id,
                interval: Duration::from_millis(200),
                hold_remaining: Duration::from_secs(60),
            }),
            websocket: None,
            error_message: None,
            should_hangup: false,
        },
        media: MediaPlan {
            greeting: greeting.then(|| sine(400.0, 0.2)),
            hold: Some(sine(600.0, 0.5)),
            error: Some(sine(300.0, 0.2)),
        },
        agent: None,
    }
}

impl ShardControl for FakeControl {
    fn inbound(&self, ctx: CallContext, reply: PlanReply) -> Result<(), ControlError> {
        let call_id = ctx.call_id.clone();
        self.inbound.lock().unwrap().push(ctx);
        if self.park {
            self.parked.lock().unwrap().push(reply);
        } else {
            // Answer from another thread, as the control plane does.
            thread::spawn(move || reply(Ok(hold_plan(call_id, true))));
        }
        Ok(())
    }

    fn check_status(&self, call_id: CallId, reply: PlanReply) -> Result<(), ControlError> {
        *self.polls.lock().unwrap() += 1;
        let fail = self.fail_on_poll;
        thread::spawn(move || {
            let mut plan = hold_plan(call_id, false);
            if fail {
                let ins = &mut plan.instructions;
                ins.clone_status = CloneStatus::Failed;
                ins.hold_audio = None;
                ins.status_poll = None;
                ins.should_hangup = true;
                ins.error_message = Some(SpeechInstruction {
                    text: "sorry".to_owned(),
                    audio_url: Some("mem://error".to_owned()),
                });
                plan.media.hold = None;
            }
            reply(Ok(plan))
        });
        Ok(())
    }

    fn call_ended(&self, call_id: CallId, reason: String) -> Result<(), ControlError> {
        let mut refuse = self.refuse_ends.lock().unwrap();
        if *refuse > 0 {
            *refuse -= 1;
            return Err(ControlError::Overloaded);
        }
        self.ended.lock().unwrap().push((call_id.as_str().to_owned(), reason));
        Ok(())
    }

    fn call_event(&self, _: CallId, _: MediaEventKind, _: String) -> Result<(), ControlError> {
        Ok(())
    }
}

fn start(shards: usize, control: Arc<FakeControl>) -> Engine {
    start_with(shards, control, Duration::from_secs(30))
}

fn start_with(shards: usize, control: Arc<FakeControl>, rtp_timeout: Duration) -> Engine {
    let cfg = EngineConfig {
        shards,
        pin_cores: false,
        sip: Some("127.0.0.1:0".parse().unwrap()),
        rtp_ports: 40000..=40999,
        rtp_timeout,
        ..EngineConfig::default()
    };
    Engine::start(cfg, control).unwrap()
}

/// One unpinned shard on a loopback SIP port with its own RTP range: the base of the tests
/// that fill one shard.
fn one_shard() -> EngineConfig {
    EngineConfig {
        shards: 1,
        pin_cores: false,
        sip: Some("127.0.0.1:0".parse().unwrap()),
        rtp_ports: 40000..=40999,
        ..EngineConfig::default()
    }
}

/// Waits until the control plane has been told that `call_id` ended for `reason`.
fn await_end(control: &FakeControl, call_id: &str, reason: &str) {
    eventually("call_ended", || {
        control.ended.lock().unwrap().iter().any(|(id, r)| id == call_id && r == reason)
    });
}

/// RTP packets received on `sock` during `window` (plus their arrival times).
fn collect_rtp(sock: &UdpSocket, window: Duration) -> Vec<(Instant, Vec<u8>)> {
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let until = Instant::now() + window;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((Instant::now(), buf[..n].to_vec()));
        }
    }
    out
}

#[test]
fn a_call_gets_greeting_and_hold_over_rtp_and_ends_with_the_callers_bye() {
    let control = Arc::new(FakeControl::default());
    let engine = start(2, control.clone());
    let server = engine.sip_addr().unwrap();
    let mut uac = Uac::new(server);
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rtp_port = rtp.local_addr().unwrap().port();

    let d = uac.invite("call-one@carrier.example", rtp_port);
    // PCMA was offered first, so it is chosen; telephone-event is kept.
    let m = d.answer_sdp.lines().find(|l| l.starts_with("m=audio")).unwrap();
    assert!(m.contains("RTP/AVP 8"), "{}", d.answer_sdp);
    let our_rtp = sdp_port(&d.answer_sdp);
    assert!((40000..=40999).contains(&our_rtp) && our_rtp.is_multiple_of(2), "{our_rtp}");
    uac.ack(&d);
    let ctx = control.inbound.lock().unwrap()[0].clone();
    assert_eq!(ctx.call_id.as_str(), "call-one@carrier.example");
    assert_eq!(ctx.recipient_number, "+18005551212");
    assert_eq!(ctx.caller_number, "+12345678901");

    // About one second of audio on the offered port.
    let packets = collect_rtp(&rtp, Duration::from_millis(1100));
    let first_at = packets.first().expect("RTP arrived").0;
    let in_first_second =
        packets.iter().filter(|(t, _)| *t - first_at < Duration::from_secs(1)).count();
    assert!((40..=55).contains(&in_first_second), "{in_first_second} packets in 1 s");
    let views: Vec<_> =
        packets.iter().map(|(_, p)| RtpPacket::new_checked(p.as_slice()).unwrap()).collect();
    assert!(views[0].marker(), "marker on the first packet");
    assert!(views[1..].iter().all(|p| !p.marker()));
    let mut late_steps = 0;
    for pair in views.windows(2) {
        assert_eq!(pair[1].sequence().0, pair[0].sequence().0.wrapping_add(1), "sequence gap");
        // +160 per packet; a shard woken 20 ms late or more skips that frame and advances the
        // timestamp over it (RFC 3550 §5.1), which a loaded test machine may cause rarely.
        let step = pair[1].timestamp().0.wrapping_sub(pair[0].timestamp().0);
        assert!(step >= 160 && step % 160 == 0, "timestamp step {step}");
        late_steps += usize::from(step != 160);
        assert_eq!(pair[1].ssrc(), pair[0].ssrc());
    }
    assert!(late_steps <= 1, "{late_steps} skipped frames");
    for p in &views {
        assert_eq!(p.payload_type(), 8);
        assert_eq!(p.payload().len(), 160);
    }
    let silent =
        views.iter().filter(|p| p.payload().iter().all(|&b| b == Codec::Pcma.silence())).count();
    assert!(silent < views.len() / 10, "{silent} of {} packets are silence", views.len());
    // The 200 ms poll interval went by several times.
    eventually("status checks", || *control.polls.lock().unwrap() >= 2);

    // Symmetric RTP: once the caller's RTP comes from elsewhere (a NAT rebinding: same IP, new
    // port) for three packets in a row, our RTP follows it.
    let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
    for seq in 0..3u8 {
        moved.send_to(&rtp_packet(seq, 0x5151), ("127.0.0.1", our_rtp)).unwrap();
    }
    let latched = collect_rtp(&moved, Duration::from_millis(300));
    assert!(latched.len() >= 10, "{} packets after the latch", latched.len());

    let answer = uac.bye(&d);
    assert_eq!(status(&answer), Some(200), "{answer}");
    await_end(&control, "call-one@carrier.example", "caller_hangup");
    eventually("no active calls", || engine.health().iter().all(|h| h.active_calls == 0));
    let health = engine.health();
    let sent: u64 = health.iter().map(|h| h.rtp_packets_out).sum();
    assert!(sent >= 50);
    // On each shard, one frame in PACING_SAMPLE_EVERY had its send lateness measured.
    let every = u64::from(precall_engine::PACING_SAMPLE_EVERY);
    for h in &health {
        let sampled: u64 = h.send_lateness.counts.iter().sum();
        assert_eq!(sampled, h.rtp_packets_out / every, "{h:?}");
    }
    engine.shutdown().unwrap();
}

#[test]
fn the_greeting_waits_for_the_callers_ack() {
    let control = Arc::new(FakeControl::default());
    let engine = start(1, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rtp_port = rtp.local_addr().unwrap().port();
    let d = uac.invite("call-unacked@carrier.example", rtp_port);
    // Answered, not confirmed: the caller may not have the 200 (it is resent at 500 ms), so
    // nothing is sent it could miss the start of.
    let early = collect_rtp(&rtp, Duration::from_millis(300));
    assert!(early.is_empty(), "{} RTP packets before the ACK", early.len());
    uac.ack(&d);
    let packets = collect_rtp(&rtp, Duration::from_millis(500));
    assert!(packets.len() >= 15, "{} RTP packets in the 500 ms after the ACK", packets.len());
    let first = RtpPacket::new_checked(packets[0].1.as_slice()).unwrap();
    assert!(first.marker(), "the greeting starts a talkspurt");
    let answer = uac.bye(&d);
    assert_eq!(status(&answer), Some(200), "{answer}");
    await_end(&control, "call-unacked@carrier.example", "caller_hangup");
    engine.shutdown().unwrap();
}

/// A PCMA packet of silence with sequence number `seq` and SSRC `ssrc`.
fn rtp_packet(seq: u8, ssrc: u32) -> [u8; 172] {
    let mut p = [0xD5u8; 172];
    p[..12].copy_from_slice(&[0x80, 8, 0, seq, 0, 0, 0, 0, 0, 0, 0, 0]);
    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

#[test]
fn spoofed_rtp_from_another_address_never_takes_the_calls_audio() {
    let control = Arc::new(FakeControl::default());
    let engine = start(1, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let d = uac.invite("call-spoof@carrier.example", rtp.local_addr().unwrap().port());
    let our_rtp = sdp_port(&d.answer_sdp);
    uac.ack(&d);
    // Right after the 200 OK, before the caller's first packet, an attacker elsewhere (another
    // loopback address: neither the SDP's nor the INVITE's) floods the call's port.
    let spoofer = UdpSocket::bind("127.0.0.2:0").unwrap();
    for seq in 0..20 {
        spoofer.send_to(&rtp_packet(seq, 0xBAD), ("127.0.0.1", our_rtp)).unwrap();
    }
    eventually("the spoofed packets counted", || {
        engine.health().iter().map(|h| h.rtp_packets_rejected).sum::<u64>() >= 20
    });
    // The audio still goes where the SDP said, and nothing to the spoofer.
    let heard = collect_rtp(&rtp, Duration::from_millis(300));
    assert!(heard.len() >= 10, "{} packets to the caller", heard.len());
    spoofer.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 2048];
    assert!(spoofer.recv_from(&mut buf).is_err(), "the spoofer got the call's audio");
    // The caller's own stream latches and keeps the call alive; the spoofer's keeps failing.
    for seq in 0..5 {
        rtp.send_to(&rtp_packet(seq, 0x1234), ("127.0.0.1", our_rtp)).unwrap();
        spoofer.send_to(&rtp_packet(seq, 0xBAD), ("127.0.0.1", our_rtp)).unwrap();
    }
    assert!(collect_rtp(&rtp, Duration::from_millis(200)).len() >= 5);
    assert!(spoofer.recv_from(&mut buf).is_err(), "the spoofer got the call's audio");
    uac.bye(&d);
    await_end(&control, "call-spoof@carrier.example", "caller_hangup");
    engine.shutdown().unwrap();
}

#[test]
fn one_client_socket_spreads_its_calls_over_both_shards() {
    let control = Arc::new(FakeControl::default());
    let engine = start(2, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let mut dialogs = Vec::new();
    for i in 0..20 {
        let d = uac.invite(&format!("{i}-spread@trunk.example"), 30000 + 2 * i);
        uac.ack(&d);
        dialogs.push(d);
    }
    let health = engine.health();
    assert!(health.iter().all(|h| h.active_calls > 0), "{health:?}");
    assert_eq!(health.iter().map(|h| h.active_calls).sum::<u64>(), 20, "{health:?}");
    // The kernel put the one client on one shard; the other shard's calls were forwarded.
    assert!(health.iter().map(|h| h.datagrams_forwarded).sum::<u64>() > 0, "{health:?}");
    for d in &dialogs {
        assert_eq!(status(&uac.bye(d)), Some(200));
    }
    eventually("every call ended", || engine.health().iter().all(|h| h.active_calls == 0));
    assert_eq!(control.ended.lock().unwrap().len(), 20);
    engine.shutdown().unwrap();
}

#[test]
fn cancel_before_the_plan_arrives_gets_487_and_is_recorded() {
    let control = Arc::new(FakeControl { park: true, ..FakeControl::default() });
    let engine = start(2, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let call_id = "cancel-me@carrier.example";
    let (branch, from_tag) = uac.send_invite(call_id, 30100);
    uac.recv_until("100 Trying", |m| status(m) == Some(100));
    eventually("the inbound request", || !control.inbound.lock().unwrap().is_empty());
    let port = uac.port();
    let server = engine.sip_addr().unwrap();
    uac.send(&format!(
        "CANCEL sip:+18005551212@{server} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+12345678901@127.0.0.1>;tag={from_tag}\r\n\
         To: <sip:+18005551212@{server}>\r\nCall-ID: {call_id}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    ));
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = uac
            .recv_until("answers to CANCEL and INVITE", |m| matches!(status(m), Some(200 | 487)));
        got.push((status(&m).unwrap(), header(&m, "CSeq").unwrap().to_owned()));
    }
    got.sort();
    assert_eq!(got, [(200, "1 CANCEL".to_owned()), (487, "1 INVITE".to_owned())]);
    eventually("the end recorded as canceled", || {
        control.ended.lock().unwrap().iter().any(|(id, r)| id == call_id && r == "canceled")
    });
    // The plan arriving late for the dead call changes nothing.
    for reply in control.parked.lock().unwrap().drain(..) {
        reply(Ok(hold_plan(CallId::new(call_id), true)));
    }
    eventually("no active calls", || engine.health().iter().all(|h| h.active_calls == 0));
    engine.shutdown().unwrap();
}

#[test]
fn a_failed_clone_plays_the_error_clip_then_precall_hangs_up() {
    let control = Arc::new(FakeControl { fail_on_poll: true, ..FakeControl::default() });
    let engine = start(1, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let d = uac.invite("fails@carrier.example", rtp.local_addr().unwrap().port());
    uac.ack(&d);
    uac.await_bye(&d.call_id);
    // The greeting (10 frames), hold until the first poll 200 ms in, then the whole error
    // clip (10 frames), all before the BYE (read from the socket's queue now); nothing after.
    let before = collect_rtp(&rtp, Duration::from_millis(100)).len();
    assert!(before >= 20, "greeting and error clip: only {before} packets");
    let after = collect_rtp(&rtp, Duration::from_millis(200)).len();
    assert_eq!(after, 0, "RTP after the BYE");
    await_end(&control, "fails@carrier.example", "failed");
    engine.shutdown().unwrap();
}

#[test]
fn a_caller_that_sends_no_rtp_is_hung_up() {
    let control = Arc::new(FakeControl::default());
    let engine = start_with(2, control.clone(), Duration::from_millis(300));
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let d = uac.invite("silent@carrier.example", 30200);
    uac.ack(&d);
    uac.await_bye(&d.call_id);
    await_end(&control, "silent@carrier.example", "rtp_timeout");
    eventually("no active calls", || engine.health().iter().all(|h| h.active_calls == 0));
    engine.shutdown().unwrap();
}

#[test]
fn garbage_does_not_hurt_a_shard() {
    let control = Arc::new(FakeControl::default());
    let engine = start(2, control.clone());
    let server = engine.sip_addr().unwrap();
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let garbage: [&[u8]; 6] = [
        b"",
        b"\r\n\r\n",
        b"\xff\xfe\x00garbage",
        b"INVITE sip:x SIP/2.0\r\nCall-ID: half",
        b"SIP/2.0 200 OK\r\nCall-ID: nobody\r\n\r\n",
        b"INVITE sip:+1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\nCall-ID: c\r\nContent-Length: 99999\r\n\r\n",
    ];
    for g in garbage {
        junk.send_to(g, server).unwrap();
    }
    // Still alive, and still answering calls.
    let mut uac = Uac::new(server);
    let d = uac.invite("after-garbage@carrier.example", 30300);
    uac.ack(&d);
    assert_eq!(status(&uac.bye(&d)), Some(200));
    assert!(engine.health().iter().all(|h| h.alive));
    engine.shutdown().unwrap();
}

#[test]
fn shutdown_says_bye_to_live_calls() {
    let control = Arc::new(FakeControl::default());
    let engine = start(2, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let d = uac.invite("still-talking@carrier.example", 30400);
    uac.ack(&d);
    // An OPTIONS with the same Call-ID goes the same way as the ACK, after it: once it is
    // answered, the ACK has been handled and the call is confirmed (no BYE before the ACK,
    // RFC 3261 §15).
    let (port, server) = (uac.port(), engine.sip_addr().unwrap());
    uac.send(&format!(
        "OPTIONS sip:{server} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKopt1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p1\r\nTo: <sip:{server}>\r\n\
         Call-ID: still-talking@carrier.example\r\nCSeq: 7 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ));
    uac.recv_until("200 to OPTIONS", |m| {
        status(m) == Some(200) && header(m, "CSeq").is_some_and(|c| c.ends_with("OPTIONS"))
    });
    engine.shutdown().unwrap();
    uac.recv_until("precall's BYE", |m| {
        m.starts_with("BYE ") && header(m, "Call-ID") == Some("still-talking@carrier.example")
    });
    let ended = control.ended.lock().unwrap().clone();
    assert_eq!(ended, [("still-talking@carrier.example".to_owned(), "shutdown".to_owned())]);
}

#[test]
fn a_full_shard_answers_503_before_any_record_is_made() {
    let control = Arc::new(FakeControl::default());
    let cfg = EngineConfig { max_calls_per_shard: 2, ..one_shard() };
    let engine = Engine::start(cfg, control.clone()).unwrap();
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let first = uac.invite("full-1@carrier.example", 30500);
    uac.ack(&first);
    let second = uac.invite("full-2@carrier.example", 30502);
    uac.ack(&second);
    uac.send_invite("full-3@carrier.example", 30504);
    let refused = uac.recv_until("503 to the third INVITE", |m| {
        header(m, "Call-ID") == Some("full-3@carrier.example")
            && status(m).is_some_and(|s| s >= 200)
    });
    assert_eq!(status(&refused), Some(503));
    assert_eq!(header(&refused, "Retry-After"), Some("5"));
    assert_eq!(control.inbound.lock().unwrap().len(), 2, "no record for the refused call");
    assert_eq!(engine.health()[0].calls_refused_full, 1);
    // A call that ends makes room again.
    assert_eq!(status(&uac.bye(&first)), Some(200));
    eventually("the slot freed", || engine.health()[0].active_calls == 1);
    let again = uac.invite("full-4@carrier.example", 30506);
    uac.ack(&again);
    assert_eq!(control.inbound.lock().unwrap().len(), 3);
    engine.shutdown().unwrap();
}

#[test]
fn a_full_setup_queue_refuses_statelessly_until_a_plan_comes_back() {
    let control = Arc::new(FakeControl { park: true, ..FakeControl::default() });
    let cfg = EngineConfig { admit_setup_depth: 2, ..one_shard() };
    let engine = Engine::start(cfg, control.clone()).unwrap();
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    // Two calls wait for their plans (the control plane holds them).
    uac.send_invite("setup-1@carrier.example", 30600);
    uac.send_invite("setup-2@carrier.example", 30602);
    eventually("two inbound requests", || control.inbound.lock().unwrap().len() == 2);
    // The third is refused at once: 503 + Retry-After, no record, no transaction.
    let (branch, _) = uac.send_invite("setup-3@carrier.example", 30604);
    let refused = uac.recv_until("503 to the third INVITE", |m| {
        header(m, "Call-ID") == Some("setup-3@carrier.example") && status(m).is_some()
    });
    assert_eq!(status(&refused), Some(503));
    assert_eq!(header(&refused, "Retry-After"), Some("5"));
    assert!(header(&refused, "Via").is_some_and(|v| v.contains(&branch)));
    assert_eq!(control.inbound.lock().unwrap().len(), 2, "no record for the refused call");
    eventually("the refusal counted", || engine.health()[0].calls_refused_overload == 1);
    // The queue bound is not the overload gauge (clock or inbox): the shard still admits.
    assert_eq!(engine.health()[0].overload, 0);
    // One plan back: room for one more call.
    let reply = control.parked.lock().unwrap().remove(0);
    reply(Ok(hold_plan(CallId::new("setup-1@carrier.example"), true)));
    uac.recv_until("the first call answered", |m| {
        header(m, "Call-ID") == Some("setup-1@carrier.example") && status(m) == Some(200)
    });
    uac.send_invite("setup-4@carrier.example", 30606);
    eventually("the fourth call recorded", || control.inbound.lock().unwrap().len() == 3);
    for reply in control.parked.lock().unwrap().drain(..) {
        reply(Err(ControlError::Overloaded));
    }
    engine.shutdown().unwrap();
}

#[test]
fn a_shard_whose_rtp_ports_are_all_taken_answers_503_before_any_record_is_made() {
    let control = Arc::new(FakeControl::default());
    let port = {
        // Two ports: one even/odd pair, so room for one call.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = probe.local_addr().unwrap().port();
        p & !1
    };
    let cfg = EngineConfig { rtp_ports: port..=port + 1, ..one_shard() };
    let engine = Engine::start(cfg, control.clone()).unwrap();
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let first = uac.invite("ports-1@carrier.example", 30600);
    uac.ack(&first);
    uac.send_invite("ports-2@carrier.example", 30602);
    let refused = uac.recv_until("503 to the second INVITE", |m| {
        header(m, "Call-ID") == Some("ports-2@carrier.example")
            && status(m).is_some_and(|s| s >= 200)
    });
    assert_eq!(status(&refused), Some(503));
    assert_eq!(control.inbound.lock().unwrap().len(), 1, "no record for the refused call");
    assert_eq!(engine.health()[0].calls_refused_full, 1);
    engine.shutdown().unwrap();
}

#[test]
fn call_end_reports_refused_by_a_full_queue_are_retried_in_order() {
    let control = Arc::new(FakeControl::default());
    let engine = start(1, control.clone());
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let a = uac.invite("end-a@carrier.example", 30600);
    uac.ack(&a);
    let b = uac.invite("end-b@carrier.example", 30602);
    uac.ack(&b);
    // The control plane's queue is full for the next 5 reports.
    *control.refuse_ends.lock().unwrap() = 5;
    assert_eq!(status(&uac.bye(&a)), Some(200));
    assert_eq!(status(&uac.bye(&b)), Some(200));
    await_end(&control, "end-b@carrier.example", "caller_hangup");
    let ended = control.ended.lock().unwrap().clone();
    assert_eq!(
        ended,
        vec![
            ("end-a@carrier.example".to_owned(), "caller_hangup".to_owned()),
            ("end-b@carrier.example".to_owned(), "caller_hangup".to_owned()),
        ],
        "both recorded, once each, in order"
    );
    assert_eq!(*control.refuse_ends.lock().unwrap(), 0, "every refusal was retried");
    eventually("no report pending", || engine.health()[0].end_reports_pending == 0);
    engine.shutdown().unwrap();
}

/// An out-of-dialog OPTIONS, as Kamailio's dispatcher probes a node; returns the status.
fn probe(uac: &mut Uac, n: u32) -> u16 {
    let branch = uac.next_branch();
    let (port, server) = (uac.port(), uac.server);
    let call_id = format!("probe-{n}@dispatcher.example");
    uac.send(&format!(
        "OPTIONS sip:{server} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:dispatcher@127.0.0.1>;tag=p{n}\r\nTo: <sip:{server}>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ));
    let answer = uac.recv_until("an answer to OPTIONS", |m| header(m, "Call-ID") == Some(&call_id));
    status(&answer).unwrap()
}

#[test]
fn a_shard_whose_media_clock_runs_late_refuses_new_calls_and_probes_until_it_keeps_time() {
    let control = Arc::new(FakeControl::default());
    let cfg = EngineConfig {
        // Two shards: only the one with the call ticks, but probes (spread over both by their
        // Call-IDs) must all speak for the node.
        shards: 2,
        pin_cores: false,
        sip: Some("127.0.0.1:0".parse().unwrap()),
        rtp_ports: 41000..=41999,
        // No wake-up of a real clock is within a nanosecond of its instant: as soon as the
        // media clock ticks for a call, the shard measures itself as running late.
        admit_clock_late: Duration::from_nanos(1),
        // A shard with one call is nowhere near busy: count its lateness all the same.
        admit_clock_busy_percent: 0,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, control.clone()).unwrap();
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    assert_eq!(probe(&mut uac, 0), 200, "an idle shard admits");
    let up = uac.invite("late-1@carrier.example", 30700);
    uac.ack(&up);
    // The call's hold audio makes the clock tick; the shard then sheds: probes get 503...
    let mut n = 0;
    eventually("the shard to shed load", || {
        n += 1;
        probe(&mut uac, n) == 503
    });
    assert_eq!(
        engine.health().iter().map(|h| h.overload).max(),
        Some(1),
        "the reason: the media clock"
    );
    // Every probe, whichever shard it reaches: the node is taken out as a whole.
    for _ in 0..8 {
        n += 1;
        assert_eq!(probe(&mut uac, n), 503, "probe {n}");
    }
    // ...and so does a new call to the shedding shard, before any record is made (found by
    // trying Call-IDs until one lands there: the other shard still takes calls).
    let shedding = engine.health().iter().position(|h| h.overload == 1).unwrap();
    let late2 = (0..)
        .map(|i| format!("late-2-{i}@carrier.example"))
        .find(|id| precall_engine::shard_for_call_id(id.as_bytes(), 2) == shedding)
        .unwrap();
    uac.send_invite(&late2, 30702);
    let refused = uac.recv_until("a final answer to the second INVITE", |m| {
        header(m, "Call-ID") == Some(late2.as_str()) && status(m).is_some_and(|s| s >= 200)
    });
    assert_eq!(status(&refused), Some(503));
    assert!(header(&refused, "Retry-After").is_some());
    assert_eq!(control.inbound.lock().unwrap().len(), 1, "no record for the refused call");
    assert_eq!(engine.health().iter().map(|h| h.calls_refused_overload).sum::<u64>(), 1);
    // The call that was up is not touched by the overload: its BYE is answered.
    assert_eq!(status(&uac.bye(&up)), Some(200));
    // With no call left the clock stops; once a window has passed, the shard admits again.
    eventually("the shard to admit again", || {
        n += 1;
        probe(&mut uac, n) == 200
    });
    assert!(engine.health().iter().all(|h| h.overload == 0));
    let again = uac.invite("late-3@carrier.example", 30704);
    uac.ack(&again);
    assert_eq!(control.inbound.lock().unwrap().len(), 2);
    engine.shutdown().unwrap();
}

/// A re-INVITE in `d` with the caller's media `direction` (`sendonly` puts precall on hold);
/// returns the 200 OK once acknowledged.
fn reinvite(uac: &mut Uac, d: &Dialog, cseq: u32, rtp_port: u16, direction: &str) -> String {
    let branch = uac.next_branch();
    let port = uac.port();
    let sdp = format!(
        "v=0\r\no=carrier 1 {cseq} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na={direction}\r\n"
    );
    uac.send(&format!(
        "INVITE {} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+12345678901@127.0.0.1>;tag={}\r\n\
         To: <sip:+18005551212@{}>;tag={}\r\nCall-ID: {}\r\nCSeq: {cseq} INVITE\r\n\
         Contact: <sip:caller@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        d.target,
        d.from_tag,
        uac.server,
        d.to_tag,
        d.call_id,
        sdp.len()
    ));
    let want = format!("{cseq} INVITE");
    let ok = uac.recv_until("200 OK to the re-INVITE", |m| {
        status(m) == Some(200) && header(m, "CSeq") == Some(want.as_str())
    });
    let branch = uac.next_branch();
    uac.send(&format!(
        "ACK {} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\nMax-Forwards: 70\r\n\
         From: <sip:+12345678901@127.0.0.1>;tag={}\r\nTo: <sip:+18005551212@{}>;tag={}\r\n\
         Call-ID: {}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
        d.target, d.from_tag, uac.server, d.to_tag, d.call_id
    ));
    ok
}

#[test]
fn a_caller_on_hold_is_not_timed_out_and_audio_resumes_with_marker_and_time_advanced() {
    let control = Arc::new(FakeControl::default());
    // A caller silent for 800 ms is hung up, unless the caller put the call on hold.
    let engine = start_with(1, control.clone(), Duration::from_millis(800));
    let mut uac = Uac::new(engine.sip_addr().unwrap());
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rtp_port = rtp.local_addr().unwrap().port();
    let d = uac.invite("on-hold@carrier.example", rtp_port);
    let our_rtp = sdp_port(&d.answer_sdp);
    uac.ack(&d);
    let mut heard = collect_rtp(&rtp, Duration::from_millis(200));
    for seq in 0..3u8 {
        rtp.send_to(&rtp_packet(seq, 0x4242), ("127.0.0.1", our_rtp)).unwrap();
    }
    // The caller puts precall on hold (a=sendonly): precall answers recvonly and stops sending.
    let ok = reinvite(&mut uac, &d, 2, rtp_port, "sendonly");
    assert!(ok.contains("a=recvonly"), "{ok}");
    heard.extend(collect_rtp(&rtp, Duration::from_millis(100)));
    let last =
        RtpPacket::new_checked(heard.last().expect("audio before the hold").1.clone()).unwrap();
    // Silent for 2.4 s, three times the RTP timeout: on hold, that is not a dead caller.
    let held = collect_rtp(&rtp, Duration::from_millis(2400));
    assert!(held.is_empty(), "{} packets sent to a caller who put us on hold", held.len());
    assert!(control.ended.lock().unwrap().is_empty(), "a held call was ended");
    // Taken off hold: audio again, the first packet with the marker (a new talkspurt), the
    // timestamp advanced over the pause (RFC 3550 §5.1), the sequence without a gap.
    let ok = reinvite(&mut uac, &d, 3, rtp_port, "sendrecv");
    assert!(ok.contains("a=sendrecv"), "{ok}");
    let after = collect_rtp(&rtp, Duration::from_millis(300));
    assert!(
        !after.is_empty(),
        "no audio after the hold; ended {:?}, health {:?}",
        control.ended.lock().unwrap(),
        engine.health()
    );
    let first =
        RtpPacket::new_checked(after.first().expect("audio after the hold").1.clone()).unwrap();
    assert!(first.marker(), "no marker after the pause");
    assert_eq!(first.sequence().0, last.sequence().0.wrapping_add(1), "sequence gap");
    let advanced = first.timestamp().0.wrapping_sub(last.timestamp().0);
    assert!(advanced >= 2400 * 8, "timestamp advanced only {advanced} over 2.4 s");
    assert_eq!(status(&uac.bye(&d)), Some(200));
    await_end(&control, "on-hold@carrier.example", "caller_hangup");
    engine.shutdown().unwrap();
}
