//! The engine shards' way to the control plane: [`ShardControl`] over the side runtime.
//!
//! A shard's request goes into the side runtime's queue like a webhook's ([`ControlHandle`],
//! never blocking). The controller's answer arrives in a reply callback that runs inside a
//! task of the side runtime; there the instruction URLs (greeting, hold, error) are turned
//! into shared, encoded clips by the [`AudioService`] (fetched and encoded once, then cached),
//! and only then is the shard's [`PlanReply`] called, which puts the plan in the shard's inbox
//! and rings its doorbell. Shards never fetch, decode or wait.

use std::sync::Arc;
use std::time::Duration;

use precall_api::{
    CallAction, CallContext, CallId, CallInstructions, ControlError, ControlPort, ControlReply,
    ControlRequest, MediaEventKind, StreamStart,
};
use precall_engine::{Done, MediaPlan, PlanReply, ShardControl, ShardPlan};
use precall_media::EncodedClip;

use crate::agent::AgentResolver;
use crate::audio_service::AudioService;
use crate::runtime::ControlHandle;

/// Clips used when the instructions name none but the shard needs one.
#[derive(Debug, Clone)]
pub struct DefaultClips {
    /// Played while a `connect` plan's agent leg opens (a call whose clone is ready at once).
    pub hold_url: String,
    /// Played before a hang-up the shard decides itself (status checks failing past the hold
    /// limit) and when a failure plan names no clip.
    pub error_url: String,
}

/// [`ShardControl`] for the `precall` binary.
#[derive(Debug, Clone)]
pub struct SipBridge {
    control: ControlHandle,
    audio: Arc<AudioService>,
    defaults: DefaultClips,
    /// Longest wait for one clip; past it the call plays without that clip.
    clip_timeout: Duration,
    agents: Arc<AgentResolver>,
}

impl SipBridge {
    /// A bridge over the side runtime `control`, resolving clips with `audio`.
    pub fn new(
        control: ControlHandle,
        audio: Arc<AudioService>,
        defaults: DefaultClips,
        clip_timeout: Duration,
        agents: Arc<AgentResolver>,
    ) -> Self {
        Self { control, audio, defaults, clip_timeout, agents }
    }

    fn plan(&self, request: ControlRequest, reply: PlanReply) -> Result<(), ControlError> {
        // A Twilio stream says the error with `<Say>` after it closes: no error clip for it.
        let error_clip = !matches!(request, ControlRequest::StreamStart(_));
        let bridge = self.clone();
        self.control.submit(
            request,
            Box::new(move |answer| {
                let instructions = match answer {
                    ControlReply::Instructions(result) => result,
                    _ => Err(ControlError::Mismatch),
                };
                let instructions = match instructions {
                    Ok(instructions) => instructions,
                    Err(e) => return reply(Err(e)),
                };
                // Reply callbacks run inside the side runtime's tasks; outside one (a runtime
                // shutting down) the plan goes out without clips rather than not at all.
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            let agent = async {
                                match &instructions.websocket {
                                    Some(ws) if instructions.action() == CallAction::Connect => {
                                        Some(bridge.agents.resolve(ws).await)
                                    }
                                    _ => None,
                                }
                            };
                            let clips = bridge.clips(&instructions, error_clip);
                            let (media, agent) = tokio::join!(clips, agent);
                            reply(Ok(ShardPlan { instructions, media, agent }));
                        });
                    }
                    Err(_) => reply(Ok(ShardPlan {
                        instructions,
                        media: MediaPlan::default(),
                        agent: None,
                    })),
                }
            }),
        )
    }

    /// The clips `ins` needs, resolved concurrently (the error clip only with `error_clip`).
    async fn clips(&self, ins: &CallInstructions, error_clip: bool) -> MediaPlan {
        let greeting = ins.greeting_audio.as_ref().map(|a| a.url.as_str());
        let hold = ins.hold_audio.as_ref().map(|a| a.url.as_str()).or_else(|| {
            (ins.action() == CallAction::Connect).then_some(self.defaults.hold_url.as_str())
        });
        let error = ins
            .error_message
            .as_ref()
            .and_then(|e| e.audio_url.as_deref())
            .unwrap_or(&self.defaults.error_url);
        let error = error_clip.then_some(error);
        let (greeting, hold, error) =
            tokio::join!(self.clip(greeting), self.clip(hold), self.clip(error));
        MediaPlan { greeting, hold, error }
    }

    async fn clip(&self, url: Option<&str>) -> Option<Arc<EncodedClip>> {
        let url = url?;
        match tokio::time::timeout(self.clip_timeout, self.audio.clip(url)).await {
            Ok(Ok(clip)) => Some(clip),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "clip unavailable; the call plays without it");
                None
            }
            Err(_) => {
                tracing::warn!("clip not ready in time; the call plays without it");
                None
            }
        }
    }
}

impl ShardControl for SipBridge {
    fn inbound(&self, ctx: CallContext, reply: PlanReply) -> Result<(), ControlError> {
        self.plan(ControlRequest::Inbound(ctx), reply)
    }

    fn check_status(&self, call_id: CallId, reply: PlanReply) -> Result<(), ControlError> {
        self.plan(ControlRequest::CheckStatus(call_id), reply)
    }

    fn call_ended(&self, call_id: CallId, reason: String) -> Result<(), ControlError> {
        self.control.submit(
            ControlRequest::CallEnded { call_id, reason },
            Box::new(|answer| {
                if let ControlReply::Ended(Err(e)) = answer {
                    tracing::warn!(error = %e, "recording the end of a SIP call failed");
                }
            }),
        )
    }

    fn stream_start(&self, start: StreamStart, reply: PlanReply) -> Result<(), ControlError> {
        self.plan(ControlRequest::StreamStart(start), reply)
    }

    fn stream_closed(
        &self,
        call_id: CallId,
        reason: String,
        failed: bool,
        done: Done,
    ) -> Result<(), ControlError> {
        self.control.submit(
            ControlRequest::StreamClosed { call_id, reason, failed },
            Box::new(move |answer| {
                done(match answer {
                    ControlReply::Ended(result) => result,
                    _ => Err(ControlError::Mismatch),
                })
            }),
        )
    }

    fn call_event(
        &self,
        call_id: CallId,
        kind: MediaEventKind,
        detail: String,
    ) -> Result<(), ControlError> {
        self.control.submit(
            ControlRequest::CallEvent { call_id, kind, detail },
            Box::new(|answer| {
                if let ControlReply::Ended(Err(e)) = answer {
                    tracing::warn!(error = %e, "recording a call event failed");
                }
            }),
        )
    }
}
