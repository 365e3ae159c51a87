//! Twilio's `CallStatus` webhook parameter.

use std::fmt;
use std::str::FromStr;

/// A call's state as Twilio reports it in `CallStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TwilioCallStatus {
    /// `queued`: waiting to be dialled (outbound).
    Queued,
    /// `ringing`: ringing at the destination, or being delivered to precall.
    Ringing,
    /// `in-progress`: answered and connected.
    InProgress,
    /// `completed`: answered, then ended normally.
    Completed,
    /// `busy`: the callee was busy.
    Busy,
    /// `failed`: could not be placed (bad number, carrier error).
    Failed,
    /// `no-answer`: rang out unanswered.
    NoAnswer,
    /// `canceled`: hung up while queued or ringing.
    Canceled,
}

/// A `CallStatus` value that is not one of Twilio's documented ones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown Twilio CallStatus {0:?}")]
pub struct UnknownCallStatus(pub String);

impl TwilioCallStatus {
    /// Every status, in Twilio's documented order.
    pub const ALL: [TwilioCallStatus; 8] = [
        TwilioCallStatus::Queued,
        TwilioCallStatus::Ringing,
        TwilioCallStatus::InProgress,
        TwilioCallStatus::Completed,
        TwilioCallStatus::Busy,
        TwilioCallStatus::Failed,
        TwilioCallStatus::NoAnswer,
        TwilioCallStatus::Canceled,
    ];

    /// Twilio's spelling (`in-progress`, `no-answer`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TwilioCallStatus::Queued => "queued",
            TwilioCallStatus::Ringing => "ringing",
            TwilioCallStatus::InProgress => "in-progress",
            TwilioCallStatus::Completed => "completed",
            TwilioCallStatus::Busy => "busy",
            TwilioCallStatus::Failed => "failed",
            TwilioCallStatus::NoAnswer => "no-answer",
            TwilioCallStatus::Canceled => "canceled",
        }
    }

    /// Parses Twilio's spelling exactly (lower case, hyphenated).
    pub fn parse(s: &str) -> Result<Self, UnknownCallStatus> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownCallStatus(s.to_owned()))
    }

    /// Whether the call is over: `completed`, `busy`, `failed`, `no-answer` or `canceled`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TwilioCallStatus::Completed
                | TwilioCallStatus::Busy
                | TwilioCallStatus::Failed
                | TwilioCallStatus::NoAnswer
                | TwilioCallStatus::Canceled
        )
    }
}

impl FromStr for TwilioCallStatus {
    type Err = UnknownCallStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TwilioCallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_spellings() {
        let table = [
            ("queued", TwilioCallStatus::Queued, false),
            ("ringing", TwilioCallStatus::Ringing, false),
            ("in-progress", TwilioCallStatus::InProgress, false),
            ("completed", TwilioCallStatus::Completed, true),
            ("busy", TwilioCallStatus::Busy, true),
            ("failed", TwilioCallStatus::Failed, true),
            ("no-answer", TwilioCallStatus::NoAnswer, true),
            ("canceled", TwilioCallStatus::Canceled, true),
        ];
        for (text, status, terminal) in table {
            assert_eq!(TwilioCallStatus::parse(text), Ok(status));
            assert_eq!(text.parse::<TwilioCallStatus>(), Ok(status));
            assert_eq!(status.as_str(), text);
            assert_eq!(status.to_string(), text);
            assert_eq!(status.is_terminal(), terminal, "{text}");
        }
        assert_eq!(table.len(), TwilioCallStatus::ALL.len());
    }

    #[test]
    fn unknown_values_are_errors() {
        for bad in ["", "in_progress", "InProgress", "cancelled", "Completed", " busy"] {
            assert_eq!(TwilioCallStatus::parse(bad), Err(UnknownCallStatus(bad.to_owned())));
        }
    }
}
