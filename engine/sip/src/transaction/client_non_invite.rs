//! Non-INVITE client transaction (RFC 3261 §17.1.2), used for our BYE and refreshing UPDATE.
//!
//! ```text
//!  Trying --1xx--> Proceeding --final--> Completed --Timer K--> Terminated
//!    Timer E: resend (T1 doubling to T2; T2 once Proceeding); Timer F (64*T1): timed out
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Purpose, TimerEffect};
use crate::call::CallHandle;
use crate::timers::TimerValues;

#[derive(Debug)]
enum State {
    Trying { e_at: Instant, e_interval: Duration },
    Proceeding { e_at: Instant },
    Completed { k_at: Instant },
    Terminated,
}

/// What a response did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseEffect {
    Provisional,
    /// The first final response: the TU learns the outcome.
    Final(u16),
    /// A retransmitted response, absorbed in Completed.
    Absorbed,
}

#[derive(Debug)]
pub(crate) struct ClientNonInvite {
    pub call: CallHandle,
    pub purpose: Purpose,
    /// Our Via branch: the key of `Endpoint::client_index`.
    pub branch: String,
    pub dest: SocketAddr,
    request: Vec<u8>,
    f_at: Instant,
    state: State,
}

impl ClientNonInvite {
    pub fn start(
        now: Instant,
        t: &TimerValues,
        call: CallHandle,
        purpose: Purpose,
        branch: String,
        dest: SocketAddr,
        request: Vec<u8>,
    ) -> Self {
        Self {
            call,
            purpose,
            branch,
            dest,
            request,
            f_at: now + t.t1x64(),
            state: State::Trying { e_at: now + t.t1, e_interval: t.t1 },
        }
    }

    pub fn request(&self) -> &[u8] {
        &self.request
    }

    pub fn on_response(&mut self, now: Instant, t: &TimerValues, code: u16) -> ResponseEffect {
        match self.state {
            State::Trying { .. } | State::Proceeding { .. } if code < 200 => {
                if let State::Trying { .. } = self.state {
                    // §17.1.2.2: in Proceeding, retransmit every T2.
                    self.state = State::Proceeding { e_at: now + t.t2 };
                }
                ResponseEffect::Provisional
            }
            State::Trying { .. } | State::Proceeding { .. } => {
                self.state = State::Completed { k_at: now + t.t4 };
                ResponseEffect::Final(code)
            }
            State::Completed { .. } | State::Terminated => ResponseEffect::Absorbed,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Trying { e_at, .. } | State::Proceeding { e_at } => Some(e_at.min(self.f_at)),
            State::Completed { k_at } => Some(k_at),
            State::Terminated => None,
        }
    }

    pub fn poll_timer(&mut self, now: Instant, t: &TimerValues) -> Option<TimerEffect> {
        match &mut self.state {
            State::Trying { .. } | State::Proceeding { .. } if self.f_at <= now => {
                self.state = State::Terminated;
                Some(TimerEffect::TimedOut)
            }
            State::Trying { e_at, e_interval } if *e_at <= now => {
                *e_interval = t.double(*e_interval);
                *e_at += *e_interval;
                Some(TimerEffect::Retransmit)
            }
            State::Proceeding { e_at } if *e_at <= now => {
                *e_at += t.t2;
                Some(TimerEffect::Retransmit)
            }
            State::Completed { k_at } if *k_at <= now => {
                self.state = State::Terminated;
                Some(TimerEffect::Terminated)
            }
            _ => None,
        }
    }
}
