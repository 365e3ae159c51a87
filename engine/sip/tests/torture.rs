//! RFC 4475 torture messages: every file in `tests/torture/` with its expected outcome from
//! `tests/torture/INDEX`.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{CounterIds, config, status};
use precall_sip::{DropReason, Endpoint, Event};

fn run(name: &str) -> (Vec<Vec<u8>>, Vec<Event>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torture").join(format!("{name}.sip"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut ep = Endpoint::new(config(), CounterIds::default());
    ep.handle_datagram(Instant::now(), "192.0.2.99:5060".parse().unwrap(), &bytes);
    let mut sent = Vec::new();
    while let Some(t) = ep.poll_transmit() {
        sent.push(t.payload);
    }
    let mut events = Vec::new();
    while let Some(e) = ep.poll_event() {
        events.push(e);
    }
    (sent, events)
}

fn drop_reason(name: &str) -> DropReason {
    match name {
        "UnmatchedResponse" => DropReason::UnmatchedResponse,
        "MalformedResponse" => DropReason::MalformedResponse,
        "NotSip" => DropReason::NotSip,
        "Unanswerable" => DropReason::Unanswerable,
        "UnmatchedAck" => DropReason::UnmatchedAck,
        other => panic!("unknown drop reason {other}"),
    }
}

#[test]
fn every_torture_message_has_its_expected_outcome() {
    let index = include_str!("torture/INDEX");
    let mut checked = 0;
    let mut failures = Vec::new();
    for line in index.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let [name, section, expected] = cols.as_slice() else { panic!("bad INDEX line {line}") };
        let (sent, events) = run(name);
        let codes: Vec<Option<u16>> = sent.iter().map(|p| status(p)).collect();
        let calls = events.iter().filter(|e| matches!(e, Event::IncomingCall { .. })).count();
        let ok = match *expected {
            "100+call" => codes == [Some(100)] && calls == 1,
            e if e.starts_with("dropped:") => {
                let want = drop_reason(&e["dropped:".len()..]);
                sent.is_empty() && events == [Event::Dropped { reason: want }]
            }
            code => {
                let code: u16 = code.parse().expect("status code");
                codes == [Some(code)] && calls == 0
            }
        };
        if !ok {
            failures.push(format!(
                "{name} ({section}): expected {expected}, sent {codes:?}, events {events:?}"
            ));
        }
        checked += 1;
    }
    assert!(checked >= 45, "only {checked} messages in INDEX");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn answers_carry_the_specific_details() {
    let (sent, _) = run("intmeth");
    assert!(common::header(&sent[0], "Allow").unwrap().contains("INVITE"));
    let (sent, _) = run("bext01");
    assert_eq!(
        common::header(&sent[0], "Unsupported"),
        Some("nothingSupportsThis, nothingSupportsThisEither")
    );
    let (sent, _) = run("invut");
    assert_eq!(common::header(&sent[0], "Accept"), Some("application/sdp"));
    let (sent, _) = run("mcl01");
    assert!(
        String::from_utf8_lossy(&sent[0])
            .starts_with("SIP/2.0 400 Multiple Content-Length Values\r\n")
    );
    let (sent, _) = run("insuf");
    assert!(String::from_utf8_lossy(&sent[0]).starts_with("SIP/2.0 400 Missing To Header\r\n"));
    let (sent, _) = run("scalar02");
    assert!(String::from_utf8_lossy(&sent[0]).starts_with("SIP/2.0 400 Malformed CSeq Header\r\n"));
    let (sent, _) = run("clerr");
    assert!(
        String::from_utf8_lossy(&sent[0])
            .starts_with("SIP/2.0 400 Body Shorter Than Content-Length\r\n")
    );
}

#[test]
fn valid_invites_yield_the_right_users() {
    let (_, events) = run("esc01");
    let Some(Event::IncomingCall { to_user, from_user, offer, .. }) = events.first() else {
        panic!("{events:?}")
    };
    assert_eq!(to_user, "sips:user@example.com");
    assert_eq!(from_user, "I have spaces");
    assert_eq!(offer.as_ref().unwrap().media.len(), 2);
    let (_, events) = run("inv2543");
    let Some(Event::IncomingCall { from_user, to_user, .. }) = events.first() else { panic!() };
    assert_eq!(from_user, "+13035551111");
    assert_eq!(to_user, "UserB");
}
