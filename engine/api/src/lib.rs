//! The call contract of precall.
//!
//! Protocol handlers (the Twilio webhooks of the control plane, the SIP engine shards) turn what
//! they receive into a [`CallContext`], hand it to the `CallController`, and get back
//! [`CallInstructions`] that they translate into TwiML or into SIP/RTP actions. Nothing in here
//! knows about a protocol, a socket or a clock: timestamps are passed in as [`Timestamp`].
//!
//! The crate has no dependencies on purpose: both the data plane (`precall-engine`) and the
//! control plane depend on it, never the reverse.
#![forbid(unsafe_code)]

mod context;
mod control;
mod event;
mod ids;
mod instructions;
pub mod percent;
mod redact;
mod time;

pub use context::{CallContext, CallStatus, Protocol};
pub use control::{ControlError, ControlPort, ControlReply, ControlRequest, ReplyFn, StreamStart};
pub use event::MediaEventKind;
pub use ids::{CallId, JobId, ProfileId, VoiceId};
pub use instructions::{
    AudioInstruction, CallAction, CallInstructions, CloneStatus, SpeechInstruction,
    StatusPollInstruction, WebSocketInstruction,
};
pub use redact::Redacted;
pub use time::Timestamp;
