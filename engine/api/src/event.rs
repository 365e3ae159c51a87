//! What a media leg records on a call's history while it is bridged.

/// A call event the engine reports (the store keeps each call's transcript with them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MediaEventKind {
    /// The agent conversation started (its id and audio formats).
    AgentConnected,
    /// What the agent said.
    AgentResponse,
    /// What the agent heard the caller say.
    UserTranscript,
    /// A key the caller pressed (RFC 4733 or Twilio `dtmf`).
    Dtmf,
    /// The agent leg failed (why, and the server's message).
    AgentFailed,
    /// A Twilio media stream broke without Twilio's `stop`: Twilio runs the TwiML after
    /// `</Connect>` next (the poll flow).
    StreamLost,
}

impl MediaEventKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaEventKind::AgentConnected => "agent_connected",
            MediaEventKind::AgentResponse => "agent_response",
            MediaEventKind::UserTranscript => "user_transcript",
            MediaEventKind::Dtmf => "dtmf",
            MediaEventKind::AgentFailed => "agent_failed",
            MediaEventKind::StreamLost => "stream_lost",
        }
    }
}
