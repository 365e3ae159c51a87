//! What a protocol handler knows about an inbound call.

use std::fmt;

use crate::{CallId, Redacted};

/// Which door the call came in through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A Twilio Programmable Voice webhook.
    Twilio,
    /// Native SIP from a carrier trunk.
    Sip,
}

impl Protocol {
    /// The lower-case name used in storage and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Twilio => "twilio",
            Protocol::Sip => "sip",
        }
    }

    /// Parses [`Protocol::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "twilio" => Some(Protocol::Twilio),
            "sip" => Some(Protocol::Sip),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a call stands, as recorded by the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallStatus {
    /// Announced by the handler, not yet recorded.
    Ringing,
    /// Greeting and hold audio while the clone is prepared.
    Holding,
    /// Handed to the agent bridge.
    Connected,
    /// The clone failed or the hold limit passed: error message, then hang up.
    Failed,
    /// The call is over (either side hung up).
    Ended,
}

impl CallStatus {
    /// The lower-case name used in storage and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Ringing => "ringing",
            CallStatus::Holding => "holding",
            CallStatus::Connected => "connected",
            CallStatus::Failed => "failed",
            CallStatus::Ended => "ended",
        }
    }

    /// Parses [`CallStatus::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ringing" => CallStatus::Ringing,
            "holding" => CallStatus::Holding,
            "connected" => CallStatus::Connected,
            "failed" => CallStatus::Failed,
            "ended" => CallStatus::Ended,
            _ => return None,
        })
    }

    /// Whether the call can no longer change (it has ended).
    pub fn is_terminal(self) -> bool {
        self == CallStatus::Ended
    }

    /// Whether `self → next` is a legal transition of a call's one state machine: ringing or
    /// holding → connected, failed or ended (ringing → holding too), connected → failed (its
    /// agent leg failed: the caller hears the error message) or ended, failed → ended. No state
    /// is ever returned to, and staying in one is not a transition. Every store applies this
    /// rule, so two nodes can never flip a call back and forth.
    pub fn can_become(self, next: CallStatus) -> bool {
        use CallStatus::{Connected, Ended, Failed, Holding, Ringing};
        matches!(
            (self, next),
            (Ringing, Holding | Connected | Failed | Ended)
                | (Holding, Connected | Failed | Ended)
                | (Connected, Failed | Ended)
                | (Failed, Ended)
        )
    }

    /// The states a call can come to `self` from ([`CallStatus::can_become`]).
    pub fn predecessors(self) -> &'static [CallStatus] {
        use CallStatus::{Connected, Failed, Holding, Ringing};
        match self {
            CallStatus::Ringing => &[],
            CallStatus::Holding => &[Ringing],
            CallStatus::Connected => &[Ringing, Holding],
            CallStatus::Failed => &[Ringing, Holding, Connected],
            CallStatus::Ended => &[Ringing, Holding, Connected, Failed],
        }
    }
}

impl fmt::Display for CallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inbound call as a protocol handler saw it.
#[derive(Clone, PartialEq, Eq)]
pub struct CallContext {
    /// Twilio `CallSid` or SIP `Call-ID`.
    pub call_id: CallId,
    /// The protocol's own session handle: Twilio's `AccountSid`, or the SIP dialog's
    /// remote tag; empty when there is none.
    pub session_id: String,
    /// Who called (`From`), as received.
    pub caller_number: String,
    /// The dialed number (`To`, or the SIP Request-URI user); it selects the voice profile.
    pub recipient_number: String,
    /// Where the call stands; handlers pass [`CallStatus::Ringing`].
    pub status: CallStatus,
    /// Twilio or SIP.
    pub protocol: Protocol,
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("call_id", &self.call_id)
            .field("session_id", &self.session_id)
            .field("caller_number", &Redacted(&self.caller_number))
            .field("recipient_number", &Redacted(&self.recipient_number))
            .field("status", &self.status)
            .field("protocol", &self.protocol)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [Protocol::Twilio, Protocol::Sip] {
            assert_eq!(Protocol::parse(p.as_str()), Some(p));
        }
        for s in [
            CallStatus::Ringing,
            CallStatus::Holding,
            CallStatus::Connected,
            CallStatus::Failed,
            CallStatus::Ended,
        ] {
            assert_eq!(CallStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(Protocol::parse("h323"), None);
        assert_eq!(CallStatus::parse(""), None);
    }

    #[test]
    fn the_state_machine_allows_only_its_transitions() {
        use CallStatus::{Connected, Ended, Failed, Holding, Ringing};
        let all = [Ringing, Holding, Connected, Failed, Ended];
        let legal: Vec<(CallStatus, CallStatus)> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            legal,
            [
                (Ringing, Holding),
                (Ringing, Connected),
                (Ringing, Failed),
                (Ringing, Ended),
                (Holding, Connected),
                (Holding, Failed),
                (Holding, Ended),
                (Connected, Failed),
                (Connected, Ended),
                (Failed, Ended),
            ]
        );
        // predecessors() is the same rule read backwards.
        for b in all {
            let from: Vec<CallStatus> = all.iter().copied().filter(|a| a.can_become(b)).collect();
            assert_eq!(b.predecessors(), from.as_slice(), "{b}");
        }
    }

    #[test]
    fn debug_redacts_numbers() {
        let ctx = CallContext {
            call_id: "CA1".into(),
            session_id: String::new(),
            caller_number: "+12349013030".into(),
            recipient_number: "+18005551212".into(),
            status: CallStatus::Ringing,
            protocol: Protocol::Twilio,
        };
        let shown = format!("{ctx:?}");
        assert!(!shown.contains("2349013030"), "{shown}");
        assert!(shown.contains("3030"), "{shown}");
    }
}
