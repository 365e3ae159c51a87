//! What the controller tells a handler to do with a call.

use std::fmt;
use std::time::Duration;

use crate::{CallId, VoiceId};

/// The state of a voice clone job, with the seed's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloneStatus {
    /// The provider is still building the voice.
    Processing,
    /// The voice exists and can be used.
    Completed,
    /// The clone could not be made.
    Failed,
}

impl CloneStatus {
    /// `processing`, `completed` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloneStatus::Processing => "processing",
            CloneStatus::Completed => "completed",
            CloneStatus::Failed => "failed",
        }
    }

    /// Parses [`CloneStatus::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "processing" => CloneStatus::Processing,
            "completed" => CloneStatus::Completed,
            "failed" => CloneStatus::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for CloneStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one thing a handler does next with a call, derived from [`CallInstructions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallAction {
    /// Play greeting and/or hold audio, then ask again after the poll interval.
    Hold,
    /// Bridge the caller to the agent WebSocket.
    Connect,
    /// Speak the error message (if any), then hang up.
    Hangup,
}

/// A clip to play.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudioInstruction {
    /// `http(s)://` or `file://` URL of a WAV or MP3 clip.
    pub url: String,
    /// How many times to play it; `0` means loop until the next instruction.
    pub loops: u32,
}

/// Words to say to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeechInstruction {
    /// The text (Twilio speaks it with `<Say>`).
    pub text: String,
    /// A pre-recorded clip of the same words, for handlers without text-to-speech (SIP).
    pub audio_url: Option<String>,
}

/// Ask the controller again about this call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPollInstruction {
    /// The call to ask about.
    pub call_id: CallId,
    /// How long to wait before asking.
    pub interval: Duration,
    /// How much longer the call may be held before the controller gives up on it.
    pub hold_remaining: Duration,
}

/// Bridge the call to a conversational agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebSocketInstruction {
    /// The agent's WebSocket URL (`wss://…/v1/convai/conversation?agent_id=…`).
    pub url: String,
    /// The agent to talk to.
    pub agent_id: String,
    /// The cloned voice the agent speaks with.
    pub voice_id: VoiceId,
    /// An opening line for the agent, when the voice profile sets one.
    pub first_message: Option<String>,
}

/// The controller's answer to an inbound call or a status check.
///
/// Handlers translate it as a whole: greeting, then hold, then a poll; or a WebSocket bridge; or
/// an error message and a hang-up. [`CallInstructions::action`] names which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallInstructions {
    /// The call these are for.
    pub call_id: CallId,
    /// The clone job's state when the instructions were made.
    pub clone_status: CloneStatus,
    /// Played once, first (inbound answers only).
    pub greeting_audio: Option<AudioInstruction>,
    /// Played after the greeting while waiting.
    pub hold_audio: Option<AudioInstruction>,
    /// When to ask again.
    pub status_poll: Option<StatusPollInstruction>,
    /// The agent bridge, once the clone is ready.
    pub websocket: Option<WebSocketInstruction>,
    /// Said before hanging up.
    pub error_message: Option<SpeechInstruction>,
    /// End the call after the error message.
    pub should_hangup: bool,
}

impl CallInstructions {
    /// The next action these instructions ask for.
    pub fn action(&self) -> CallAction {
        if self.should_hangup {
            CallAction::Hangup
        } else if self.websocket.is_some() {
            CallAction::Connect
        } else {
            CallAction::Hold
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CallInstructions {
        CallInstructions {
            call_id: "c".into(),
            clone_status: CloneStatus::Processing,
            greeting_audio: None,
            hold_audio: None,
            status_poll: None,
            websocket: None,
            error_message: None,
            should_hangup: false,
        }
    }

    #[test]
    fn action_follows_fields() {
        assert_eq!(base().action(), CallAction::Hold);
        let mut connect = base();
        connect.websocket = Some(WebSocketInstruction {
            url: "wss://agent".into(),
            agent_id: "a".into(),
            voice_id: "v".into(),
            first_message: None,
        });
        assert_eq!(connect.action(), CallAction::Connect);
        let mut hangup = connect.clone();
        hangup.should_hangup = true;
        assert_eq!(hangup.action(), CallAction::Hangup);
    }

    #[test]
    fn clone_status_names() {
        for s in [CloneStatus::Processing, CloneStatus::Completed, CloneStatus::Failed] {
            assert_eq!(CloneStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(CloneStatus::Processing.as_str(), "processing");
        assert_eq!(CloneStatus::parse("done"), None);
    }
}
