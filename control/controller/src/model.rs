//! Records the controller keeps: calls, clone jobs, events and voice profiles.

use std::fmt;

use precall_api::{
    CallContext, CallId, CallStatus, CloneStatus, JobId, ProfileId, Protocol, Redacted, Timestamp,
    VoiceId,
};
use sha2::{Digest, Sha256};

/// A call as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// Twilio `CallSid` or SIP `Call-ID`.
    pub call_id: CallId,
    /// See [`CallContext::session_id`].
    pub session_id: String,
    /// Twilio or SIP.
    pub protocol: Protocol,
    /// Who called.
    pub caller_number: String,
    /// The dialed number.
    pub recipient_number: String,
    /// The voice profile the dialed number selected.
    pub profile_id: ProfileId,
    /// The clone job this call waits on (set right after the call is recorded).
    pub clone_job_id: Option<JobId>,
    /// Where the call stands.
    pub status: CallStatus,
    /// When the call was recorded (hold time counts from here).
    pub started_at: Timestamp,
    /// When the call was handed to the agent.
    pub connected_at: Option<Timestamp>,
    /// When the call ended.
    pub ended_at: Option<Timestamp>,
    /// Why the call failed (clone failure, hold limit), if it did.
    pub failure: Option<String>,
    /// Why the call ended (`caller_hangup`, `completed`, `canceled`, …).
    pub end_reason: Option<String>,
}

impl CallRecord {
    /// A new record for an inbound call, holding from `now`.
    pub fn inbound(ctx: &CallContext, profile_id: ProfileId, now: Timestamp) -> Self {
        Self {
            call_id: ctx.call_id.clone(),
            session_id: ctx.session_id.clone(),
            protocol: ctx.protocol,
            caller_number: ctx.caller_number.clone(),
            recipient_number: ctx.recipient_number.clone(),
            profile_id,
            clone_job_id: None,
            status: CallStatus::Holding,
            started_at: now,
            connected_at: None,
            ended_at: None,
            failure: None,
            end_reason: None,
        }
    }
}

impl fmt::Debug for CallRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallRecord")
            .field("call_id", &self.call_id)
            .field("session_id", &self.session_id)
            .field("protocol", &self.protocol)
            .field("caller_number", &Redacted(&self.caller_number))
            .field("recipient_number", &Redacted(&self.recipient_number))
            .field("profile_id", &self.profile_id)
            .field("clone_job_id", &self.clone_job_id)
            .field("status", &self.status)
            .field("started_at", &self.started_at)
            .field("connected_at", &self.connected_at)
            .field("ended_at", &self.ended_at)
            .field("failure", &self.failure)
            .field("end_reason", &self.end_reason)
            .finish()
    }
}

/// A voice clone job at the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneJob {
    /// Store-assigned number.
    pub id: JobId,
    /// The profile whose samples are cloned.
    pub profile_id: ProfileId,
    /// [`VoiceProfile::samples_hash`] when the job started: the clone is reused while it matches.
    pub samples_hash: String,
    /// `processing`, `completed` or `failed`.
    pub status: CloneStatus,
    /// The provider's voice, once completed.
    pub voice_id: Option<VoiceId>,
    /// Why it failed, once failed.
    pub error: Option<String>,
    /// When the job's current run started (its creation, or the takeover of a lapsed lease).
    pub started_at: Timestamp,
    /// When it completed or failed.
    pub finished_at: Option<Timestamp>,
    /// The node running it, while it is processing.
    pub lease_owner: Option<String>,
    /// Until when the running node's lease holds (it renews it while the provider works);
    /// once it lapses, any node may take the job over. `None`: never leased (a job from before
    /// leases), which counts as lapsed.
    pub lease_until: Option<Timestamp>,
    /// 1 for the first job of a sample set; one more for each job that follows a failed one
    /// (the backoff doubles with it).
    pub attempt: u32,
    /// A failed job's failure will recur until somebody changes something (bad key, quota,
    /// full voice library, rejected samples): it backs off for long.
    pub permanent: bool,
    /// A failed job serves its failure until then; the first call after it starts a new job.
    pub retry_at: Option<Timestamp>,
    /// When the job's voice was deleted at the provider (a voice replaced by new samples, or
    /// freed for a slot, or found gone).
    pub voice_deleted_at: Option<Timestamp>,
    /// When the provider last confirmed the voice exists (`None`: not since it was made).
    pub checked_at: Option<Timestamp>,
}

impl CloneJob {
    /// A new processing job, leased to `lease`'s node.
    pub fn new(
        id: JobId,
        profile_id: ProfileId,
        samples_hash: &str,
        attempt: u32,
        now: Timestamp,
        lease: &Lease,
    ) -> Self {
        Self {
            id,
            profile_id,
            samples_hash: samples_hash.to_owned(),
            status: CloneStatus::Processing,
            voice_id: None,
            error: None,
            started_at: now,
            finished_at: None,
            lease_owner: Some(lease.owner.clone()),
            lease_until: Some(lease.until),
            attempt,
            permanent: false,
            retry_at: None,
            voice_deleted_at: None,
            checked_at: None,
        }
    }

    /// When the voice was last known to exist: its last check, or its creation.
    pub fn confirmed_at(&self) -> Timestamp {
        self.checked_at.or(self.finished_at).unwrap_or(self.started_at)
    }

    /// Whether its lease has lapsed at `now` (a processing job nobody runs any more).
    pub fn lease_lapsed(&self, now: Timestamp) -> bool {
        self.lease_until.is_none_or(|until| until <= now)
    }
}

/// A node's hold on a job it runs: who, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The node (`NODE_ID`).
    pub owner: String,
    /// When the lease lapses unless renewed.
    pub until: Timestamp,
}

/// Why a clone job failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFailure {
    /// What the job records and the call's failure says.
    pub reason: String,
    /// See [`CloneJob::permanent`].
    pub permanent: bool,
}

impl JobFailure {
    /// A failure that may pass by itself.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), permanent: false }
    }

    /// A failure that recurs until somebody changes something.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), permanent: true }
    }
}

/// How a clone job ended: the provider's voice, or why there is none.
pub type JobOutcome = Result<VoiceId, JobFailure>;

/// The voice (and agent) a dialed number gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoiceProfile {
    /// Stable identifier (`default` for the profile from configuration).
    pub id: ProfileId,
    /// The dialed number that selects this profile (normalized, see [`normalize_number`]);
    /// `None` for a profile only reachable as the default.
    pub number: Option<String>,
    /// Display name, also the name of the voice at the provider.
    pub name: String,
    /// Audio samples of the voice to clone (`http(s)://` or `file://`).
    pub sample_urls: Vec<String>,
    /// The conversational agent to bridge to; the configured default when `None`.
    pub agent_id: Option<String>,
    /// Greeting clip for this number; the configured default when `None`.
    pub greeting_url: Option<String>,
    /// Hold clip for this number; the configured default when `None`.
    pub hold_url: Option<String>,
    /// The agent's opening line, when set.
    pub first_message: Option<String>,
}

impl VoiceProfile {
    /// Fingerprint of the sample set: a completed clone is reused while this is unchanged.
    ///
    /// The URLs are what is fingerprinted, in order: replacing a sample means giving it a new
    /// URL (content behind an unchanged URL is not re-read on every call).
    pub fn samples_hash(&self) -> String {
        let mut h = Sha256::new();
        for url in &self.sample_urls {
            h.update((url.len() as u64).to_be_bytes());
            h.update(url.as_bytes());
        }
        let digest = h.finalize();
        let mut out = String::with_capacity(64);
        for b in digest {
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        out
    }
}

/// What the shell must do to start a clone job the controller claimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneRequest {
    /// The job to report on with `clone_finished`.
    pub job_id: JobId,
    /// The job's attempt ([`CloneJob::attempt`]).
    pub attempt: u32,
    /// The profile to clone (name and samples).
    pub profile: VoiceProfile,
}

/// Kinds of entries in a call's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The call was recorded.
    Inbound,
    /// The same call id arrived again (webhook retry, retransmitted INVITE).
    DuplicateInbound,
    /// This call started a new clone job.
    CloneStarted,
    /// This call waits on a job another call started.
    CloneJoined,
    /// This call reuses a completed clone.
    CloneReused,
    /// The call was handed to the agent.
    Connected,
    /// The call failed (error message, hang up).
    Failed,
    /// The call ended.
    Ended,
    /// The agent conversation started (its id and audio formats).
    AgentConnected,
    /// What the agent said.
    AgentResponse,
    /// What the agent heard the caller say.
    UserTranscript,
    /// A key the caller pressed.
    Dtmf,
    /// The agent leg failed (why, with the server's message).
    AgentFailed,
    /// A Twilio media stream started on a shard (the shard's plan was made).
    StreamStarted,
    /// A Twilio media stream broke without Twilio's `stop` (Twilio falls back to polling).
    StreamLost,
    /// The provider no longer has the reused clone's voice: the call waits on a new clone.
    VoiceGone,
}

impl EventKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Inbound => "inbound",
            EventKind::DuplicateInbound => "duplicate_inbound",
            EventKind::CloneStarted => "clone_started",
            EventKind::CloneJoined => "clone_joined",
            EventKind::CloneReused => "clone_reused",
            EventKind::Connected => "connected",
            EventKind::Failed => "failed",
            EventKind::Ended => "ended",
            EventKind::AgentConnected => "agent_connected",
            EventKind::AgentResponse => "agent_response",
            EventKind::UserTranscript => "user_transcript",
            EventKind::Dtmf => "dtmf",
            EventKind::AgentFailed => "agent_failed",
            EventKind::StreamStarted => "stream_started",
            EventKind::StreamLost => "stream_lost",
            EventKind::VoiceGone => "voice_gone",
        }
    }

    /// Parses [`EventKind::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "inbound" => EventKind::Inbound,
            "duplicate_inbound" => EventKind::DuplicateInbound,
            "clone_started" => EventKind::CloneStarted,
            "clone_joined" => EventKind::CloneJoined,
            "clone_reused" => EventKind::CloneReused,
            "connected" => EventKind::Connected,
            "failed" => EventKind::Failed,
            "ended" => EventKind::Ended,
            "agent_connected" => EventKind::AgentConnected,
            "agent_response" => EventKind::AgentResponse,
            "user_transcript" => EventKind::UserTranscript,
            "dtmf" => EventKind::Dtmf,
            "agent_failed" => EventKind::AgentFailed,
            "stream_started" => EventKind::StreamStarted,
            "stream_lost" => EventKind::StreamLost,
            "voice_gone" => EventKind::VoiceGone,
            _ => return None,
        })
    }
}

/// One entry in a call's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallEvent {
    /// The call.
    pub call_id: CallId,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: EventKind,
    /// Free text: a job id, a failure reason, an end reason.
    pub detail: String,
}

/// Normalizes a dialed number for profile lookup: keeps a leading `+` and the digits.
///
/// `"+1 (800) 555-1212"` and `"+18005551212"` select the same profile. A value with no digits
/// (a SIP user name such as `agent`) is kept as it is, lower-cased.
pub fn normalize_number(raw: &str) -> String {
    let trimmed = raw.trim();
    // A telephone-subscriber's parameters (`;npdi`, `;rn=+1…` from number portability,
    // `;isub=`, `;phone-context=`) are not part of the number: their digits must not join it.
    let number = trimmed.split(';').next().unwrap_or(trimmed);
    let trimmed = if number.chars().any(|c| c.is_ascii_digit()) { number.trim() } else { trimmed };
    let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return trimmed.to_ascii_lowercase();
    }
    if trimmed.starts_with('+') { format!("+{digits}") } else { digits }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialed_numbers_lose_separators_and_number_parameters() {
        assert_eq!(normalize_number("+1 (800) 555-1212"), "+18005551212");
        assert_eq!(normalize_number("+1.800.555.1212"), "+18005551212");
        // Number portability: the routing number's digits must not join the dialed number.
        assert_eq!(normalize_number("+1-800-555-1212;npdi;rn=+1-999-555-0000"), "+18005551212");
        assert_eq!(normalize_number("18005551212;rn=1999;npdi"), "18005551212");
        assert_eq!(normalize_number("5551212;phone-context=+1800"), "5551212");
        // User names without digits stay as they are, parameters included, lower-cased.
        assert_eq!(normalize_number("Agent"), "agent");
        assert_eq!(normalize_number("support;x=y"), "support;x=y");
    }

    fn profile(urls: &[&str]) -> VoiceProfile {
        VoiceProfile {
            id: "p".into(),
            number: None,
            name: "P".into(),
            sample_urls: urls.iter().map(|s| (*s).to_owned()).collect(),
            agent_id: None,
            greeting_url: None,
            hold_url: None,
            first_message: None,
        }
    }

    #[test]
    fn samples_hash_tracks_the_sample_list() {
        let a = profile(&["https://x/a.mp3", "https://x/b.mp3"]);
        let same = profile(&["https://x/a.mp3", "https://x/b.mp3"]);
        let other = profile(&["https://x/a.mp3"]);
        // Concatenation must not collide: ["ab","c"] vs ["a","bc"].
        let split1 = profile(&["ab", "c"]);
        let split2 = profile(&["a", "bc"]);
        assert_eq!(a.samples_hash(), same.samples_hash());
        assert_ne!(a.samples_hash(), other.samples_hash());
        assert_ne!(split1.samples_hash(), split2.samples_hash());
        assert_eq!(a.samples_hash().len(), 64);
    }

    #[test]
    fn numbers_normalize() {
        assert_eq!(normalize_number("+1 (800) 555-1212"), "+18005551212");
        assert_eq!(normalize_number(" 18005551212 "), "18005551212");
        assert_eq!(normalize_number("Agent"), "agent");
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in [
            EventKind::Inbound,
            EventKind::DuplicateInbound,
            EventKind::CloneStarted,
            EventKind::CloneJoined,
            EventKind::CloneReused,
            EventKind::Connected,
            EventKind::Failed,
            EventKind::Ended,
        ] {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
    }
}
