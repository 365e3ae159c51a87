//! INVITE server transaction (RFC 3261 §17.2.1, with RFC 6026's Accepted state).
//!
//! ```text
//!  Proceeding --non-2xx--> Completed --ACK--> Confirmed --Timer I--> Terminated
//!      |                     | Timer G: resend final; Timer H: give up
//!      +------2xx-----> Accepted --Timer L--> Terminated
//! ```
//! This struct runs Proceeding and Completed, while the transaction has work to do. Accepted
//! and Confirmed only absorb retransmissions: the endpoint moves the transaction into its
//! compact table then (`absorbed.rs`), where a retransmitted INVITE gets the call's 2xx again
//! while the core still retransmits one, and an ACK is swallowed. A retransmitted INVITE gets
//! the last response again here, so a lost 100 or non-2xx is repaired by the caller's own
//! retransmission.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::TimerEffect;
use crate::call::CallHandle;
use crate::timers::TimerValues;

#[derive(Debug)]
enum State {
    Proceeding,
    Completed { g_at: Instant, g_interval: Duration, h_at: Instant },
    Confirmed { i_at: Instant },
    Terminated,
}

#[derive(Debug)]
pub(crate) struct ServerInvite {
    /// The call this INVITE created or belongs to (None for an INVITE refused at once).
    pub call: Option<CallHandle>,
    pub dest: SocketAddr,
    last_response: Vec<u8>,
    state: State,
}

impl ServerInvite {
    /// Enters Proceeding, having sent `100 Trying` (§17.2.1: at once, precall never waits).
    pub fn proceeding(call: Option<CallHandle>, dest: SocketAddr, trying: Vec<u8>) -> Self {
        Self { call, dest, last_response: trying, state: State::Proceeding }
    }

    /// A final non-2xx response sent without any provisional (immediate refusals).
    pub fn refused(now: Instant, t: &TimerValues, dest: SocketAddr, response: Vec<u8>) -> Self {
        let mut txn = Self::proceeding(None, dest, Vec::new());
        txn.final_non2xx(now, t, response);
        txn
    }

    pub fn is_proceeding(&self) -> bool {
        matches!(self.state, State::Proceeding)
    }

    pub fn last_response(&self) -> &[u8] {
        &self.last_response
    }

    /// §17.2.1: non-2xx final over UDP starts Timer G (T1) and Timer H (64*T1).
    pub fn final_non2xx(&mut self, now: Instant, t: &TimerValues, response: Vec<u8>) {
        self.last_response = response;
        self.state = State::Completed { g_at: now + t.t1, g_interval: t.t1, h_at: now + t.t1x64() };
    }

    /// An ACK matching this transaction (only a non-2xx ACK has the INVITE's branch).
    /// Returns true when absorbed here.
    pub fn on_ack(&mut self, now: Instant, t: &TimerValues) -> bool {
        match self.state {
            State::Completed { .. } => {
                self.state = State::Confirmed { i_at: now + t.t4 };
                true
            }
            State::Confirmed { .. } => true,
            _ => false,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Completed { g_at, h_at, .. } => Some(g_at.min(h_at)),
            State::Confirmed { i_at } => Some(i_at),
            State::Proceeding | State::Terminated => None,
        }
    }

    /// One due timer's effect, or None when nothing is due.
    pub fn poll_timer(&mut self, now: Instant, t: &TimerValues) -> Option<TimerEffect> {
        match &mut self.state {
            State::Completed { h_at, .. } if *h_at <= now => {
                self.state = State::Terminated;
                Some(TimerEffect::TimedOut)
            }
            State::Completed { g_at, g_interval, .. } if *g_at <= now => {
                *g_interval = t.double(*g_interval);
                *g_at += *g_interval;
                Some(TimerEffect::Retransmit)
            }
            State::Confirmed { i_at } if *i_at <= now => {
                self.state = State::Terminated;
                Some(TimerEffect::Terminated)
            }
            _ => None,
        }
    }
}
