//! One call as its shard sees it: its call flow (the rules, in `precall-call`), its RTP
//! socket and sender, its agent leg, and the RTP port pool it came from.

use std::{
    collections::HashSet,
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
    socket::{UdpPair, bind_rtp},
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
    /// The sending duplicate of the RTP socket (see `socket.rs`).
    pub(crate) send: Socket,
    /// Receives the caller's RTP; dropping it cancels the receive.
    pub(crate) _receiver: Task<()>,
    /// The SDP address, used until the caller's RTP shows where it really comes from.
    pub(crate) remote: SocketAddr,
    /// Source of the caller's first RTP packet: symmetric RTP sends there from then on.
    pub(crate) latched: Option<SocketAddr>,
    pub(crate) codec: Codec,
    pub(crate) payload_type: u8,
    /// RFC 4733 payload type the caller offered.
    pub(crate) telephone_event: Option<u8>,
    /// The RTP timestamp of the last DTMF event reported (its end is sent three times).
    pub(crate) last_dtmf: Option<u32>,
    /// Our direction lets us send (not `recvonly`/`inactive`, no `0.0.0.0` hold address).
    pub(crate) sending: bool,
    pub(crate) sender: RtpSender,
    /// The media clock stream: one frame, or a skipped one, every 20 ms while answered.
    pub(crate) slot: StreamSlot,
}

impl CallMedia {
    /// Where RTP goes now: the latched source, else the SDP address.
    pub(crate) fn destination(&self) -> SocketAddr {
        self.latched.unwrap_or(self.remote)
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
/// above), handed out round-robin so a port just freed is reused last. That leaves time for
/// the cancelled receive of its old socket to reach the kernel, and for the old caller's late
/// packets to stop.
#[derive(Debug)]
pub(crate) struct PortPool {
    first: u16,
    pairs: u16,
    next: u16,
    in_use: HashSet<u16>,
}

impl PortPool {
    pub(crate) fn new(slice: RangeInclusive<u16>) -> Self {
        let (first, pairs) = if slice.is_empty() {
            (0, 0)
        } else {
            let pairs = (u32::from(*slice.end()) - u32::from(*slice.start())).div_ceil(2);
            (*slice.start(), u16::try_from(pairs).unwrap_or(u16::MAX))
        };
        Self { first, pairs, next: 0, in_use: HashSet::new() }
    }

    /// Binds the next free even port on `ip`. Ports taken by other processes are skipped.
    pub(crate) fn bind(&mut self, ip: IpAddr) -> io::Result<(u16, UdpPair)> {
        for _ in 0..self.pairs {
            let port = self.first + 2 * self.next;
            self.next = (self.next + 1) % self.pairs;
            if self.in_use.contains(&port) {
                continue;
            }
            match bind_rtp(SocketAddr::new(ip, port)) {
                Ok(pair) => {
                    self.in_use.insert(port);
                    return Ok((port, pair));
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, "every RTP port of this shard is in use"))
    }

    pub(crate) fn release(&mut self, port: u16) {
        self.in_use.remove(&port);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ports_are_even_round_robin_and_skip_taken_ones() {
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
            let mut pool = PortPool::new(base..=base + 5);
            let (a, _sa) = pool.bind(ip).unwrap();
            let (b, _sb) = pool.bind(ip).unwrap();
            assert!(a.is_multiple_of(2) && b.is_multiple_of(2) && a != b, "{a} {b}");
            assert!(![a, b].contains(&base), "the held port {base} was handed out");
            // All three pairs used (one held elsewhere): the pool is exhausted.
            assert_eq!(pool.bind(ip).unwrap_err().kind(), io::ErrorKind::AddrInUse);
            // A released port comes back, but only after the others (round robin).
            pool.release(a);
            drop(_sa);
            assert_eq!(pool.bind(ip).unwrap().0, a);
        });
    }

    #[test]
    fn an_empty_slice_has_no_ports() {
        let mut pool = PortPool::new(RangeInclusive::new(1, 0));
        assert!(pool.bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).is_err());
    }
}
