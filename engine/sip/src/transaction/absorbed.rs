//! Server transactions whose only work left is absorbing retransmissions, kept compactly.
//!
//! Over UDP a server transaction outlives its answer by 64*T1 (32 s): a non-INVITE one in
//! Completed (Timer J) answers a retransmitted request with its final response again, an
//! INVITE one in Accepted (Timer L, RFC 6026 §8.5) swallows retransmitted INVITEs, one in
//! Confirmed (Timer I) swallows retransmitted ACKs. At 8,000 calls/s that is half a million
//! transactions alive at once, each doing nothing. Kept as whole transaction structs (three
//! `String`s of matching key, stored twice for the index, a heap timer entry each) they cost
//! about 900 bytes apiece and their table's growth stalled the shard. Here each is:
//!
//! * a 64-bit hash of its matching key (RFC 3261 §17.2.3), keyed per endpoint with a random
//!   key so that a peer cannot aim collisions (at a million entries the chance that two keys
//!   share a hash is about 3 in 10^8; the cost of one is a retransmission answered as the
//!   other transaction's);
//! * where the answer goes, and what to answer: the response bytes (non-INVITE), or the call
//!   whose 2xx the core is still retransmitting (INVITE, Accepted), or nothing;
//! * its place in a FIFO of its lifetime: every entry of one lifetime expires in insertion
//!   order, so expiry is a pop from the front, not a heap operation.
//!
//! The table is bounded by a memory budget (`SipConfig::absorbed_bytes`): past it the entry
//! nearest its end goes first, so a flood can cost a late retransmission its answer (the
//! peer's transaction times out as if the answer was lost) but never memory or a call.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::call::CallHandle;

use super::ServerKey;

/// What an absorbed transaction does with a retransmitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Send this final response again (a non-INVITE transaction in Completed).
    Resend(Box<[u8]>),
    /// An INVITE transaction in Accepted: the call's core retransmits the 2xx until the ACK
    /// (RFC 6026 §8.5); a retransmitted INVITE gets that 2xx at once while the call has one.
    Accepted(CallHandle),
    /// Nothing (an INVITE transaction in Confirmed: retransmitted ACKs are swallowed).
    Silent,
    /// A `200 OK` that is a pure function of the request (an in-dialog BYE's: its To tag is
    /// in the request, and nothing else is added), built again from the retransmission: the
    /// same request gives the same bytes (RFC 3261 §17.2.2), and the table keeps none.
    RebuildOk,
}

/// One absorbed transaction.
#[derive(Debug)]
pub(crate) struct Entry {
    pub dest: SocketAddr,
    pub answer: Answer,
}

/// The keys are already hashes: the map uses them as they are.
#[derive(Debug, Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a u64); fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Entries of one lifetime, oldest first.
#[derive(Debug)]
struct Lane {
    lifetime: Duration,
    queue: VecDeque<(Instant, u64)>,
}

/// What one entry costs besides its response bytes: its map slot (with the map's control
/// byte and its 7/8 load), its place in a lane, the allocator's rounding of the response.
pub(crate) const ENTRY_BYTES: usize =
    (std::mem::size_of::<(u64, Entry)>() + 1) * 8 / 7 + std::mem::size_of::<(Instant, u64)>() + 16;

/// The absorbed transactions of one endpoint.
#[derive(Debug)]
pub(crate) struct Absorbed {
    hasher: RandomState,
    entries: HashMap<u64, Entry, BuildHasherDefault<Identity>>,
    lanes: Vec<Lane>,
    budget: usize,
    response_bytes: usize,
}

impl Absorbed {
    /// An empty table that holds at most `budget` bytes (see [`ENTRY_BYTES`]); at least one
    /// entry always fits.
    pub fn new(budget: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            entries: HashMap::default(),
            lanes: Vec::new(),
            budget,
            response_bytes: 0,
        }
    }

    /// The bytes the entries count against the budget.
    pub fn used_bytes(&self) -> usize {
        self.entries.len() * ENTRY_BYTES + self.response_bytes
    }

    /// The table's hash of `key`.
    pub fn hash(&self, key: &ServerKey) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(key.branch.as_bytes());
        h.write_u8(0xff);
        h.write(key.sent_by.as_bytes());
        h.write_u8(0xff);
        h.write(key.method.as_bytes());
        h.finish()
    }

    /// The entry of `key`, if it is absorbed here.
    pub fn get(&self, key: &ServerKey) -> Option<&Entry> {
        self.entries.get(&self.hash(key))
    }

    /// Absorbs `key`'s transaction for `lifetime` from `now`. A key already here keeps its
    /// first entry (a transaction ends once). When full, the oldest entry makes room.
    pub fn insert(
        &mut self,
        now: Instant,
        lifetime: Duration,
        key: &ServerKey,
        dest: SocketAddr,
        answer: Answer,
    ) {
        let hash = self.hash(key);
        if self.entries.contains_key(&hash) {
            return;
        }
        let cost = ENTRY_BYTES + answer_bytes(&answer);
        while self.used_bytes() + cost > self.budget {
            if !self.evict_oldest() {
                break;
            }
        }
        self.response_bytes += answer_bytes(&answer);
        self.entries.insert(hash, Entry { dest, answer });
        let lane = match self.lanes.iter().position(|l| l.lifetime == lifetime) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane { lifetime, queue: VecDeque::new() });
                self.lanes.len() - 1
            }
        };
        self.lanes[lane].queue.push_back((now + lifetime, hash));
    }

    /// The earliest expiry, or None when empty.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.lanes.iter().filter_map(|l| l.queue.front().map(|(at, _)| *at)).min()
    }

    /// Forgets every entry whose lifetime is over at `now`.
    pub fn expire(&mut self, now: Instant) {
        for i in 0..self.lanes.len() {
            while let Some(&(at, hash)) = self.lanes[i].queue.front() {
                if at > now {
                    break;
                }
                self.lanes[i].queue.pop_front();
                self.forget(hash);
            }
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of stored responses (the rest is a fixed size per entry).
    #[cfg(test)]
    pub fn response_bytes(&self) -> usize {
        self.response_bytes
    }

    fn forget(&mut self, hash: u64) {
        if let Some(entry) = self.entries.remove(&hash) {
            self.response_bytes -= answer_bytes(&entry.answer);
        }
    }

    /// Drops the entry that expires first; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.queue.front().map(|(at, _)| (*at, i)))
            .min();
        let Some((_, lane)) = oldest else { return false };
        if let Some((_, hash)) = self.lanes[lane].queue.pop_front() {
            self.forget(hash);
        }
        true
    }
}

fn answer_bytes(answer: &Answer) -> usize {
    match answer {
        Answer::Resend(bytes) => bytes.len(),
        Answer::Accepted(_) | Answer::Silent | Answer::RebuildOk => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(branch: &str, method: &str) -> ServerKey {
        ServerKey {
            branch: branch.to_owned(),
            sent_by: "192.0.2.1:5060".to_owned(),
            method: method.to_owned().into(),
        }
    }

    fn dest() -> SocketAddr {
        "192.0.2.1:5060".parse().unwrap()
    }

    const LONG: Duration = Duration::from_secs(32);
    const SHORT: Duration = Duration::from_secs(5);

    #[test]
    fn a_key_is_found_until_its_lifetime_ends_and_then_forgotten() {
        let t0 = Instant::now();
        let mut table = Absorbed::new(1 << 20);
        table.insert(
            t0,
            LONG,
            &key("z9hG4bK1", "BYE"),
            dest(),
            Answer::Resend(b"SIP/2.0 200".to_vec().into()),
        );
        table.insert(t0, SHORT, &key("z9hG4bK2", "INVITE"), dest(), Answer::Silent);
        let got = table.get(&key("z9hG4bK1", "BYE")).map(|e| e.answer.clone());
        assert_eq!(got, Some(Answer::Resend(b"SIP/2.0 200".to_vec().into())));
        // Another method, branch or sent-by is another transaction.
        assert!(table.get(&key("z9hG4bK1", "INVITE")).is_none());
        assert!(table.get(&key("z9hG4bK3", "BYE")).is_none());
        assert_eq!(table.response_bytes(), 11);
        assert_eq!(table.next_expiry(), Some(t0 + SHORT));

        table.expire(t0 + SHORT);
        assert!(table.get(&key("z9hG4bK2", "INVITE")).is_none());
        assert!(table.get(&key("z9hG4bK1", "BYE")).is_some());
        assert_eq!(table.next_expiry(), Some(t0 + LONG));
        table.expire(t0 + LONG - Duration::from_millis(1));
        assert_eq!(table.len(), 1);
        table.expire(t0 + LONG);
        assert_eq!((table.len(), table.response_bytes(), table.next_expiry()), (0, 0, None));
    }

    #[test]
    fn a_key_keeps_its_first_entry() {
        let t0 = Instant::now();
        let mut table = Absorbed::new(1 << 20);
        table.insert(
            t0,
            LONG,
            &key("z9hG4bKa", "BYE"),
            dest(),
            Answer::Resend(b"first".to_vec().into()),
        );
        table.insert(
            t0,
            LONG,
            &key("z9hG4bKa", "BYE"),
            dest(),
            Answer::Resend(b"second".to_vec().into()),
        );
        assert_eq!(table.len(), 1);
        assert_eq!(table.response_bytes(), 5);
        assert_eq!(
            table.get(&key("z9hG4bKa", "BYE")).map(|e| e.answer.clone()),
            Some(Answer::Resend(b"first".to_vec().into()))
        );
    }

    #[test]
    fn a_full_table_forgets_the_entry_nearest_its_end() {
        let t0 = Instant::now();
        let mut table = Absorbed::new(3 * ENTRY_BYTES);
        table.insert(t0, LONG, &key("z9hG4bKlong", "BYE"), dest(), Answer::Silent);
        table.insert(
            t0 + Duration::from_secs(1),
            SHORT,
            &key("z9hG4bKshort", "INVITE"),
            dest(),
            Answer::Silent,
        );
        table.insert(
            t0 + Duration::from_secs(2),
            LONG,
            &key("z9hG4bKlater", "BYE"),
            dest(),
            Answer::Silent,
        );
        // Full: the short-lived entry ends first (t0 + 6 s), so it makes room.
        table.insert(
            t0 + Duration::from_secs(3),
            LONG,
            &key("z9hG4bKnew", "BYE"),
            dest(),
            Answer::Silent,
        );
        assert_eq!(table.len(), 3);
        assert!(table.get(&key("z9hG4bKshort", "INVITE")).is_none());
        for b in ["z9hG4bKlong", "z9hG4bKlater", "z9hG4bKnew"] {
            assert!(table.get(&key(b, "BYE")).is_some(), "{b}");
        }
    }

    #[test]
    fn two_tables_hash_one_key_differently() {
        // The hash is keyed per table, so a peer cannot precompute collisions.
        let k = key("z9hG4bKsame", "BYE");
        let hashes: std::collections::HashSet<u64> =
            (0..8).map(|_| Absorbed::new(0).hash(&k)).collect();
        assert!(hashes.len() > 1);
    }
}
