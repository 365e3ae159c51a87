//! The bodies of precall's fuzz targets, one function per target, each taking the fuzzer's
//! bytes. `tests/fuzz/` wraps every function in a libFuzzer target (`bash tests/fuzz/run.sh`);
//! `tests/regressions.rs` replays the seeds and every input a fuzzer ever crashed through the
//! same functions in the README's test command.
//!
//! A target fails by panicking: on its own (a bug in the parser) or on one of the checks here,
//! which state what must hold for any input (lengths within the input, limits kept, what we send
//! back is well-formed SIP).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use precall_sip::{DigestConfig, Endpoint, Event, IdGen, SipConfig};

/// A target's body: the fuzzer's bytes in, a panic on failure.
pub type Target = fn(&[u8]);

/// Every target, by the name of its file in `tests/fuzz/fuzz_targets/` and of its seeds.
pub const TARGETS: &[(&str, Target)] = &[
    ("sip_datagram", sip_datagram),
    ("sdp", sdp),
    ("rtp", rtp),
    ("telephone_event", telephone_event),
    ("http_head", http_head),
    ("twilio_form", twilio_form),
    ("agent_message", agent_message),
    ("media_stream_message", media_stream_message),
];

/// Deterministic ids: a fuzz run must replay exactly.
#[derive(Debug, Default)]
struct Counter(u64);

impl IdGen for Counter {
    fn tag(&mut self) -> String {
        self.0 += 1;
        format!("ft{}", self.0)
    }
    fn branch(&mut self) -> String {
        self.0 += 1;
        format!("z9hG4bKfz{}", self.0)
    }
    fn session_id(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// Our SIP address, the RTP address calls are answered with, and the datagrams' source.
const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 5060);
const LOCAL_RTP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 30000);
const PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 5060);

fn endpoint(digest: bool) -> Endpoint<Counter> {
    let mut cfg = SipConfig::new(LOCAL);
    cfg.advertised_ip = Some(Ipv4Addr::new(203, 0, 113, 10).into());
    if digest {
        cfg.digest = Some(DigestConfig {
            realm: "fuzz.invalid".to_owned(),
            users: vec![("alice".to_owned(), "secret".to_owned())],
            algorithms: precall_sip::DigestAlgorithm::ALL.to_vec(),
        });
    }
    Endpoint::new(cfg, Counter::default())
}

/// Sends everything out of `ep`, answering every new call (so SDP answers are built), and
/// checks that each datagram it would send is SIP.
fn pump(ep: &mut Endpoint<Counter>, now: Instant) {
    for _ in 0..64 {
        let mut idle = true;
        while let Some(t) = ep.poll_transmit() {
            idle = false;
            let text = std::str::from_utf8(&t.payload).expect("precall sends UTF-8 SIP");
            assert!(
                text.starts_with("SIP/2.0 ") || text.contains(" SIP/2.0\r\n"),
                "not a SIP message: {text:?}"
            );
            assert!(text.contains("\r\n\r\n"), "no end of head: {text:?}");
        }
        while let Some(event) = ep.poll_event() {
            idle = false;
            if let Event::IncomingCall { call, .. } = event {
                let _ = ep.accept(now, call, LOCAL_RTP);
            }
        }
        if idle {
            return;
        }
    }
    panic!("the endpoint kept producing output for one datagram");
}

/// The SIP wire layer, message parsing, transactions, dialogs, SDP negotiation and digest
/// checks: the input is one datagram, received twice (the retransmission path), then every
/// timer runs out. Once with digest authentication configured, once without.
pub fn sip_datagram(data: &[u8]) {
    let _ = precall_sip::peek_call_id(data);
    let from = PEER;
    for digest in [false, true] {
        let mut ep = endpoint(digest);
        let now = Instant::now();
        ep.handle_datagram(now, from, data);
        pump(&mut ep, now);
        ep.handle_datagram(now, from, data);
        pump(&mut ep, now);
        let mut at = now;
        for _ in 0..16 {
            let Some(t) = ep.poll_timeout() else { break };
            at = t.max(at) + Duration::from_millis(1);
            ep.handle_timeout(at);
            pump(&mut ep, at);
        }
    }
}

/// An SDP body as an offer.
pub fn sdp(data: &[u8]) {
    if let Ok(offer) = precall_sip::SessionDescription::parse(data) {
        let _ = offer.has_g711_audio();
    }
}

/// An RTP datagram: a checked view never reaches outside the datagram.
pub fn rtp(data: &[u8]) {
    let Ok(p) = precall_media::RtpPacket::new_checked(data) else { return };
    assert!(p.header_len() + p.payload().len() + p.padding_len() <= data.len());
    for i in 0..usize::from(p.csrc_count()) {
        assert!(p.csrc(i).is_some());
    }
    if let Some((_, ext)) = p.extension_header() {
        assert!(ext.len() <= data.len());
    }
    let _ = precall_media::RtpHeader::from_packet(&p);
}

/// An RFC 4733 telephone-event payload.
pub fn telephone_event(data: &[u8]) {
    if let Ok(e) = precall_media::TelephoneEvent::parse(data) {
        let _ = e.digit();
    }
}

/// An HTTP request head under the server's default limits.
pub fn http_head(data: &[u8]) {
    let limits = precall_http::Limits::default();
    match precall_http::parse_request_head(data, &limits) {
        Ok(Some((head, body))) => {
            assert!(head <= data.len() && head <= limits.max_head_bytes);
            assert!(body <= limits.max_body_bytes);
        }
        Ok(None) => assert!(data.len() < limits.max_head_bytes),
        Err(status) => assert!(matches!(status, 400 | 413 | 431), "status {status}"),
    }
}

/// A Twilio webhook form body (and the same bytes as a query string).
pub fn twilio_form(data: &[u8]) {
    if let Ok(params) = precall_twilio::Params::parse(data) {
        assert!(params.len() <= precall_twilio::MAX_FIELDS);
        let _ = params.get("CallSid");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = precall_twilio::parse_query(text);
    }
}

/// A text frame from the ElevenLabs agent.
pub fn agent_message(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = precall_call::agent::parse_server(text);
    }
}

/// A text frame from Twilio Media Streams; a media payload is decoded into a reused buffer.
pub fn media_stream_message(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut audio = Vec::new();
        let _ = precall_call::twilio::parse(text, &mut audio);
        // base64 of a frame is 4/3 of its bytes: the audio is never larger than the text.
        assert!(audio.len() <= text.len());
    }
}
