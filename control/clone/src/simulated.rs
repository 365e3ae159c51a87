//! A provider that clones nothing: it waits, then answers a configured outcome.
//!
//! For demos and end-to-end tests without an ElevenLabs account. It fetches no samples.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use precall_api::VoiceId;
use precall_controller::CloneRequest;

use crate::error::CloneError;
use crate::{CloneProvider, VoiceState};

/// What every simulated clone ends with (`SIMULATED_CLONE_OUTCOME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SimulatedOutcome {
    /// A voice id `sim-<profile id>-<job number>`.
    #[default]
    Completed,
    /// [`CloneError::Simulated`].
    Failed,
}

/// A `SIMULATED_CLONE_OUTCOME` value other than `completed` or `failed`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown simulated clone outcome {0:?} (expected completed or failed)")]
pub struct UnknownOutcome(pub String);

impl FromStr for SimulatedOutcome {
    type Err = UnknownOutcome;

    /// `completed` or `failed`, case-insensitive, surrounding blanks ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("completed") {
            Ok(Self::Completed)
        } else if t.eq_ignore_ascii_case("failed") {
            Ok(Self::Failed)
        } else {
            Err(UnknownOutcome(t.chars().take(64).collect()))
        }
    }
}

impl fmt::Display for SimulatedOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
        })
    }
}

/// How the simulated provider behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedConfig {
    /// How long a clone takes (`SIMULATED_CLONE_DELAY_MS`, default 3000 ms).
    pub delay: Duration,
    /// How every clone ends (`SIMULATED_CLONE_OUTCOME`, default completed).
    pub outcome: SimulatedOutcome,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self { delay: Duration::from_millis(3000), outcome: SimulatedOutcome::Completed }
    }
}

/// Waits [`SimulatedConfig::delay`] per clone, then answers [`SimulatedConfig::outcome`].
#[derive(Clone, Debug)]
pub struct SimulatedProvider {
    config: SimulatedConfig,
}

impl SimulatedProvider {
    /// A provider with this behaviour.
    pub fn new(config: SimulatedConfig) -> Self {
        Self { config }
    }

    /// The voice id a completed simulated clone of `req` answers.
    pub fn voice_id_for(req: &CloneRequest) -> VoiceId {
        VoiceId::new(format!("sim-{}-{}", req.profile.id.as_str(), req.job_id.0))
    }
}

impl CloneProvider for SimulatedProvider {
    async fn clone_voice(&self, req: &CloneRequest) -> Result<VoiceId, CloneError> {
        // The simulated clone's duration is its behaviour (tokio time, so paused-clock tests
        // advance through it instantly).
        if !self.config.delay.is_zero() {
            tokio::time::sleep(self.config.delay).await;
        }
        match self.config.outcome {
            SimulatedOutcome::Completed => {
                let voice = Self::voice_id_for(req);
                tracing::info!(
                    job = req.job_id.0,
                    profile = %req.profile.id,
                    voice = %voice,
                    "simulated clone completed"
                );
                Ok(voice)
            }
            SimulatedOutcome::Failed => {
                tracing::info!(
                    job = req.job_id.0,
                    profile = %req.profile.id,
                    "simulated clone failed"
                );
                Err(CloneError::Simulated)
            }
        }
    }

    async fn delete_voice(&self, voice: &VoiceId) -> Result<(), CloneError> {
        tracing::info!(voice = %voice, "simulated voice deleted");
        Ok(())
    }

    async fn check_voice(&self, _voice: &VoiceId) -> Result<VoiceState, CloneError> {
        Ok(VoiceState::Usable)
    }

    fn name(&self) -> &'static str {
        "simulated"
    }
}
