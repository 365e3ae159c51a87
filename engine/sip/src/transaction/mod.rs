//! Transactions (RFC 3261 §17): what a UAS, its BYE and its session refreshes need over UDP.

use std::borrow::Cow;

pub(crate) mod absorbed;
pub(crate) mod client_invite;
pub(crate) mod client_non_invite;
pub(crate) mod server_invite;

/// Identifies a transaction in the endpoint's tables and timer queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TxnId(pub u64);

/// A server transaction's matching key (RFC 3261 §17.2.3): the top Via branch and sent-by,
/// and the method, where ACK counts as INVITE. Requests without the magic cookie (RFC 2543
/// peers, §17.2.3 last paragraphs) use Call-ID, CSeq number and From tag in place of the
/// branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ServerKey {
    pub branch: String,
    pub sent_by: String,
    /// The methods we know are borrowed (no allocation per request); others are owned.
    pub method: Cow<'static, str>,
}

/// `method` as a [`ServerKey`] holds it.
pub(crate) fn key_method(method: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 10] = [
        "INVITE", "BYE", "OPTIONS", "CANCEL", "UPDATE", "INFO", "PRACK", "REGISTER", "MESSAGE",
        "NOTIFY",
    ];
    match KNOWN.iter().find(|m| **m == method) {
        Some(m) => Cow::Borrowed(*m),
        None => Cow::Owned(method.to_owned()),
    }
}

/// What a timer did to a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerEffect {
    /// Send the stored message again.
    Retransmit,
    /// Timer H or F: the peer never answered.
    TimedOut,
    /// Timers I, J, K, L: the transaction is over.
    Terminated,
}

/// Why we sent a non-INVITE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A BYE. `ends_call`: its outcome ends the call (a hang-up); false when the call already
    /// ended (the 2xx give-up, an expired session).
    Bye { ends_call: bool },
    /// An UPDATE refreshing the session (RFC 4028 §7.4).
    Refresh,
}
