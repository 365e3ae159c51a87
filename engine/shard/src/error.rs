//! Errors of the engine: one variant per cause, each naming the shard it concerns.

use std::{io, net::SocketAddr};

/// Why the engine could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The configuration cannot run; checked before any thread is started.
    #[error("invalid engine configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, for the operator.
        reason: &'static str,
    },
    /// The TLS configuration for `wss://` agents could not be made.
    #[error("agent TLS: {reason}")]
    AgentTls {
        /// What is wrong.
        reason: String,
    },
    /// The CPU list needed to pin shards to cores could not be read.
    #[error("cannot read the online CPUs to pin shards")]
    CpuTopology {
        /// The error from reading the machine topology.
        source: io::Error,
    },
    /// A shard's executor could not be created: thread spawn, CPU pinning, `io_memory` over the
    /// memlock limit, io_uring setup. glommio only reveals these when the thread is joined.
    #[error("shard {shard} could not start its executor")]
    ShardStart {
        /// The shard index.
        shard: usize,
        /// glommio's error, converted.
        source: io::Error,
    },
    /// A shard could not create or bind its SIP/UDP socket (port taken without SO_REUSEPORT,
    /// address not local, permission).
    #[error("shard {shard} could not bind the SIP socket on {addr}")]
    Bind {
        /// The shard index.
        shard: usize,
        /// The address it tried to bind.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// A shard's thread panicked; the panic message went to the panic hook (stderr).
    #[error("shard {shard} panicked")]
    ShardPanicked {
        /// The shard index.
        shard: usize,
    },
}

/// Why [`Engine::send`](crate::Engine::send) did not deliver a message. It never blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The shard's inbox is full: answer the request with an overload response (503 +
    /// Retry-After) rather than wait.
    #[error("shard inbox full")]
    Overloaded,
    /// The shard's loop has exited.
    #[error("shard stopped")]
    Stopped,
    /// There is no shard with this index.
    #[error("no shard {shard} (the engine has {shards})")]
    NoSuchShard {
        /// The index asked for.
        shard: usize,
        /// How many shards the engine has.
        shards: usize,
    },
}
