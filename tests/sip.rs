//! Native SIP against the running `precall` binary, driven by the real SIPp with the scenario
//! kept in `benches/sipp/uac_hold.xml`: 50 calls at 10 calls/s, each INVITE (carrier-style SDP
//! offer) -> 100 -> 200 -> ACK -> 3 s of greeting and hold audio -> BYE -> 200. SIPp must
//! report no failed call (exit status 0), and the RTP precall sent, captured on a socket this
//! test owns (the offers point there), must be right for every call.

mod support;

use std::collections::HashMap;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use precall_media::{Codec, RtpPacket};
use support::precall::Precall;
use support::{free_udp_port, sipp, wait_for};

const SCENARIO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/sipp/uac_hold.xml");

/// One received RTP packet: arrival time and the header fields checked.
struct Received {
    at: Instant,
    seq: u16,
    ts: u32,
    pt: u8,
    silent: bool,
}

/// Binds the callers' media socket and starts a thread that keeps every RTP packet arriving
/// there, by SSRC, until `done` is set and the socket is quiet. Returns the port, the flag and
/// the thread.
#[allow(clippy::type_complexity)]
fn capture_rtp() -> (u16, Arc<AtomicBool>, std::thread::JoinHandle<HashMap<u32, Vec<Received>>>) {
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port();
    media.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let capture = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut streams: HashMap<u32, Vec<Received>> = HashMap::new();
            let mut buf = [0u8; 2048];
            loop {
                // After SIPp is done, read until the socket is quiet: what is still queued
                // was sent before the BYE was answered.
                let Ok(n) = media.recv(&mut buf) else {
                    if done.load(Ordering::Acquire) {
                        break;
                    }
                    continue;
                };
                let p = RtpPacket::new_checked(&buf[..n]).expect("precall sent a valid RTP packet");
                streams.entry(p.ssrc().0).or_default().push(Received {
                    at: Instant::now(),
                    seq: p.sequence().0,
                    ts: p.timestamp().0,
                    pt: p.payload_type(),
                    silent: p.payload().iter().all(|&b| b == Codec::Pcma.silence()),
                });
            }
            streams
        })
    };
    (media_port, done, capture)
}

/// One call's RTP as the caller heard it: 50 packets/s for at least `min_span`, sequence +1,
/// timestamp +160 (a frame skipped by a late wake-up advances it: allowed on 1 % of packets),
/// PCMA, mostly not silence.
fn check_stream(ssrc: u32, packets: &[Received], min_span: Duration) {
    let span = packets.last().unwrap().at - packets[0].at;
    let rate = (packets.len() - 1) as f64 / span.as_secs_f64();
    assert!((42.0..=55.0).contains(&rate), "SSRC {ssrc:#x}: {rate:.1} packets/s");
    assert!(span >= min_span, "SSRC {ssrc:#x}: only {span:?} of audio");
    let mut late_steps = 0;
    for w in packets.windows(2) {
        assert_eq!(w[1].seq, w[0].seq.wrapping_add(1), "SSRC {ssrc:#x}: sequence gap");
        // +160 per packet; a frame the shard skipped because it woke 20 ms late advances
        // the timestamp over it (RFC 3550 §5.1): allowed, rarely, on a loaded machine.
        let step = w[1].ts.wrapping_sub(w[0].ts);
        assert!(step >= 160 && step % 160 == 0, "SSRC {ssrc:#x}: timestamp step {step}");
        late_steps += usize::from(step != 160);
    }
    assert!(late_steps * 100 <= packets.len(), "SSRC {ssrc:#x}: {late_steps} skipped frames");
    // PCMA was offered first.
    assert!(packets.iter().all(|p| p.pt == 8), "SSRC {ssrc:#x}: payload type");
    let silent = packets.iter().filter(|p| p.silent).count();
    assert!(silent * 5 < packets.len(), "SSRC {ssrc:#x}: {silent} silent packets");
}

#[test]
fn sipp_places_50_calls_that_hear_greeting_and_hold_over_rtp() {
    let sipp_found = Command::new("sipp").arg("-v").stdout(Stdio::null()).status().is_ok();
    assert!(sipp_found, "sipp is not installed: `bash tests/run.sh` installs sip-tester");

    let sip_port = free_udp_port();
    let precall = Precall::start(&[
        ("SIP_PORT", sip_port.to_string()),
        ("RTP_PORT_MIN", "42000".to_owned()),
        ("RTP_PORT_MAX", "42999".to_owned()),
        ("STATUS_POLL_INTERVAL_MS", "500".to_owned()),
        // Every call holds for its whole length: the clone is still being made.
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
    ]);

    // The caller's media address in every offer: RTP for all 50 calls lands here, told apart
    // by SSRC.
    let (media_port, done, capture) = capture_rtp();

    let target = format!("127.0.0.1:{sip_port}");
    let out = sipp(&target, SCENARIO.as_ref(), media_port, 50, 10, 90).output().expect("run sipp");
    done.store(true, Ordering::Release);
    let streams = capture.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "sipp reported failed calls: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(streams.len(), 50, "one RTP stream per call");
    for (ssrc, packets) in &streams {
        check_stream(*ssrc, packets, Duration::from_millis(2500));
    }

    // Every call's end was recorded and no call is left on a shard.
    wait_for("the shards to drop every call", Duration::from_secs(10), || {
        (precall.metric("precall_active_calls") == 0).then_some(())
    });
    assert!(precall.stop().success());
}

#[test]
fn sigterm_drains_new_calls_get_503_and_the_calls_up_finish() {
    let sip_port = free_udp_port();
    let precall = Precall::start(&[
        ("SIP_PORT", sip_port.to_string()),
        ("RTP_PORT_MIN", "44000".to_owned()),
        ("RTP_PORT_MAX", "44999".to_owned()),
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
        ("DRAIN_TIMEOUT_MS", "30000".to_owned()),
    ]);
    // 20 calls of 5 s each, all up at once.
    let scenario = std::fs::read_to_string(SCENARIO)
        .unwrap()
        .replace(r#"<pause milliseconds="3000"/>"#, r#"<pause milliseconds="5000"/>"#);
    let path = std::env::temp_dir().join(format!("precall-drain-{}.xml", std::process::id()));
    std::fs::write(&path, scenario).unwrap();
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port();
    let target = format!("127.0.0.1:{sip_port}");
    let sipp = sipp(&target, &path, media_port, 20, 20, 60).spawn().expect("run sipp");
    wait_for("20 calls up", Duration::from_secs(20), || {
        (precall.metric("precall_active_calls") == 20).then_some(())
    });

    precall.sigterm();
    // /health says draining from the signal on; each shard refuses once it took the drain
    // from its inbox, a moment later (and later still on a loaded machine).
    wait_for("/health to say every shard drains", Duration::from_secs(5), || {
        let (status, body) = precall.get("/health");
        let health: serde_json::Value = serde_json::from_str(&body).ok()?;
        let shards = health["shards"].as_array()?;
        let all = !shards.is_empty() && shards.iter().all(|s| s["draining"] == true);
        (status == 503 && health["status"] == "draining" && all).then_some(())
    });
    // A new call and a dispatcher's probe: 503 with Retry-After.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let me = probe.local_addr().unwrap().port();
    for (method, call_id) in [("INVITE", "drain-new@test"), ("OPTIONS", "drain-probe@test")] {
        let req = format!(
            "{method} sip:+18005551212@127.0.0.1:{sip_port} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{method};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:+12345678901@127.0.0.1>;tag=d1\r\n\
             To: <sip:+18005551212@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n\
             Contact: <sip:+12345678901@127.0.0.1:{me}>\r\nContent-Length: 0\r\n\r\n"
        );
        probe.send_to(req.as_bytes(), ("127.0.0.1", sip_port)).unwrap();
        let mut buf = [0u8; 4096];
        let n = probe.recv(&mut buf).expect("an answer while draining");
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("SIP/2.0 503"), "{method}: {answer}");
        assert!(answer.contains("Retry-After: 5"), "{method}: {answer}");
    }
    // The calls up finish as the callers end them: SIPp sees no failed call.
    let out = sipp.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "a call was dropped by the drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With no call left, precall stops by itself, well before the drain timeout.
    assert!(precall.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn sip_from_outside_the_trusted_networks_gets_403_and_no_call() {
    let sip_port = free_udp_port();
    // Only 127.0.0.2 may call; the test sends from 127.0.0.1.
    let precall = Precall::start(&[
        ("SIP_PORT", sip_port.to_string()),
        ("SIP_TRUSTED_CIDRS", "127.0.0.2/32, 192.0.2.0/24".to_owned()),
    ]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let me = sock.local_addr().unwrap().port();
    let invite = format!(
        "INVITE sip:+18005551212@127.0.0.1:{sip_port} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKuntrusted;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+12345678901@127.0.0.1>;tag=u1\r\n\
         To: <sip:+18005551212@127.0.0.1>\r\nCall-ID: untrusted@test\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:+12345678901@127.0.0.1:{me}>\r\nContent-Length: 0\r\n\r\n"
    );
    sock.send_to(invite.as_bytes(), ("127.0.0.1", sip_port)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("an answer");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("SIP/2.0 403 Forbidden"), "{answer}");
    // No call was recorded or held: nothing reached the control plane or the shards.
    let calls = precall.metric("precall_calls_total") + precall.metric("precall_active_calls");
    assert_eq!(calls, 0, "{}", precall.get("/metrics").1);
    assert!(precall.stop().success());
}

const DIGEST_SCENARIO: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/sipp/uac_digest.xml");

/// SIPp as an untrusted PBX authenticating with `password` (user `pbx1`): `calls` calls.
fn sipp_digest(sip_port: u16, password: &str, calls: u32) -> std::process::Output {
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = format!("127.0.0.1:{sip_port}");
    sipp(&target, DIGEST_SCENARIO.as_ref(), media.local_addr().unwrap().port(), calls, 10, 30)
        .args(["-au", "pbx1", "-ap", password])
        // The digest covers the Request-URI (RFC 3261 §22.4); SIPp's default is its remote
        // address, which precall refuses.
        .args(["-auth_uri", &format!("+18005551212@127.0.0.1:{sip_port}")])
        .output()
        .expect("run sipp")
}

#[test]
fn sipp_authenticates_with_a_digest_and_a_wrong_password_gets_403_and_no_call() {
    let sip_port = free_udp_port();
    // 127.0.0.1 is not trusted: its INVITEs must authenticate. MD5 only: SIPp 3.6 gives up
    // on a first challenge in SHA-256.
    let precall = Precall::start(&[
        ("SIP_PORT", sip_port.to_string()),
        ("SIP_TRUSTED_CIDRS", "192.0.2.0/24".to_owned()),
        ("SIP_DIGEST_USERS", "pbx1:s3cret,pbx2:other".to_owned()),
        ("SIP_DIGEST_ALGORITHMS", "MD5".to_owned()),
        ("RTP_PORT_MIN", "45000".to_owned()),
        ("RTP_PORT_MAX", "45999".to_owned()),
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
    ]);
    let ended = |p: &Precall| p.metric("precall_calls_total");
    let out = sipp_digest(sip_port, "s3cret", 5);
    assert_eq!(
        out.status.code(),
        Some(0),
        "authenticated calls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("5 calls recorded", Duration::from_secs(10), || (ended(&precall) == 5).then_some(()));
    // The wrong password: 403 to the authenticated INVITE, so SIPp fails every call, and
    // precall records none.
    let out = sipp_digest(sip_port, "wrong", 3);
    assert_ne!(out.status.code(), Some(0), "calls with a wrong password succeeded");
    let active = precall.metric("precall_active_calls");
    assert_eq!((ended(&precall), active), (5, 0), "a call was made without the password");
    assert!(precall.stop().success());
}

const ACCEPT_503: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/sipp/accept_503.xml");

/// `uac_hold.xml` with `hold_ms` of hold, where a `503` ends the call as refused (ACKed), not
/// failed: the splice `rtp_load.py --accept-503` makes, from `accept_503.xml`.
fn scenario_accepting_503(hold_ms: u32) -> String {
    let refused = std::fs::read_to_string(ACCEPT_503).unwrap();
    let refused = refused.split_once("-->").unwrap().1;
    let s = std::fs::read_to_string(SCENARIO)
        .unwrap()
        .replace(
            r#"<pause milliseconds="3000"/>"#,
            &format!(r#"<pause milliseconds="{hold_ms}"/>"#),
        )
        .replacen(
            r#"<recv response="200" rtd="true" rrs="true">"#,
            "<recv response=\"503\" optional=\"true\" next=\"refused\">\n  </recv>\n\n  \
             <recv response=\"200\" rtd=\"true\" rrs=\"true\">",
            1,
        )
        .replacen(
            r#"<recv response="200" crlf="true">"#,
            r#"<recv response="200" crlf="true" next="done">"#,
            1,
        )
        .replacen(
            "  <ResponseTimeRepartition",
            &format!("{refused}\n  <ResponseTimeRepartition"),
            1,
        );
    assert_eq!(s.matches(r#"id="refused""#).count(), 1);
    s
}

#[test]
fn sipp_at_twice_the_capacity_gets_503_for_the_excess_and_the_admitted_calls_keep_pacing() {
    let sip_port = free_udp_port();
    // Capacity: 15 calls per shard, 30 for the node (the default 2 shards of the harness).
    let precall = Precall::start(&[
        ("SIP_PORT", sip_port.to_string()),
        ("SHARD_MAX_CALLS", "15".to_owned()),
        ("RTP_PORT_MIN", "43000".to_owned()),
        ("RTP_PORT_MAX", "43999".to_owned()),
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
    ]);
    let path = std::env::temp_dir().join(format!("precall-503-{}.xml", std::process::id()));
    std::fs::write(&path, scenario_accepting_503(4000)).unwrap();
    let (media_port, done, capture) = capture_rtp();
    // 80 calls in one second, each up for 4 s: more than twice what the node holds, all at
    // once (80 rather than 60, so that each shard surely sees 15 of them: a hash of 80 random
    // Call-IDs gives a shard fewer than 15 with odds under 1 in 10^7).
    let target = format!("127.0.0.1:{sip_port}");
    let out = sipp(&target, &path, media_port, 80, 80, 60).output().expect("run sipp");
    done.store(true, Ordering::Release);
    let streams = capture.join().unwrap();
    let _ = std::fs::remove_file(&path);
    // No admitted call failed (a refused one ends as refused).
    assert_eq!(
        out.status.code(),
        Some(0),
        "an admitted call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = precall.metric("precall_calls_refused_full_total");
    // Each shard took its 15 and refused the rest before any record.
    assert_eq!((streams.len(), refused), (30, 50), "admitted and refused calls");
    for (ssrc, packets) in &streams {
        check_stream(*ssrc, packets, Duration::from_millis(3500));
    }
    assert!(precall.stop().success());
}
