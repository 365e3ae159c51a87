//! The scale-out front as shipped: Debian's real `kamailio` runs `deploy/kamailio/kamailio.cfg`
//! with only its `listen=` line and its dispatcher list adapted, in front of two `precall`
//! nodes on loopback, and the real SIPp places calls through it (`benches/sipp/uac_hold.xml`,
//! whose ACK and BYE follow the Record-Route set).
//!
//! What must hold: calls spread over both nodes by Call-ID; one node drained (SIGTERM) under
//! load finishes every call it has; every call placed after that lands on the other node, the
//! drained one answering 503 to INVITEs and probes until it stops by itself, then not at all.

mod support;

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::precall::Precall;
use support::{free_udp_port, wait_for};

const SCENARIO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/sipp/uac_hold.xml");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kamailio/kamailio.cfg");

/// A running `kamailio` in a process group of its own (it forks its workers), the whole group
/// killed when dropped.
struct Kamailio {
    child: Child,
    log: PathBuf,
}

impl Kamailio {
    /// Starts the shipped configuration on `127.0.0.1:port` with `nodes` as dispatcher set 1.
    fn start(dir: &Path, port: u16, nodes: &[u16]) -> Self {
        let list = dir.join("dispatcher.list");
        let entries: String = nodes.iter().map(|p| format!("1 sip:127.0.0.1:{p} 0 0\n")).collect();
        std::fs::write(&list, entries).unwrap();
        let shipped = std::fs::read_to_string(CONFIG).unwrap();
        // Exactly the two adaptations the file's header allows.
        assert_eq!(shipped.matches("\nlisten=").count(), 1, "one listen= line");
        let list_param = r#""list_file", "/etc/kamailio/dispatcher.list""#;
        assert_eq!(shipped.matches(list_param).count(), 1, "one dispatcher list_file");
        let config: String = shipped
            .lines()
            .map(|l| {
                if l.starts_with("listen=") {
                    format!("listen=udp:127.0.0.1:{port}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace(list_param, &format!(r#""list_file", "{}""#, list.display()));
        let cfg = dir.join("kamailio.cfg");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("kamailio.log");
        let child = Command::new("kamailio")
            .process_group(0)
            // In the foreground, logging to stderr, with its runtime files in our folder.
            .args(["-DD", "-E", "-m", "64", "-M", "8", "-f"])
            .arg(&cfg)
            .arg("-Y")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("kamailio is not installed: `bash tests/run.sh` installs it");
        Self { child, log }
    }

    /// What Kamailio logged so far (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // SAFETY: the group is our own child's (process_group(0): its pid is the group id).
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// SIPp placing `calls` calls of `hold_ms` through the proxy at `rate` per second.
fn sipp(proxy: u16, media: u16, calls: u32, rate: u32, hold_ms: u32, dir: &Path) -> Child {
    let scenario = std::fs::read_to_string(SCENARIO).unwrap().replace(
        r#"<pause milliseconds="3000"/>"#,
        &format!(r#"<pause milliseconds="{hold_ms}"/>"#),
    );
    let path = dir.join(format!("uac-{hold_ms}.xml"));
    std::fs::write(&path, scenario).unwrap();
    support::sipp(&format!("127.0.0.1:{proxy}"), &path, media, calls, rate, 60)
        .current_dir(dir)
        .spawn()
        .expect("run sipp")
}

#[test]
fn kamailio_spreads_calls_and_a_drained_node_hands_new_calls_to_the_other() {
    let dir = std::env::temp_dir().join(format!("precall-kamailio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = |rtp: u32| {
        Precall::start(&[
            ("SIP_PORT", free_udp_port().to_string()),
            ("RTP_PORT_MIN", rtp.to_string()),
            ("RTP_PORT_MAX", (rtp + 999).to_string()),
            ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
            ("DRAIN_TIMEOUT_MS", "30000".to_owned()),
        ])
    };
    let (a, b) = (node(46000), node(47000));
    let proxy = free_udp_port();
    let kamailio = Kamailio::start(&dir, proxy, &[a.sip_port, b.sip_port]);

    // The proxy answers its own probes once it is up (200: its nodes are active).
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let me = probe.local_addr().unwrap().port();
    let options = |n: u32| {
        format!(
            "OPTIONS sip:127.0.0.1:{proxy} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKkam{n};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:carrier@127.0.0.1>;tag=k{n}\r\n\
             To: <sip:127.0.0.1:{proxy}>\r\nCall-ID: kam-probe-{n}@test\r\nCSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    let mut n = 0;
    wait_for("kamailio to answer OPTIONS", Duration::from_secs(10), || {
        n += 1;
        probe.send_to(options(n).as_bytes(), ("127.0.0.1", proxy)).unwrap();
        let mut buf = [0u8; 2048];
        let len = probe.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..len]).starts_with("SIP/2.0 200").then_some(())
    });

    // 40 calls of 8 s through the proxy: both nodes get a share.
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port();
    let first = sipp(proxy, media_port, 40, 20, 8000, &dir);
    let (on_a, on_b) = wait_for("40 calls up over the two nodes", Duration::from_secs(20), || {
        let (on_a, on_b) = (a.metric("precall_active_calls"), b.metric("precall_active_calls"));
        (on_a + on_b == 40).then_some((on_a, on_b))
    });
    // A hash over 40 random Call-IDs: fewer than 5 on one side has odds under 1 in 10^6.
    assert!(on_a >= 5 && on_b >= 5, "calls not spread: {on_a} on a, {on_b} on b");

    // Drain node a under load.
    a.sigterm();
    wait_for("node a to say draining", Duration::from_secs(5), || {
        let (status, body) = a.get("/health");
        (status == 503 && body.contains("draining")).then_some(())
    });
    // 30 new calls while a drains: each lands on b (a refuses with 503, Kamailio fails over
    // and takes a out; once a has stopped, its probes time out).
    let second = sipp(proxy, media_port, 30, 15, 1000, &dir);
    let second = second.wait_with_output().unwrap();
    assert_eq!(
        second.status.code(),
        Some(0),
        "calls placed during the drain failed: {}\n{}",
        String::from_utf8_lossy(&second.stderr),
        kamailio.log()
    );
    // Every call a had finishes as its caller ends it: SIPp saw no failed call.
    let first = first.wait_with_output().unwrap();
    assert_eq!(
        first.status.code(),
        Some(0),
        "a call was dropped by the drain: {}\n{}",
        String::from_utf8_lossy(&first.stderr),
        kamailio.log()
    );
    // a stops by itself once its calls are over, well before its drain timeout.
    assert!(a.wait_exit(Duration::from_secs(15)).success());
    // b ended its own share of the first calls and every one of the second.
    let expected = on_b + 30;
    wait_for("b to record its calls", Duration::from_secs(10), || {
        (b.metric("precall_calls_total") == expected).then_some(())
    });
    assert!(b.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
