//! precall's data plane: one glommio shard per core.
//!
//! # The run loop
//!
//! [`Engine::start`] spawns one glommio `LocalExecutor` (one thread, optionally pinned to a
//! core) per shard. Each shard owns, on its own thread and shared with nobody:
//!
//! * its SIP/UDP socket, bound on the same address by every shard with SO_REUSEPORT (the kernel
//!   spreads datagrams by 4-tuple), with a large receive buffer;
//! * one 64 KiB receive buffer, allocated once;
//! * its slice of the RTP port range ([`rtp_port_slice`]); later its calls, RTP sockets, timers.
//!
//! A shard runs two tasks. The *receive task* awaits datagrams on the SIP socket; today it
//! counts and discards them (SIP handling comes with the SIP layer, which will forward each
//! datagram to the shard that owns its Call-ID, [`shard_for_call_id`]). The *inbox task* awaits
//! the shard's inbox: a bounded crossbeam queue plus an `AtomicWaker` doorbell that any thread
//! can ring ([`Engine::send`]), because glommio's own channels panic outside glommio threads. An
//! idle shard sleeps in io_uring: no polling, no timers.
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

mod config;
mod engine;
mod error;
mod health;
mod inbox;
mod routing;
mod shard;
mod socket;

pub use config::EngineConfig;
pub use engine::Engine;
pub use error::{EngineError, SendError};
pub use health::ShardHealth;
pub use inbox::ShardMsg;
pub use routing::{rtp_port_slice, shard_for_call_id};
