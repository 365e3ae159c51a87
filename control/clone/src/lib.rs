//! Voice clone providers: turn a [`VoiceProfile`]'s audio samples into a provider voice id.
//!
//! # Flow
//!
//! The control shell claims a clone job from the controller and gets a [`CloneRequest`]. It
//! calls [`CloneProvider::clone_voice`] once per job on the provider the binary picked at start
//! ([`AnyProvider`]), and reports the outcome back to the controller (`clone_finished`):
//!
//! 1. [`ElevenLabsProvider`] (Instant Voice Cloning):
//!    - fetches every sample URL of the profile ([`fetch_sample`]: `file://` from disk,
//!      `http(s)://` with a GET), each capped at
//!      [`ElevenLabsConfig::max_sample_bytes`]; any failure ends the job before the API is called;
//!    - sends one `POST {api_base}/v1/voices/add` (multipart: `name`, `remove_background_noise`,
//!      `description`, `labels`, then one `files` part per sample) with the `xi-api-key` header;
//!    - retries only `429` and `5xx`, with doubling backoff (or `Retry-After` on `429`), up to
//!      [`ElevenLabsConfig::max_attempts`] attempts; everything else is final at once;
//!    - parses `{"voice_id": …, "requires_verification": …}`; a voice that needs verification
//!      is a failure ([`CloneError::RequiresVerification`]);
//!    - `DELETE {api_base}/v1/voices/{voice_id}` frees a slot ([`CloneProvider::delete_voice`]:
//!      a voice already gone is no error), `GET` the same URL says whether a voice still exists
//!      and may speak ([`CloneProvider::check_voice`]).
//! 2. [`SimulatedProvider`] waits its configured delay and answers a deterministic
//!    `sim-<profile>-<job>` voice id or [`CloneError::Simulated`], for demos and tests.
//!
//! Errors are precise per cause ([`CloneError`], [`SampleError`]), and say whether they are
//! permanent ([`CloneError::is_permanent`]: the job backs off for long) or transient; the shell stores their
//! `Display` text as the job's failure reason. Neither the API key nor sample URL query strings
//! (which may carry signatures) appear in errors or logs.
//!
//! [`VoiceProfile`]: precall_controller::VoiceProfile

use std::future::Future;

use precall_api::VoiceId;
use precall_controller::CloneRequest;

mod elevenlabs;
mod error;
mod sample;
mod simulated;

pub use elevenlabs::{DEFAULT_API_BASE, ElevenLabsConfig, ElevenLabsProvider};
pub use error::{CloneError, SampleError};
pub use sample::{Sample, fetch_sample};
pub use simulated::{SimulatedConfig, SimulatedOutcome, SimulatedProvider, UnknownOutcome};

/// Something that turns a profile's samples into a provider voice.
///
/// One call per clone job; the call performs every retry it wants itself, so its error is final.
pub trait CloneProvider: Send + Sync + 'static {
    /// Clones the voice of `req.profile` and returns the provider's voice id.
    fn clone_voice(
        &self,
        req: &CloneRequest,
    ) -> impl Future<Output = Result<VoiceId, CloneError>> + Send;

    /// Deletes a voice this node created (frees its slot in the account's voice library).
    /// A voice already gone is no error.
    fn delete_voice(&self, voice: &VoiceId) -> impl Future<Output = Result<(), CloneError>> + Send;

    /// Whether a voice still exists and may be used.
    fn check_voice(
        &self,
        voice: &VoiceId,
    ) -> impl Future<Output = Result<VoiceState, CloneError>> + Send;

    /// Short provider name for logs and job records (`elevenlabs`, `simulated`).
    fn name(&self) -> &'static str;
}

/// What the provider says of a voice it made earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoiceState {
    /// It exists and may speak.
    Usable,
    /// It exists but may not be used (it needs verification, or the provider's safety control
    /// holds it).
    Unusable,
    /// It is gone (deleted in the provider's dashboard, or by another tool).
    Gone,
}

/// The provider the binary picked at start (static dispatch over the known providers).
#[derive(Debug)]
pub enum AnyProvider {
    /// ElevenLabs Instant Voice Cloning (boxed: its HTTP client is large).
    ElevenLabs(Box<ElevenLabsProvider>),
    /// No provider: a fixed delay and a configured outcome.
    Simulated(SimulatedProvider),
}

impl CloneProvider for AnyProvider {
    async fn clone_voice(&self, req: &CloneRequest) -> Result<VoiceId, CloneError> {
        match self {
            Self::ElevenLabs(p) => p.clone_voice(req).await,
            Self::Simulated(p) => p.clone_voice(req).await,
        }
    }

    async fn delete_voice(&self, voice: &VoiceId) -> Result<(), CloneError> {
        match self {
            Self::ElevenLabs(p) => p.delete_voice(voice).await,
            Self::Simulated(p) => p.delete_voice(voice).await,
        }
    }

    async fn check_voice(&self, voice: &VoiceId) -> Result<VoiceState, CloneError> {
        match self {
            Self::ElevenLabs(p) => p.check_voice(voice).await,
            Self::Simulated(p) => p.check_voice(voice).await,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::ElevenLabs(p) => p.name(),
            Self::Simulated(p) => p.name(),
        }
    }
}

impl From<ElevenLabsProvider> for AnyProvider {
    fn from(p: ElevenLabsProvider) -> Self {
        Self::ElevenLabs(Box::new(p))
    }
}

impl From<SimulatedProvider> for AnyProvider {
    fn from(p: SimulatedProvider) -> Self {
        Self::Simulated(p)
    }
}
