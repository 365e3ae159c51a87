//! One call as the UAS core sees it (RFC 3261 §13.3): its dialog, its media and the
//! retransmission of our 2xx until the ACK (§13.3.1.4).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::dialog::Dialog;
use crate::sdp::{MediaParams, SdpOffer};
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
    pub offer: Option<SdpOffer>,
    /// `Session-Expires` to echo with `refresher=uac` (RFC 4028 §9), when the caller supports it.
    pub session_expires: Option<u32>,
    pub retransmit: Option<Retransmit2xx>,
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
    pub fn next_deadline(&self) -> Option<Instant> {
        self.retransmit.as_ref().map(|r| r.next_at.min(r.give_up_at))
    }
}
