//! precall's data plane: one glommio shard per core.
//!
//! # The run loop
//!
//! [`Engine::start`] spawns one glommio `LocalExecutor` (one thread, optionally pinned to a
//! core) per shard. Each shard owns, on its own thread and shared with nobody:
//!
//! * its SIP/UDP socket, bound on the same address by every shard with SO_REUSEPORT (the kernel
//!   spreads datagrams by 4-tuple), with a large receive buffer, and a sans-IO
//!   [`precall_sip::Endpoint`] for the calls it owns;
//! * its calls (keyed by the endpoint's `CallHandle`), their RTP sockets from its slice of the
//!   RTP port range ([`rtp_port_slice`]), one [`precall_media::MediaClock`] and one heap of
//!   per-call timers.
//!
//! A shard runs one loop and some receive tasks (details in `shard.rs`):
//!
//! * the *SIP receive task* awaits datagrams on the SIP socket, peeks each Call-ID and
//!   forwards the datagram to the inbox of the shard that owns it ([`shard_for_call_id`]), or
//!   feeds its own endpoint;
//! * one *RTP receive task* per answered call records when and from where the caller's RTP
//!   arrives (RTP timeout, symmetric RTP);
//! * the *loop* awaits the shard's inbox (a bounded crossbeam queue plus an `AtomicWaker`
//!   doorbell that any thread can ring, because glommio's own channels panic outside glommio
//!   threads), the next deadline (SIP timers, media clock, call timers) or a nudge from the
//!   receive task, then runs what is due: SIP retransmissions, one RTP frame per due call,
//!   status checks. An idle shard sleeps in io_uring: no polling.
//!
//! Calls follow the control plane's plan, which arrives through [`ShardControl`] as a reply
//! callback that puts it in the shard's inbox. Each call's rules (greeting, hold, status
//! checks, the switch-over to the agent, the bridge, every ending) are a sans-IO
//! `precall_call::CallFlow`; the shard owns the sockets and tasks it asks for: the RTP socket
//! and, once the clone is ready, one agent WebSocket leg (ws:// or wss://) on this shard.
//!
//! A shard reports once at start, on a channel, that it runs (with its socket address) or why
//! it could not: glommio itself only shows executor errors when the thread is joined.
//! [`Engine::start`] returns when every shard has reported, or stops the started ones on the
//! first error.
//!
//! [`ShardMsg::Stop`] (or [`Engine::shutdown`], which also works with a full inbox) ends the
//! inbox task's loop: it cancels the receive task, closes the socket, marks the shard not alive
//! and returns, which ends the executor and its thread; `shutdown` joins every thread and turns
//! a shard panic into [`EngineError::ShardPanicked`].
//!
//! The only state shared across threads is each shard's statistics (atomics), read by
//! [`Engine::health`].
#![deny(unsafe_code)]

mod admission;
mod agent_leg;
mod call;
mod config;
mod control;
mod engine;
mod error;
mod health;
mod ids;
mod inbox;
mod routing;
mod shard;
mod socket;
mod stream_leg;

pub use config::{EngineConfig, MediaStreamsConfig};
pub use control::{
    AgentTarget, AgentUnavailable, Done, MediaPlan, PlanReply, ShardControl, ShardPlan,
};
pub use engine::Engine;
pub use error::{EngineError, SendError};
pub use health::{
    LATENCY_BUCKETS_US, LatencySnapshot, PACING_BUCKETS_US, PACING_SAMPLE_EVERY, PacingSnapshot,
    ShardHealth, Snapshot,
};
pub use inbox::{ForwardedDatagram, PlanDelivery, ShardMsg, StreamRelease};
pub use precall_call::FlowConfig;
pub use precall_sip::{Cidr, DigestAlgorithm, DigestConfig};
pub use routing::{rtp_port_slice, shard_for_call_id};
