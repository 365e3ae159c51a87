//! ElevenLabs Instant Voice Cloning: `POST {api_base}/v1/voices/add`.
//!
//! Wire format (from the `elevenlabs` Python SDK, `voices/ivc/raw_client.py` and
//! `core/http_client.py`): multipart/form-data with the text fields `name`,
//! `remove_background_noise` (`true`/`false`, as httpx renders a bool), `description` and `labels`
//! (a JSON object as a string), then one `files` part per sample (file name and content type
//! set); header `xi-api-key`. Any 2xx answers `{"voice_id", "requires_verification",
//! "library_voice_match"}`; `422` carries a JSON `detail`.

use std::time::{Duration, Instant};

use precall_api::VoiceId;
use precall_controller::CloneRequest;
use reqwest::header::{HeaderValue, RETRY_AFTER};
use reqwest::multipart::{Form, Part};
use serde::Deserialize;
use serde_json::Value;

use crate::error::CloneError;
use crate::sample::{Sample, fetch_sample, loggable_url};
use crate::{CloneProvider, VoiceState};

/// The public API.
pub const DEFAULT_API_BASE: &str = "https://api.elevenlabs.io";

/// Error details kept in [`CloneError`] are cut to this many characters.
const DETAIL_MAX_CHARS: usize = 300;

/// Bodies of API answers are read up to this size (a voice answer is tiny).
const BODY_MAX_BYTES: usize = 64 << 10;

/// How to reach ElevenLabs and how patiently.
#[derive(Clone)]
pub struct ElevenLabsConfig {
    /// Base URL without trailing slash (default [`DEFAULT_API_BASE`]).
    pub api_base: String,
    /// Sent as `xi-api-key`; never logged.
    pub api_key: String,
    /// Whole-request limit, also for sample downloads (default 60 s).
    pub request_timeout: Duration,
    /// TCP/TLS connect limit (default 5 s).
    pub connect_timeout: Duration,
    /// Attempts of the add-voice request, first included (default 4); only `429`/`5xx` retry.
    pub max_attempts: u32,
    /// First retry delay, doubling per retry (default 500 ms).
    pub backoff_base: Duration,
    /// Cap on any retry delay, `Retry-After` included (default 8 s).
    pub backoff_max: Duration,
    /// Ask ElevenLabs to clean the samples (it can hurt clean samples; default off).
    pub remove_background_noise: bool,
    /// Per-sample size limit (default 20 MiB).
    pub max_sample_bytes: u64,
}

impl ElevenLabsConfig {
    /// The defaults with this API key.
    pub fn new(api_key: impl Into<String>) -> Self {
        Self { api_key: api_key.into(), ..Self::default() }
    }
}

impl Default for ElevenLabsConfig {
    /// The documented defaults with an empty API key (set one before use).
    fn default() -> Self {
        Self {
            api_base: DEFAULT_API_BASE.to_owned(),
            api_key: String::new(),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 4,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            remove_background_noise: false,
            max_sample_bytes: 20 << 20,
        }
    }
}

impl std::fmt::Debug for ElevenLabsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElevenLabsConfig")
            .field("api_base", &self.api_base)
            .field("api_key", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("remove_background_noise", &self.remove_background_noise)
            .field("max_sample_bytes", &self.max_sample_bytes)
            .finish()
    }
}

/// Clones voices with ElevenLabs Instant Voice Cloning.
///
/// `Debug` shows the API key as `Sensitive`.
#[derive(Debug)]
pub struct ElevenLabsProvider {
    client: reqwest::Client,
    add_voice_url: reqwest::Url,
    /// `{api_base}/v1/voices`, for one voice's URL (`DELETE`, `GET`).
    voices_url: reqwest::Url,
    api_key: HeaderValue,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    remove_background_noise: bool,
    max_sample_bytes: u64,
}

impl ElevenLabsProvider {
    /// Checks the configuration and builds the HTTP client.
    pub fn new(config: ElevenLabsConfig) -> Result<Self, CloneError> {
        let key = config.api_key.trim();
        if key.is_empty() {
            return Err(CloneError::InvalidConfig { reason: "the API key is empty" });
        }
        let mut api_key = HeaderValue::from_str(key).map_err(|_| CloneError::InvalidConfig {
            reason: "the API key is not a valid header value",
        })?;
        api_key.set_sensitive(true);
        if config.max_attempts == 0 {
            return Err(CloneError::InvalidConfig { reason: "max_attempts must be at least 1" });
        }
        let base = config.api_base.trim().trim_end_matches('/');
        let add_voice_url = reqwest::Url::parse(&format!("{base}/v1/voices/add"))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or(CloneError::InvalidConfig { reason: "api_base is not an http(s) URL" })?;
        let voices_url = reqwest::Url::parse(&format!("{base}/v1/voices"))
            .map_err(|_| CloneError::InvalidConfig { reason: "api_base is not an http(s) URL" })?;
        // No redirects: the API key goes with every request, and must never reach another host.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("precall/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(CloneError::Transport)?;
        Ok(Self {
            client,
            add_voice_url,
            voices_url,
            api_key,
            max_attempts: config.max_attempts,
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
            remove_background_noise: config.remove_background_noise,
            max_sample_bytes: config.max_sample_bytes,
        })
    }

    async fn fetch_samples(&self, req: &CloneRequest) -> Result<Vec<Sample>, CloneError> {
        let urls = &req.profile.sample_urls;
        if urls.is_empty() {
            return Err(CloneError::NoSamples);
        }
        let mut samples = Vec::with_capacity(urls.len());
        for url in urls {
            let sample = fetch_sample(url, self.max_sample_bytes, &self.client)
                .await
                .map_err(|reason| CloneError::Sample { url: loggable_url(url), reason })?;
            samples.push(sample);
        }
        Ok(samples)
    }

    /// The multipart body, rebuilt per attempt (a sent form is consumed). Field order as the
    /// SDK sends it: text fields first, then the files.
    fn form(&self, req: &CloneRequest, samples: &[Sample]) -> Result<Form, CloneError> {
        let profile = &req.profile;
        let labels = serde_json::json!({
            "precall_profile": profile.id.as_str(),
            "precall_job": req.job_id.0.to_string(),
        });
        let mut form = Form::new()
            .text("name", profile.name.clone())
            .text(
                "remove_background_noise",
                if self.remove_background_noise { "true" } else { "false" },
            )
            .text("description", format!("precall voice for profile {}", profile.id.as_str()))
            .text("labels", labels.to_string());
        for sample in samples {
            let part = Part::bytes(sample.bytes.clone())
                .file_name(sample.filename.clone())
                .mime_str(sample.content_type)
                .map_err(CloneError::Transport)?;
            form = form.part("files", part);
        }
        Ok(form)
    }

    /// One add-voice request; on failure also the server's `Retry-After`, if any.
    async fn attempt(&self, form: Form) -> Result<VoiceId, (CloneError, Option<Duration>)> {
        let resp = self
            .client
            .post(self.add_voice_url.clone())
            .header("xi-api-key", self.api_key.clone())
            .multipart(form)
            .send()
            .await
            .map_err(|e| (request_error(e), None))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let body = read_capped(resp, BODY_MAX_BYTES).await.map_err(|e| (request_error(e), None))?;
        classify(status, &body).map_err(|e| (e, retry_after))
    }
}

impl ElevenLabsProvider {
    /// `{api_base}/v1/voices/{voice_id}`, the id percent-encoded as one path segment.
    fn voice_url(&self, voice: &VoiceId) -> reqwest::Url {
        let mut url = self.voices_url.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(voice.as_str());
        }
        url
    }

    /// One request about one voice: its status and body (capped).
    async fn voice_request(
        &self,
        method: reqwest::Method,
        voice: &VoiceId,
    ) -> Result<(u16, Vec<u8>), CloneError> {
        let resp = self
            .client
            .request(method, self.voice_url(voice))
            .header("xi-api-key", self.api_key.clone())
            .send()
            .await
            .map_err(request_error)?;
        let status = resp.status().as_u16();
        let body = read_capped(resp, BODY_MAX_BYTES).await.map_err(request_error)?;
        Ok((status, body))
    }
}

/// Whether an answer about one voice says it does not exist (`404`, or `400` with
/// `detail.status = "voice_not_found"`).
fn voice_gone(status: u16, body: &[u8]) -> bool {
    status == 404 || (status == 400 && error_status(body).as_deref() == Some("voice_not_found"))
}

/// The failure an unexpected answer about one voice stands for.
fn voice_error(status: u16, body: &[u8]) -> CloneError {
    match classify(status, body) {
        Err(e) => e,
        // A 2xx is never unexpected; classify answers Ok only for one.
        Ok(_) => CloneError::UnexpectedStatus { status, detail: error_detail(body) },
    }
}

impl CloneProvider for ElevenLabsProvider {
    async fn delete_voice(&self, voice: &VoiceId) -> Result<(), CloneError> {
        let (status, body) = self.voice_request(reqwest::Method::DELETE, voice).await?;
        if (200..300).contains(&status) || voice_gone(status, &body) {
            tracing::info!(voice = %voice, status, "elevenlabs voice deleted");
            return Ok(());
        }
        Err(voice_error(status, &body))
    }

    async fn check_voice(&self, voice: &VoiceId) -> Result<VoiceState, CloneError> {
        let (status, body) = self.voice_request(reqwest::Method::GET, voice).await?;
        if voice_gone(status, &body) {
            return Ok(VoiceState::Gone);
        }
        if !(200..300).contains(&status) {
            return Err(voice_error(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| CloneError::BadResponse {
            reason: format!("not the expected JSON: {e}"),
        })?;
        let unverified = v
            .get("voice_verification")
            .and_then(|vv| vv.get("requires_verification"))
            .and_then(Value::as_bool)
            == Some(true);
        let blocked = v
            .get("safety_control")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.eq_ignore_ascii_case("NONE"));
        Ok(if unverified || blocked { VoiceState::Unusable } else { VoiceState::Usable })
    }

    async fn clone_voice(&self, req: &CloneRequest) -> Result<VoiceId, CloneError> {
        let samples = self.fetch_samples(req).await?;
        let total_bytes: usize = samples.iter().map(|s| s.bytes.len()).sum();
        let mut attempt = 1;
        loop {
            let form = self.form(req, &samples)?;
            let started = Instant::now();
            let outcome = self.attempt(form).await;
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            match outcome {
                Ok(voice) => {
                    tracing::info!(
                        job = req.job_id.0,
                        profile = %req.profile.id,
                        attempt,
                        samples = samples.len(),
                        total_bytes,
                        elapsed_ms,
                        voice = %voice,
                        "elevenlabs add voice succeeded"
                    );
                    return Ok(voice);
                }
                Err((error, retry_after))
                    if error.is_retryable() && attempt < self.max_attempts =>
                {
                    let delay =
                        retry_delay(attempt, retry_after, self.backoff_base, self.backoff_max);
                    tracing::warn!(
                        job = req.job_id.0,
                        profile = %req.profile.id,
                        attempt,
                        max_attempts = self.max_attempts,
                        elapsed_ms,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        %error,
                        "elevenlabs add voice failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err((error, _)) => {
                    tracing::warn!(
                        job = req.job_id.0,
                        profile = %req.profile.id,
                        attempt,
                        max_attempts = self.max_attempts,
                        elapsed_ms,
                        %error,
                        "elevenlabs add voice failed"
                    );
                    return Err(error);
                }
            }
        }
    }

    fn name(&self) -> &'static str {
        "elevenlabs"
    }
}

/// Delay before retry number `retry` (1 = after the first attempt): `Retry-After` when the
/// server sent one, else `base * 2^(retry-1)`; never more than `max`.
fn retry_delay(
    retry: u32,
    retry_after: Option<Duration>,
    base: Duration,
    max: Duration,
) -> Duration {
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let factor = 1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// The outcome an answer stands for.
fn classify(status: u16, body: &[u8]) -> Result<VoiceId, CloneError> {
    match status {
        200..=299 => parse_voice(body),
        401 if error_status(body).as_deref() == Some("quota_exceeded") => {
            Err(CloneError::QuotaExceeded { detail: error_detail(body) })
        }
        401 => Err(CloneError::Unauthorized),
        400 if error_status(body).as_deref() == Some("voice_limit_reached") => {
            Err(CloneError::VoiceLimitReached { detail: error_detail(body) })
        }
        422 => Err(CloneError::Validation { detail: error_detail(body) }),
        429 => Err(CloneError::RateLimited),
        500..=599 => Err(CloneError::Server { status }),
        _ => Err(CloneError::UnexpectedStatus { status, detail: error_detail(body) }),
    }
}

#[derive(Deserialize)]
struct AddVoiceResponse {
    voice_id: Option<String>,
    #[serde(default)]
    requires_verification: Option<bool>,
}

fn parse_voice(body: &[u8]) -> Result<VoiceId, CloneError> {
    let parsed: AddVoiceResponse = serde_json::from_slice(body)
        .map_err(|e| CloneError::BadResponse { reason: format!("not the expected JSON: {e}") })?;
    let voice_id = match parsed.voice_id {
        Some(id) if !id.trim().is_empty() => VoiceId::new(id),
        _ => {
            return Err(CloneError::BadResponse { reason: "no voice_id".to_owned() });
        }
    };
    if parsed.requires_verification == Some(true) {
        return Err(CloneError::RequiresVerification { voice_id });
    }
    Ok(voice_id)
}

/// The machine-readable cause of an error body: ElevenLabs' `{"detail": {"status": …}}`.
fn error_status(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("detail")?.get("status")?.as_str().map(str::to_owned)
}

/// A short explanation from an error body: ElevenLabs' `{"detail": {"message": …}}`,
/// FastAPI's `{"detail": [{"loc": […], "msg": …}]}`, a plain `detail` string, or the raw text.
fn error_detail(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("detail") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    let msg = item.get("msg").and_then(Value::as_str);
                    let loc = item.get("loc").and_then(Value::as_array).map(|parts| {
                        parts
                            .iter()
                            .map(|p| match p {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .collect::<Vec<_>>()
                            .join(".")
                    });
                    match (loc, msg) {
                        (Some(loc), Some(msg)) => format!("{loc}: {msg}"),
                        (None, Some(msg)) => msg.to_owned(),
                        _ => item.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
            Some(d) => d
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| d.to_string(), str::to_owned),
            None => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    truncate(text.trim(), DETAIL_MAX_CHARS)
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

fn request_error(e: reqwest::Error) -> CloneError {
    if e.is_timeout() { CloneError::Timeout } else { CloneError::Transport(e.without_url()) }
}

/// Reads at most `cap` bytes of the body (the rest is dropped unread).
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_and_caps() {
        let (base, max) = (500 * MS, 8000 * MS);
        let delays: Vec<_> = (1..=7).map(|r| retry_delay(r, None, base, max)).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 8000, 8000].map(|ms| ms * MS));
        assert_eq!(retry_delay(40, None, base, max), max);
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let (base, max) = (500 * MS, 8000 * MS);
        assert_eq!(retry_delay(1, Some(Duration::from_secs(3)), base, max), 3000 * MS);
        assert_eq!(retry_delay(1, Some(Duration::from_secs(120)), base, max), max);
    }

    #[test]
    fn statuses() {
        let ok = br#"{"voice_id":"v1","requires_verification":false,"library_voice_match":null}"#;
        assert_eq!(classify(200, ok).unwrap(), VoiceId::new("v1"));
        assert_eq!(classify(201, ok).unwrap(), VoiceId::new("v1"));
        assert!(matches!(classify(401, b""), Err(CloneError::Unauthorized)));
        assert!(matches!(classify(429, b""), Err(CloneError::RateLimited)));
        assert!(matches!(classify(502, b"<html>"), Err(CloneError::Server { status: 502 })));
        assert!(matches!(
            classify(200, br#"{"voice_id":""}"#),
            Err(CloneError::BadResponse { .. })
        ));
        match classify(400, br#"{"detail":{"status":"voice_limit_reached","message":"Limit"}}"#) {
            Err(e @ CloneError::VoiceLimitReached { .. }) => {
                assert!(e.is_permanent());
                assert!(e.to_string().ends_with(": Limit"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        match classify(401, br#"{"detail":{"status":"quota_exceeded","message":"Out"}}"#) {
            Err(e @ CloneError::QuotaExceeded { .. }) => assert!(e.is_permanent()),
            other => panic!("{other:?}"),
        }
        // Another 400 stays what it is (still permanent: the request is wrong).
        match classify(400, br#"{"detail":{"status":"invalid_name","message":"Bad"}}"#) {
            Err(e @ CloneError::UnexpectedStatus { status: 400, .. }) => assert!(e.is_permanent()),
            other => panic!("{other:?}"),
        }
        assert!(!classify(429, b"").unwrap_err().is_permanent());
        assert!(!classify(503, b"").unwrap_err().is_permanent());
        assert!(classify(401, b"").unwrap_err().is_permanent());
        assert!(classify(422, b"{}").unwrap_err().is_permanent());
    }

    #[test]
    fn details() {
        assert_eq!(error_detail(br#"{"detail":"bad name"}"#), "bad name");
        assert_eq!(
            error_detail(
                br#"{"detail":[{"loc":["body","files",0],"msg":"too short","type":"x"},{"msg":"m2"}]}"#
            ),
            "body.files.0: too short; m2"
        );
        assert_eq!(error_detail(b"plain text"), "plain text");
        let long = format!(r#"{{"detail":"{}"}}"#, "é".repeat(1000));
        let d = error_detail(long.as_bytes());
        assert_eq!(d.chars().count(), DETAIL_MAX_CHARS + 1);
        assert!(d.ends_with('…'));
    }

    #[test]
    fn config_checks() {
        assert!(matches!(
            ElevenLabsProvider::new(ElevenLabsConfig::new("  ")),
            Err(CloneError::InvalidConfig { .. })
        ));
        assert!(matches!(
            ElevenLabsProvider::new(ElevenLabsConfig::new("k\n1")),
            Err(CloneError::InvalidConfig { .. })
        ));
        assert!(matches!(
            ElevenLabsProvider::new(ElevenLabsConfig {
                max_attempts: 0,
                ..ElevenLabsConfig::new("k")
            }),
            Err(CloneError::InvalidConfig { .. })
        ));
        assert!(matches!(
            ElevenLabsProvider::new(ElevenLabsConfig {
                api_base: "ftp://x".to_owned(),
                ..ElevenLabsConfig::new("k")
            }),
            Err(CloneError::InvalidConfig { .. })
        ));
        let p = ElevenLabsProvider::new(ElevenLabsConfig {
            api_base: "http://127.0.0.1:9/".to_owned(),
            ..ElevenLabsConfig::new("secret-key")
        })
        .unwrap();
        assert_eq!(p.add_voice_url.as_str(), "http://127.0.0.1:9/v1/voices/add");
        assert_eq!(
            p.voice_url(&VoiceId::new("ab/c d")).as_str(),
            "http://127.0.0.1:9/v1/voices/ab%2Fc%20d"
        );
        assert!(!format!("{p:?}").contains("secret-key"));
        assert!(!format!("{:?}", ElevenLabsConfig::new("secret-key")).contains("secret-key"));
    }
}
