//! Deterministic simulation: a fake clock that jumps to the endpoint's next deadline, a
//! scripted UAC written as raw SIP, and a lossy in-memory network. No sleeps: every scenario
//! runs in microseconds of real time.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{CounterIds, body, config, header, status};
use precall_sip::{Codec, Direction, EndReason, Endpoint, Event, Transmit};

const UAC: &str = "198.51.100.20:5060";

/// The network's loss rule: returns true to lose an endpoint -> UAC datagram.
type LossRule = Box<dyn FnMut(&[u8]) -> bool>;

struct Sim {
    ep: Endpoint<CounterIds>,
    start: Instant,
    now: Instant,
    uac: SocketAddr,
    /// Everything the endpoint sent, lost or not, with the time it was sent.
    wire: Vec<(Duration, Transmit)>,
    /// What reached the UAC and was not yet read by the script.
    inbox: Vec<(Duration, Vec<u8>)>,
    events: Vec<(Duration, Event)>,
    lose: LossRule,
}

impl Sim {
    fn new() -> Self {
        let start = Instant::now();
        Sim {
            ep: Endpoint::new(config(), CounterIds::default()),
            start,
            now: start,
            uac: UAC.parse().unwrap(),
            wire: Vec::new(),
            inbox: Vec::new(),
            events: Vec::new(),
            lose: Box::new(|_| false),
        }
    }

    fn t(&self) -> Duration {
        self.now - self.start
    }

    /// The UAC sends `msg` now.
    fn send(&mut self, msg: &str) {
        self.ep.handle_datagram(self.now, self.uac, msg.as_bytes());
        self.drain();
    }

    fn drain(&mut self) {
        let t = self.t();
        while let Some(tx) = self.ep.poll_transmit() {
            if !(self.lose)(&tx.payload) {
                self.inbox.push((t, tx.payload.clone()));
            }
            self.wire.push((t, tx));
        }
        while let Some(e) = self.ep.poll_event() {
            self.events.push((t, e));
        }
    }

    /// Jumps the clock from deadline to deadline up to `until` (since start).
    fn run_until(&mut self, until: Duration) {
        let end = self.start + until;
        while let Some(at) = self.ep.poll_timeout() {
            if at > end {
                break;
            }
            self.now = self.now.max(at);
            self.ep.handle_timeout(self.now);
            self.drain();
        }
        self.now = end;
    }

    fn take_inbox(&mut self) -> Vec<Vec<u8>> {
        self.inbox.drain(..).map(|(_, p)| p).collect()
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).map(|(_, e)| e).collect()
    }

    /// Times at which the endpoint sent something matching `pred`.
    fn sent_times(&self, pred: impl Fn(&[u8]) -> bool) -> Vec<u128> {
        self.wire.iter().filter(|(_, tx)| pred(&tx.payload)).map(|(t, _)| t.as_millis()).collect()
    }
}

const OFFER: &str = "v=0\r\no=carrier 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\nm=audio 40000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n";

fn invite(call_id: &str, branch: &str, sdp: &str) -> String {
    format!(
        "INVITE sip:+15550001111@192.0.2.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch={branch}\r\n\
         Record-Route: <sip:198.51.100.30;lr>\r\n\
         Max-Forwards: 70\r\n\
         From: \"Caller\" <sip:+15557654321@carrier.example>;tag=uac1\r\n\
         To: <sip:+15550001111@192.0.2.10>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:+15557654321@198.51.100.20:5060>\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

fn in_dialog(
    method: &str,
    call_id: &str,
    branch: &str,
    to_tag: &str,
    cseq: u32,
    sdp: &str,
) -> String {
    let ct =
        if sdp.is_empty() { String::new() } else { "Content-Type: application/sdp\r\n".into() };
    format!(
        "{method} sip:203.0.113.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Caller\" <sip:+15557654321@carrier.example>;tag=uac1\r\n\
         To: <sip:+15550001111@192.0.2.10>;tag={to_tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Contact: <sip:+15557654321@198.51.100.20:5060>\r\n\
         {ct}Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

fn cancel(call_id: &str, invite_branch: &str) -> String {
    format!(
        "CANCEL sip:+15550001111@192.0.2.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch={invite_branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Caller\" <sip:+15557654321@carrier.example>;tag=uac1\r\n\
         To: <sip:+15550001111@192.0.2.10>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 CANCEL\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// ACK for a non-2xx: same branch as the INVITE (RFC 3261 §17.1.1.3).
fn ack_non2xx(call_id: &str, invite_branch: &str, to_tag: &str) -> String {
    format!(
        "ACK sip:+15550001111@192.0.2.10:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.51.100.20:5060;branch={invite_branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Caller\" <sip:+15557654321@carrier.example>;tag=uac1\r\n\
         To: <sip:+15550001111@192.0.2.10>;tag={to_tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn to_tag(resp: &[u8]) -> String {
    let to = header(resp, "To").unwrap();
    to.split(";tag=").nth(1).unwrap().split(';').next().unwrap().to_owned()
}

fn is_200_invite(p: &[u8]) -> bool {
    status(p) == Some(200) && header(p, "CSeq").is_some_and(|c| c.ends_with("INVITE"))
}

fn is_bye(p: &[u8]) -> bool {
    p.starts_with(b"BYE ")
}

fn rtp() -> SocketAddr {
    "0.0.0.0:30000".parse().unwrap()
}

/// INVITE and accept at t=0; returns the call handle and our To tag.
fn answered(sim: &mut Sim, call_id: &str) -> (precall_sip::CallHandle, String) {
    sim.send(&invite(call_id, "z9hG4bKinv1", OFFER));
    let events = sim.take_events();
    let Some(Event::IncomingCall { call, .. }) = events.first() else { panic!("{events:?}") };
    let call = *call;
    sim.ep.accept(sim.now, call, rtp()).unwrap();
    sim.drain();
    let tag =
        sim.wire.iter().map(|(_, t)| &t.payload).find(|p| is_200_invite(p)).map(|p| to_tag(p));
    (call, tag.expect("200 sent"))
}

#[test]
fn normal_call() {
    let mut sim = Sim::new();
    sim.send(&invite("c1", "z9hG4bKinv1", OFFER));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.len(), 1);
    assert_eq!(status(&inbox[0]), Some(100));
    assert!(!header(&inbox[0], "To").unwrap().contains("tag="), "100 without To tag");
    let events = sim.take_events();
    let [Event::IncomingCall { call, call_id, from_user, to_user, source, offer }] =
        events.as_slice()
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (call_id.as_str(), from_user.as_str(), to_user.as_str()),
        ("c1", "+15557654321", "+15550001111")
    );
    assert_eq!(*source, UAC.parse::<SocketAddr>().unwrap());
    assert!(offer.is_some());
    let call = *call;
    assert_eq!(sim.ep.calls(), 1);

    let media = sim.ep.accept(sim.now, call, rtp()).unwrap();
    assert_eq!(media.remote_rtp, "198.51.100.20:40000".parse().unwrap());
    assert_eq!((media.payload_type, media.codec), (8, Codec::Pcma), "caller's first choice");
    assert_eq!(media.telephone_event, Some(101));
    assert_eq!(media.direction, Direction::SendRecv);
    sim.drain();
    let inbox = sim.take_inbox();
    let ok = &inbox[0];
    assert!(is_200_invite(ok));
    assert_eq!(header(ok, "Record-Route"), Some("<sip:198.51.100.30;lr>"));
    assert_eq!(header(ok, "Contact"), Some("<sip:203.0.113.10:5060>"));
    assert!(header(ok, "Via").unwrap().contains("received=198.51.100.20"));
    let sdp = body(ok);
    assert!(sdp.contains("c=IN IP4 203.0.113.10\r\n"), "{sdp}");
    assert!(sdp.contains("m=audio 30000 RTP/AVP 8 101\r\n"), "{sdp}");
    assert!(sdp.contains("a=fmtp:101 0-15\r\n") && sdp.contains("a=ptime:20\r\n"));
    let tag = to_tag(ok);

    sim.run_until(Duration::from_millis(100));
    sim.send(&in_dialog("ACK", "c1", "z9hG4bKack1", &tag, 1, ""));
    assert_eq!(sim.take_events(), vec![Event::CallConfirmed { call }]);

    sim.run_until(Duration::from_secs(10));
    // The INVITE's transaction is absorbed (Accepted), with no response bytes of its own.
    let one = sim.ep.transactions();
    assert_eq!(one.absorbed, 1, "{one:?}");
    sim.send(&in_dialog("BYE", "c1", "z9hG4bKbye1", &tag, 2, ""));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(200)]);
    assert_eq!(header(&inbox[0], "CSeq"), Some("2 BYE"));
    assert_eq!(sim.take_events(), vec![Event::CallEnded { call, reason: EndReason::RemoteBye }]);
    assert_eq!(sim.ep.calls(), 0);

    // A retransmitted BYE is absorbed by its transaction: the same 200 again, byte for byte
    // (it is built again from the retransmission, not stored), and no new event.
    sim.send(&in_dialog("BYE", "c1", "z9hG4bKbye1", &tag, 2, ""));
    assert_eq!(sim.take_inbox(), vec![inbox[0].clone()]);
    assert!(sim.take_events().is_empty());
    let two = sim.ep.transactions();
    assert_eq!((two.absorbed, two.absorbed_bytes), (2, 2 * one.absorbed_bytes), "no bytes kept");
    // Nothing else is ever sent, and all timers drain.
    sim.run_until(Duration::from_secs(120));
    assert!(sim.take_inbox().is_empty());
    assert_eq!(sim.ep.poll_timeout(), None);
}

#[test]
fn lost_200_is_retransmitted_at_t1_doubling_until_the_ack() {
    let mut sim = Sim::new();
    let mut lost = 0;
    sim.lose = Box::new(move |p| {
        if is_200_invite(p) && lost < 3 {
            lost += 1;
            true
        } else {
            false
        }
    });
    let (call, tag) = answered(&mut sim, "c2");
    sim.run_until(Duration::from_millis(3500));
    // The fourth copy (at 3.5 s) gets through; the UAC ACKs at once.
    assert!(sim.take_inbox().iter().any(|p| is_200_invite(p)));
    sim.send(&in_dialog("ACK", "c2", "z9hG4bKack2", &tag, 1, ""));
    sim.run_until(Duration::from_secs(60));
    assert_eq!(sim.sent_times(is_200_invite), vec![0, 500, 1500, 3500]);
    assert!(sim.events.iter().any(|(_, e)| *e == Event::CallConfirmed { call }));
    assert_eq!(sim.ep.calls(), 1);
}

#[test]
fn ack_lost_forever_ends_with_bye_after_64_t1() {
    let mut sim = Sim::new();
    let (call, _tag) = answered(&mut sim, "c3");
    sim.run_until(Duration::from_secs(40));
    // T1, 2T1, 4T1, then capped at T2 = 4 s, until 64*T1 = 32 s.
    assert_eq!(
        sim.sent_times(is_200_invite),
        vec![0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
    );
    assert_eq!(sim.sent_times(is_bye)[0], 32000);
    let ended: Vec<_> =
        sim.events.iter().filter(|(_, e)| matches!(e, Event::CallEnded { .. })).collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, Duration::from_secs(32));
    assert_eq!(ended[0].1, Event::CallEnded { call, reason: EndReason::AckTimeout });
    // The BYE follows the Record-Route (loose routing) with the caller's Contact as R-URI.
    let (_, bye) = sim.wire.iter().find(|(_, t)| is_bye(&t.payload)).unwrap();
    assert_eq!(bye.dest, "198.51.100.30:5060".parse().unwrap());
    assert!(bye.payload.starts_with(b"BYE sip:+15557654321@198.51.100.20:5060 SIP/2.0\r\n"));
    assert_eq!(header(&bye.payload, "Route"), Some("<sip:198.51.100.30;lr>"));
    assert_eq!(sim.ep.calls(), 0);
}

#[test]
fn retransmitted_invite_never_creates_a_second_call() {
    let mut sim = Sim::new();
    let msg = invite("c4", "z9hG4bKinv4", OFFER);
    sim.send(&msg);
    sim.run_until(Duration::from_millis(500));
    sim.send(&msg);
    let calls =
        sim.take_events().iter().filter(|e| matches!(e, Event::IncomingCall { .. })).count();
    assert_eq!(calls, 1);
    let codes: Vec<_> = sim.take_inbox().iter().map(|p| status(p)).collect();
    assert_eq!(codes, vec![Some(100), Some(100)], "the 100 is sent again");
    assert_eq!(sim.ep.calls(), 1);
}

#[test]
fn retransmitted_invite_after_accept_gets_the_200_again() {
    let mut sim = Sim::new();
    let (_call, _tag) = answered(&mut sim, "c5");
    sim.take_inbox();
    sim.run_until(Duration::from_millis(200));
    sim.send(&invite("c5", "z9hG4bKinv1", OFFER));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.len(), 1);
    assert!(is_200_invite(&inbox[0]));
    assert!(sim.take_events().iter().all(|e| !matches!(e, Event::IncomingCall { .. })));
    assert_eq!(sim.ep.calls(), 1);
}

#[test]
fn cancel_before_accept_gives_487() {
    let mut sim = Sim::new();
    sim.send(&invite("c6", "z9hG4bKinv6", OFFER));
    let call = match sim.take_events().as_slice() {
        [Event::IncomingCall { call, .. }] => *call,
        other => panic!("{other:?}"),
    };
    sim.take_inbox();
    sim.run_until(Duration::from_millis(300));
    sim.send(&cancel("c6", "z9hG4bKinv6"));
    let inbox = sim.take_inbox();
    let codes: Vec<_> =
        inbox.iter().map(|p| (status(p), header(p, "CSeq").unwrap().to_owned())).collect();
    assert_eq!(codes, vec![(Some(200), "1 CANCEL".into()), (Some(487), "1 INVITE".into())]);
    assert_eq!(to_tag(&inbox[0]), to_tag(&inbox[1]), "§9.2: same To tag");
    assert_eq!(sim.take_events(), vec![Event::CallEnded { call, reason: EndReason::Cancelled }]);
    assert_eq!(sim.ep.calls(), 0);
    // accept after the cancel is refused
    assert!(sim.ep.accept(sim.now, call, rtp()).is_err());
    // 487 is retransmitted on Timer G until the ACK, which the transaction absorbs.
    sim.run_until(Duration::from_millis(1900));
    let tag = to_tag(&inbox[1]);
    sim.send(&ack_non2xx("c6", "z9hG4bKinv6", &tag));
    assert!(sim.take_events().is_empty(), "ACK absorbed, not dropped");
    sim.run_until(Duration::from_secs(60));
    let is_487 = |p: &[u8]| status(p) == Some(487);
    assert_eq!(sim.sent_times(is_487), vec![300, 800, 1800]);
    assert_eq!(sim.ep.poll_timeout(), None);
}

#[test]
fn cancel_after_200_leaves_the_call_up() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c7");
    sim.take_inbox();
    sim.send(&cancel("c7", "z9hG4bKinv1"));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(200)]);
    assert_eq!(header(&inbox[0], "CSeq"), Some("1 CANCEL"));
    sim.send(&in_dialog("ACK", "c7", "z9hG4bKack7", &tag, 1, ""));
    assert_eq!(sim.take_events(), vec![Event::CallConfirmed { call }]);
    assert_eq!(sim.ep.calls(), 1);
}

#[test]
fn cancel_for_unknown_transaction_gets_481() {
    let mut sim = Sim::new();
    sim.send(&cancel("nope", "z9hG4bKnothing"));
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(481)]);
}

#[test]
fn bye_before_ack_ends_the_call_and_stops_retransmissions() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c8");
    sim.run_until(Duration::from_millis(700));
    sim.send(&in_dialog("BYE", "c8", "z9hG4bKbye8", &tag, 2, ""));
    assert!(sim.take_events().contains(&Event::CallEnded { call, reason: EndReason::RemoteBye }));
    sim.run_until(Duration::from_secs(60));
    assert_eq!(sim.sent_times(is_200_invite), vec![0, 500]);
    assert!(sim.sent_times(is_bye).is_empty());
}

#[test]
fn reinvite_hold_and_unhold() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c9");
    sim.send(&in_dialog("ACK", "c9", "z9hG4bKack9", &tag, 1, ""));
    sim.take_events();
    sim.take_inbox();

    let hold = OFFER.replace("a=sendrecv", "a=sendonly");
    sim.send(&in_dialog("INVITE", "c9", "z9hG4bKre1", &tag, 2, &hold));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.len(), 1);
    assert!(is_200_invite(&inbox[0]));
    assert_eq!(to_tag(&inbox[0]), tag, "same To tag");
    let sdp = body(&inbox[0]);
    assert!(sdp.contains("a=recvonly\r\n"), "{sdp}");
    assert!(sdp.contains("o=precall 1002 2 IN IP4"), "version 2: {sdp}");
    let events = sim.take_events();
    let [Event::MediaChanged { call: c, media }] = events.as_slice() else { panic!("{events:?}") };
    assert_eq!((*c, media.direction), (call, Direction::RecvOnly));
    sim.send(&in_dialog("ACK", "c9", "z9hG4bKack9b", &tag, 2, ""));

    // Unhold.
    sim.send(&in_dialog("INVITE", "c9", "z9hG4bKre2", &tag, 3, OFFER));
    let inbox = sim.take_inbox();
    let sdp = body(&inbox[0]);
    assert!(sdp.contains("a=sendrecv\r\n") && sdp.contains("o=precall 1002 3 IN IP4"), "{sdp}");
    let events = sim.take_events();
    assert!(
        matches!(events.as_slice(), [Event::MediaChanged { media, .. }] if media.direction == Direction::SendRecv)
    );
    sim.send(&in_dialog("ACK", "c9", "z9hG4bKack9c", &tag, 3, ""));

    // Old-style hold: c=0.0.0.0.
    let old_hold = OFFER.replace("c=IN IP4 198.51.100.20", "c=IN IP4 0.0.0.0");
    sim.send(&in_dialog("INVITE", "c9", "z9hG4bKre3", &tag, 4, &old_hold));
    let sdp = body(&sim.take_inbox()[0]).to_owned();
    assert!(sdp.contains("a=recvonly\r\n"), "{sdp}");
    let events = sim.take_events();
    let [Event::MediaChanged { media, .. }] = events.as_slice() else { panic!("{events:?}") };
    assert_eq!(media.remote_rtp, "0.0.0.0:40000".parse().unwrap());
    sim.send(&in_dialog("ACK", "c9", "z9hG4bKack9d", &tag, 4, ""));
    sim.run_until(Duration::from_secs(60));
    assert_eq!(sim.ep.calls(), 1);
    assert!(sim.sent_times(is_bye).is_empty(), "every 2xx was acknowledged");
}

#[test]
fn options_out_of_a_dialog_are_answered_statelessly_with_the_same_tag_each_time() {
    let mut cfg = config();
    // With room for one transaction only: 100 probes must not need any.
    cfg.max_transactions = 1;
    let mut sim = Sim::new();
    sim.ep = Endpoint::new(cfg, CounterIds::default());
    let probe = |n: u32| {
        format!(
            "OPTIONS sip:192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bKp{n}\r\n\
             From: <sip:probe@carrier.example>;tag=p{n}\r\nTo: <sip:192.0.2.10>\r\nCall-ID: p{n}\r\n\
             CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let to_tag =
        |answer: &[u8]| header(answer, "To").unwrap().split(";tag=").nth(1).unwrap().to_owned();
    sim.send(&probe(0));
    let first = sim.take_inbox();
    sim.send(&probe(0));
    let again = sim.take_inbox();
    assert_eq!((status(&first[0]), status(&again[0])), (Some(200), Some(200)));
    assert_eq!(to_tag(&first[0]), to_tag(&again[0]), "a retransmission gets the same answer");
    sim.send(&probe(1));
    assert_ne!(to_tag(&sim.take_inbox()[0]), to_tag(&first[0]), "another probe, another tag");
    for n in 2..100 {
        sim.send(&probe(n));
    }
    assert_eq!(sim.take_inbox().iter().filter(|a| status(a) == Some(200)).count(), 98);
    // No transaction was kept: the one slot is free for a call.
    sim.send(&invite("after-probes", "z9hG4bKap", OFFER));
    assert_eq!(status(&sim.take_inbox()[0]), Some(100));
    assert_eq!(sim.ep.calls(), 1);
}

#[test]
fn options_in_and_out_of_dialog() {
    let mut sim = Sim::new();
    sim.send(
        "OPTIONS sip:192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20;branch=z9hG4bKo1\r\n\
         From: <sip:ping@carrier.example>;tag=p\r\nTo: <sip:192.0.2.10>\r\nCall-ID: opt1\r\n\
         CSeq: 7 OPTIONS\r\nContent-Length: 0\r\n\r\n",
    );
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(200));
    assert_eq!(header(&inbox[0], "Allow"), Some("INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"));
    assert_eq!(header(&inbox[0], "Accept"), Some("application/sdp"));
    assert_eq!(header(&inbox[0], "Supported"), Some("timer"));
    let (_call, tag) = answered(&mut sim, "c10");
    sim.take_inbox();
    sim.send(&in_dialog("OPTIONS", "c10", "z9hG4bKo2", &tag, 2, ""));
    assert_eq!(status(&sim.take_inbox()[0]), Some(200));
    assert_eq!(sim.ep.calls(), 1);
    sim.send(&in_dialog("INFO", "c10", "z9hG4bKi1", &tag, 3, ""));
    assert_eq!(status(&sim.take_inbox()[0]), Some(200));
    sim.send(&in_dialog("UPDATE", "c10", "z9hG4bKu1", &tag, 4, ""));
    assert_eq!(status(&sim.take_inbox()[0]), Some(200));
}

#[test]
fn unknown_method_gets_501_with_allow() {
    let mut sim = Sim::new();
    sim.send(
        "FOO sip:192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20;branch=z9hG4bKf1\r\n\
         From: <sip:a@carrier.example>;tag=f\r\nTo: <sip:192.0.2.10>\r\nCall-ID: foo1\r\n\
         CSeq: 1 FOO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
    );
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(501));
    assert!(header(&inbox[0], "Allow").is_some());
}

#[test]
fn in_dialog_bye_for_unknown_dialog_gets_481() {
    let mut sim = Sim::new();
    sim.send(&in_dialog("BYE", "ghost", "z9hG4bKg1", "nosuchtag", 2, ""));
    assert_eq!(status(&sim.take_inbox()[0]), Some(481));
}

#[test]
fn offer_without_common_codec_gets_488_and_no_call() {
    let mut sim = Sim::new();
    let g729 = OFFER
        .replace("m=audio 40000 RTP/AVP 8 0 101", "m=audio 40000 RTP/AVP 18 101")
        .replace("a=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n", "a=rtpmap:18 G729/8000\r\n");
    sim.send(&invite("c12", "z9hG4bKinv12", &g729));
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(488)]);
    assert!(sim.take_events().is_empty());
    assert_eq!(sim.ep.calls(), 0);
}

#[test]
fn our_bye_is_retransmitted_on_timer_e_until_its_200() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c13");
    sim.send(&in_dialog("ACK", "c13", "z9hG4bKack13", &tag, 1, ""));
    sim.run_until(Duration::from_secs(10));
    sim.ep.hangup(sim.now, call);
    sim.drain();
    sim.run_until(Duration::from_millis(13_500));
    let byes = sim.sent_times(is_bye);
    assert_eq!(byes, vec![10_000, 10_500, 11_500, 13_500]);
    // The UAC answers the last copy.
    let (_, bye) = sim.wire.iter().rev().find(|(_, t)| is_bye(&t.payload)).unwrap();
    let bye = bye.payload.clone();
    let via = header(&bye, "Via").unwrap();
    assert!(via.starts_with("SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bK"));
    assert_eq!(header(&bye, "CSeq"), Some("1 BYE"));
    assert!(header(&bye, "From").unwrap().ends_with(&format!(";tag={tag}")));
    let ok = format!(
        "SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: c13\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        header(&bye, "From").unwrap(),
        header(&bye, "To").unwrap()
    );
    sim.take_events();
    sim.send(&ok);
    assert_eq!(sim.take_events(), vec![Event::CallEnded { call, reason: EndReason::LocalBye }]);
    sim.send(&ok); // retransmitted 200: absorbed by Timer K
    assert!(sim.take_events().is_empty());
    sim.run_until(Duration::from_secs(60));
    assert_eq!(sim.sent_times(is_bye).len(), 4);
    assert_eq!(sim.ep.calls(), 0);
}

#[test]
fn unanswered_bye_ends_the_call_on_timer_f() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c14");
    sim.send(&in_dialog("ACK", "c14", "z9hG4bKack14", &tag, 1, ""));
    sim.ep.hangup(sim.now, call);
    sim.drain();
    sim.run_until(Duration::from_secs(40));
    assert_eq!(
        sim.sent_times(is_bye),
        vec![0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
    );
    let ended: Vec<_> =
        sim.events.iter().filter(|(_, e)| matches!(e, Event::CallEnded { .. })).collect();
    assert_eq!(
        ended,
        vec![&(Duration::from_secs(32), Event::CallEnded { call, reason: EndReason::LocalBye })]
    );
}

#[test]
fn hangup_before_ack_waits_for_the_ack() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c15");
    sim.ep.hangup(sim.now, call);
    sim.drain();
    assert!(sim.sent_times(is_bye).is_empty(), "RFC 3261 §15: no BYE before the ACK");
    sim.run_until(Duration::from_millis(600));
    sim.send(&in_dialog("ACK", "c15", "z9hG4bKack15", &tag, 1, ""));
    assert_eq!(sim.sent_times(is_bye), vec![600]);
}

#[test]
fn reject_retransmits_on_timer_g_until_timer_h() {
    let mut sim = Sim::new();
    sim.send(&invite("c16", "z9hG4bKinv16", OFFER));
    let call = match sim.take_events().as_slice() {
        [Event::IncomingCall { call, .. }] => *call,
        other => panic!("{other:?}"),
    };
    sim.ep.reject(sim.now, call, 486, "Busy Here");
    sim.drain();
    assert_eq!(sim.take_events(), vec![Event::CallEnded { call, reason: EndReason::Rejected }]);
    sim.run_until(Duration::from_secs(60));
    let is_486 = |p: &[u8]| status(p) == Some(486);
    assert_eq!(
        sim.sent_times(is_486),
        vec![0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
    );
    assert_eq!(sim.ep.poll_timeout(), None, "Timer H ended the transaction");
}

#[test]
fn offerless_invite_gets_our_offer_and_the_ack_answers() {
    let mut sim = Sim::new();
    let mut msg = invite("c17", "z9hG4bKinv17", "");
    msg = msg.replace("Content-Type: application/sdp\r\n", "");
    sim.send(&msg);
    let call = match sim.take_events().as_slice() {
        [Event::IncomingCall { call, offer: None, .. }] => *call,
        other => panic!("{other:?}"),
    };
    sim.ep.accept(sim.now, call, rtp()).unwrap();
    sim.drain();
    let ok = sim.take_inbox().pop().unwrap();
    assert!(body(&ok).contains("m=audio 30000 RTP/AVP 0 8 101\r\n"));
    let answer = "v=0\r\no=c 1 1 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\nm=audio 41000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";
    sim.send(&in_dialog("ACK", "c17", "z9hG4bKack17", &to_tag(&ok), 1, answer));
    let events = sim.take_events();
    let [Event::MediaChanged { media, .. }, Event::CallConfirmed { .. }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(media.remote_rtp, "198.51.100.20:41000".parse().unwrap());
    assert_eq!(media.codec, Codec::Pcmu);
}

#[test]
fn lf_only_and_folded_invite_is_understood() {
    let mut sim = Sim::new();
    let msg = invite("c18", "z9hG4bKinv18", OFFER)
        .replace("\r\n", "\n")
        .replace("Max-Forwards: 70\n", "Max-Forwards:\n  70\n");
    // Content-Length counted the CRLF body; recount for LF-only lines.
    let (head, body_part) = msg.split_once("\n\n").unwrap();
    let head = head.replace(
        &format!("Content-Length: {}", OFFER.len()),
        &format!("Content-Length: {}", body_part.len()),
    );
    sim.send(&format!("{head}\n\n{body_part}"));
    assert!(matches!(sim.take_events().as_slice(), [Event::IncomingCall { .. }]));
}

#[test]
fn tel_uri_and_ipv6_invite() {
    let mut sim = Sim::new();
    let msg = invite("c19", "z9hG4bKinv19", OFFER)
        .replace(
            "INVITE sip:+15550001111@192.0.2.10:5060 SIP/2.0",
            "INVITE tel:+15550001111 SIP/2.0",
        )
        .replace("<sip:+15557654321@carrier.example>", "<sip:+15557654321@[2001:db8::7]>")
        .replace(
            "Contact: <sip:+15557654321@198.51.100.20:5060>",
            "Contact: <sip:+15557654321@[2001:db8::7]:5062>",
        );
    sim.send(&msg);
    let events = sim.take_events();
    let [Event::IncomingCall { call, from_user, to_user, .. }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!((from_user.as_str(), to_user.as_str()), ("+15557654321", "+15550001111"));
    let call = *call;
    sim.ep.accept(sim.now, call, rtp()).unwrap();
    sim.drain();
    let tag = to_tag(&sim.take_inbox().pop().unwrap());
    sim.send(&in_dialog("ACK", "c19", "z9hG4bKack19", &tag, 1, ""));
    sim.ep.hangup(sim.now, call);
    sim.drain();
    // The BYE still follows the Record-Route; the R-URI is the IPv6 Contact.
    let (_, bye) = sim.wire.iter().find(|(_, t)| is_bye(&t.payload)).unwrap();
    assert!(bye.payload.starts_with(b"BYE sip:+15557654321@[2001:db8::7]:5062 SIP/2.0\r\n"));
}

#[test]
fn edge_policies_max_forwards_require_session_timer() {
    let mut sim = Sim::new();
    sim.send(&invite("c20", "z9hG4bKinv20", OFFER).replace("Max-Forwards: 70", "Max-Forwards: 0"));
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(483)]);

    let no_mf = invite("c21", "z9hG4bKinv21", OFFER).replace("Max-Forwards: 70\r\n", "");
    sim.send(&no_mf);
    assert_eq!(status(&sim.take_inbox()[0]), Some(100), "Max-Forwards is optional");

    sim.send(
        &invite("c22", "z9hG4bKinv22", OFFER)
            .replace("CSeq: 1 INVITE\r\n", "CSeq: 1 INVITE\r\nRequire: 100rel\r\n"),
    );
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(420));
    assert_eq!(header(&inbox[0], "Unsupported"), Some("100rel"));

    let short = "CSeq: 1 INVITE\r\nSupported: timer\r\nSession-Expires: 30\r\n";
    sim.send(&invite("c23", "z9hG4bKinv23", OFFER).replace("CSeq: 1 INVITE\r\n", short));
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(422));
    assert_eq!(header(&inbox[0], "Min-SE"), Some("90"));

    sim.take_events();
    let timer = "CSeq: 1 INVITE\r\nSupported: timer\r\nSession-Expires: 1800;refresher=uac\r\n";
    sim.send(&invite("c24", "z9hG4bKinv24", OFFER).replace("CSeq: 1 INVITE\r\n", timer));
    let call = match sim.take_events().as_slice() {
        [Event::IncomingCall { call, .. }] => *call,
        other => panic!("{other:?}"),
    };
    sim.ep.accept(sim.now, call, rtp()).unwrap();
    sim.drain();
    let ok = sim.take_inbox().pop().unwrap();
    assert_eq!(header(&ok, "Session-Expires"), Some("1800;refresher=uac"));
    assert_eq!(header(&ok, "Require"), Some("timer"));
}

#[test]
fn wildcard_bind_announces_the_calls_own_address() {
    // Bound to 0.0.0.0 with no advertised IP (the default configuration): the Contact of the
    // 200 and the Via of our BYE must name an address the caller can reach, the one the shard
    // chose for this call's RTP, never 0.0.0.0.
    let mut cfg = config();
    cfg.local = "0.0.0.0:5060".parse().unwrap();
    cfg.advertised_ip = None;
    let mut sim = Sim::new();
    sim.ep = Endpoint::new(cfg, CounterIds::default());
    sim.send(&invite("wild", "z9hG4bKinv1", OFFER));
    let events = sim.take_events();
    let Some(Event::IncomingCall { call, .. }) = events.first() else { panic!("{events:?}") };
    let call = *call;
    sim.ep.accept(sim.now, call, "192.0.2.7:30000".parse().unwrap()).unwrap();
    sim.drain();
    let ok = sim.wire.iter().map(|(_, t)| t.payload.clone()).find(|p| is_200_invite(p)).unwrap();
    assert_eq!(header(&ok, "Contact"), Some("<sip:192.0.2.7:5060>"));
    sim.send(&in_dialog("ACK", "wild", "z9hG4bKack1", &to_tag(&ok), 1, ""));
    sim.ep.hangup(sim.now, call);
    sim.drain();
    let bye = sim.wire.iter().map(|(_, t)| t.payload.clone()).find(|p| is_bye(p)).unwrap();
    let via = header(&bye, "Via").unwrap();
    assert!(via.contains("192.0.2.7:5060"), "{via}");
}

#[test]
fn overload_503_carries_retry_after() {
    let mut sim = Sim::new();
    sim.send(&invite("busy", "z9hG4bKinv1", OFFER));
    let events = sim.take_events();
    let Some(Event::IncomingCall { call, .. }) = events.first() else { panic!("{events:?}") };
    sim.ep.reject(sim.now, *call, 503, "Service Unavailable");
    sim.drain();
    let resp = sim.wire.iter().map(|(_, t)| t.payload.clone()).find(|p| status(p) == Some(503));
    let resp = resp.expect("503 sent");
    assert_eq!(header(&resp, "Retry-After"), Some("5"));
    // Other rejections carry none.
    sim.send(&invite("busy2", "z9hG4bKinv2", OFFER));
    let events = sim.take_events();
    let call = events.iter().find_map(|e| match e {
        Event::IncomingCall { call, .. } => Some(call),
        _ => None,
    });
    let Some(call) = call else { panic!("{events:?}") };
    sim.ep.reject(sim.now, *call, 486, "Busy Here");
    sim.drain();
    let resp = sim.wire.iter().map(|(_, t)| t.payload.clone()).find(|p| status(p) == Some(486));
    assert_eq!(header(&resp.expect("486 sent"), "Retry-After"), None);
}

#[test]
fn an_overloaded_endpoint_refuses_statelessly_and_keeps_nothing() {
    let mut sim = Sim::new();
    sim.ep.set_overloaded(true);
    sim.send(&invite("shed-1", "z9hG4bKshed1", OFFER));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(503)]);
    assert_eq!(header(&inbox[0], "Retry-After"), Some("5"));
    let tag = to_tag(&inbox[0]);
    assert!(tag.starts_with("sl"), "a stateless tag: {tag}");
    // No call, no transaction, no absorbed entry, no timer.
    assert!(sim.take_events().is_empty());
    assert_eq!(sim.ep.transactions(), precall_sip::Transactions::default());
    assert_eq!(sim.ep.poll_timeout(), None);
    assert_eq!(sim.ep.overload_refusals(), 1);
    // A retransmitted INVITE (the 503 was lost) gets the same 503, byte for byte.
    sim.send(&invite("shed-1", "z9hG4bKshed1", OFFER));
    assert_eq!(sim.take_inbox(), inbox);
    // Its ACK is swallowed: nothing sent, not even a drop reported.
    sim.send(&ack_non2xx("shed-1", "z9hG4bKshed1", &tag));
    assert!(sim.take_inbox().is_empty());
    assert!(sim.take_events().is_empty());
    // The 503 is never retransmitted (no Timer G), and nothing is left to expire.
    sim.run_until(Duration::from_secs(40));
    assert!(sim.take_inbox().is_empty());
    assert_eq!(sim.ep.transactions(), precall_sip::Transactions::default());
    // An ACK with a tag that is not ours is still reported as unmatched.
    sim.send(&ack_non2xx("shed-1", "z9hG4bKshed1", "0123456789abcdef"));
    assert_eq!(
        sim.take_events(),
        vec![Event::Dropped { reason: precall_sip::DropReason::UnmatchedAck }]
    );
    // Headroom again: the caller's next INVITE is a call.
    sim.ep.set_overloaded(false);
    sim.send(&invite("shed-2", "z9hG4bKshed2", OFFER));
    assert!(matches!(sim.take_events().first(), Some(Event::IncomingCall { .. })));
}

#[test]
fn a_draining_endpoint_refuses_new_calls_and_probes_but_keeps_its_calls() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "up-before");
    sim.send(&in_dialog("ACK", "up-before", "z9hG4bKack1", &tag, 1, ""));
    sim.take_inbox();
    sim.take_events();
    sim.ep.set_draining(true);
    // A new call: 503 with Retry-After, no call for the application.
    sim.send(&invite("new-during-drain", "z9hG4bKinv2", OFFER));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(503)]);
    assert_eq!(header(&inbox[0], "Retry-After"), Some("5"));
    assert!(sim.take_events().is_empty());
    assert_eq!(sim.ep.calls(), 1);
    // A dispatcher's OPTIONS probe: 503 too, so it takes the node out.
    let options = invite("probe", "z9hG4bKopt1", "")
        .replace("INVITE sip:", "OPTIONS sip:")
        .replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS");
    sim.send(&options);
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(503)]);
    // The call already up goes on to its natural end.
    sim.send(&in_dialog("BYE", "up-before", "z9hG4bKbye1", &tag, 2, ""));
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(200)]);
    assert_eq!(sim.take_events(), vec![Event::CallEnded { call, reason: EndReason::RemoteBye }]);
}

#[test]
fn requests_from_outside_the_trusted_networks_get_403_and_nothing_else() {
    let mut cfg = config();
    cfg.trusted = vec!["198.51.100.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
    let mut sim = Sim { ep: Endpoint::new(cfg, CounterIds::default()), ..Sim::new() };
    // The trunk (198.51.100.20) is served.
    let (_call, _tag) = answered(&mut sim, "from-trunk");
    sim.take_inbox();
    sim.take_events();
    // Anyone else: 403, no call, no event; an ACK or a response from there is dropped.
    sim.uac = "203.0.113.66:5060".parse().unwrap();
    sim.send(&invite("from-elsewhere", "z9hG4bKinv9", OFFER));
    let inbox = sim.take_inbox();
    assert_eq!(inbox.iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(403)]);
    assert!(sim.take_events().is_empty());
    assert_eq!(sim.ep.calls(), 1);
    sim.send(&in_dialog("ACK", "from-elsewhere", "z9hG4bKack9", "x", 1, ""));
    sim.send("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bKzz\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n");
    assert!(sim.take_inbox().is_empty());
    let dropped = sim
        .take_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Dropped {
                    reason: precall_sip::DropReason::Untrusted
                        | precall_sip::DropReason::UnmatchedAck
                }
            )
        })
        .count();
    assert_eq!(dropped, 2);
}

#[test]
fn an_untrusted_flood_is_answered_a_few_times_then_ignored_for_a_while() {
    let mut cfg = config();
    cfg.trusted = vec!["198.51.100.0/24".parse().unwrap()];
    cfg.untrusted_limit = 5;
    cfg.untrusted_window = Duration::from_secs(2);
    cfg.untrusted_ban = Duration::from_secs(30);
    let mut sim = Sim { ep: Endpoint::new(cfg, CounterIds::default()), ..Sim::new() };
    sim.uac = "203.0.113.66:5060".parse().unwrap();
    for i in 0..50 {
        sim.send(&invite(&format!("flood-{i}"), &format!("z9hG4bKf{i}"), OFFER));
    }
    let answered = sim.take_inbox().len();
    assert_eq!(answered, 5, "5 answers (403), the rest ignored");
    let limited = sim
        .take_events()
        .iter()
        .filter(|e| matches!(e, Event::Dropped { reason: precall_sip::DropReason::RateLimited }))
        .count();
    assert_eq!(limited, 45);
    // The trunk itself is never limited.
    let trunk: SocketAddr = UAC.parse().unwrap();
    for i in 0..20 {
        sim.ep.handle_datagram(
            sim.now,
            trunk,
            invite(&format!("trunk-{i}"), &format!("z9hG4bKt{i}"), OFFER).as_bytes(),
        );
    }
    sim.drain();
    assert_eq!(sim.ep.calls(), 20);
    sim.take_inbox();
    sim.take_events();
    // Still banned 20 s later; heard again once the ban is over.
    sim.now += Duration::from_secs(20);
    sim.send(&invite("later", "z9hG4bKl1", OFFER));
    assert!(sim.take_inbox().is_empty());
    sim.now += Duration::from_secs(11);
    sim.send(&invite("after-ban", "z9hG4bKl2", OFFER));
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(403)]);
}

#[test]
fn update_refreshes_the_remote_target_like_a_reinvite() {
    let mut sim = Sim::new();
    let (call, tag) = answered(&mut sim, "c-upd");
    sim.send(&in_dialog("ACK", "c-upd", "z9hG4bKacku", &tag, 1, ""));
    sim.take_inbox();
    // The caller moved (RFC 3311 §5.2): its UPDATE carries a new Contact.
    let update = in_dialog("UPDATE", "c-upd", "z9hG4bKupd1", &tag, 2, "").replace(
        "Contact: <sip:+15557654321@198.51.100.20:5060>",
        "Contact: <sip:+15557654321@198.51.100.77:5070>",
    );
    sim.send(&update);
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(200)]);
    // Our BYE goes to the new target.
    sim.ep.hangup(sim.now, call);
    sim.drain();
    let bye = sim.take_inbox().into_iter().find(|p| is_bye(p)).expect("a BYE");
    let line = String::from_utf8_lossy(&bye).lines().next().unwrap().to_owned();
    assert_eq!(line, "BYE sip:+15557654321@198.51.100.77:5070 SIP/2.0");
}

#[test]
fn a_bye_to_a_private_contact_behind_nat_goes_to_the_source() {
    let mut sim = Sim::new();
    // The caller announces its LAN address; its packets come from 198.51.100.20 (the NAT).
    let natted = invite("c-nat", "z9hG4bKnat1", OFFER).replace(
        "Contact: <sip:+15557654321@198.51.100.20:5060>",
        "Contact: <sip:+15557654321@192.168.1.50:5060>",
    );
    let natted = natted.replace("Record-Route: <sip:198.51.100.30;lr>\r\n", "");
    sim.send(&natted);
    let events = sim.take_events();
    let Some(Event::IncomingCall { call, .. }) = events.first() else { panic!("{events:?}") };
    let call = *call;
    sim.ep.accept(sim.now, call, rtp()).unwrap();
    sim.drain();
    let tag = sim
        .wire
        .iter()
        .map(|(_, t)| &t.payload)
        .find(|p| is_200_invite(p))
        .map(|p| to_tag(p))
        .unwrap();
    sim.send(&in_dialog("ACK", "c-nat", "z9hG4bKacknat", &tag, 1, ""));
    sim.ep.hangup(sim.now, call);
    sim.drain();
    let (_, bye) = sim.wire.iter().rev().find(|(_, t)| is_bye(&t.payload)).expect("a BYE");
    // The Request-URI is still the Contact (the NAT forwards by address, the phone by URI).
    assert!(
        String::from_utf8_lossy(&bye.payload)
            .starts_with("BYE sip:+15557654321@192.168.1.50:5060 SIP/2.0")
    );
    assert_eq!(
        bye.dest,
        UAC.parse::<SocketAddr>().unwrap(),
        "sent where the caller's packets come from"
    );
}

#[test]
fn the_2xx_to_a_session_refreshing_update_carries_the_session_interval() {
    let mut sim = Sim::new();
    let (_call, tag) = answered(&mut sim, "c-se");
    sim.send(&in_dialog("ACK", "c-se", "z9hG4bKackse", &tag, 1, ""));
    sim.take_inbox();
    let refresh = in_dialog("UPDATE", "c-se", "z9hG4bKse1", &tag, 2, "").replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nSession-Expires: 1800;refresher=uac\r\nSupported: timer\r\n",
    );
    sim.send(&refresh);
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(200));
    assert_eq!(header(&inbox[0], "Session-Expires"), Some("1800;refresher=uac"));
    assert_eq!(header(&inbox[0], "Require"), Some("timer"));
    // An UPDATE that refreshes nothing gets a plain 200.
    sim.send(&in_dialog("UPDATE", "c-se", "z9hG4bKse2", &tag, 3, ""));
    assert_eq!(header(&sim.take_inbox()[0], "Session-Expires"), None);
}

// ----- RFC 4028 session timers -----

/// The UAC's answer to a request the endpoint sent: Via, From, To, Call-ID and CSeq copied.
fn answer_to(req: &[u8], code: u16, extra: &str, sdp: &str) -> String {
    let h = |name: &str| header(req, name).unwrap().to_owned();
    let ct = if sdp.is_empty() { "" } else { "Content-Type: application/sdp\r\n" };
    format!(
        "SIP/2.0 {code} Answer\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\n\
         {extra}{ct}Content-Length: {}\r\n\r\n{sdp}",
        h("Via"),
        h("From"),
        h("To"),
        h("Call-ID"),
        h("CSeq"),
        sdp.len()
    )
}

/// INVITE with the given session-timer and Allow lines, accepted and ACKed at t=0; returns the
/// call, our To tag and the 200.
fn timed_call(
    sim: &mut Sim,
    call_id: &str,
    lines: &str,
) -> (precall_sip::CallHandle, String, Vec<u8>) {
    let inv = invite(call_id, "z9hG4bKinv1", OFFER)
        .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: 1 INVITE\r\n{lines}"));
    sim.send(&inv);
    let call = match sim.take_events().as_slice() {
        [Event::IncomingCall { call, .. }] => *call,
        other => panic!("{other:?}"),
    };
    sim.ep.accept(sim.now, call, rtp()).unwrap();
    sim.drain();
    let ok = sim.take_inbox().into_iter().find(|p| is_200_invite(p)).expect("200");
    let tag = to_tag(&ok);
    sim.send(&in_dialog("ACK", call_id, "z9hG4bKack1", &tag, 1, ""));
    sim.take_events();
    (call, tag, ok)
}

fn is_update(p: &[u8]) -> bool {
    p.starts_with(b"UPDATE ")
}

fn is_reinvite(p: &[u8]) -> bool {
    p.starts_with(b"INVITE ")
}

fn ended(sim: &mut Sim) -> Vec<(u128, EndReason)> {
    sim.events
        .iter()
        .filter_map(|(t, e)| match e {
            Event::CallEnded { reason, .. } => Some((t.as_millis(), *reason)),
            _ => None,
        })
        .collect()
}

const ALLOW_ALL: &str = "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE\r\n";

#[test]
fn asked_to_refresh_we_send_update_at_half_the_interval_and_end_the_call_when_it_goes_unanswered() {
    let mut sim = Sim::new();
    let lines = format!("Supported: timer\r\nSession-Expires: 90;refresher=uas\r\n{ALLOW_ALL}");
    let (_call, _tag, ok) = timed_call(&mut sim, "st1", &lines);
    assert_eq!(header(&ok, "Session-Expires"), Some("90;refresher=uas"), "the caller's choice");
    assert_eq!(header(&ok, "Require"), None, "Require: timer only when the caller refreshes");

    sim.run_until(Duration::from_millis(44_999));
    assert!(sim.sent_times(is_update).is_empty());
    sim.run_until(Duration::from_secs(45));
    let update = sim.take_inbox().pop().expect("a refresh at 45 s");
    assert!(is_update(&update), "{}", String::from_utf8_lossy(&update));
    assert_eq!(header(&update, "Session-Expires"), Some("90;refresher=uac"), "uac = us, here");
    assert_eq!(header(&update, "CSeq"), Some("1 UPDATE"));
    assert!(header(&update, "Contact").is_some(), "UPDATE is a target refresh (RFC 3311 §5.1)");
    assert_eq!(body(&update), "");
    sim.send(&answer_to(
        &update,
        200,
        "Session-Expires: 90;refresher=uac\r\nRequire: timer\r\n",
        "",
    ));

    // The next one half an interval after that answer; it is never answered: Timer E resends,
    // Timer F gives up after 32 s, and the session is over.
    sim.run_until(Duration::from_secs(200));
    let updates = sim.sent_times(is_update);
    assert_eq!(updates[1], 90_000, "{updates:?}");
    assert_eq!(updates.last(), Some(&121_500), "Timer E at T2 until Timer F: {updates:?}");
    assert_eq!(sim.sent_times(is_bye)[0], 122_000);
    assert_eq!(ended(&mut sim), vec![(122_000, EndReason::SessionExpired)]);
    assert_eq!(sim.ep.calls(), 0);
}

#[test]
fn a_caller_that_refreshes_keeps_the_call_and_one_that_stops_gets_bye_before_expiry() {
    let mut sim = Sim::new();
    let lines = format!("Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n{ALLOW_ALL}");
    let (_call, tag, ok) = timed_call(&mut sim, "st2", &lines);
    assert_eq!(header(&ok, "Session-Expires"), Some("90;refresher=uac"));
    assert_eq!(header(&ok, "Require"), Some("timer"));
    // Refreshes at 40 s and 80 s (UPDATE, then re-INVITE): the call goes on.
    sim.run_until(Duration::from_secs(40));
    let refresh = in_dialog("UPDATE", "st2", "z9hG4bKr1", &tag, 2, "").replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nSupported: timer\r\nSession-Expires: 90;refresher=uac\r\n",
    );
    sim.send(&refresh);
    assert_eq!(header(&sim.take_inbox()[0], "Session-Expires"), Some("90;refresher=uac"));
    sim.run_until(Duration::from_secs(80));
    let reinvite = in_dialog("INVITE", "st2", "z9hG4bKr2", &tag, 3, OFFER).replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nSupported: timer\r\nSession-Expires: 90;refresher=uac\r\n",
    );
    sim.send(&reinvite);
    sim.send(&in_dialog("ACK", "st2", "z9hG4bKack2", &tag, 3, ""));
    sim.run_until(Duration::from_secs(139));
    assert!(sim.sent_times(is_bye).is_empty(), "refreshed in time");
    // The last refresh was at 80 s; 90 s later it expires, and the BYE goes 30 s before that
    // (RFC 4028 §10: min(32 s, interval/3)).
    sim.run_until(Duration::from_secs(200));
    assert_eq!(sim.sent_times(is_bye)[0], 140_000);
    assert_eq!(ended(&mut sim), vec![(140_000, EndReason::SessionExpired)]);
    assert!(sim.sent_times(is_update).is_empty() && sim.sent_times(is_reinvite).is_empty());
}

#[test]
fn a_caller_without_update_gets_a_reinvite_with_our_sdp_unchanged_and_acks_it() {
    let mut sim = Sim::new();
    // A proxy put Session-Expires in; the caller itself does not support timers: we refresh,
    // and since its Allow has no UPDATE, with re-INVITE.
    let lines = "Session-Expires: 120\r\nAllow: INVITE, ACK, BYE, CANCEL\r\n";
    let (_call, _tag, ok) = timed_call(&mut sim, "st3", lines);
    assert_eq!(header(&ok, "Session-Expires"), Some("120;refresher=uas"));
    assert_eq!(header(&ok, "Require"), None);
    sim.run_until(Duration::from_secs(60));
    let reinvite = sim.take_inbox().pop().expect("refresh at 60 s");
    assert!(is_reinvite(&reinvite), "{}", String::from_utf8_lossy(&reinvite));
    assert_eq!(body(&reinvite), body(&ok), "the same SDP, same o= version (RFC 4028 §7.4)");
    assert_eq!(header(&reinvite, "CSeq"), Some("1 INVITE"));
    // Timer A resends it until the caller answers.
    sim.run_until(Duration::from_millis(61_500));
    assert_eq!(sim.sent_times(is_reinvite), vec![60_000, 60_500, 61_500]);
    let answer = OFFER.replace("o=carrier 1 1", "o=carrier 1 2");
    sim.send(&answer_to(
        &reinvite,
        200,
        "Contact: <sip:+15557654321@198.51.100.20:5060>\r\n",
        &answer,
    ));
    let ack = sim.take_inbox().pop().expect("ACK");
    assert!(ack.starts_with(b"ACK sip:+15557654321@198.51.100.20:5060 SIP/2.0\r\n"));
    assert_eq!(header(&ack, "CSeq"), Some("1 ACK"));
    assert_ne!(
        header(&ack, "Via"),
        header(&reinvite, "Via"),
        "the ACK of a 2xx is a new transaction"
    );
    // A repeated 200 gets the same ACK again, and the timer restarts from the answer.
    sim.send(&answer_to(&reinvite, 200, "", &answer));
    assert_eq!(sim.take_inbox(), vec![ack]);
    sim.run_until(Duration::from_secs(122));
    assert_eq!(sim.sent_times(is_reinvite).last(), Some(&122_000));
    assert!(sim.sent_times(is_bye).is_empty());
}

#[test]
fn refresh_answers_422_405_491_and_481() {
    let mut sim = Sim::new();
    let lines = format!("Supported: timer\r\nSession-Expires: 90;refresher=uas\r\n{ALLOW_ALL}");
    let (_call, tag, _) = timed_call(&mut sim, "st4", &lines);
    sim.run_until(Duration::from_secs(45));
    let update = sim.take_inbox().pop().unwrap();
    // 422: at once again, with the interval and Min-SE asked for.
    sim.send(&answer_to(&update, 422, "Min-SE: 300\r\n", ""));
    let again = sim.take_inbox().pop().expect("retried at once");
    assert_eq!(header(&again, "Session-Expires"), Some("300;refresher=uac"));
    assert_eq!(header(&again, "Min-SE"), Some("300"));
    // 405: UPDATE is not taken after all: a re-INVITE, at once.
    sim.send(&answer_to(&again, 405, "", ""));
    let reinvite = sim.take_inbox().into_iter().find(|p| is_reinvite(p)).expect("re-INVITE");
    // Meanwhile the caller's own offer crosses ours: 491 (RFC 3261 §14.2).
    sim.send(&in_dialog("INVITE", "st4", "z9hG4bKx1", &tag, 2, OFFER));
    assert_eq!(status(&sim.take_inbox()[0]), Some(491));
    // Ours gets 491 too: ACKed, and retried within 2 s.
    sim.send(&answer_to(&reinvite, 491, "", ""));
    let ack = sim.take_inbox().pop().unwrap();
    assert!(ack.starts_with(b"ACK "));
    assert_eq!(header(&ack, "Via"), header(&reinvite, "Via"), "a non-2xx ACK: same branch");
    sim.run_until(Duration::from_secs(47));
    let mut retried: Vec<String> = sim
        .take_inbox()
        .iter()
        .filter(|p| is_reinvite(p))
        .map(|p| header(p, "CSeq").unwrap().to_owned())
        .collect();
    retried.dedup();
    assert_eq!(retried, vec!["4 INVITE"], "UPDATE 1, UPDATE 2 (422), INVITE 3 (405), INVITE 4");
    let last =
        sim.wire.iter().rev().find(|(_, t)| is_reinvite(&t.payload)).unwrap().1.payload.clone();
    // 481: the dialog is gone at the caller: BYE and the session is over.
    sim.send(&answer_to(&last, 481, "", ""));
    assert_eq!(sim.sent_times(is_bye).len(), 1);
    assert!(matches!(ended(&mut sim).as_slice(), [(_, EndReason::SessionExpired)]));
}

#[test]
fn an_update_offer_while_our_offer_is_outstanding_gets_491() {
    let mut sim = Sim::new();
    let lines =
        "Supported: timer\r\nSession-Expires: 90;refresher=uas\r\nAllow: INVITE, ACK, BYE\r\n";
    let (_call, tag, _) = timed_call(&mut sim, "st5", lines);
    sim.run_until(Duration::from_secs(45));
    assert_eq!(sim.sent_times(is_reinvite), vec![45_000]);
    sim.take_inbox();
    sim.send(&in_dialog("UPDATE", "st5", "z9hG4bKu1", &tag, 2, OFFER));
    assert_eq!(status(&sim.take_inbox()[0]), Some(491));
    // Without an offer an UPDATE is fine meanwhile.
    sim.send(&in_dialog("UPDATE", "st5", "z9hG4bKu2", &tag, 3, ""));
    assert_eq!(status(&sim.take_inbox()[0]), Some(200));
}

#[test]
fn only_a_merged_invite_gets_482() {
    let mut sim = Sim::new();
    sim.send(&invite("m1", "z9hG4bKa", OFFER));
    sim.take_inbox();
    // The same INVITE by another path: same From tag, Call-ID and CSeq, another branch.
    sim.send(&invite("m1", "z9hG4bKb", OFFER));
    assert_eq!(status(&sim.take_inbox()[0]), Some(482));
    // A new INVITE reusing a live call's Call-ID is no merge: 500 with Retry-After.
    sim.send(&invite("m1", "z9hG4bKc", OFFER).replace("CSeq: 1 INVITE", "CSeq: 2 INVITE"));
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(500));
    assert!(header(&inbox[0], "Retry-After").is_some());
    assert_eq!(sim.ep.calls(), 1);
}

#[test]
fn responses_go_to_the_via_port_unless_rport_asks_for_the_source_port() {
    let mut sim = Sim::new();
    // Sent from port 5060, Via says 5070 and no rport: §18.2.2 answers at 5070.
    sim.send(
        &invite("v1", "z9hG4bKv1", OFFER)
            .replace("198.51.100.20:5060;branch", "198.51.100.20:5070;branch"),
    );
    let dests: Vec<SocketAddr> = sim.wire.iter().map(|(_, t)| t.dest).collect();
    assert_eq!(dests, vec!["198.51.100.20:5070".parse().unwrap()]);
    let trying = sim.take_inbox().pop().unwrap();
    assert_eq!(
        header(&trying, "Via"),
        Some("SIP/2.0/UDP 198.51.100.20:5070;branch=z9hG4bKv1;received=198.51.100.20")
    );
    // With rport: the source port, filled in.
    sim.wire.clear();
    sim.send(
        &invite("v2", "z9hG4bKv2", OFFER)
            .replace("198.51.100.20:5060;branch", "198.51.100.20:5070;rport;branch"),
    );
    assert_eq!(sim.wire[0].1.dest, UAC.parse::<SocketAddr>().unwrap());
    // No port in sent-by: 5060. force_rport: always the source.
    let mut cfg = config();
    cfg.force_rport = true;
    let mut forced = Sim::new();
    forced.ep = Endpoint::new(cfg, CounterIds::default());
    forced.uac = "198.51.100.20:40000".parse().unwrap();
    forced.send(
        &invite("v3", "z9hG4bKv3", OFFER)
            .replace("198.51.100.20:5060;branch", "198.51.100.20;branch"),
    );
    assert_eq!(forced.wire[0].1.dest, "198.51.100.20:40000".parse::<SocketAddr>().unwrap());
    let mut plain = Sim::new();
    plain.uac = "198.51.100.20:40000".parse().unwrap();
    plain.send(
        &invite("v4", "z9hG4bKv4", OFFER)
            .replace("198.51.100.20:5060;branch", "198.51.100.20;branch"),
    );
    assert_eq!(plain.wire[0].1.dest, "198.51.100.20:5060".parse::<SocketAddr>().unwrap());
}

#[test]
fn a_short_interval_gets_422_only_from_a_caller_that_can_retry() {
    let mut sim = Sim::new();
    // A proxy's 60 s for a caller without the extension: raised to Min-SE, we refresh.
    let (_call, tag, ok) = timed_call(&mut sim, "st6", "Session-Expires: 60\r\n");
    assert_eq!(header(&ok, "Session-Expires"), Some("90;refresher=uas"));
    // A refreshing UPDATE below the minimum from a caller that supports timers: 422.
    let short = in_dialog("UPDATE", "st6", "z9hG4bKs1", &tag, 2, "").replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nSupported: timer\r\nSession-Expires: 60\r\n",
    );
    sim.send(&short);
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(422));
    assert_eq!(header(&inbox[0], "Min-SE"), Some("90"));
    assert_eq!(sim.ep.calls(), 1, "a refused refresh leaves the session as it was");
}

#[test]
fn past_its_live_transaction_limit_new_calls_get_503_until_one_is_answered() {
    let mut cfg = config();
    cfg.max_transactions = 2;
    let mut sim = Sim::new();
    sim.ep = Endpoint::new(cfg, CounterIds::default());
    // Two calls ringing: two live INVITE transactions.
    sim.send(&invite("r1", "z9hG4bKr1", OFFER));
    sim.send(&invite("r2", "z9hG4bKr2", OFFER));
    let ringing: Vec<_> = sim
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::IncomingCall { call, .. } => Some(call),
            _ => None,
        })
        .collect();
    assert_eq!(ringing.len(), 2);
    assert_eq!(sim.ep.transactions().live, 2);
    sim.take_inbox();
    // A new call needs a live transaction: 503 while full, and no call.
    sim.send(&invite("r3", "z9hG4bKr3", OFFER));
    assert_eq!(status(&sim.take_inbox()[0]), Some(503));
    assert_eq!(sim.ep.calls(), 2);
    // An answered INVITE only absorbs retransmissions: it leaves the live table.
    sim.ep.accept(sim.now, ringing[0], rtp()).unwrap();
    sim.drain();
    assert_eq!(sim.ep.transactions().live, 1);
    sim.send(&invite("r4", "z9hG4bKr4", OFFER));
    assert!(sim.take_inbox().iter().any(|p| status(p) == Some(100)));
    assert_eq!(sim.ep.calls(), 3);
}

/// A request precall refuses out of any dialog (a MESSAGE): a fresh To tag in each answer.
fn message(n: u32) -> String {
    format!(
        "MESSAGE sip:192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.20:5060;branch=z9hG4bKm{n}\r\n\
         From: <sip:im@carrier.example>;tag=p{n}\r\nTo: <sip:192.0.2.10>\r\nCall-ID: m{n}\r\n\
         CSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    )
}

#[test]
fn answered_transactions_absorb_within_their_memory_budget_the_oldest_going_first() {
    // What one absorbed MESSAGE costs, learnt from an endpoint with room to spare.
    let mut sim = Sim::new();
    sim.send(&message(0));
    let one = sim.ep.transactions().absorbed_bytes;
    assert!(one > 0);

    let mut cfg = config();
    cfg.absorbed_bytes = 3 * one + one / 2;
    let mut sim = Sim::new();
    sim.ep = Endpoint::new(cfg, CounterIds::default());
    let mut first = Vec::new();
    for n in 0..5 {
        sim.run_until(Duration::from_millis(10 * u64::from(n)));
        sim.send(&message(n));
        first.push(sim.take_inbox().remove(0));
    }
    let refusal = status(&first[0]).unwrap();
    assert!(matches!(refusal, 405 | 501), "{refusal}");
    let held = sim.ep.transactions();
    assert_eq!(held.absorbed, 3, "{held:?}");
    assert!(held.absorbed_bytes <= 3 * one + one / 2, "{held:?}");
    // The newest three resend their answer byte for byte; the oldest two were forgotten and
    // are answered again as new requests (a new To tag).
    for n in (0..5).rev() {
        sim.send(&message(n));
        let again = sim.take_inbox().remove(0);
        assert_eq!(again == first[n as usize], n >= 2, "MESSAGE {n}");
    }
    // Timer J (64*T1) ends the absorbed ones, and no timer is left.
    sim.run_until(Duration::from_secs(40));
    assert_eq!(sim.ep.transactions(), precall_sip::Transactions::default());
    assert_eq!(sim.ep.poll_timeout(), None);
}

#[test]
fn finished_calls_leave_only_compact_state_until_their_timers_end() {
    let mut sim = Sim::new();
    for n in 0..20u32 {
        let call_id = format!("s{n}");
        let branch = format!("z9hG4bKs{n}");
        sim.send(&invite(&call_id, &branch, OFFER));
        let events = sim.take_events();
        let Some(Event::IncomingCall { call, .. }) = events.first() else {
            panic!("call {n}: {events:?}")
        };
        let call = *call;
        sim.ep.accept(sim.now, call, rtp()).unwrap();
        sim.drain();
        let tag = to_tag(sim.take_inbox().iter().find(|p| is_200_invite(p)).unwrap());
        sim.send(&in_dialog("ACK", &call_id, &format!("z9hG4bKa{n}"), &tag, 1, ""));
        sim.send(&in_dialog("BYE", &call_id, &format!("z9hG4bKb{n}"), &tag, 2, ""));
        assert_eq!(status(&sim.take_inbox()[0]), Some(200));
        assert!(matches!(sim.take_events().last(), Some(Event::CallEnded { .. })));
    }
    // No live transaction; each call left its INVITE (Timer L) and its BYE (Timer J).
    let held = sim.ep.transactions();
    assert_eq!((held.live, held.absorbed, sim.ep.calls()), (0, 40, 0), "{held:?}");
    // A late retransmission of either is still absorbed: the BYE's 200 again, the INVITE
    // swallowed (its call is over, nothing to repeat), and no new call.
    sim.send(&in_dialog("BYE", "s3", "z9hG4bKb3", "x", 2, ""));
    assert_eq!(sim.take_inbox().iter().map(|p| status(p)).collect::<Vec<_>>(), vec![Some(200)]);
    sim.send(&invite("s3", "z9hG4bKs3", OFFER));
    assert!(sim.take_inbox().is_empty());
    assert!(sim.take_events().is_empty());
    sim.run_until(Duration::from_secs(40));
    assert_eq!(sim.ep.transactions(), precall_sip::Transactions::default());
}

fn digest_hex(alg: &str, s: &str) -> String {
    use sha2::Digest as _;
    let bytes: Vec<u8> = match alg {
        "SHA-256" => sha2::Sha256::digest(s.as_bytes()).to_vec(),
        _ => <md5::Md5 as md5::Digest>::digest(s.as_bytes()).to_vec(),
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The caller's answer to a challenge, as RFC 7616 §3.4.1 computes it with `qop=auth`.
fn authorization(challenge: &str, alg: &str, user: &str, password: &str, uri: &str) -> String {
    let param = |name: &str| {
        let at = challenge.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        challenge[at..].split('"').next().unwrap().to_owned()
    };
    let (realm, nonce) = (param("realm"), param("nonce"));
    let ha1 = digest_hex(alg, &format!("{user}:{realm}:{password}"));
    let ha2 = digest_hex(alg, &format!("INVITE:{uri}"));
    let response = digest_hex(alg, &format!("{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}"));
    format!(
        "Authorization: Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", \
         uri=\"{uri}\", response=\"{response}\", algorithm={alg}, cnonce=\"c0ffee\", qop=auth, nc=00000001\r\n"
    )
}

fn digest_sim() -> Sim {
    let mut cfg = config();
    cfg.trusted = vec!["198.51.100.0/24".parse().unwrap()];
    cfg.digest = Some(precall_sip::DigestConfig {
        realm: "precall".to_owned(),
        users: vec![("pbx1".to_owned(), "s3cret".to_owned())],
        algorithms: precall_sip::DigestAlgorithm::ALL.to_vec(),
    });
    let mut sim = Sim { ep: Endpoint::new(cfg, CounterIds::default()), ..Sim::new() };
    sim.uac = "203.0.113.50:5060".parse().unwrap();
    sim
}

const RURI: &str = "sip:+15550001111@192.0.2.10:5060";

#[test]
fn an_unlisted_caller_is_challenged_and_served_once_it_answers_with_sha256_or_md5() {
    let mut sim = digest_sim();
    sim.send(&invite("d1", "z9hG4bKd1", OFFER));
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(401));
    let text = String::from_utf8_lossy(&inbox[0]).into_owned();
    let challenges: Vec<&str> =
        text.lines().filter(|l| l.starts_with("WWW-Authenticate:")).collect();
    assert_eq!(challenges.len(), 2, "{text}");
    assert!(challenges[0].contains("algorithm=SHA-256") && challenges[1].contains("algorithm=MD5"));
    assert!(challenges[0].contains("realm=\"precall\"") && challenges[0].contains("qop=\"auth\""));
    assert!(sim.take_events().is_empty(), "no call before the credentials");
    // The caller ACKs the 401 and retries with CSeq 2 and its credentials.
    let retry = |branch: &str, cseq: u32, auth: &str| {
        invite("d1", branch, OFFER)
            .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: {cseq} INVITE\r\n{auth}"))
    };
    sim.send(&retry(
        "z9hG4bKd2",
        2,
        &authorization(challenges[0], "SHA-256", "pbx1", "s3cret", RURI),
    ));
    assert_eq!(status(&sim.take_inbox()[0]), Some(100));
    assert!(matches!(sim.take_events().as_slice(), [Event::IncomingCall { .. }]));
    // MD5, for the many PBXs that have only that.
    sim.send(&invite("d2", "z9hG4bKd3", OFFER));
    let text = String::from_utf8_lossy(&sim.take_inbox()[0]).into_owned();
    let md5 = text.lines().find(|l| l.contains("algorithm=MD5")).unwrap().to_owned();
    let auth = authorization(&md5, "MD5", "pbx1", "s3cret", RURI);
    sim.send(
        &invite("d2", "z9hG4bKd4", OFFER)
            .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: 2 INVITE\r\n{auth}")),
    );
    assert_eq!(status(&sim.take_inbox()[0]), Some(100));
    assert_eq!(sim.ep.calls(), 2);
}

#[test]
fn wrong_credentials_get_403_stale_nonces_a_new_challenge_and_listed_trunks_none() {
    let mut sim = digest_sim();
    sim.send(&invite("w1", "z9hG4bKw1", OFFER));
    let text = String::from_utf8_lossy(&sim.take_inbox()[0]).into_owned();
    let challenge = text.lines().find(|l| l.contains("SHA-256")).unwrap().to_owned();
    let with = |branch: &str, auth: &str| {
        invite("w1", branch, OFFER)
            .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: 2 INVITE\r\n{auth}"))
    };
    let wrong = authorization(&challenge, "SHA-256", "pbx1", "guess", RURI);
    sim.send(&with("z9hG4bKw2", &wrong));
    assert_eq!(status(&sim.take_inbox()[0]), Some(403));
    let stranger = authorization(&challenge, "SHA-256", "nobody", "s3cret", RURI);
    sim.send(&with("z9hG4bKw3", &stranger));
    assert_eq!(status(&sim.take_inbox()[0]), Some(403));
    let other_uri = authorization(&challenge, "SHA-256", "pbx1", "s3cret", "sip:+1999@192.0.2.10");
    sim.send(&with("z9hG4bKw4", &other_uri));
    assert_eq!(status(&sim.take_inbox()[0]), Some(403), "the digest must cover this request's URI");
    // A minute later the nonce is stale: a fresh challenge that says so, no 403.
    sim.now += Duration::from_secs(61);
    let late = authorization(&challenge, "SHA-256", "pbx1", "s3cret", RURI);
    sim.send(&with("z9hG4bKw5", &late));
    let inbox = sim.take_inbox();
    assert_eq!(status(&inbox[0]), Some(401));
    assert!(String::from_utf8_lossy(&inbox[0]).contains("stale=true"));
    assert_eq!(sim.ep.calls(), 0);
    // A nonce issued to another address is worthless here.
    sim.uac = "203.0.113.51:5060".parse().unwrap();
    let fresh = {
        sim.send(&invite("w2", "z9hG4bKw6", OFFER));
        let t = String::from_utf8_lossy(&sim.take_inbox()[0]).into_owned();
        t.lines().find(|l| l.contains("SHA-256")).unwrap().to_owned()
    };
    sim.uac = "203.0.113.52:5060".parse().unwrap();
    let borrowed = authorization(&fresh, "SHA-256", "pbx1", "s3cret", RURI);
    sim.send(
        &invite("w3", "z9hG4bKw7", OFFER)
            .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: 1 INVITE\r\n{borrowed}")),
    );
    assert_eq!(status(&sim.take_inbox()[0]), Some(401));
    // The listed trunk is never challenged.
    sim.uac = UAC.parse().unwrap();
    sim.send(&invite("w4", "z9hG4bKw8", OFFER));
    assert_eq!(status(&sim.take_inbox()[0]), Some(100));
}

#[test]
fn a_password_guesser_is_ignored_after_a_few_refusals() {
    let mut sim = digest_sim();
    sim.send(&invite("g0", "z9hG4bKg0", OFFER));
    let text = String::from_utf8_lossy(&sim.take_inbox()[0]).into_owned();
    let challenge = text.lines().find(|l| l.contains("SHA-256")).unwrap().to_owned();
    for i in 1..=20 {
        let auth = authorization(&challenge, "SHA-256", "pbx1", &format!("guess{i}"), RURI);
        sim.send(
            &invite("g0", &format!("z9hG4bKg{i}"), OFFER)
                .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: {} INVITE\r\n{auth}", i + 1)),
        );
    }
    let statuses: Vec<Option<u16>> = sim.take_inbox().iter().map(|p| status(p)).collect();
    assert_eq!(statuses, vec![Some(403); 10], "10 refusals, then silence");
    // Even the right password is ignored while the ban lasts.
    let right = authorization(&challenge, "SHA-256", "pbx1", "s3cret", RURI);
    sim.send(
        &invite("g0", "z9hG4bKgok", OFFER)
            .replace("CSeq: 1 INVITE\r\n", &format!("CSeq: 30 INVITE\r\n{right}")),
    );
    assert!(sim.take_inbox().is_empty());
}
