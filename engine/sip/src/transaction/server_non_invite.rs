//! Non-INVITE server transaction (RFC 3261 §17.2.2). precall answers every non-INVITE
//! request at once, so the transaction starts in Completed: retransmitted requests get the
//! same response again until Timer J (64*T1 over UDP) ends it.

use std::net::SocketAddr;
use std::time::Instant;

use super::TimerEffect;
use crate::timers::TimerValues;

#[derive(Debug)]
pub(crate) struct ServerNonInvite {
    pub dest: SocketAddr,
    response: Vec<u8>,
    j_at: Instant,
}

impl ServerNonInvite {
    pub fn completed(now: Instant, t: &TimerValues, dest: SocketAddr, response: Vec<u8>) -> Self {
        Self { dest, response, j_at: now + t.t1x64() }
    }

    pub fn last_response(&self) -> &[u8] {
        &self.response
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        Some(self.j_at)
    }

    pub fn poll_timer(&mut self, now: Instant) -> Option<TimerEffect> {
        (self.j_at <= now).then_some(TimerEffect::Terminated)
    }
}
