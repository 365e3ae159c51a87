//! One call as its shard sees it: where it stands in the call flow, its RTP socket and
//! playout, and the RTP port pool it came from.

use std::{
    cell::Cell,
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    rc::Rc,
    time::{Duration, Instant},
};

use glommio::Task;
use precall_api::CallId;
use precall_media::{Codec, Playout, RtpSender, StreamSlot};
use socket2::Socket;

use crate::{
    control::MediaPlan,
    socket::{UdpPair, bind_rtp},
};

/// Where a call is in the flow of issue 4 point 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// INVITE received (100 Trying sent), waiting for the control plane's plan.
    AwaitingPlan,
    /// Answered; greeting then hold, with a status check every poll interval.
    Holding,
    /// The controller says connect; the agent bridge does not exist yet, so the call keeps
    /// holding until the caller hangs up.
    Connected,
    /// Playing the error clip; BYE follows when it ends.
    Ending,
    /// BYE sent (or the final response): waiting for the SIP layer to end the call.
    HangingUp,
}

/// What the per-call RTP receive task records, read by the shard loop. Shard-local
/// (`Rc` + `Cell`): the task and the loop run on the same thread.
#[derive(Debug)]
pub(crate) struct RtpIn {
    /// Source of the caller's first RTP packet: symmetric RTP sends there from then on.
    pub(crate) latched: Cell<Option<SocketAddr>>,
    /// Arrival of the last RTP packet (the answer time until one arrives).
    pub(crate) last: Cell<Instant>,
}

impl RtpIn {
    pub(crate) fn new(now: Instant) -> Self {
        Self { latched: Cell::new(None), last: Cell::new(now) }
    }

    pub(crate) fn arrived(&self, now: Instant, from: SocketAddr) {
        self.last.set(now);
        if self.latched.get().is_none() {
            self.latched.set(Some(from));
        }
    }
}

/// The media half of an answered call.
#[derive(Debug)]
pub(crate) struct CallMedia {
    pub(crate) port: u16,
    /// The sending duplicate of the RTP socket (see `socket.rs`).
    pub(crate) send: Socket,
    /// Receives the caller's RTP into `rx`; dropping it cancels the receive.
    pub(crate) _receiver: Task<()>,
    pub(crate) rx: Rc<RtpIn>,
    /// The SDP address, used until the caller's RTP shows where it really comes from.
    pub(crate) remote: SocketAddr,
    pub(crate) codec: Codec,
    pub(crate) payload_type: u8,
    /// Our direction lets us send (not `recvonly`/`inactive`, no `0.0.0.0` hold address).
    pub(crate) sending: bool,
    pub(crate) sender: RtpSender,
    pub(crate) playout: Playout,
    /// The media clock stream, while something plays.
    pub(crate) slot: Option<StreamSlot>,
}

impl CallMedia {
    /// Where RTP goes now: the latched source, else the SDP address.
    pub(crate) fn destination(&self) -> SocketAddr {
        self.rx.latched.get().unwrap_or(self.remote)
    }
}

/// One call of the shard.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) call_id: CallId,
    pub(crate) phase: Phase,
    /// Where the INVITE came from (picks our RTP address when the SIP socket is a wildcard).
    pub(crate) source: SocketAddr,
    /// The control plane knows the call (its `inbound` was queued): report its end.
    pub(crate) announced: bool,
    pub(crate) media: Option<CallMedia>,
    /// Kept from the last plan: the error clip is what a hang-up plays.
    pub(crate) clips: MediaPlan,
    pub(crate) poll_interval: Option<Duration>,
    /// The due time of the one live poll timer (older heap entries are stale).
    pub(crate) poll_at: Option<Instant>,
    pub(crate) poll_in_flight: bool,
    /// Past this, a call whose status checks keep failing is ended by the shard itself
    /// (the controller's `hold_remaining` plus one interval of grace).
    pub(crate) hold_deadline: Option<Instant>,
    /// The reason reported to the control plane when the SIP layer ends the call, when the
    /// shard chose it (`rtp_timeout`, `failed`, ...).
    pub(crate) end_reason: Option<&'static str>,
}

impl Call {
    pub(crate) fn new(call_id: CallId, source: SocketAddr) -> Self {
        Self {
            call_id,
            phase: Phase::AwaitingPlan,
            source,
            announced: false,
            media: None,
            clips: MediaPlan::default(),
            poll_interval: None,
            poll_at: None,
            poll_in_flight: false,
            hold_deadline: None,
            end_reason: None,
        }
    }
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
