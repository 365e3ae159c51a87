//! The node's journal: what the store could not take during an outage, kept in order until it
//! can.
//!
//! A call that arrives while the database is away is answered from the node's own knowledge
//! (greeting + hold, from the configured profiles) and its record is journaled; so are the ends
//! and events of calls during the outage. Once the store answers, the journal is replayed
//! oldest first, each entry with the time it happened, so nothing a caller did is lost and
//! the records read as if the store had never been away. Bounded: when full, new entries are
//! refused (the caller then gets what an outage gave before: an error, or SIP `503`), never
//! old ones dropped. Plain data, no I/O: the side runtime drives it.

use std::collections::{HashMap, VecDeque};

use precall_api::{CallContext, CallId, MediaEventKind, Timestamp};

/// Entries kept at most (a few hundred bytes each).
pub const JOURNAL_CAPACITY: usize = 100_000;

/// What the store is to be told, once it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A call arrived (answered greeting + hold): record it, claim its clone.
    Inbound(CallContext),
    /// A call ended.
    Ended {
        /// Why.
        reason: String,
    },
    /// A media stream closed (`failed`: the call failed).
    StreamClosed {
        /// Why.
        reason: String,
        /// The call failed rather than ended.
        failed: bool,
    },
    /// Something for the call's history.
    Event {
        /// What.
        kind: MediaEventKind,
        /// The text.
        detail: String,
    },
}

/// One journaled entry: which call, when, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journaled {
    /// The call it concerns.
    pub call_id: CallId,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub entry: Entry,
}

/// The journal is full: the entry was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the node's journal is full ({JOURNAL_CAPACITY} entries waiting for the store)")]
pub struct Full;

#[derive(Debug, Default)]
struct Waiting {
    entries: usize,
    inbound: Option<CallContext>,
}

/// The ordered, bounded journal.
#[derive(Debug)]
pub struct Journal {
    entries: VecDeque<Journaled>,
    /// Per call: its entries waiting, and its arrival while that waits (so a request about
    /// a journaled call keeps its place behind them, in O(1)).
    calls: HashMap<CallId, Waiting>,
    capacity: usize,
}

impl Default for Journal {
    fn default() -> Self {
        Self::with_capacity(JOURNAL_CAPACITY)
    }
}

impl Journal {
    /// An empty journal keeping at most `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { entries: VecDeque::new(), calls: HashMap::new(), capacity: capacity.max(1) }
    }

    /// Keeps an entry at the end.
    pub fn push(&mut self, call_id: CallId, at: Timestamp, entry: Entry) -> Result<(), Full> {
        if self.entries.len() >= self.capacity {
            return Err(Full);
        }
        let waiting = self.calls.entry(call_id.clone()).or_default();
        waiting.entries += 1;
        if let Entry::Inbound(ctx) = &entry {
            waiting.inbound.get_or_insert_with(|| ctx.clone());
        }
        self.entries.push_back(Journaled { call_id, at, entry });
        Ok(())
    }

    /// The oldest entry, to replay.
    pub fn front(&self) -> Option<&Journaled> {
        self.entries.front()
    }

    /// Removes the oldest entry once the store has it.
    pub fn pop(&mut self) -> Option<Journaled> {
        let head = self.entries.pop_front()?;
        if let Some(waiting) = self.calls.get_mut(&head.call_id) {
            waiting.entries -= 1;
            if matches!(head.entry, Entry::Inbound(_)) {
                waiting.inbound = None;
            }
            if waiting.entries == 0 {
                self.calls.remove(&head.call_id);
            }
        }
        Some(head)
    }

    /// Whether entries about `call_id` wait (a request about it must queue behind them).
    pub fn has(&self, call_id: &CallId) -> bool {
        self.calls.contains_key(call_id)
    }

    /// Whether a call's arrival waits (the call is known to this node, not yet to the store).
    pub fn has_inbound(&self, call_id: &CallId) -> bool {
        self.inbound(call_id).is_some()
    }

    /// The journaled arrival of a call, while it waits.
    pub fn inbound(&self, call_id: &CallId) -> Option<&CallContext> {
        self.calls.get(call_id)?.inbound.as_ref()
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use precall_api::{CallStatus, Protocol};

    fn ctx(id: &str) -> CallContext {
        CallContext {
            call_id: id.into(),
            session_id: String::new(),
            caller_number: "+1555".into(),
            recipient_number: "+1800".into(),
            status: CallStatus::Ringing,
            protocol: Protocol::Sip,
        }
    }

    #[test]
    fn entries_come_back_in_order_and_calls_are_tracked() {
        let mut j = Journal::with_capacity(3);
        j.push("a".into(), Timestamp(1), Entry::Inbound(ctx("a"))).unwrap();
        j.push("b".into(), Timestamp(2), Entry::Inbound(ctx("b"))).unwrap();
        j.push("a".into(), Timestamp(3), Entry::Ended { reason: "bye".into() }).unwrap();
        assert_eq!(j.push("c".into(), Timestamp(4), Entry::Inbound(ctx("c"))), Err(Full));
        assert!(j.has_inbound(&"a".into()) && j.has(&"b".into()) && !j.has(&"c".into()));
        assert_eq!(j.inbound(&"b".into()), Some(&ctx("b")));
        let order: Vec<_> = std::iter::from_fn(|| j.pop()).map(|e| (e.call_id, e.at)).collect();
        assert_eq!(
            order,
            [("a".into(), Timestamp(1)), ("b".into(), Timestamp(2)), ("a".into(), Timestamp(3))]
        );
        assert!(j.is_empty() && !j.has(&"a".into()));
    }

    #[test]
    fn a_call_stays_tracked_until_its_last_entry_is_replayed() {
        let mut j = Journal::default();
        j.push("a".into(), Timestamp(1), Entry::Inbound(ctx("a"))).unwrap();
        j.push("a".into(), Timestamp(2), Entry::Ended { reason: "bye".into() }).unwrap();
        j.pop();
        assert!(j.has(&"a".into()) && !j.has_inbound(&"a".into()));
        j.pop();
        assert!(!j.has(&"a".into()));
        assert_eq!(j.len(), 0);
    }
}
