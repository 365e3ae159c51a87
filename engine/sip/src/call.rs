//! One call as the UAS core sees it (RFC 3261 §13.3): its dialog, its media and the
//! retransmission of our 2xx until the ACK (§13.3.1.4).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::dialog::Dialog;
use crate::sdp::{MediaParams, SdpOffer};
use crate::session_timer::{Refresher, SessionTimer};
use crate::timers::TimerValues;
use crate::transaction::TxnId;

pub use crate::event::CallHandle;

/// Where the call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallState {
    /// INVITE received, waiting for the application.
    Ringing,
    /// 2xx sent, waiting for the ACK.
    Answered,
    /// ACK received.
    Confirmed,
    /// Our BYE is in flight.
    Ending,
}

/// §13.3.1.4: the 2xx is resent at T1, 2T1, 4T1... capped at T2, until the ACK; after 64*T1
/// the UAS gives up, and the dialog is ended with a BYE.
#[derive(Debug)]
pub(crate) struct Retransmit2xx {
    pub payload: Vec<u8>,
    /// Source of the INVITE this 2xx answers.
    pub dest: SocketAddr,
    /// CSeq of the INVITE this 2xx answers; its ACK carries the same number.
    pub cseq: u32,
    pub next_at: Instant,
    pub interval: Duration,
    pub give_up_at: Instant,
}

impl Retransmit2xx {
    pub fn start(
        now: Instant,
        t: &TimerValues,
        dest: SocketAddr,
        cseq: u32,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            payload,
            dest,
            cseq,
            next_at: now + t.t1,
            interval: t.t1,
            give_up_at: now + t.t1x64(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Call {
    pub state: CallState,
    pub dialog: Dialog,
    /// The INVITE's normalised header section, kept to build the answer later.
    pub invite_head: String,
    pub invite_txn: TxnId,
    pub invite_source: SocketAddr,
    /// Where responses to the INVITE go (RFC 3261 §18.2.2; see `Endpoint::reply_addr`).
    pub invite_reply: SocketAddr,
    /// CSeq number of the INVITE (a merged copy has the same, §8.2.2.2).
    pub invite_cseq: u32,
    pub offer: Option<SdpOffer>,
    /// What the INVITE's `Session-Expires` negotiated (RFC 4028 §9); the timer starts with
    /// our 2xx.
    pub negotiated: Option<(u32, Refresher)>,
    /// The running session timer.
    pub session: Option<SessionTimer>,
    /// Largest `Min-SE` a `422` to our refresh asked for.
    pub min_se: u32,
    /// The caller's Allow lists UPDATE: we refresh with UPDATE, else with re-INVITE.
    pub allows_update: bool,
    /// Our re-INVITE (a refresh carrying our SDP as an offer) is in flight: an offer of the
    /// caller's meanwhile gets `491` (RFC 3261 §14.2, RFC 3311 §5.2).
    pub offer_in_flight: bool,
    pub retransmit: Option<Retransmit2xx>,
    /// The SDP we last sent, repeated unchanged by a refreshing re-INVITE (RFC 4028 §7.4).
    pub local_sdp: String,
    /// Our RTP address as announced in SDP, and the `o=` numbers.
    pub local_rtp: Option<SocketAddr>,
    pub session_id: u64,
    pub session_version: u64,
    /// We sent an offer in a 2xx; the ACK carries the answer.
    pub awaiting_answer: bool,
    pub media: Option<MediaParams>,
    /// The application hung up before the ACK: §15 forbids BYE until the ACK or the give-up.
    pub bye_pending: bool,
}

impl Call {
    /// An offer of ours is unanswered: our re-INVITE is in flight, or our offer in a 2xx waits
    /// for its ACK. A new offer of the caller's now crosses it (RFC 3261 §14.2, RFC 3311 §5.2).
    pub fn offer_outstanding(&self) -> bool {
        self.offer_in_flight || (self.awaiting_answer && self.retransmit.is_some())
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let retransmit = self.retransmit.as_ref().map(|r| r.next_at.min(r.give_up_at));
        // The session timer runs once the dialog is confirmed; while our refresh is in flight
        // only the expiry counts (its transaction's own timers decide before that).
        let session = self
            .session
            .as_ref()
            .filter(|_| self.state == CallState::Confirmed)
            .map(|s| if s.in_flight { s.expires_at } else { s.act_at.min(s.expires_at) });
        match (retransmit, session) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
