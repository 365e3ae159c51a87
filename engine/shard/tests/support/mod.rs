//! The raw-SIP caller the engine tests share: one UDP socket speaking just enough SIP to
//! place, acknowledge and end calls, with waits bounded by a deadline.
#![allow(dead_code)]

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// A caller speaking raw SIP from one UDP socket.
pub struct Uac {
    pub sip: UdpSocket,
    pub server: SocketAddr,
    pub branch: u32,
}

/// What the caller knows about one call.
pub struct Dialog {
    pub call_id: String,
    pub from_tag: String,
    pub to_tag: String,
    /// The 200 OK's Contact URI: where in-dialog requests go.
    pub target: String,
    pub answer_sdp: String,
}

pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines()
        .find(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l[name.len()..].starts_with(':')
        })
        .map(|l| l[name.len() + 1..].trim())
}

pub fn status(msg: &str) -> Option<u16> {
    msg.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

impl Uac {
    pub fn new(server: SocketAddr) -> Self {
        let sip = UdpSocket::bind("127.0.0.1:0").unwrap();
        sip.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Self { sip, server, branch: 0 }
    }

    pub fn port(&self) -> u16 {
        self.sip.local_addr().unwrap().port()
    }

    pub fn next_branch(&mut self) -> String {
        self.branch += 1;
        format!("z9hG4bKuac{}x{}", self.port(), self.branch)
    }

    pub fn send(&self, msg: &str) {
        self.sip.send_to(msg.as_bytes(), self.server).unwrap();
    }

    /// The next SIP message matching `pred`, others skipped.
    pub fn recv_until(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = vec![0u8; 65536];
        loop {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if let Ok((n, _)) = self.sip.recv_from(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if pred(&msg) {
                    return msg;
                }
            }
        }
    }

    pub fn send_invite(&mut self, call_id: &str, rtp_port: u16) -> (String, String) {
        let branch = self.next_branch();
        let from_tag = format!("tag{}", self.branch);
        let sdp = format!(
            "v=0\r\no=carrier 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {rtp_port} RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
        );
        let port = self.port();
        let server = self.server;
        self.send(&format!(
            "INVITE sip:+18005551212@{server} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:+12345678901@127.0.0.1>;tag={from_tag}\r\n\
             To: <sip:+18005551212@{server}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n\
             Contact: <sip:caller@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        ));
        (branch, from_tag)
    }

    /// INVITE with a carrier-style offer; returns the dialog once the 200 OK is in (not ACKed).
    pub fn invite(&mut self, call_id: &str, rtp_port: u16) -> Dialog {
        let (_branch, from_tag) = self.send_invite(call_id, rtp_port);
        let ok = self.recv_until("200 OK to the INVITE", |m| {
            status(m) == Some(200)
                && header(m, "Call-ID") == Some(call_id)
                && header(m, "CSeq").is_some_and(|c| c.ends_with("INVITE"))
        });
        dialog_from(ok, call_id, from_tag)
    }

    pub fn ack(&mut self, d: &Dialog) {
        let branch = self.next_branch();
        let port = self.port();
        self.send(&format!(
            "ACK {} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\nMax-Forwards: 70\r\n\
             From: <sip:+12345678901@127.0.0.1>;tag={}\r\nTo: <sip:+18005551212@{}>;tag={}\r\n\
             Call-ID: {}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            d.target, d.from_tag, self.server, d.to_tag, d.call_id
        ));
    }

    /// Waits for precall's BYE and answers it 200 OK.
    pub fn await_bye(&self, call_id: &str) {
        let bye = self.recv_until("precall's BYE", |m| {
            m.starts_with("BYE ") && header(m, "Call-ID") == Some(call_id)
        });
        let mut ok = String::from("SIP/2.0 200 OK\r\n");
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            ok.push_str(&format!("{name}: {}\r\n", header(&bye, name).unwrap()));
        }
        ok.push_str("Content-Length: 0\r\n\r\n");
        self.send(&ok);
    }

    pub fn bye(&mut self, d: &Dialog) -> String {
        let branch = self.next_branch();
        let port = self.port();
        self.send(&format!(
            "BYE {} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\nMax-Forwards: 70\r\n\
             From: <sip:+12345678901@127.0.0.1>;tag={}\r\nTo: <sip:+18005551212@{}>;tag={}\r\n\
             Call-ID: {}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            d.target, d.from_tag, self.server, d.to_tag, d.call_id
        ));
        let call_id = d.call_id.clone();
        self.recv_until("the answer to BYE", move |m| {
            status(m).is_some()
                && header(m, "Call-ID") == Some(call_id.as_str())
                && header(m, "CSeq").is_some_and(|c| c.ends_with("BYE"))
        })
    }
}

pub fn dialog_from(ok: String, call_id: &str, from_tag: String) -> Dialog {
    let to = header(&ok, "To").unwrap();
    let to_tag = to.split(";tag=").nth(1).unwrap().split(';').next().unwrap().to_owned();
    let contact = header(&ok, "Contact").unwrap();
    let target = contact.trim_start_matches('<').split('>').next().unwrap().to_owned();
    let answer_sdp = ok.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Dialog { call_id: call_id.to_owned(), from_tag, to_tag, target, answer_sdp }
}

/// The `m=audio` port of an SDP body.
pub fn sdp_port(sdp: &str) -> u16 {
    let m = sdp.lines().find(|l| l.starts_with("m=audio ")).expect("m=audio line");
    m.split(' ').nth(1).unwrap().parse().unwrap()
}
