//! The shard's way to the control plane.
//!
//! A shard never waits for the controller: it submits a request with a [`PlanReply`] callback
//! and goes on serving. The control plane calls the callback exactly once, on its own thread;
//! the engine's callbacks put the answer in the owning shard's inbox and ring its doorbell, so
//! the answer wakes the shard like any other message (no polling).

use precall_api::{CallContext, CallId, ControlError, MediaEventKind, StreamStart};
pub use precall_call::{AgentTarget, AgentUnavailable, MediaPlan, ShardPlan};

/// Called once with the answer, on the control plane's thread. It must not block.
pub type PlanReply = Box<dyn FnOnce(Result<ShardPlan, ControlError>) + Send>;

/// Called once when a report is stored (or could not be), on the control plane's thread. It
/// must not block.
pub type Done = Box<dyn FnOnce(Result<(), ControlError>) + Send>;

/// What a shard asks the control plane. Implemented over the side runtime by the `precall`
/// binary, and by fakes in tests. Every method returns at once: an `Err` means the request was
/// not queued and `reply` will never be called (answer the caller `503` for
/// [`ControlError::Overloaded`]).
pub trait ShardControl: Send + Sync + 'static {
    /// A SIP call arrived: record it and plan it.
    fn inbound(&self, ctx: CallContext, reply: PlanReply) -> Result<(), ControlError>;
    /// The poll interval of a held call has passed: plan it again.
    fn check_status(&self, call_id: CallId, reply: PlanReply) -> Result<(), ControlError>;
    /// The call is over (`caller_hangup`, `canceled`, `rtp_timeout`, `completed`, ...).
    fn call_ended(&self, call_id: CallId, reason: String) -> Result<(), ControlError>;
    /// Something for the call's history: what the agent said, what the caller said, DTMF,
    /// why the agent leg failed.
    fn call_event(
        &self,
        call_id: CallId,
        kind: MediaEventKind,
        detail: String,
    ) -> Result<(), ControlError>;
    /// A Twilio media stream started: check it belongs to its call and plan the call (clips
    /// for the stream: no error clip, Twilio says the error message itself). By default
    /// streams are refused (a control plane without Twilio).
    fn stream_start(&self, start: StreamStart, reply: PlanReply) -> Result<(), ControlError> {
        let _ = reply;
        Err(ControlError::Refused(format!("media streams are not served (call {})", start.call_id)))
    }
    /// The shard is closing a call's media stream: record the outcome (`failed` or ended),
    /// then call `done`. The shard closes the stream only after `done` (or a short deadline),
    /// because Twilio asks the poll URL as soon as the stream closes. By default: recorded as
    /// an end, done at once.
    fn stream_closed(
        &self,
        call_id: CallId,
        reason: String,
        failed: bool,
        done: Done,
    ) -> Result<(), ControlError> {
        let _ = failed;
        let result = self.call_ended(call_id, reason);
        done(result.clone());
        result
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A control plane that refuses everything (for tests without calls).
    #[derive(Debug)]
    pub(crate) struct NoControl;

    impl NoControl {
        pub(crate) fn arc() -> Arc<dyn ShardControl> {
            Arc::new(NoControl)
        }
    }

    impl ShardControl for NoControl {
        fn inbound(&self, _: CallContext, _: PlanReply) -> Result<(), ControlError> {
            Err(ControlError::Stopped)
        }
        fn check_status(&self, _: CallId, _: PlanReply) -> Result<(), ControlError> {
            Err(ControlError::Stopped)
        }
        fn call_ended(&self, _: CallId, _: String) -> Result<(), ControlError> {
            Ok(())
        }
        fn call_event(&self, _: CallId, _: MediaEventKind, _: String) -> Result<(), ControlError> {
            Ok(())
        }
    }
}
