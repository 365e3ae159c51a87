//! Per-shard statistics: the only state shared across threads. A shard writes its own counters
//! (relaxed atomics, one cache line per shard); anyone may read them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A snapshot of one shard, from [`Engine::health`](crate::Engine::health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHealth {
    /// The shard index.
    pub shard: usize,
    /// The executor runs and the shard's loop has not exited (false after a stop or a panic).
    pub alive: bool,
    /// Calls owned by the shard (always 0 until calls are handled).
    pub active_calls: u64,
    /// Datagrams received on the shard's SIP socket.
    pub datagrams_in: u64,
    /// Received datagrams the shard discarded without handling them. Until SIP handling exists
    /// that is every datagram, so today this equals `datagrams_in`.
    pub datagrams_dropped: u64,
}

/// The counters behind [`ShardHealth`]. Aligned to a cache line so shards do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct ShardStats {
    alive: AtomicBool,
    active_calls: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_dropped: AtomicU64,
}

impl ShardStats {
    pub(crate) fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::Release);
    }

    pub(crate) fn datagram_in(&self) {
        self.datagrams_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn datagram_dropped(&self) {
        self.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, shard: usize) -> ShardHealth {
        ShardHealth {
            shard,
            alive: self.alive.load(Ordering::Acquire),
            active_calls: self.active_calls.load(Ordering::Relaxed),
            datagrams_in: self.datagrams_in.load(Ordering::Relaxed),
            datagrams_dropped: self.datagrams_dropped.load(Ordering::Relaxed),
        }
    }
}
