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
//! All RFC 3261 timers (E, F, G, H, I, J, K, RFC 6026's L and the §13.3.1.4 2xx
//! retransmission; the table is in `src/timers.rs`) live in one queue; the endpoint has no task per
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
//! * `transaction/*`: INVITE and non-INVITE server transactions, the BYE client transaction.
//! * `dialog`, `call`: UAS dialogs (route set, remote target, CSeq) and per-call state.
//! * `sdp`: SDP parsing and RFC 3264 offer/answer for G.711 with RFC 4733 events.
//! * `endpoint`: dispatch, the application API, the timer queue.
//!
//! Responses go to the source address of the request (symmetric, as RFC 3581 `rport`
//! describes; carriers behind NAT expect it) with `received`/`rport` filled in the top Via.
#![forbid(unsafe_code)]

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
mod timers;
mod transaction;
mod uri;
mod wire;

pub use config::{Cidr, IdGen, SipConfig};
pub use endpoint::Endpoint;
pub use error::{AcceptError, DropReason, FramingError, RequestError};
pub use event::{CallHandle, EndReason, Event, Transmit};
pub use sdp::{
    Codec, Direction, MediaDescription, MediaParams, SdpError, SdpOffer, SessionDescription,
};
pub use wire::peek_call_id;
