//! Why a clone failed, one variant per cause.

use precall_api::VoiceId;

/// Why a clone job failed. The `Display` text is what the job records as its failure reason.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The profile lists no sample URLs, so there is nothing to clone.
    #[error("the voice profile has no samples")]
    NoSamples,
    /// A sample could not be fetched; the provider API was not called.
    #[error("voice sample {url}: {reason}")]
    Sample {
        /// The sample's URL without query string, fragment or user info.
        url: String,
        /// What went wrong with it.
        #[source]
        reason: SampleError,
    },
    /// The provider rejected the API key (`401`).
    #[error("the clone provider rejected the API key (401)")]
    Unauthorized,
    /// The account's quota is used up (`401` with `detail.status = "quota_exceeded"`).
    #[error("the clone provider's quota is exceeded (401): {detail}")]
    QuotaExceeded {
        /// The provider's explanation.
        detail: String,
    },
    /// The account's voice slots are full (`400` with `detail.status =
    /// "voice_limit_reached"`): a slot must be freed (`DELETE /v1/voices/{id}`) first.
    #[error("the clone provider's voice library is full (400 voice_limit_reached): {detail}")]
    VoiceLimitReached {
        /// The provider's explanation.
        detail: String,
    },
    /// The provider rejected the request's content (`422`), with its `detail`, truncated.
    #[error("the clone provider rejected the request (422): {detail}")]
    Validation {
        /// The provider's explanation.
        detail: String,
    },
    /// The provider kept answering `429` (rate or concurrency limit); retryable until the
    /// attempts run out.
    #[error("the clone provider is rate limiting (429)")]
    RateLimited,
    /// The provider kept answering a `5xx`; retryable until the attempts run out.
    #[error("the clone provider failed with {status}")]
    Server {
        /// The last `5xx` status.
        status: u16,
    },
    /// The provider answered a status this client does not expect (`400`, `403`, `404`, …).
    #[error("the clone provider answered {status}{}", fmt_detail(.detail))]
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
        /// The provider's explanation, truncated; empty when it gave none.
        detail: String,
    },
    /// The request (or reading its answer) took longer than the configured timeout. Not
    /// retried: the voice may have been created.
    #[error("the clone provider did not answer in time")]
    Timeout,
    /// The request could not be sent or its answer not read (connect refused, TLS, reset).
    #[error("cannot reach the clone provider: {0}")]
    Transport(#[source] reqwest::Error),
    /// A success status whose body is not the expected JSON (or has no `voice_id`).
    #[error("the clone provider's answer is unusable: {reason}")]
    BadResponse {
        /// What is wrong with the body.
        reason: String,
    },
    /// The voice was created but cannot be used until it is verified at the provider.
    #[error("voice {voice_id} requires verification at the provider before use")]
    RequiresVerification {
        /// The created, unverified voice.
        voice_id: VoiceId,
    },
    /// The simulated provider was configured to fail.
    #[error("simulated clone failure")]
    Simulated,
    /// The provider configuration is unusable (empty or non-header-safe API key, zero attempts,
    /// bad base URL).
    #[error("invalid clone provider configuration: {reason}")]
    InvalidConfig {
        /// Which setting is wrong.
        reason: &'static str,
    },
}

impl CloneError {
    /// Whether another attempt may succeed: only `429` and `5xx`, and only while attempts
    /// remain (the provider returns these variants as final once they ran out).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited | Self::Server { .. })
    }

    /// Whether the failure will recur on its own until somebody changes something (the API
    /// key, the account's plan or voice library, the samples, the configuration): a bad key,
    /// the quota, a full voice library, rejected samples, a voice that needs verification, an
    /// unexpected `4xx`. Everything else (`429`, `5xx`, timeouts, connection failures, a
    /// garbled answer) is transient: the same request may succeed later.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::NoSamples
            | Self::Unauthorized
            | Self::QuotaExceeded { .. }
            | Self::VoiceLimitReached { .. }
            | Self::Validation { .. }
            | Self::RequiresVerification { .. }
            | Self::InvalidConfig { .. } => true,
            Self::UnexpectedStatus { status, .. } => {
                (400..500).contains(status) && !matches!(status, 408 | 409 | 425 | 429)
            }
            Self::Sample { reason, .. } => reason.is_permanent(),
            Self::RateLimited
            | Self::Server { .. }
            | Self::Timeout
            | Self::Transport(_)
            | Self::BadResponse { .. }
            | Self::Simulated => false,
        }
    }
}

fn fmt_detail(detail: &str) -> String {
    if detail.is_empty() { String::new() } else { format!(": {detail}") }
}

impl SampleError {
    /// Whether fetching the sample again is bound to fail the same way: a bad URL, a sample
    /// over the limit, a missing or unreadable file, a `4xx` from its server. A `5xx`, `408`,
    /// `429` or a failed connection may pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::UnsupportedScheme { .. } | Self::InvalidUrl { .. } | Self::TooLarge { .. } => {
                true
            }
            Self::Io(_) => true,
            Self::HttpStatus { status } => {
                (400..500).contains(status) && !matches!(status, 408 | 425 | 429)
            }
            Self::Transport(_) => false,
        }
    }
}

/// Why one voice sample could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Only `file://`, `http://` and `https://` samples are supported.
    #[error("unsupported URL scheme {scheme:?}")]
    UnsupportedScheme {
        /// The scheme as written (empty when the URL has none).
        scheme: String,
    },
    /// The URL cannot be parsed or is not usable (relative `file://` path, remote `file://`
    /// host, bad percent-encoding).
    #[error("invalid URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it.
        reason: String,
    },
    /// The sample is bigger than the per-sample limit.
    #[error("larger than the {limit}-byte sample limit")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// Reading a `file://` sample failed.
    #[error("cannot read file: {0}")]
    Io(#[source] std::io::Error),
    /// The HTTP server answered a non-2xx status.
    #[error("HTTP status {status}")]
    HttpStatus {
        /// The status.
        status: u16,
    },
    /// The HTTP request failed (connect, TLS, timeout, reset while reading).
    #[error("HTTP request failed: {0}")]
    Transport(#[source] reqwest::Error),
}
