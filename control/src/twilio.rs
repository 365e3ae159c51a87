//! Twilio webhooks: `/twilio/voice`, `/twilio/poll`, `/twilio/status`.
//!
//! Order of checks for every request: route (404), method (405), body framing (the HTTP layer
//! already answered 400/408/413/431), signature (403), form (400), then the controller. The
//! controller's instructions become TwiML through the one renderer in `precall-twilio`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use precall_api::{
    CallContext, CallId, CallInstructions, CallStatus, ControlError, ControlReply, ControlRequest,
    Protocol, Redacted,
};
use precall_http::{Request, Response};
use precall_twilio::{
    Params, RequestValidator, SIGNATURE_HEADER, TwilioCallStatus, TwimlUrls, parse_query, twiml,
};

use crate::config::HoldMode;
use crate::hold_segments::HoldSegments;
use crate::metrics::{ErrorKind, Metrics, Route};
use crate::runtime::ControlHandle;

/// The URLs of a call's TwiML: the poll URL under `public_base_url`, the stream URL, and the
/// caller's and dialed numbers as stream parameters (for the agent's dynamic variables).
pub fn twiml_urls(
    public_base_url: &str,
    stream_url: &str,
    call_id: &CallId,
    caller: &str,
    dialed: &str,
) -> TwimlUrls {
    let mut stream_params = Vec::new();
    for (name, value) in [("caller", caller), ("dialed", dialed)] {
        if !value.is_empty() {
            stream_params.push((name.to_owned(), value.to_owned()));
        }
    }
    TwimlUrls {
        poll_url: format!(
            "{public_base_url}/twilio/poll?call_id={}",
            precall_api::percent::encode_component(call_id.as_str())
        ),
        media_stream_url: stream_url.to_owned(),
        stream_params,
    }
}

/// Settings of the Twilio routes.
#[derive(Debug, Clone)]
pub struct TwilioConfig {
    /// `PUBLIC_BASE_URL`, no trailing slash: what Twilio requests, and what it signs.
    pub public_base_url: String,
    /// `TWILIO_AUTH_TOKEN`.
    pub auth_token: Option<String>,
    /// `TWILIO_SKIP_SIGNATURE`.
    pub skip_signature: bool,
    /// `ERROR_MESSAGE`, said when precall cannot serve a call.
    pub error_message: String,
    /// The `<Stream url>` (`TWILIO_STREAM_URL`, or derived from `PUBLIC_BASE_URL`).
    pub stream_url: String,
    /// `TWILIO_HOLD_MODE`.
    pub hold_mode: HoldMode,
    /// `HOLD_AUDIO_URL`: what a poll plays while the store cannot answer.
    pub hold_audio_url: String,
    /// `STATUS_POLL_INTERVAL_MS`: each poll's hold segment is this long.
    pub poll_interval: Duration,
    /// `MAX_HOLD_MS`: a poll holds through a store outage only this long into the call.
    pub max_hold: Duration,
}

/// The Twilio routes.
pub struct Twilio {
    control: ControlHandle,
    validator: Option<RequestValidator>,
    cfg: TwilioConfig,
    metrics: Arc<Metrics>,
    /// Poll hold mode: the hold clip in poll-sized segments.
    segments: Option<Arc<HoldSegments>>,
}

impl std::fmt::Debug for Twilio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twilio")
            .field("public_base_url", &self.cfg.public_base_url)
            .field("signed", &self.validator.is_some())
            .finish_non_exhaustive()
    }
}

const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response />";

fn xml(status: u16, body: String) -> Response {
    Response::new(status).body(twiml::CONTENT_TYPE, body)
}

/// A call id must look like an id: Twilio's are `CA` + 32 hex digits; be lenient but bounded.
fn valid_call_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Twilio {
    /// Routes over `control`. Warns loudly when signatures are not checked.
    pub fn new(control: ControlHandle, cfg: TwilioConfig, metrics: Arc<Metrics>) -> Self {
        let validator = cfg.auth_token.as_deref().map(RequestValidator::new);
        if validator.is_none() {
            if cfg.skip_signature {
                tracing::warn!(
                    "TWILIO_SKIP_SIGNATURE=true: Twilio webhooks are accepted WITHOUT signature \
                     checks. Anyone who can reach this port can place calls. Development only."
                );
            } else {
                tracing::warn!("TWILIO_AUTH_TOKEN is not set: every /twilio/* request gets 403");
            }
        } else if cfg.skip_signature {
            tracing::warn!("TWILIO_SKIP_SIGNATURE is ignored because TWILIO_AUTH_TOKEN is set");
        }
        Self { control, validator, cfg, metrics, segments: None }
    }

    /// Serves the hold clip in segments (poll hold mode).
    #[must_use]
    pub fn with_hold_segments(mut self, segments: Arc<HoldSegments>) -> Self {
        self.segments = Some(segments);
        self
    }

    /// Serves a `/twilio/…` request.
    pub fn handle(&self, req: &Request) -> Response {
        let route = match req.path.as_str() {
            "/twilio/voice" => Route::Voice,
            "/twilio/poll" => Route::Poll,
            "/twilio/status" => Route::Status,
            _ => return Response::text(404, "not found\n"),
        };
        let started = Instant::now();
        let resp = self.route(route, req);
        self.metrics.webhook(route, started.elapsed());
        resp
    }

    fn fail(&self, kind: ErrorKind, status: u16, msg: &str) -> Response {
        self.metrics.error(kind);
        Response::text(status, format!("{msg}\n"))
    }

    fn route(&self, route: Route, req: &Request) -> Response {
        if req.method != "POST" {
            return Response::text(405, "use POST\n").header("Allow", "POST");
        }
        let is_json = req
            .header("Content-Type")
            .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"));
        let params = if is_json {
            Params::from(Vec::new())
        } else {
            match Params::parse(&req.body) {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!(path = %req.path, error = %e, "malformed webhook form");
                    return self.fail(
                        ErrorKind::BadRequest,
                        400,
                        &format!("malformed form body: {e}"),
                    );
                }
            }
        };
        if let Err(why) = self.check_signature(req, &params, is_json) {
            tracing::warn!(path = %req.path, peer = %req.peer, why, "rejected Twilio webhook");
            return self.fail(ErrorKind::Signature, 403, why);
        }
        let query = match parse_query(&req.query) {
            Ok(q) => Params::from(q),
            Err(e) => {
                return self.fail(ErrorKind::BadRequest, 400, &format!("malformed query: {e}"));
            }
        };
        match route {
            Route::Voice => self.voice(&params),
            Route::Poll => self.poll(&query, &params),
            Route::Status => self.status(&params),
        }
    }

    fn check_signature(
        &self,
        req: &Request,
        params: &Params,
        is_json: bool,
    ) -> Result<(), &'static str> {
        let Some(validator) = &self.validator else {
            return if self.cfg.skip_signature {
                Ok(())
            } else {
                Err("TWILIO_AUTH_TOKEN is not set")
            };
        };
        let Some(signature) = req.header(SIGNATURE_HEADER) else {
            return Err("missing X-Twilio-Signature");
        };
        let url = format!("{}{}", self.cfg.public_base_url, req.target());
        let ok = if is_json {
            validator.validate_json(&url, &req.body, signature)
        } else {
            validator.validate(&url, params.as_slice(), signature)
        };
        if ok { Ok(()) } else { Err("invalid X-Twilio-Signature") }
    }

    /// The URLs of a call's TwiML; `params` (the webhook's form) gives the stream its
    /// caller and dialed numbers, for the agent.
    fn urls(&self, call_id: &CallId, params: &Params) -> TwimlUrls {
        let number = |keys: [&str; 2]| keys.iter().find_map(|k| params.get(k)).unwrap_or_default();
        twiml_urls(
            &self.cfg.public_base_url,
            &self.cfg.stream_url,
            call_id,
            number(["From", "Caller"]),
            number(["To", "Called"]),
        )
    }

    /// A hold answer plays segment `n` of the hold clip and polls for segment `n + 1`, so the
    /// music goes on where it stopped (when the clip is loaded; else the whole clip plays).
    fn continue_hold(&self, ins: &mut CallInstructions, urls: &mut TwimlUrls, n: u64) {
        let Some(segments) = &self.segments else { return };
        if ins.action() != precall_api::CallAction::Hold {
            return;
        }
        let Some(hold) = ins.hold_audio.as_mut() else { return };
        let Some(path) = segments.path(&hold.url, n) else { return };
        hold.url = format!("{}{path}", self.cfg.public_base_url);
        hold.loops = 1;
        urls.poll_url.push_str(&format!("&hold={}", n.saturating_add(1)));
    }

    /// Serves `/audio/hold/{rest}`: one hold segment.
    pub fn hold_segment(&self, rest: &str) -> Option<Vec<u8>> {
        self.segments.as_ref()?.wav(rest)
    }

    /// Turns the controller's answer into TwiML; failures become a spoken error and hang-up,
    /// except overload, which is a 503 so that Twilio tries the number's fallback URL.
    fn instructions(
        &self,
        call_id: &CallId,
        params: &Params,
        reply: Result<ControlReply, ControlError>,
        stream_hold: bool,
        hold_segment: u64,
    ) -> Response {
        let result = match reply {
            Ok(ControlReply::Instructions(r)) => r,
            Ok(_) => Err(ControlError::Mismatch),
            Err(e) => Err(e),
        };
        // The active-calls gauge: a call on TwiML hold is here until its next poll is due;
        // any other answer (a stream, which its shard counts; a hang-up) ends that.
        match &result {
            Ok(ins) if !stream_hold && ins.action() == precall_api::CallAction::Hold => {
                self.metrics.twilio_holding(call_id, self.cfg.poll_interval)
            }
            _ => self.metrics.twilio_left_hold(call_id),
        }
        match result {
            Ok(ins) if stream_hold => {
                xml(200, twiml::render_stream(&ins, &self.urls(call_id, params)))
            }
            Ok(mut ins) => {
                let mut urls = self.urls(call_id, params);
                self.continue_hold(&mut ins, &mut urls, hold_segment);
                xml(200, twiml::render(&ins, &urls))
            }
            Err(ControlError::Overloaded) => {
                self.metrics.error(ErrorKind::Overloaded);
                Response::text(503, "overloaded, retry\n").header("Retry-After", "1")
            }
            Err(ControlError::UnknownCall(id)) => {
                self.metrics.error(ErrorKind::UnknownCall);
                tracing::info!(call_id = %id, "poll for an unknown call; ending it politely");
                xml(200, twiml::hangup(Some(&self.cfg.error_message)))
            }
            Err(e) => {
                self.metrics.error(match e {
                    ControlError::Timeout => ErrorKind::Timeout,
                    _ => ErrorKind::Store,
                });
                tracing::error!(call_id = %call_id, error = %e, "controller failed; ending the call");
                xml(200, twiml::hangup(Some(&self.cfg.error_message)))
            }
        }
    }

    fn voice(&self, params: &Params) -> Response {
        let Some(call_sid) = params.get("CallSid").filter(|s| valid_call_id(s)) else {
            return self.fail(ErrorKind::BadRequest, 400, "missing or invalid CallSid");
        };
        let from = params.get("From").or_else(|| params.get("Caller")).unwrap_or_default();
        let to = params.get("To").or_else(|| params.get("Called")).unwrap_or_default();
        let ctx = CallContext {
            call_id: CallId::new(call_sid),
            session_id: params.get("AccountSid").unwrap_or_default().to_owned(),
            caller_number: from.to_owned(),
            recipient_number: to.to_owned(),
            status: CallStatus::Ringing,
            protocol: Protocol::Twilio,
        };
        tracing::info!(call_id = %ctx.call_id, from = %Redacted(from), to = %Redacted(to), "Twilio inbound call");
        let call_id = ctx.call_id.clone();
        let reply = self.control.call(ControlRequest::Inbound(ctx));
        self.instructions(&call_id, params, reply, self.cfg.hold_mode == HoldMode::Stream, 0)
    }

    /// A status check: the poll flow (`TWILIO_HOLD_MODE=poll`), and in stream mode what
    /// Twilio asks when a stream closed: the call's end (`<Hangup/>`, with the error message
    /// when it failed), or, for a broken stream, the poll flow from where the call is.
    fn poll(&self, query: &Params, params: &Params) -> Response {
        let Some(call_id) = query.get("call_id").filter(|s| valid_call_id(s)) else {
            return self.fail(ErrorKind::BadRequest, 400, "missing or invalid call_id");
        };
        let call_id = CallId::new(call_id);
        let reply = self.control.call(ControlRequest::CheckStatus(call_id.clone()));
        // Which hold segment this poll plays (see `hold_segments`); a missing or odd value
        // starts the clip again rather than failing the call.
        let segment = query.get("hold").and_then(|h| h.parse().ok()).unwrap_or(0);
        // Only a poll that comes from a hold segment (its URL numbers it) holds through an
        // outage: the poll after a stream, or from a hold whose clip is not in segments, has
        // no clock to bound the hold by.
        let from_hold = query.get("hold").is_some();
        let reply = match reply {
            Err(ControlError::StoreUnavailable(e))
            | Ok(ControlReply::Instructions(Err(ControlError::StoreUnavailable(e))))
                if from_hold =>
            {
                match self.hold_through_outage(&call_id, segment) {
                    Some(ins) => {
                        self.metrics.error(ErrorKind::Store);
                        tracing::warn!(call_id = %call_id, error = %e, "store unavailable: the caller keeps holding");
                        Ok(ControlReply::Instructions(Ok(ins)))
                    }
                    None => Err(ControlError::StoreUnavailable(e)),
                }
            }
            other => other,
        };
        self.instructions(&call_id, params, reply, false, segment)
    }

    /// A caller on hold does not hear a database outage: while the store cannot answer, a poll
    /// keeps holding (the next hold segment, the next poll) as long as the call has not been on
    /// hold for `MAX_HOLD_MS`, counted from the poll's segment number (one per
    /// `STATUS_POLL_INTERVAL_MS`: Twilio's polls carry no other clock). The poll after the
    /// store is back answers from the record as usual.
    fn hold_through_outage(&self, call_id: &CallId, segment: u64) -> Option<CallInstructions> {
        let held =
            self.cfg.poll_interval.saturating_mul(u32::try_from(segment).unwrap_or(u32::MAX));
        let remaining = self.cfg.max_hold.checked_sub(held).filter(|r| !r.is_zero())?;
        Some(CallInstructions {
            call_id: call_id.clone(),
            clone_status: precall_api::CloneStatus::Processing,
            greeting_audio: None,
            hold_audio: Some(precall_api::AudioInstruction {
                url: self.cfg.hold_audio_url.clone(),
                loops: 0,
            }),
            status_poll: Some(precall_api::StatusPollInstruction {
                call_id: call_id.clone(),
                interval: self.cfg.poll_interval,
                hold_remaining: remaining,
            }),
            websocket: None,
            error_message: None,
            should_hangup: false,
        })
    }

    fn status(&self, params: &Params) -> Response {
        let Some(call_sid) = params.get("CallSid").filter(|s| valid_call_id(s)) else {
            return self.fail(ErrorKind::BadRequest, 400, "missing or invalid CallSid");
        };
        let status = match params.get("CallStatus").map(TwilioCallStatus::parse) {
            Some(Ok(s)) => s,
            Some(Err(e)) => return self.fail(ErrorKind::BadRequest, 400, &e.to_string()),
            None => return self.fail(ErrorKind::BadRequest, 400, "missing CallStatus"),
        };
        if !status.is_terminal() {
            return xml(200, EMPTY_TWIML.to_owned());
        }
        let call_id = CallId::new(call_sid);
        self.metrics.twilio_left_hold(&call_id);
        let reply = self.control.call(ControlRequest::CallEnded {
            call_id: call_id.clone(),
            reason: status.as_str().to_owned(),
        });
        match reply {
            Ok(ControlReply::Ended(Ok(()))) => xml(200, EMPTY_TWIML.to_owned()),
            Ok(ControlReply::Ended(Err(ControlError::UnknownCall(_)))) => {
                // A status callback for a call precall never saw (another application's number):
                // acknowledge, nothing to record.
                self.metrics.error(ErrorKind::UnknownCall);
                xml(200, EMPTY_TWIML.to_owned())
            }
            Ok(ControlReply::Ended(Err(ControlError::Overloaded)))
            | Err(ControlError::Overloaded) => {
                self.metrics.error(ErrorKind::Overloaded);
                // Twilio retries status callbacks that fail: let it, so the end is not lost.
                Response::text(503, "overloaded, retry\n").header("Retry-After", "1")
            }
            other => {
                self.metrics.error(ErrorKind::Store);
                tracing::error!(call_id = %call_id, reply = ?other, "could not record the end of a call");
                Response::text(503, "could not record, retry\n").header("Retry-After", "1")
            }
        }
    }
}
