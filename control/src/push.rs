//! The live-call push (`TWILIO_HOLD_MODE=poll`): when a held Twilio call has news (its clone
//! completed or failed, or its hold limit passed), precall tells Twilio at once with the REST
//! API instead of waiting for the caller's hold clip to end and the next poll.
//!
//! `POST {TWILIO_API_BASE}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with basic
//! auth (`AccountSid:AuthToken`, or an API key `SK…:secret`) and a form body `Twiml=<Response>…`
//! (the same TwiML the poll would answer, absolute URLs); past Twilio's 4,000-character limit
//! for inline TwiML, `Url=` + `Method=POST` of the poll URL instead, so Twilio fetches it.
//! `404` (code 20404) means the call has already ended; `429`, `5xx` and transport errors are
//! retried with backoff; any other answer is a failure (logged, and polling goes on). Each call
//! is pushed at most once, by whichever node claims it first in the store
//! ([`Store::claim_push`](precall_controller::Store::claim_push)); polling stays the fallback.

use std::time::Duration;

use precall_api::{CallAction, CallId, CallInstructions};
use precall_twilio::twiml;

use crate::twilio::twiml_urls;

/// Inline TwiML Twilio accepts at most (error 32018 past it).
pub const MAX_INLINE_TWIML: usize = 4000;

/// Attempts per push (the first and the retries).
const ATTEMPTS: u32 = 5;

/// How precall authenticates to Twilio's REST API.
#[derive(Clone, PartialEq, Eq)]
pub enum PushAuth {
    /// The account's auth token, with `TWILIO_ACCOUNT_SID` (or else the call's AccountSid) as
    /// the user.
    AuthToken(String),
    /// An API key (`TWILIO_API_KEY` `SK…`, `TWILIO_API_SECRET`).
    ApiKey {
        /// The key's SID.
        sid: String,
        /// Its secret.
        secret: String,
    },
}

impl std::fmt::Debug for PushAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushAuth::AuthToken(_) => f.write_str("AuthToken(…)"),
            PushAuth::ApiKey { sid, .. } => write!(f, "ApiKey({sid})"),
        }
    }
}

/// The push's settings.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// `TWILIO_API_BASE`, no trailing slash.
    pub api_base: String,
    /// How to authenticate.
    pub auth: PushAuth,
    /// `TWILIO_ACCOUNT_SID`: the user for the auth token, and the account when a call's
    /// record has none.
    pub account_sid: Option<String>,
    /// `PUBLIC_BASE_URL`, for the TwiML's absolute URLs.
    pub public_base_url: String,
    /// The `<Stream url>`.
    pub stream_url: String,
    /// Longest one request may take.
    pub timeout: Duration,
    /// First retry delay (doubled per retry).
    pub backoff: Duration,
}

/// What became of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Twilio took the new TwiML.
    Updated,
    /// The call had already ended (404 / 20404).
    AlreadyEnded,
    /// It could not be pushed; polling carries the call on.
    Failed(String),
}

impl PushOutcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            PushOutcome::Updated => "updated",
            PushOutcome::AlreadyEnded => "already_ended",
            PushOutcome::Failed(_) => "failed",
        }
    }
}

/// The REST client of the push.
#[derive(Debug)]
pub struct LivePush {
    cfg: PushConfig,
    http: reqwest::Client,
}

/// One call to push: who it is, and what the poll would answer now.
#[derive(Debug, Clone)]
pub struct PushTarget<'a> {
    /// The call (its CallSid).
    pub call_id: &'a CallId,
    /// The call's AccountSid (from its webhook), empty when unknown.
    pub account_sid: &'a str,
    /// For the stream's parameters.
    pub caller: &'a str,
    /// For the stream's parameters.
    pub dialed: &'a str,
}

impl LivePush {
    /// A client over `cfg`.
    pub fn new(cfg: PushConfig) -> Result<Self, String> {
        // No redirects: requests carry the Twilio API key's credentials.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| format!("Twilio REST client: {e}"))?;
        Ok(Self { cfg, http })
    }

    /// The form body for `ins`: inline TwiML, or the poll URL when the TwiML is too long.
    pub fn body(&self, target: &PushTarget<'_>, ins: &CallInstructions) -> Vec<(String, String)> {
        let urls = twiml_urls(
            &self.cfg.public_base_url,
            &self.cfg.stream_url,
            target.call_id,
            target.caller,
            target.dialed,
        );
        let doc = twiml::render(ins, &urls);
        if doc.chars().count() <= MAX_INLINE_TWIML {
            vec![("Twiml".to_owned(), doc)]
        } else {
            vec![("Url".to_owned(), urls.poll_url), ("Method".to_owned(), "POST".to_owned())]
        }
    }

    /// Whether the news in `ins` is worth a push: a connect or a hang-up (a hold is what the
    /// call already does).
    pub fn worth_pushing(ins: &CallInstructions) -> bool {
        ins.action() != CallAction::Hold
    }

    /// Pushes `ins` to the live call, retrying what Twilio asks to retry.
    pub async fn push(&self, target: &PushTarget<'_>, ins: &CallInstructions) -> PushOutcome {
        let account = if target.account_sid.is_empty() {
            match &self.cfg.account_sid {
                Some(a) => a.as_str(),
                None => return PushOutcome::Failed("the call's AccountSid is unknown".into()),
            }
        } else {
            target.account_sid
        };
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Calls/{}.json",
            self.cfg.api_base,
            precall_api::percent::encode_component(account),
            precall_api::percent::encode_component(target.call_id.as_str())
        );
        // The URL names the call's own account; the credentials are `TWILIO_ACCOUNT_SID`'s when
        // set (a parent account's token also serves its subaccounts' calls), else the call's.
        let (user, password) = match &self.cfg.auth {
            PushAuth::AuthToken(token) => {
                (self.cfg.account_sid.as_deref().unwrap_or(account), token.as_str())
            }
            PushAuth::ApiKey { sid, secret } => (sid.as_str(), secret.as_str()),
        };
        let body = self.body(target, ins);
        let form = body
            .iter()
            .map(|(k, v)| {
                use precall_api::percent::encode_component as enc;
                format!("{}={}", enc(k), enc(v))
            })
            .collect::<Vec<_>>()
            .join("&");
        let mut delay = self.cfg.backoff;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let sent = self
                .http
                .post(&url)
                .basic_auth(user, Some(password))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(form.clone())
                .send()
                .await;
            let retry_after = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("Retry-After")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    match status {
                        200..=299 => return PushOutcome::Updated,
                        404 => return PushOutcome::AlreadyEnded,
                        429 | 500..=599 => {
                            last = format!("HTTP {status}: {}", snippet(&text));
                            retry_after
                        }
                        _ => {
                            return PushOutcome::Failed(format!(
                                "HTTP {status}: {}",
                                snippet(&text)
                            ));
                        }
                    }
                }
                Err(e) => {
                    last = format!("request failed: {e}");
                    None
                }
            };
            if attempt < ATTEMPTS {
                let wait = retry_after.map_or(delay, |r| r.min(Duration::from_secs(5)).max(delay));
                tokio::time::sleep(wait).await;
                delay *= 2;
            }
        }
        PushOutcome::Failed(format!("gave up after {ATTEMPTS} attempts: {last}"))
    }
}

fn snippet(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use precall_api::{CloneStatus, SpeechInstruction, WebSocketInstruction};

    fn push() -> LivePush {
        LivePush::new(PushConfig {
            api_base: "http://127.0.0.1:9".into(),
            auth: PushAuth::AuthToken("t".into()),
            account_sid: None,
            public_base_url: "https://voice.example.com".into(),
            stream_url: "wss://voice.example.com/twilio/media".into(),
            timeout: Duration::from_secs(1),
            backoff: Duration::from_millis(1),
        })
        .unwrap()
    }

    fn connect(first_message: Option<String>) -> CallInstructions {
        CallInstructions {
            call_id: "CA1".into(),
            clone_status: CloneStatus::Completed,
            greeting_audio: None,
            hold_audio: None,
            status_poll: None,
            websocket: Some(WebSocketInstruction {
                url: "wss://agent".into(),
                agent_id: "ag".into(),
                voice_id: "vo".into(),
                first_message,
            }),
            error_message: None,
            should_hangup: false,
        }
    }

    #[test]
    fn inline_twiml_with_absolute_urls_or_the_poll_url_when_too_long() {
        let p = push();
        let target =
            PushTarget { call_id: &"CA1".into(), account_sid: "AC1", caller: "+1", dialed: "+2" };
        let body = p.body(&target, &connect(None));
        assert_eq!(body.len(), 1);
        assert_eq!(body[0].0, "Twiml");
        assert!(body[0].1.contains(r#"<Stream url="wss://voice.example.com/twilio/media">"#));
        assert!(body[0].1.contains(
            r#"<Redirect method="POST">https://voice.example.com/twilio/poll?call_id=CA1</Redirect>"#
        ));
        // A first message long enough to pass 4,000 characters: Twilio fetches the poll URL.
        let body = p.body(&target, &connect(Some("x".repeat(5000))));
        assert_eq!(
            body,
            [
                ("Url".to_owned(), "https://voice.example.com/twilio/poll?call_id=CA1".to_owned()),
                ("Method".to_owned(), "POST".to_owned())
            ]
        );
        let mut hangup = connect(None);
        hangup.websocket = None;
        hangup.should_hangup = true;
        hangup.error_message = Some(SpeechInstruction { text: "Sorry".into(), audio_url: None });
        assert!(LivePush::worth_pushing(&hangup));
        assert!(p.body(&target, &hangup)[0].1.contains("<Say>Sorry</Say><Hangup />"));
    }

    #[test]
    fn the_auth_token_is_never_printed() {
        assert_eq!(format!("{:?}", PushAuth::AuthToken("secret".into())), "AuthToken(…)");
        let key = PushAuth::ApiKey { sid: "SK1".into(), secret: "s3cret".into() };
        assert!(!format!("{key:?}").contains("s3cret"));
    }
}
