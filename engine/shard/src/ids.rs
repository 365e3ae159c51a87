//! Randomness for SIP tags, branches, SDP session ids and RTP SSRC/sequence/timestamp.
//!
//! The sans-IO cores take randomness as an input. Here it comes from std's `RandomState`
//! (seeded by the OS once per process), hashed with a counter: unpredictable enough for tags
//! and branches (RFC 3261 §19.3 asks for 32 random bits) without another dependency.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
};

use precall_sip::IdGen;

/// A per-shard random source.
#[derive(Debug)]
pub(crate) struct RandomIds {
    state: RandomState,
    counter: u64,
}

impl RandomIds {
    pub(crate) fn new(shard: usize) -> Self {
        Self { state: RandomState::new(), counter: (shard as u64) << 48 }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        let mut h = self.state.build_hasher();
        h.write_u64(self.counter);
        h.finish()
    }
}

impl IdGen for RandomIds {
    fn tag(&mut self) -> String {
        format!("{:016x}", self.next_u64())
    }

    fn branch(&mut self) -> String {
        format!("z9hG4bK{:016x}", self.next_u64())
    }

    fn session_id(&mut self) -> u64 {
        // SDP o= numbers are carried as decimal; keep them within i64 for picky parsers.
        self.next_u64() >> 1
    }
}
