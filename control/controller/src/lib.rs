//! The `CallController`: one protocol-agnostic place that decides what happens to a call.
//!
//! ## How it runs
//! Handlers call [`CallController::handle_inbound_call`] when a call arrives,
//! [`CallController::check_clone_status`] every poll interval, and
//! [`CallController::call_ended`] when the call is over. The shell that owns the clone provider
//! starts the job an [`InboundOutcome::start_clone`] asks for and reports the result with
//! [`CallController::clone_finished`].
//!
//! Every method takes `now` from the caller, and every decision is made by a pure function
//! ([`plan::Planner`]) over what the [`Store`] returned: the controller reads no clock, opens no
//! socket and spawns nothing, so it is tested with a fake clock and the in-memory store.
//!
//! Idempotency lives in the store's atomic operations: [`Store::insert_call`] records a call once
//! per call id, and [`Store::claim_clone_job`] starts at most one job per voice profile and
//! sample set, whichever node or request asks first.
#![forbid(unsafe_code)]

mod controller;
mod model;
pub mod plan;
mod store;

pub use controller::{CallController, ControllerConfig, ControllerError, InboundOutcome};
pub use model::{
    CallEvent, CallRecord, CloneJob, CloneRequest, EventKind, JobOutcome, VoiceProfile,
    normalize_number,
};
pub use store::{
    InsertCall, MemoryStore, StatusChange, Store, StoreError, apply_status, job_serves,
};
