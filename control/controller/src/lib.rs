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
//!
//! ## Clone jobs
//! The node that runs a job holds a lease on it ([`Lease`], `CLONE_LEASE_MS`) and renews it
//! while the provider works ([`CallController::renew_lease`]); a job whose lease lapses (its
//! node died, stopped or lost the database) is taken over by the next claim or by any node's
//! sweep ([`CallController::take_over_lapsed`]), so no job is ever orphaned and no running job
//! is run twice. A failed job backs off ([`ControllerConfig::clone_retry`], doubling per
//! failed attempt; [`ControllerConfig::clone_retry_permanent`] for a permanent failure): until
//! then it serves its failure, so a broken profile is not retried by every new call.
#![forbid(unsafe_code)]

mod controller;
mod model;
pub mod plan;
mod store;

pub use controller::{
    CallController, ControllerConfig, ControllerError, InboundOutcome, VoiceCheck,
};
pub use model::{
    CallEvent, CallRecord, CloneJob, CloneRequest, EventKind, JobFailure, JobOutcome, Lease,
    VoiceProfile, normalize_number,
};
pub use store::{
    CallView, ClaimDecision, InboundRequest, InboundStep, InsertCall, MemoryStore, StatusChange,
    Store, StoreError, apply_finish, apply_status, claim_decision,
};
