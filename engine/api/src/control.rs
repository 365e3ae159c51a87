//! Messages between the handlers (HTTP coroutines, engine shards) and the control plane.
//!
//! A handler submits a [`ControlRequest`] through a [`ControlPort`] together with a reply
//! callback; the control plane answers exactly once, on its own thread, by calling it. The
//! callback decides how the answer travels back (a may channel for an HTTP coroutine, a shard's
//! inbox and doorbell for an engine shard), so nobody blocks a thread while waiting.

use std::fmt;

use crate::{CallContext, CallId, CallInstructions, MediaEventKind};

/// What a handler asks the controller.
#[derive(Debug, Clone)]
pub enum ControlRequest {
    /// A call arrived.
    Inbound(CallContext),
    /// Re-check the clone for a call.
    CheckStatus(CallId),
    /// A call ended, for the given reason (`caller_hangup`, `completed`, `canceled`, …).
    CallEnded {
        /// The call.
        call_id: CallId,
        /// Why it ended.
        reason: String,
    },
    /// Something to keep on the call's history (transcript, DTMF, agent failure).
    CallEvent {
        /// The call.
        call_id: CallId,
        /// What happened.
        kind: MediaEventKind,
        /// The text.
        detail: String,
    },
    /// A Twilio Media Stream started on a shard (its `start` message): check that it belongs
    /// to a known Twilio call and plan it like an inbound call.
    StreamStart(StreamStart),
    /// A shard closed a call's media stream: the call's outcome, recorded before the stream
    /// closes, so the TwiML Twilio runs next (`<Redirect>` to the poll URL) finds it.
    StreamClosed {
        /// The call.
        call_id: CallId,
        /// Why (`completed`, `failed`, `agent_error`, `hold_timeout`, ...).
        reason: String,
        /// The call failed: the caller hears the error message next. Otherwise it ended.
        failed: bool,
    },
    /// Is the control plane (and its store) able to serve?
    Health,
}

/// What a Media Streams `start` message says about the call, for
/// [`ControlRequest::StreamStart`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The call id precall put in the `<Stream>`'s `call_id` parameter.
    pub call_id: CallId,
    /// `start.callSid`: must be the call's own CallSid.
    pub call_sid: String,
    /// `start.accountSid`: must be the account the call came in on.
    pub account_sid: String,
    /// The `<Stream>` was the call's first answer (stream hold mode): play the greeting.
    pub greeting: bool,
}

/// The controller's answer to a [`ControlRequest`].
// Replies are moved once, through one channel: boxing the large variant would only add an
// allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ControlReply {
    /// For `Inbound`, `CheckStatus` and `StreamStart`.
    Instructions(Result<CallInstructions, ControlError>),
    /// For `CallEnded`, `CallEvent` and `StreamClosed`.
    Ended(Result<(), ControlError>),
    /// For `Health`.
    Health(Result<(), ControlError>),
}

/// Why the control plane could not answer a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// The call id was never recorded.
    UnknownCall(CallId),
    /// The store failed; the text is for logs.
    Store(String),
    /// The store cannot be reached now (connection refused or lost, pool exhausted, timed
    /// out): unlike [`ControlError::Store`], worth waiting out (a caller on hold keeps holding).
    StoreUnavailable(String),
    /// No answer within the request deadline.
    Timeout,
    /// The request queue is full: answer `503` and let the peer retry.
    Overloaded,
    /// The control plane is shutting down or gone.
    Stopped,
    /// The answer did not match the request (a bug, reported rather than panicking).
    Mismatch,
    /// The request does not belong to the call it names (a media stream whose CallSid or
    /// account is not the call's); the text says what differs.
    Refused(String),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::UnknownCall(id) => write!(f, "unknown call {id}"),
            ControlError::Store(e) => write!(f, "store error: {e}"),
            ControlError::StoreUnavailable(e) => write!(f, "store unavailable: {e}"),
            ControlError::Timeout => f.write_str("the controller did not answer in time"),
            ControlError::Overloaded => f.write_str("the controller's queue is full"),
            ControlError::Stopped => f.write_str("the control plane is stopping"),
            ControlError::Mismatch => f.write_str("the controller answered another question"),
            ControlError::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

impl std::error::Error for ControlError {}

/// Called once with the answer, on the control plane's thread. It must not block.
pub type ReplyFn = Box<dyn FnOnce(ControlReply) + Send>;

/// The way into the control plane.
pub trait ControlPort: Send + Sync {
    /// Queues a request; `reply` is called exactly once unless this returns an error (then
    /// never). Never blocks: a full queue is [`ControlError::Overloaded`].
    fn submit(&self, request: ControlRequest, reply: ReplyFn) -> Result<(), ControlError>;
}
