//! What the endpoint tells the application, and the handle it names calls by.

use std::net::SocketAddr;

use crate::error::DropReason;
use crate::sdp::{MediaParams, SdpOffer};

/// A call of this endpoint. Small and `Copy`; the endpoint keeps the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallHandle(pub(crate) u64);

impl CallHandle {
    /// A number unique among this endpoint's calls (for logs and maps).
    pub fn id(self) -> u64 {
        self.0
    }
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The caller sent BYE (before or after its ACK).
    RemoteBye,
    /// The caller cancelled before we answered (RFC 3261 §9.2).
    Cancelled,
    /// Our 2xx was never acknowledged within 64*T1; we sent BYE (RFC 3261 §13.3.1.4).
    AckTimeout,
    /// We hung up; the BYE was answered or timed out (Timer F).
    LocalBye,
    /// We answered the INVITE with a final non-2xx.
    Rejected,
    /// The RFC 4028 session timer ran out: the caller's refresh never came, or ours timed out
    /// or was answered `408`/`481`. We sent BYE.
    SessionExpired,
}

/// Application-visible happenings, drained with [`crate::Endpoint::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new INVITE; answer with `accept`, `reject` or `hangup`. `100 Trying` is already sent.
    IncomingCall {
        /// Handle for the answers.
        call: CallHandle,
        /// The Call-ID (also what shards route on).
        call_id: String,
        /// User part of the From URI (caller number), unescaped.
        from_user: String,
        /// User part of the Request-URI (dialled number), falling back to the To URI.
        to_user: String,
        /// Where the INVITE came from.
        source: SocketAddr,
        /// The SDP offer, if the INVITE had one (else we offer in the 200 OK).
        offer: Option<SdpOffer>,
    },
    /// The ACK for our 2xx arrived: the dialog is confirmed.
    CallConfirmed {
        /// The call.
        call: CallHandle,
    },
    /// A re-INVITE or UPDATE changed the media (hold, unhold, new address), or the ACK brought
    /// the answer to our offer.
    MediaChanged {
        /// The call.
        call: CallHandle,
        /// The new media parameters.
        media: MediaParams,
    },
    /// The call is over; the handle is dead from now on.
    CallEnded {
        /// The call.
        call: CallHandle,
        /// Why.
        reason: EndReason,
    },
    /// A datagram was dropped without an answer.
    Dropped {
        /// Why.
        reason: DropReason,
    },
}

/// A datagram to send, drained with [`crate::Endpoint::poll_transmit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination address.
    pub dest: SocketAddr,
    /// The SIP message.
    pub payload: Vec<u8>,
}
