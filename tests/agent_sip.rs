//! The product's path end to end, as a carrier would drive it: the real `precall` binary, the
//! real SIPp placing a call whose caller audio is a pcap (Debian's sip-tester ships
//! `/usr/share/sip-tester/g711a.pcap`: 7 s of PCMA speech), the clone completing while the
//! caller holds, and a strict fake agent behind `AGENT_WS_URL`. The agent must hear the
//! caller's words (compared by content with the pcap), the caller must hear the agent as paced
//! RTP (captured with tshark on the loopback), and the agent's close ends the call with BYE.

mod support;

#[path = "support/fake_agent.rs"]
mod fake_agent;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use fake_agent::{Behaviour, FakeAgent, TONE_A_HZ, frequency};
use precall_media::{Codec, RtpPacket};
use support::precall::Precall;
use support::{free_udp_port, wait_for};

const SCENARIO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/sipp/uac_agent.xml");
const CALLER_PCAP: &str = "/usr/share/sip-tester/g711a.pcap";

/// The UDP payloads of a classic pcap file (Ethernet link type), with their capture times.
fn pcap_udp(bytes: &[u8]) -> Vec<(f64, Vec<u8>)> {
    assert!(bytes.len() >= 24 && bytes[..4] == [0xd4, 0xc3, 0xb2, 0xa1], "a little-endian pcap");
    let u32le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut at = 24;
    let mut out = Vec::new();
    while at + 16 <= bytes.len() {
        let (sec, usec, len) =
            (u32le(&bytes[at..]), u32le(&bytes[at + 4..]), u32le(&bytes[at + 8..]) as usize);
        let frame = &bytes[at + 16..(at + 16 + len).min(bytes.len())];
        at += 16 + len;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            continue;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let udp = &frame[14 + ihl..];
        out.push((f64::from(sec) + f64::from(usec) / 1e6, udp[8..].to_vec()));
    }
    out
}

/// The best normalised correlation of `probe` against `reference` at any offset.
fn best_match(reference: &[i16], probe: &[i16]) -> f64 {
    let energy = |s: &[i16]| s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let pe = energy(probe);
    (0..reference.len().saturating_sub(probe.len()))
        .step_by(1)
        .map(|off| {
            let r = &reference[off..off + probe.len()];
            let dot: f64 = r.iter().zip(probe).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            dot / (energy(r) * pe).max(1.0)
        })
        .fold(f64::MIN, f64::max)
}

#[test]
fn sipp_caller_from_a_pcap_talks_to_the_agent_and_the_agent_hangs_up() {
    for tool in ["sipp", "tshark"] {
        let found = Command::new(tool)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(found, "{tool} is not installed: `bash tests/run.sh` installs it");
    }
    assert!(
        std::path::Path::new(CALLER_PCAP).exists(),
        "{CALLER_PCAP} missing: sip-tester ships it"
    );
    let agent = FakeAgent::start(Behaviour::Talk);
    let sip_port = free_udp_port();
    let precall = Precall::start(&[
        ("SIP_PORT", sip_port.to_string()),
        ("RTP_PORT_MIN", "43000".to_owned()),
        ("RTP_PORT_MAX", "43999".to_owned()),
        ("STATUS_POLL_INTERVAL_MS", "200".to_owned()),
        ("SIMULATED_CLONE_DELAY_MS", "300".to_owned()),
        ("AGENT_WS_URL", format!("ws://{}/v1/convai/conversation", agent.addr)),
    ]);

    // What the caller hears arrives at SIPp's media port: capture it there.
    let media_port = free_udp_port();
    let capture = std::env::temp_dir().join(format!("precall-agent-{}.pcap", std::process::id()));
    let mut tshark = Command::new("tshark")
        .args(["-i", "lo", "-F", "pcap", "-w"])
        .arg(&capture)
        .args(["-f", &format!("udp dst port {media_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tshark");
    let mut err = BufReader::new(tshark.stderr.take().unwrap());
    wait_for("tshark to capture", Duration::from_secs(20), || {
        let mut line = String::new();
        match err.read_line(&mut line) {
            Ok(0) => panic!("tshark exited before capturing"),
            _ => line.contains("Capturing on").then_some(()),
        }
    });
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));

    let out = Command::new("sipp")
        .arg(format!("127.0.0.1:{sip_port}"))
        .args(["-sf", SCENARIO, "-i", "127.0.0.1", "-p", &free_udp_port().to_string()])
        .args(["-mp", &media_port.to_string(), "-m", "1", "-timeout", "60s", "-timeout_error"])
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run sipp");
    // SAFETY: our own child's pid, not yet reaped.
    unsafe { libc::kill(tshark.id() as libc::pid_t, libc::SIGINT) };
    let _ = tshark.wait();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the call failed (precall's BYE missing?): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The agent: no protocol violation, the cloned voice, and the caller's words.
    let log = agent.log.lock().unwrap();
    assert!(log.violations.is_empty(), "protocol violations: {:?}", log.violations);
    assert!(
        log.init.as_ref().unwrap()["conversation_config_override"]["tts"]["voice_id"]
            .as_str()
            .unwrap()
            .starts_with("sim-")
    );
    let reference: Vec<i16> = pcap_udp(&std::fs::read(CALLER_PCAP).unwrap())
        .iter()
        .filter_map(|(_, d)| RtpPacket::new_checked(&d[..]).ok().map(|p| p.payload().to_vec()))
        .flatten()
        .map(|b| Codec::Pcma.decode(b))
        .collect();
    let heard: Vec<i16> = log.heard.iter().map(|&b| Codec::Pcmu.decode(b)).collect();
    let start =
        heard.iter().position(|&s| s.unsigned_abs() > 2000).expect("the agent heard the caller");
    let probe = &heard[start..(start + 4000).min(heard.len())];
    let score = best_match(&reference, probe);
    assert!(score > 0.95, "what the agent heard matches the caller's pcap only {score:.3}");
    drop(log);

    // The caller: one RTP stream, continuous, paced at 20 ms, with the agent's tone in it.
    let packets = pcap_udp(&std::fs::read(&capture).unwrap());
    let _ = std::fs::remove_file(&capture);
    let rtp: Vec<(f64, u16, u32, Vec<u8>)> = packets
        .iter()
        .filter_map(|(t, d)| {
            RtpPacket::new_checked(&d[..])
                .ok()
                .map(|p| (*t, p.sequence().0, p.timestamp().0, p.payload().to_vec()))
        })
        .collect();
    assert!(rtp.len() > 100, "{} RTP packets reached the caller", rtp.len());
    for w in rtp.windows(2) {
        assert_eq!(w[1].1, w[0].1.wrapping_add(1), "sequence gap");
        let step = w[1].2.wrapping_sub(w[0].2);
        assert!(step >= 160 && step % 160 == 0, "timestamp step {step}");
    }
    let span = rtp.last().unwrap().0 - rtp[0].0;
    let rate = (rtp.len() - 1) as f64 / span;
    assert!((45.0..=55.0).contains(&rate), "{rate:.1} packets/s");
    let agent_frames = rtp
        .iter()
        .filter(|p| (TONE_A_HZ - 100.0..TONE_A_HZ + 100.0).contains(&frequency(Codec::Pcma, &p.3)))
        .count();
    assert!(agent_frames >= 8, "the caller heard {agent_frames} frames of the agent");
    assert!(precall.stop().success());
}
