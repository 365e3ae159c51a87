//! Micro-benchmarks of the per-message and per-frame work on the hot paths (divan): SIP routing,
//! transaction matching, parsing and answering; SDP; G.711; resampling; RTP; the agent and
//! Media Streams messages. Each figure is the median time of one operation, as divan prints it.
//!
//! Run: `cargo bench -p precall-benches --bench micro` (issue 14's targets: route + match
//! ≤ 1 µs; the rest are measured and recorded in docs/PERFORMANCE.md "Micro-benchmarks").

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use divan::{Bencher, black_box};
use precall_call::AgentFormat;
use precall_call::convert::{FromAgent, ToAgent};
use precall_engine::shard_for_call_id;
use precall_media::rtp::{RtpHeader, RtpPacket, RtpTimestamp, SeqNo, Ssrc};
use precall_media::{Codec, RtpSender, StreamResampler, g711};
use precall_sip::{CallHandle, Endpoint, Event, IdGen, SessionDescription, SipConfig};

/// The allocator the engine runs with (`control/src/main.rs`), so allocations cost here what
/// they cost in a shard.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

/// Counter ids, and one fixed tag: every benchmarked call has its own Call-ID, so a fixed
/// tag still makes distinct dialogs, and the ACK and BYE can be written before the call.
#[derive(Debug, Default)]
struct BenchIds(u64);

impl IdGen for BenchIds {
    fn tag(&mut self) -> String {
        "benchtag".to_owned()
    }
    fn branch(&mut self) -> String {
        self.0 += 1;
        format!("z9hG4bKb{}", self.0)
    }
    fn session_id(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

const OFFER: &str = "v=0\r\no=carrier 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\nm=audio 40000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n";

fn invite(call_id: &str) -> String {
    format!(
        "INVITE sip:+15550001111@192.0.2.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bK-{call_id}\r\n\
         Record-Route: <sip:198.51.100.30;lr>\r\n\
         Max-Forwards: 70\r\n\
         From: \"Caller\" <sip:+15557654321@carrier.example>;tag=uac1\r\n\
         To: <sip:+15550001111@192.0.2.10>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:+15557654321@198.51.100.20:5060>\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{OFFER}",
        OFFER.len()
    )
}

fn in_dialog(method: &str, call_id: &str, cseq: u32) -> String {
    format!(
        "{method} sip:203.0.113.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bK-{method}-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Caller\" <sip:+15557654321@carrier.example>;tag=uac1\r\n\
         To: <sip:+15550001111@192.0.2.10>;tag=benchtag\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn options(n: u64) -> String {
    format!(
        "OPTIONS sip:192.0.2.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bK-opt{n}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@carrier.example>;tag=p{n}\r\n\
         To: <sip:192.0.2.10>\r\n\
         Call-ID: opt{n}@carrier.example\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn peer() -> SocketAddr {
    "198.51.100.20:5060".parse().expect("literal address")
}

fn endpoint() -> Endpoint<BenchIds> {
    let mut cfg = SipConfig::new("192.0.2.10:5060".parse().expect("literal address"));
    cfg.advertised_ip = Some("203.0.113.10".parse().expect("literal address"));
    Endpoint::new(cfg, BenchIds::default())
}

/// Takes every datagram and event the endpoint has queued; returns the bytes sent and the new
/// call, if one arrived.
fn drain(ep: &mut Endpoint<BenchIds>) -> (usize, Option<CallHandle>) {
    let mut bytes = 0;
    let mut call = None;
    while let Some(t) = ep.poll_transmit() {
        bytes += t.payload.len();
    }
    while let Some(e) = ep.poll_event() {
        if let Event::IncomingCall { call: c, .. } = e {
            call = Some(c);
        }
    }
    (bytes, call)
}

/// What a shard does first with every SIP datagram: find the Call-ID and its owner shard.
#[divan::bench]
fn sip_route(b: Bencher) {
    let datagram = invite("a84b4c76e66710@pc33.carrier.example");
    b.bench(|| {
        let id = precall_sip::peek_call_id(black_box(datagram.as_bytes())).expect("a Call-ID");
        shard_for_call_id(&id, 2)
    });
}

/// Route, then the owner's endpoint matches a retransmitted INVITE to its ringing transaction
/// and resends the stored `100 Trying`.
#[divan::bench]
fn sip_route_and_match_invite_retransmission(b: Bencher) {
    let mut ep = endpoint();
    let now = Instant::now();
    let datagram = invite("ringing@carrier.example");
    ep.handle_datagram(now, peer(), datagram.as_bytes());
    let (_, call) = drain(&mut ep);
    assert!(call.is_some(), "the INVITE made a call");
    b.bench_local(|| {
        let id = precall_sip::peek_call_id(black_box(datagram.as_bytes())).expect("a Call-ID");
        let shard = shard_for_call_id(&id, 2);
        ep.handle_datagram(now, peer(), datagram.as_bytes());
        (shard, drain(&mut ep))
    });
}

/// Route, then a retransmitted BYE of a finished call matches its absorbed transaction and
/// the stored `200 OK` is sent again.
#[divan::bench]
fn sip_route_and_match_absorbed_bye(b: Bencher) {
    let mut ep = endpoint();
    let now = Instant::now();
    let call_id = "ended@carrier.example";
    ep.handle_datagram(now, peer(), invite(call_id).as_bytes());
    let (_, call) = drain(&mut ep);
    ep.accept(now, call.expect("a call"), "0.0.0.0:30000".parse().expect("literal"))
        .expect("accept");
    ep.handle_datagram(now, peer(), in_dialog("ACK", call_id, 1).as_bytes());
    let bye = in_dialog("BYE", call_id, 2);
    ep.handle_datagram(now, peer(), bye.as_bytes());
    drain(&mut ep);
    assert_eq!(ep.calls(), 0, "the BYE ended the call");
    b.bench_local(|| {
        let id = precall_sip::peek_call_id(black_box(bye.as_bytes())).expect("a Call-ID");
        let shard = shard_for_call_id(&id, 2);
        ep.handle_datagram(now, peer(), bye.as_bytes());
        (shard, drain(&mut ep))
    });
}

/// A new OPTIONS: parse, a new transaction, and a `200 OK` built.
#[divan::bench]
fn sip_parse_and_answer_options(b: Bencher) {
    let mut ep = endpoint();
    let start = Instant::now();
    let mut n = 0u64;
    b.with_inputs(|| {
        n += 1;
        (start + Duration::from_micros(n * 100), options(n))
    })
    .bench_local_refs(|(now, datagram)| {
        let now = *now;
        ep.handle_timeout(now);
        ep.handle_datagram(now, peer(), datagram.as_bytes());
        drain(&mut ep)
    });
}

/// The SIP work of one whole short call (the carrier load's scenario): INVITE (`100 Trying`),
/// accept (SDP answer, `200 OK`), ACK, BYE (`200 OK`). The clock moves 125 µs a call, as at
/// 8,000 calls/s, so answered transactions expire as they would.
#[divan::bench]
fn sip_whole_short_call(b: Bencher) {
    let mut ep = endpoint();
    let start = Instant::now();
    let rtp: SocketAddr = "0.0.0.0:30000".parse().expect("literal");
    let mut n = 0u64;
    b.with_inputs(|| {
        n += 1;
        let id = format!("{n}-bench@carrier.example");
        let now = start + Duration::from_micros(n * 125);
        (now, invite(&id), in_dialog("ACK", &id, 1), in_dialog("BYE", &id, 2))
    })
    .bench_local_refs(|(now, inv, ack, bye)| {
        let now = *now;
        ep.handle_timeout(now);
        ep.handle_datagram(now, peer(), inv.as_bytes());
        let (_, call) = drain(&mut ep);
        let media = ep.accept(now, call.expect("a call"), rtp).expect("accept");
        ep.handle_datagram(now, peer(), ack.as_bytes());
        ep.handle_datagram(now, peer(), bye.as_bytes());
        (media, drain(&mut ep))
    });
}

#[divan::bench]
fn sdp_parse_offer() -> SessionDescription {
    SessionDescription::parse(black_box(OFFER.as_bytes())).expect("the offer parses")
}

/// One 20 ms frame of speech-like PCM (a 440 Hz tone at half scale).
fn frame_pcm() -> Vec<i16> {
    (0..160)
        .map(|i| ((i as f64 * 440.0 * std::f64::consts::TAU / 8000.0).sin() * 16000.0) as i16)
        .collect()
}

type EncodeFn = fn(&[i16], &mut [u8]);
type DecodeFn = fn(&[u8], &mut [i16]);

/// The slice coders of each G.711 law.
const LAWS: [(&str, EncodeFn, DecodeFn); 2] = [
    ("ulaw", g711::ulaw_encode_slice, g711::ulaw_decode_slice),
    ("alaw", g711::alaw_encode_slice, g711::alaw_decode_slice),
];

fn law(name: &str) -> (EncodeFn, DecodeFn) {
    let (_, encode, decode) = LAWS.iter().find(|(n, ..)| *n == name).expect("a G.711 law");
    (*encode, *decode)
}

#[divan::bench(args = ["ulaw", "alaw"])]
fn g711_encode_20ms(b: Bencher, name: &str) {
    let (encode, _) = law(name);
    let pcm = frame_pcm();
    let mut out = [0u8; 160];
    b.bench_local(|| {
        encode(black_box(&pcm), &mut out);
        out[0]
    });
}

#[divan::bench(args = ["ulaw", "alaw"])]
fn g711_decode_20ms(b: Bencher, name: &str) {
    let (encode, decode) = law(name);
    let mut codes = [0u8; 160];
    encode(&frame_pcm(), &mut codes);
    let mut out = [0i16; 160];
    b.bench_local(|| {
        decode(black_box(&codes), &mut out);
        out[0]
    });
}

/// The streaming resampler on one 20 ms frame, both ways an agent at 16 kHz needs.
#[divan::bench(args = [(8000, 16000), (16000, 8000), (24000, 8000)])]
fn resample_20ms(b: Bencher, (from, to): (u32, u32)) {
    let mut rs = StreamResampler::new(from, to).expect("a supported rate");
    let input: Vec<i16> = (0..from as usize / 50).map(|i| (i % 200) as i16 * 100).collect();
    let mut out = Vec::with_capacity(1024);
    b.bench_local(|| {
        out.clear();
        rs.push(black_box(&input), &mut out);
        out.len()
    });
}

/// The next header of a stream, written with a 20 ms µ-law payload into a send buffer.
#[divan::bench]
fn rtp_packetize_20ms(b: Bencher) {
    let mut sender = RtpSender::new(Ssrc(0x1234_5678), SeqNo(1), RtpTimestamp(160));
    let payload = [0xffu8; 160];
    let mut buf = [0u8; 12 + 160];
    b.bench_local(|| {
        let header = sender.next_header(0);
        let n = header.emit(&mut buf);
        buf[n..n + 160].copy_from_slice(black_box(&payload));
        buf[1]
    });
}

/// A received packet's header checked and parsed, its payload found.
#[divan::bench]
fn rtp_parse_20ms(b: Bencher) {
    let mut buf = [0u8; 12 + 160];
    RtpSender::new(Ssrc(7), SeqNo(9), RtpTimestamp(0)).next_header(8).emit(&mut buf);
    b.bench_local(|| {
        let packet = RtpPacket::new_checked(black_box(&buf[..])).expect("a valid packet");
        (RtpHeader::from_packet(&packet).sequence, packet.payload().len())
    });
}

/// The caller's 20 ms of PCMA to a `pcm_16000` agent, and the agent's 20 ms back.
#[divan::bench]
fn convert_caller_to_agent_pcm16k(b: Bencher) {
    let mut conv = ToAgent::new(Codec::Pcma, AgentFormat::Pcm(16000)).expect("supported");
    let frame = [0xd5u8; 160];
    let mut out = Vec::with_capacity(2048);
    b.bench_local(|| {
        out.clear();
        conv.push(black_box(&frame), &mut out);
        out.len()
    });
}

#[divan::bench]
fn convert_agent_pcm16k_to_caller(b: Bencher) {
    let mut conv = FromAgent::new(AgentFormat::Pcm(16000), Codec::Pcma).expect("supported");
    let audio = [0x10u8; 640];
    let mut out = VecDeque::with_capacity(4096);
    b.bench_local(|| {
        out.clear();
        conv.push(black_box(&audio), &mut out);
        out.len()
    });
}

/// `user_audio_chunk` with 20 ms of `pcm_16000` (640 bytes, base64 in JSON).
#[divan::bench]
fn agent_encode_user_audio_20ms(b: Bencher) {
    let audio = [0x21u8; 640];
    let mut out = String::with_capacity(1024);
    b.bench_local(|| {
        precall_call::agent::client_audio(black_box(&audio), &mut out);
        out.len()
    });
}

/// An `audio` event with 20 ms of `pcm_16000`, parsed and its base64 decoded.
#[divan::bench]
fn agent_decode_audio_event_20ms(b: Bencher) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode([0x21u8; 640]);
    let text =
        format!(r#"{{"type":"audio","audio_event":{{"audio_base_64":"{b64}","event_id":42}}}}"#);
    b.bench(|| precall_call::agent::parse_server(black_box(&text)).expect("an audio event"));
}

/// A Media Streams `media` message for one 20 ms µ-law frame, both ways.
#[divan::bench]
fn twilio_encode_media_20ms(b: Bencher) {
    let payload = [0x7fu8; 160];
    let mut out = String::with_capacity(512);
    b.bench_local(|| {
        precall_call::twilio::media_message(
            "MZ18ad3ab5a668481ce02b83e7395059f0",
            black_box(&payload),
            &mut out,
        );
        out.len()
    });
}

#[divan::bench]
fn twilio_decode_media_20ms(b: Bencher) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode([0x7fu8; 160]);
    let text = format!(
        r#"{{"event":"media","sequenceNumber":"4","media":{{"track":"inbound","chunk":"2","timestamp":"5","payload":"{b64}"}},"streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"}}"#
    );
    let mut audio = Vec::with_capacity(256);
    b.bench_local(|| {
        precall_call::twilio::parse(black_box(&text), &mut audio).expect("a media event");
        audio.len()
    });
}
