//! INVITE client transaction (RFC 3261 §17.1.1, with RFC 6026's Accepted state), used for the
//! re-INVITE that refreshes a session when the caller does not allow UPDATE.
//!
//! ```text
//!  Calling --1xx--> Proceeding --final--> Done --Timer D / 64*T1--> Terminated
//!    Timer A: resend (T1 doubling); Timer B (64*T1 from the start): timed out
//! ```
//!
//! Done covers both endings: after a non-2xx the ACK is part of the transaction (§17.1.1.3,
//! same branch, kept for Timer D = 32 s); after a 2xx the TU's ACK is a request of its own
//! (§13.2.2.4, new branch), resent to every retransmitted 2xx for 64*T1 (RFC 6026 §8.4). Either
//! way a repeated final response gets the stored ACK again. Unlike §17.1.1.2, Timer B also
//! bounds Proceeding: a refresh that is never answered is a dead session either way.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::TimerEffect;
use crate::call::CallHandle;
use crate::timers::TimerValues;

/// Timer D over UDP (§17.1.1.2: at least 32 s).
const TIMER_D: Duration = Duration::from_secs(32);

#[derive(Debug)]
enum State {
    Calling { a_at: Instant, a_interval: Duration },
    Proceeding,
    Done { until: Instant },
    Terminated,
}

/// What a response did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InviteResponse {
    Provisional,
    /// The first final response: the TU builds the ACK ([`ClientInvite::acked`]).
    Final(u16),
    /// A repeated final response: send the stored ACK again.
    ResendAck,
    /// Nothing to do.
    Absorbed,
}

#[derive(Debug)]
pub(crate) struct ClientInvite {
    pub call: CallHandle,
    /// Our Via branch: the key of `Endpoint::client_index`.
    pub branch: String,
    pub dest: SocketAddr,
    pub cseq: u32,
    request: Vec<u8>,
    ack: Vec<u8>,
    b_at: Instant,
    state: State,
}

impl ClientInvite {
    pub fn start(
        now: Instant,
        t: &TimerValues,
        call: CallHandle,
        branch: String,
        cseq: u32,
        dest: SocketAddr,
        request: Vec<u8>,
    ) -> Self {
        Self {
            call,
            branch,
            dest,
            cseq,
            request,
            ack: Vec::new(),
            b_at: now + t.t1x64(),
            state: State::Calling { a_at: now + t.t1, a_interval: t.t1 },
        }
    }

    pub fn request(&self) -> &[u8] {
        &self.request
    }

    pub fn ack(&self) -> &[u8] {
        &self.ack
    }

    pub fn on_response(&mut self, now: Instant, t: &TimerValues, code: u16) -> InviteResponse {
        match self.state {
            State::Calling { .. } | State::Proceeding if code < 200 => {
                self.state = State::Proceeding;
                InviteResponse::Provisional
            }
            State::Calling { .. } | State::Proceeding => {
                let keep = if code < 300 { t.t1x64() } else { TIMER_D };
                self.state = State::Done { until: now + keep };
                InviteResponse::Final(code)
            }
            State::Done { .. } if code >= 200 => InviteResponse::ResendAck,
            State::Done { .. } | State::Terminated => InviteResponse::Absorbed,
        }
    }

    /// The ACK the TU sent for the final response, resent to its retransmissions.
    pub fn acked(&mut self, ack: Vec<u8>) {
        self.ack = ack;
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Calling { a_at, .. } => Some(a_at.min(self.b_at)),
            State::Proceeding => Some(self.b_at),
            State::Done { until } => Some(until),
            State::Terminated => None,
        }
    }

    pub fn poll_timer(&mut self, now: Instant) -> Option<TimerEffect> {
        match &mut self.state {
            State::Calling { .. } | State::Proceeding if self.b_at <= now => {
                self.state = State::Terminated;
                Some(TimerEffect::TimedOut)
            }
            State::Calling { a_at, a_interval } if *a_at <= now => {
                // §17.1.1.2: Timer A doubles without the T2 cap.
                *a_interval *= 2;
                *a_at += *a_interval;
                Some(TimerEffect::Retransmit)
            }
            State::Done { until } if *until <= now => {
                self.state = State::Terminated;
                Some(TimerEffect::Terminated)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TimerValues {
        TimerValues {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }

    #[test]
    fn timer_a_doubles_until_timer_b() {
        let t0 = Instant::now();
        let mut c = ClientInvite::start(
            t0,
            &t(),
            CallHandle(1),
            "z9hG4bKx".to_owned(),
            2,
            "192.0.2.1:5060".parse().unwrap(),
            vec![1],
        );
        let mut resent = Vec::new();
        while let Some(at) = c.next_deadline() {
            match c.poll_timer(at) {
                Some(TimerEffect::Retransmit) => resent.push((at - t0).as_millis()),
                Some(TimerEffect::TimedOut) => {
                    assert_eq!((at - t0).as_secs(), 32);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(resent, vec![500, 1500, 3500, 7500, 15500, 31500]);
    }

    #[test]
    fn final_answers_are_acked_once_and_their_repeats_again() {
        let t0 = Instant::now();
        let mut c = ClientInvite::start(
            t0,
            &t(),
            CallHandle(1),
            "z9hG4bKx".to_owned(),
            2,
            "192.0.2.1:5060".parse().unwrap(),
            vec![1],
        );
        assert_eq!(c.on_response(t0, &t(), 100), InviteResponse::Provisional);
        assert_eq!(c.poll_timer(t0 + Duration::from_secs(1)), None, "no resend once proceeding");
        assert_eq!(c.on_response(t0, &t(), 200), InviteResponse::Final(200));
        c.acked(vec![9]);
        assert_eq!(c.on_response(t0, &t(), 200), InviteResponse::ResendAck);
        assert_eq!(c.ack(), &[9]);
        assert_eq!(c.on_response(t0, &t(), 180), InviteResponse::Absorbed);
        assert_eq!(c.next_deadline(), Some(t0 + Duration::from_secs(32)));
        assert_eq!(c.poll_timer(t0 + Duration::from_secs(32)), Some(TimerEffect::Terminated));
    }
}
