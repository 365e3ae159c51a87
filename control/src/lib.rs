//! The control plane of precall and the `precall` binary's building blocks.
//!
//! ## How it runs
//! `main.rs` reads the [`config`], builds a [`Store`](precall_controller::Store) (in memory, or
//! PostgreSQL when `DATABASE_URL` is set), and starts three things:
//! * the **side runtime** ([`runtime`]): one tokio thread that owns the `CallController`, the
//!   store and the clone provider. Every request reaches it as a message and is answered on a
//!   channel the caller chose, so HTTP coroutines and engine shards never block on I/O;
//! * the **engine shards** (`precall-engine`), one glommio executor per core;
//! * the **HTTP server** (`precall-http`) in may coroutines, serving [`app`]'s routes.
//!
//! SIGINT/SIGTERM stop them in the reverse order.

pub mod agent;
pub mod app;
pub mod audio;
pub mod audio_service;
pub mod config;
pub mod demo_agent;
pub mod hold_segments;
pub mod journal;
pub mod metrics;
pub mod profiles;
pub mod push;
pub mod runtime;
pub mod sip_bridge;
pub mod store;
pub mod twilio;
