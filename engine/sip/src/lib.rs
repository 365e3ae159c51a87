//! precall's SIP user-agent server core: sans-IO, one [`Endpoint`] per engine shard.
//!
//! # Run loop
//!
//! The endpoint never touches a socket, a clock or a random source. The shard feeds it inputs
//! and drains its outputs:
//!
//! 1. Input, with the current time: [`Endpoint::handle_datagram`] for each received UDP
//!    datagram (after routing it with [`peek_call_id`] to the shard owning the Call-ID),
//!    [`Endpoint::handle_timeout`] when the armed timer fires, and the application's answers
//!    to events: [`Endpoint::accept`], [`Endpoint::reject`], [`Endpoint::hangup`].
//! 2. Drain [`Endpoint::poll_transmit`] until `None` and send each datagram from the SIP
//!    socket to its `dest`.
//! 3. Drain [`Endpoint::poll_event`] until `None` and act on each event
//!    ([`Event::IncomingCall`] -> ask the controller, then `accept`/`reject`, whose output is
//!    drained the same way).
//! 4. Arm the shard's single SIP timer at [`Endpoint::poll_timeout`] (none when `None`).
//!
//! All RFC 3261 timers (A, B, D, E, F, G, H, I, J, K, RFC 6026's L and the §13.3.1.4 2xx
//! retransmission) and the RFC 4028 session timers (the table is in `src/timers.rs`) live in
//! one queue; the endpoint has no task per
//! transaction. Tags, branches and SDP session ids come from the injected [`IdGen`], so tests
//! are byte-for-byte deterministic.
//!
//! # Layers (one file each)
//!
//! * `wire`: framing by Content-Length, LF-only line endings, folded header fields,
//!   [`peek_call_id`]. rsip 0.4 cannot do these (measured gaps in `shared/STACK.md`).
//! * `message`, `uri`, `body`: the header fields we route, match and answer on, checked in a
//!   documented order so each malformed request gets one precise status (400 with a specific
//!   reason phrase, 416, 420, 415, 406, 483, 501/405 with Allow, 505). rsip rejects tel: URIs,
//!   IPv6 hosts, escaped user parts and unknown methods, so syntax is ours; rsip's typed URI
//!   turns stored targets into socket addresses where it parses them.
//! * `transaction/*`: INVITE and non-INVITE server transactions, the non-INVITE client
//!   transaction (BYE, refreshing UPDATE) and the INVITE client transaction (refreshing
//!   re-INVITE).
//! * `dialog`, `call`: UAS dialogs (route set, remote target, CSeq) and per-call state.
//! * `session_timer`: RFC 4028 negotiation, who refreshes, when we refresh or give up.
//! * `sdp`: SDP parsing and RFC 3264 offer/answer for G.711 with RFC 4733 events.
//! * `endpoint`: dispatch, the application API, the timer queue.
//!
//! Responses go where RFC 3261 §18.2.2 says: the request's source IP (`received`) and the top
//! Via's sent-by port (5060 when absent), or the source port when the Via has `rport` (RFC
//! 3581) or [`SipConfig::force_rport`] is set; `received`/`rport` are filled in the top Via.
#![forbid(unsafe_code)]

mod auth;
mod body;
mod build;
mod call;
mod config;
mod dialog;
mod endpoint;
mod error;
mod event;
mod message;
mod sdp;
mod session_timer;
mod timers;
mod transaction;
mod uri;
mod wire;

pub use auth::{DigestAlgorithm, DigestConfig};
pub use config::{Cidr, IdGen, SipConfig};
pub use endpoint::{Endpoint, Transactions};
pub use error::{AcceptError, DropReason, FramingError, RequestError};
pub use event::{CallHandle, EndReason, Event, Transmit};
pub use sdp::{
    Codec, Direction, MediaDescription, MediaParams, SdpError, SdpOffer, SessionDescription,
};
pub use wire::peek_call_id;
