//! The decisions, as pure functions of a call, its clone job, its profile and the time.

use precall_api::{
    AudioInstruction, CallInstructions, CallStatus, CloneStatus, SpeechInstruction,
    StatusPollInstruction, Timestamp, WebSocketInstruction,
};

use crate::controller::ControllerConfig;
use crate::model::{CallRecord, CloneJob, VoiceProfile};

/// Failure reason when the hold limit passes.
pub const HOLD_TIMEOUT: &str = "hold_timeout";
/// Failure reason when a processing job outlives the clone timeout.
pub const CLONE_TIMEOUT: &str = "clone_timeout";
/// Failure reason when the call's voice profile no longer exists.
pub const NO_PROFILE: &str = "no_voice_profile";

/// A call status change the shell must record along with the instructions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The new status ([`CallStatus::Connected`] or [`CallStatus::Failed`]).
    pub status: CallStatus,
    /// The failure reason, for [`CallStatus::Failed`].
    pub reason: Option<String>,
}

/// Instructions for a call plus the status change they imply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// What the handler does.
    pub instructions: CallInstructions,
    /// What the store must record; `None` when the call's status stays as it is.
    pub transition: Option<Transition>,
}

/// Makes plans from configuration; holds no state of its own.
#[derive(Debug)]
pub struct Planner<'a> {
    cfg: &'a ControllerConfig,
}

impl<'a> Planner<'a> {
    /// A planner over `cfg`.
    pub fn new(cfg: &'a ControllerConfig) -> Self {
        Self { cfg }
    }

    /// The plan for `call` at `now`.
    ///
    /// `inbound` adds the greeting (an answer to an inbound call, first or repeated);
    /// a status check leaves it out. `job` is `None` while the call is not attached to a job
    /// yet (a concurrent duplicate): that counts as processing.
    pub fn plan(
        &self,
        call: &CallRecord,
        job: Option<&CloneJob>,
        profile: Option<&VoiceProfile>,
        now: Timestamp,
        inbound: bool,
    ) -> Plan {
        let clone_status = job.map_or(CloneStatus::Processing, |j| j.status);
        let mut ins = CallInstructions {
            call_id: call.call_id.clone(),
            clone_status,
            greeting_audio: None,
            hold_audio: None,
            status_poll: None,
            websocket: None,
            error_message: None,
            should_hangup: false,
        };
        match call.status {
            CallStatus::Ended => {
                ins.should_hangup = true;
                return Plan { instructions: ins, transition: None };
            }
            CallStatus::Failed => return self.fail(ins, None),
            CallStatus::Ringing | CallStatus::Holding | CallStatus::Connected => {}
        }
        let Some(profile) = profile else {
            return self.fail(ins, Some(NO_PROFILE.to_owned()));
        };
        if inbound {
            ins.greeting_audio = Some(AudioInstruction {
                url: profile.greeting_url.clone().unwrap_or_else(|| self.cfg.greeting_url.clone()),
                loops: 1,
            });
        }

        // A connected call stays connected: a repeated poll gets the same bridge.
        if call.status == CallStatus::Connected {
            if let Some(ws) = job.and_then(|j| self.websocket(j, profile)) {
                ins.websocket = Some(ws);
                return Plan { instructions: ins, transition: None };
            }
        }

        // A ready clone connects even when the hold limit has just passed: the caller waited
        // for exactly this. The limit ends only a hold that would go on.
        let held = now.since(call.started_at);
        match job {
            Some(j) if j.status == CloneStatus::Completed => match self.websocket(j, profile) {
                Some(ws) => {
                    ins.websocket = Some(ws);
                    Plan {
                        instructions: ins,
                        transition: Some(Transition {
                            status: CallStatus::Connected,
                            reason: None,
                        }),
                    }
                }
                None => self.fail(ins, Some("clone completed without a voice id".to_owned())),
            },
            Some(j) if j.status == CloneStatus::Failed => {
                let reason = j.error.clone().unwrap_or_else(|| "clone failed".to_owned());
                self.fail(ins, Some(reason))
            }
            _ if held > self.cfg.max_hold => self.fail(ins, Some(HOLD_TIMEOUT.to_owned())),
            Some(j) if now.since(j.started_at) > self.cfg.clone_job_timeout => {
                ins.clone_status = CloneStatus::Failed;
                self.fail(ins, Some(CLONE_TIMEOUT.to_owned()))
            }
            _ => {
                ins.hold_audio = Some(AudioInstruction {
                    url: profile.hold_url.clone().unwrap_or_else(|| self.cfg.hold_url.clone()),
                    loops: 0,
                });
                ins.status_poll = Some(StatusPollInstruction {
                    call_id: call.call_id.clone(),
                    interval: self.cfg.poll_interval,
                    hold_remaining: self.cfg.max_hold.saturating_sub(held),
                });
                Plan { instructions: ins, transition: None }
            }
        }
    }

    fn fail(&self, mut ins: CallInstructions, reason: Option<String>) -> Plan {
        ins.greeting_audio = None;
        ins.hold_audio = None;
        ins.status_poll = None;
        ins.websocket = None;
        ins.error_message = Some(SpeechInstruction {
            text: self.cfg.error_message.clone(),
            audio_url: self.cfg.error_audio_url.clone(),
        });
        ins.should_hangup = true;
        Plan {
            instructions: ins,
            transition: reason.map(|r| Transition { status: CallStatus::Failed, reason: Some(r) }),
        }
    }

    fn websocket(&self, job: &CloneJob, profile: &VoiceProfile) -> Option<WebSocketInstruction> {
        let voice_id = job.voice_id.clone()?;
        let agent_id =
            profile.agent_id.clone().unwrap_or_else(|| self.cfg.default_agent_id.clone());
        let sep = if self.cfg.agent_ws_url.contains('?') { '&' } else { '?' };
        Some(WebSocketInstruction {
            url: format!(
                "{}{sep}agent_id={}",
                self.cfg.agent_ws_url,
                precall_api::percent::encode_component(&agent_id)
            ),
            agent_id,
            voice_id,
            first_message: profile.first_message.clone(),
        })
    }
}
