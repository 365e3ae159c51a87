//! One call as its shard sees it: its call flow (the rules, in `precall-call`), its RTP
//! socket and sender, its agent leg, and the RTP port pool it came from.

use std::{
    collections::{HashSet, VecDeque},
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    rc::Rc,
    time::Instant,
};

use glommio::Task;
use precall_call::CallFlow;
use precall_media::{Codec, RtpSender, StreamSlot};
use precall_sip::CallHandle;
use socket2::Socket;

use crate::{
    agent_leg::Outbox,
    socket::{RtpSocket, bind_rtp},
};

/// A call of the shard: a SIP call of its endpoint, or a Twilio media stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum CallKey {
    Sip(CallHandle),
    Stream(u64),
}

/// The Twilio half of a call that came as a media stream.
#[derive(Debug)]
pub(crate) struct StreamLeg {
    /// `start.streamSid`, in every message sent.
    pub(crate) stream_sid: String,
    /// What the connection's writer sends; closing it closes the stream.
    pub(crate) outbox: Rc<Outbox>,
    /// The media clock stream, once answered.
    pub(crate) slot: Option<StreamSlot>,
    /// The shard asked for the stream to close (its outcome is being recorded).
    pub(crate) closing: bool,
}

/// The RTP half of an answered call.
#[derive(Debug)]
pub(crate) struct CallMedia {
    pub(crate) port: u16,
    /// The call's RTP socket: frames are sent on it at the call's media-clock ticks, and the
    /// caller's RTP is drained from it at the same ticks (`socket.rs`, `RecvBatch`).
    pub(crate) socket: Socket,
    /// The SDP address, used until the caller's RTP shows where it really comes from.
    pub(crate) remote: SocketAddr,
    /// Which source the caller's RTP is taken from, and our RTP sent to (strict symmetric RTP).
    pub(crate) latch: RtpLatch,
    pub(crate) codec: Codec,
    pub(crate) payload_type: u8,
    /// RFC 4733 payload type the caller offered.
    pub(crate) telephone_event: Option<u8>,
    /// The RTP timestamp of the last DTMF event reported (its end is sent three times).
    pub(crate) last_dtmf: Option<u32>,
    /// Our direction lets us send (not `recvonly`/`inactive`, no `0.0.0.0` hold address).
    pub(crate) sending: bool,
    /// The caller's last SDP puts the call on hold (`shard::caller_holds`): told to the flow
    /// when the dialog is confirmed, and at each change after.
    pub(crate) caller_holds: bool,
    pub(crate) sender: RtpSender,
    /// The media clock stream: one frame, or a skipped one, every 20 ms while answered.
    pub(crate) slot: StreamSlot,
}

impl CallMedia {
    /// Where RTP goes now: the latched source, else the SDP address.
    pub(crate) fn destination(&self) -> SocketAddr {
        self.latch.latched().unwrap_or(self.remote)
    }
}

/// What to do with one RTP packet, by where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RtpSource {
    /// From the latched source: the caller's audio.
    Latched,
    /// Before any latch, from an allowed address: taken (the caller's first words are not
    /// lost), but our RTP keeps going to the SDP address until the source is confirmed.
    Learning,
    /// From elsewhere: dropped and counted; it does not keep the call alive either.
    Rejected,
}

/// Strict symmetric RTP. The first RTP packet from *any* address used to decide where the
/// call's audio went, so one spoofed packet right after the `200 OK` took the greeting, the hold
/// audio and the agent's voice (the "RTP bleed" class: Asterisk's `strictrtp`,
/// CVE-2017-14099). Now a source is latched only
/// * when its IP is the SDP `c=` address or the INVITE's source IP (unless the source rule is
///   relaxed: `RTP_STRICT_SOURCE=false`, for trunks whose media comes from elsewhere), and
/// * after [`RtpLatch::PACKETS`] consecutive packets of one SSRC from it, with no packet from
///   the latched source in between (a NAT rebinding of the caller's own stream re-latches the
///   same way; a spoofer racing a live caller never gets consecutive packets).
#[derive(Debug, Clone)]
pub(crate) struct RtpLatch {
    allowed: [Option<IpAddr>; 2],
    strict_source: bool,
    latched: Option<SocketAddr>,
    candidate: Option<(SocketAddr, u32, u8)>,
}

impl RtpLatch {
    /// Consecutive packets of one SSRC that latch a source.
    pub(crate) const PACKETS: u8 = 3;

    /// A latch for a call whose SDP says `sdp` and whose INVITE came from `signalling`.
    pub(crate) fn new(sdp: SocketAddr, signalling: IpAddr, strict_source: bool) -> Self {
        let mut latch = Self {
            allowed: [None, Some(signalling)],
            strict_source,
            latched: None,
            candidate: None,
        };
        latch.media_changed(sdp);
        latch
    }

    /// A re-INVITE or UPDATE moved the caller's media: learn its source again.
    pub(crate) fn media_changed(&mut self, sdp: SocketAddr) {
        self.allowed[0] = Some(sdp.ip()).filter(|ip| !ip.is_unspecified());
        self.latched = None;
        self.candidate = None;
    }

    /// The latched source, if any.
    pub(crate) fn latched(&self) -> Option<SocketAddr> {
        self.latched
    }

    /// Judges one packet from `from` with `ssrc`.
    pub(crate) fn on_packet(&mut self, from: SocketAddr, ssrc: u32) -> RtpSource {
        if self.latched == Some(from) {
            self.candidate = None;
            return RtpSource::Latched;
        }
        if self.strict_source && !self.allowed.contains(&Some(from.ip())) {
            return RtpSource::Rejected;
        }
        let count = match self.candidate {
            Some((addr, s, n)) if addr == from && s == ssrc => n.saturating_add(1),
            _ => 1,
        };
        if count >= Self::PACKETS {
            self.latched = Some(from);
            self.candidate = None;
            return RtpSource::Latched;
        }
        self.candidate = Some((from, ssrc, count));
        if self.latched.is_none() { RtpSource::Learning } else { RtpSource::Rejected }
    }
}

/// The agent WebSocket of a call.
#[derive(Debug)]
pub(crate) struct AgentLeg {
    pub(crate) task: Task<()>,
    pub(crate) outbox: Rc<Outbox>,
    /// The handshake finished (so a close frame can be sent).
    pub(crate) open: bool,
}

/// One call of the shard.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) flow: CallFlow,
    /// Where the INVITE (or the stream's connection) came from (picks our RTP address when
    /// the SIP socket is a wildcard).
    pub(crate) source: SocketAddr,
    pub(crate) media: Option<CallMedia>,
    /// For a Twilio call: its media stream.
    pub(crate) stream: Option<StreamLeg>,
    pub(crate) agent: Option<AgentLeg>,
    /// The deadline of the flow that is in the shard's timer heap (older entries are stale).
    pub(crate) armed: Option<Instant>,
}

/// The shard's RTP ports: even ports of its slice (RFC 3550 §11: RTP even, RTCP the odd one
/// above), chosen at random so that a port cannot be guessed from the last one handed out (an
/// attacker aiming RTP at a call about to be answered). A port just freed rests in quarantine
/// while other ports are free: time for the cancelled receive of its old socket to reach the
/// kernel, and for the old caller's late packets to stop.
#[derive(Debug)]
pub(crate) struct PortPool {
    first: u16,
    pairs: u16,
    in_use: HashSet<u16>,
    /// Recently released ports, oldest first.
    quarantine: VecDeque<u16>,
    /// The same ports, for an O(1) "is it resting?" on every probe.
    resting: HashSet<u16>,
    quarantine_cap: usize,
    rng: u64,
}

impl PortPool {
    pub(crate) fn new(slice: RangeInclusive<u16>, seed: u64) -> Self {
        let (first, pairs) = if slice.is_empty() {
            (0, 0)
        } else {
            let pairs = (u32::from(*slice.end()) - u32::from(*slice.start())).div_ceil(2);
            (*slice.start(), u16::try_from(pairs).unwrap_or(u16::MAX))
        };
        Self {
            first,
            pairs,
            in_use: HashSet::new(),
            quarantine: VecDeque::new(),
            resting: HashSet::new(),
            // Half the pool rests at most, so a busy shard always has ports to pick from.
            quarantine_cap: usize::from(pairs / 2),
            rng: seed | 1,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: unpredictable enough from outside once seeded from the shard's random
        // ids; not a cryptographic secret (the latch, not the port, is the defence).
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Binds a free even port on `ip`, picked at random. Ports taken by other processes are
    /// skipped; quarantined ones are used only when nothing else is free.
    pub(crate) fn bind(&mut self, ip: IpAddr) -> io::Result<(u16, RtpSocket)> {
        if self.pairs == 0 {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "no RTP ports for this shard"));
        }
        let start = (self.random() % u64::from(self.pairs)) as u16;
        // Visit every pair once from a random start, with a random stride coprime with the
        // pair count; the quarantined ports go last.
        let stride = loop {
            let s = (self.random() % u64::from(self.pairs)) as u16;
            if gcd(s, self.pairs) == 1 {
                break s;
            }
        };
        let mut resting = Vec::new();
        for i in 0..self.pairs {
            let idx = (u32::from(start) + u32::from(i) * u32::from(stride)) % u32::from(self.pairs);
            let port = self.first + 2 * idx as u16;
            if self.in_use.contains(&port) {
                continue;
            }
            if self.resting.contains(&port) {
                resting.push(port);
                continue;
            }
            match self.try_bind(ip, port) {
                Ok(Some(pair)) => return Ok((port, pair)),
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        for port in resting {
            if let Some(pair) = self.try_bind(ip, port)? {
                return Ok((port, pair));
            }
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, "every RTP port of this shard is in use"))
    }

    fn try_bind(&mut self, ip: IpAddr, port: u16) -> io::Result<Option<RtpSocket>> {
        match bind_rtp(SocketAddr::new(ip, port)) {
            Ok(pair) => {
                self.in_use.insert(port);
                // Only when nothing else was free: the scan is rare.
                if self.resting.remove(&port) {
                    if let Some(at) = self.quarantine.iter().position(|p| *p == port) {
                        self.quarantine.remove(at);
                    }
                }
                Ok(Some(pair))
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Ports of the slice not held by one of this shard's calls (another process may hold
    /// some of them: then a bind finds out).
    pub(crate) fn free_pairs(&self) -> usize {
        usize::from(self.pairs).saturating_sub(self.in_use.len())
    }

    pub(crate) fn release(&mut self, port: u16) {
        if self.in_use.remove(&port) {
            self.quarantine.push_back(port);
            self.resting.insert(port);
            while self.quarantine.len() > self.quarantine_cap {
                if let Some(out) = self.quarantine.pop_front() {
                    self.resting.remove(&out);
                }
            }
        }
    }
}

fn gcd(a: u16, b: u16) -> u16 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ports_are_even_random_skip_taken_ones_and_rest_after_release() {
        glommio::LocalExecutor::default().run(async {
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            // An even port held by someone else (a plain socket, no SO_REUSEPORT).
            let (_held, base) = loop {
                let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
                let port = s.local_addr().unwrap().port();
                if port.is_multiple_of(2) && port < 65530 {
                    break (s, port);
                }
            };
            let mut pool = PortPool::new(base..=base + 5, 7);
            let (a, _sa) = pool.bind(ip).unwrap();
            let (b, _sb) = pool.bind(ip).unwrap();
            assert!(a.is_multiple_of(2) && b.is_multiple_of(2) && a != b, "{a} {b}");
            assert!(![a, b].contains(&base), "the held port {base} was handed out");
            // All three pairs used (one held elsewhere): the pool is exhausted.
            assert_eq!(pool.bind(ip).unwrap_err().kind(), io::ErrorKind::AddrInUse);
            // A released port comes back when it is the only one left.
            pool.release(a);
            drop(_sa);
            assert_eq!(pool.bind(ip).unwrap().0, a);
        });
    }

    #[test]
    fn the_next_port_cannot_be_told_from_the_last_and_a_freed_one_rests() {
        glommio::LocalExecutor::default().run(async {
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let mut pool = PortPool::new(47000..=47199, 99);
            let mut held = Vec::new();
            let mut ports = Vec::new();
            for _ in 0..20 {
                let (port, pair) = pool.bind(ip).unwrap();
                ports.push(port);
                held.push(pair);
            }
            // Not handed out in order: the steps between consecutive ports vary.
            let steps: HashSet<i32> =
                ports.windows(2).map(|w| i32::from(w[1]) - i32::from(w[0])).collect();
            assert!(steps.len() > 3, "predictable ports: {ports:?}");
            // A port just released is not handed out again while others are free.
            let freed = ports[0];
            pool.release(freed);
            drop(held.remove(0));
            for _ in 0..30 {
                let (port, pair) = pool.bind(ip).unwrap();
                assert_ne!(port, freed, "a freed port came back at once");
                held.push(pair);
            }
        });
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_latches_after_consecutive_packets_from_an_allowed_address() {
        let caller = addr("192.0.2.10:4000");
        let mut latch = RtpLatch::new(caller, "192.0.2.10".parse().unwrap(), true);
        // A spoofer elsewhere never gets in, however much it sends.
        let spoof = addr("203.0.113.66:5000");
        for _ in 0..10 {
            assert_eq!(latch.on_packet(spoof, 1), RtpSource::Rejected);
        }
        assert_eq!(latch.latched(), None);
        // The caller's first packets are taken, and the third latches.
        assert_eq!(latch.on_packet(caller, 7), RtpSource::Learning);
        assert_eq!(latch.on_packet(caller, 7), RtpSource::Learning);
        assert_eq!(latch.on_packet(caller, 7), RtpSource::Latched);
        assert_eq!(latch.latched(), Some(caller));
        // A NAT rebinding (same IP, new port) re-latches after three consecutive packets...
        let rebound = addr("192.0.2.10:4100");
        assert_eq!(latch.on_packet(rebound, 7), RtpSource::Rejected);
        assert_eq!(latch.on_packet(rebound, 7), RtpSource::Rejected);
        assert_eq!(latch.on_packet(rebound, 7), RtpSource::Latched);
        assert_eq!(latch.latched(), Some(rebound));
        // ...but a second source racing the live one never does.
        let racer = addr("192.0.2.10:4200");
        for _ in 0..10 {
            assert_eq!(latch.on_packet(racer, 9), RtpSource::Rejected);
            assert_eq!(latch.on_packet(rebound, 7), RtpSource::Latched);
        }
        // Nor does one that changes SSRC at every packet.
        for ssrc in 0..10 {
            assert_eq!(latch.on_packet(racer, ssrc), RtpSource::Rejected);
        }
        assert_eq!(latch.latched(), Some(rebound));
    }

    #[test]
    fn the_invite_source_is_allowed_and_the_relaxed_rule_allows_any() {
        let sdp = addr("198.51.100.5:30000");
        let mut latch = RtpLatch::new(sdp, "192.0.2.1".parse().unwrap(), true);
        let from_proxy_ip = addr("192.0.2.1:30000");
        for _ in 0..3 {
            latch.on_packet(from_proxy_ip, 1);
        }
        assert_eq!(latch.latched(), Some(from_proxy_ip));
        // A re-INVITE forgets the latch; the relaxed rule takes media from anywhere, still only
        // after consecutive packets.
        let mut relaxed = RtpLatch::new(sdp, "192.0.2.1".parse().unwrap(), false);
        let media_server = addr("203.0.113.9:40000");
        assert_eq!(relaxed.on_packet(media_server, 3), RtpSource::Learning);
        relaxed.on_packet(media_server, 3);
        assert_eq!(relaxed.on_packet(media_server, 3), RtpSource::Latched);
        latch.media_changed(addr("0.0.0.0:0"));
        assert_eq!(latch.latched(), None);
        assert_eq!(latch.on_packet(addr("198.51.100.5:30000"), 1), RtpSource::Rejected);
    }

    #[test]
    fn an_empty_slice_has_no_ports() {
        let mut pool = PortPool::new(RangeInclusive::new(1, 0), 1);
        assert!(pool.bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).is_err());
    }
}
