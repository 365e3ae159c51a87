//! Bad input never panics: random bytes and mutations of valid messages (the torture files
//! and the simulation's messages) through the whole endpoint, with a deterministic seed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{CounterIds, config};
use precall_sip::{Endpoint, Event, peek_call_id};

/// xorshift64*: tiny, deterministic, good enough to mutate bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torture");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sip"))
        .collect();
    files.sort();
    let mut seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    seeds.push(
        b"INVITE tel:+15550001111 SIP/2.0\r\nVia: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKf\r\n\
          From: <sip:a@[2001:db8::1]>;tag=1\r\nTo: <tel:+15550001111>\r\nCall-ID: fz\r\nCSeq: 1 INVITE\r\n\
          Contact: <sip:a@[2001:db8::1]>\r\nContent-Type: application/sdp\r\nContent-Length: 60\r\n\r\n\
          v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=sendonly\r\n"
            .to_vec(),
    );
    seeds
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..=rng.below(8) {
        match rng.below(7) {
            0 if !m.is_empty() => {
                let i = rng.below(m.len());
                m[i] = rng.next() as u8;
            }
            1 if !m.is_empty() => {
                let len = rng.below(m.len());
                m.truncate(len);
            }
            2 => {
                let i = rng.below(m.len() + 1);
                let b = [b'\r', b'\n', b' ', b':', b';', b',', b'"', b'<', b'>', b'%', 0, 0xff];
                m.insert(i, b[rng.below(b.len())]);
            }
            3 if m.len() > 1 => {
                let i = rng.below(m.len());
                let j = rng.below(m.len());
                let (a, b) = (i.min(j), i.max(j));
                m.drain(a..b);
            }
            4 if !m.is_empty() => {
                // duplicate a slice (repeated header lines, doubled bodies)
                let i = rng.below(m.len());
                let j = (i + rng.below(64)).min(m.len());
                let slice = m[i..j].to_vec();
                let at = rng.below(m.len());
                m.splice(at..at, slice);
            }
            5 => {
                // digits overflow
                let i = rng.below(m.len() + 1);
                m.splice(i..i, b"99999999999999999999".iter().copied());
            }
            _ => {
                let i = rng.below(m.len() + 1);
                m.splice(i..i, b"\r\n ".iter().copied());
            }
        }
    }
    m
}

#[test]
fn random_and_mutated_input_never_panics() {
    let seeds = corpus();
    // More rounds or another seed on demand: PRECALL_FUZZ_ROUNDS, PRECALL_FUZZ_SEED.
    let rounds: usize =
        std::env::var("PRECALL_FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6000);
    let seed: u64 = std::env::var("PRECALL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng(seed.max(1));
    let mut ep = Endpoint::new(config(), CounterIds::default());
    let mut now = Instant::now();
    let from = "198.51.100.20:5060".parse().unwrap();
    let mut answered = 0;
    for round in 0..rounds {
        let input = if round % 5 == 0 {
            let len = rng.below(700);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        let _ = peek_call_id(&input);
        ep.handle_datagram(now, from, &input);
        while ep.poll_transmit().is_some() {}
        while let Some(event) = ep.poll_event() {
            if let Event::IncomingCall { call, .. } = event {
                // exercise the answers on whatever got through
                match rng.below(3) {
                    0 => {
                        if ep.accept(now, call, "0.0.0.0:30000".parse().unwrap()).is_ok() {
                            answered += 1;
                        }
                    }
                    1 => ep.reject(now, call, 486, "Busy Here"),
                    _ => ep.hangup(now, call),
                }
            }
        }
        now += Duration::from_millis(rng.below(900) as u64);
        ep.handle_timeout(now);
    }
    // drain every timer
    while let Some(at) = ep.poll_timeout() {
        now = now.max(at);
        ep.handle_timeout(now);
        while ep.poll_transmit().is_some() {}
        while ep.poll_event().is_some() {}
    }
    assert!(answered > 0, "some mutated INVITEs should still be valid");
    assert_eq!(ep.calls(), 0);
}
