//! The controller: store reads and writes around the pure planner.

use std::time::Duration;

use precall_api::{
    CallContext, CallId, CallInstructions, CallStatus, CloneStatus, JobId, MediaEventKind,
    ProfileId, Protocol, StreamStart, Timestamp,
};

use crate::model::{
    CallEvent, CallRecord, CloneJob, CloneRequest, EventKind, JobOutcome, Lease, VoiceProfile,
    normalize_number,
};
use crate::plan::{NO_PROFILE, Planner};

/// A lapsed job's failure when its profile's samples changed meanwhile.
pub const SAMPLES_CHANGED: &str = "the profile's samples changed while the job waited";
use crate::store::{CallView, InboundRequest, InboundStep, StatusChange, Store, StoreError};

/// What the controller needs to know; built from the process configuration.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Greeting clip, unless the profile overrides it (`GREETING_AUDIO_URL`).
    pub greeting_url: String,
    /// Hold clip, unless the profile overrides it (`HOLD_AUDIO_URL`).
    pub hold_url: String,
    /// Said before hanging up on a failed call (`ERROR_MESSAGE`).
    pub error_message: String,
    /// A recording of the error message, for handlers without text-to-speech (`ERROR_AUDIO_URL`).
    pub error_audio_url: Option<String>,
    /// Time between status checks (`STATUS_POLL_INTERVAL_MS`).
    pub poll_interval: Duration,
    /// Longest hold before the call is failed (`MAX_HOLD_MS`).
    pub max_hold: Duration,
    /// A clone job's deadline: its provider work is cut off after this, and a call waiting on
    /// a run older than this fails (`CLONE_JOB_TIMEOUT_MS`).
    pub clone_job_timeout: Duration,
    /// How long a node's lease on a job it runs lasts unless renewed (`CLONE_LEASE_MS`); a
    /// job whose node died is taken over about this long after its last renewal.
    pub clone_lease: Duration,
    /// How long a transiently failed sample set waits before the next call retries it,
    /// doubling per failed attempt up to `clone_retry_permanent` (`CLONE_RETRY_MS`).
    pub clone_retry: Duration,
    /// How long a permanently failed sample set waits (`CLONE_RETRY_PERMANENT_MS`).
    pub clone_retry_permanent: Duration,
    /// This node's name on the leases it holds (`NODE_ID`); unique per process.
    pub node_id: String,
    /// A reused clone whose voice the provider has not confirmed for this long is checked
    /// before a call is sent to it (`CLONE_VERIFY_AFTER_MS`; zero: never).
    pub clone_verify_after: Duration,
    /// The agent WebSocket endpoint, without `agent_id` (`AGENT_WS_URL`).
    pub agent_ws_url: String,
    /// The agent of profiles that name none (`ELEVENLABS_AGENT_ID`).
    pub default_agent_id: String,
    /// The profile for dialed numbers that have none of their own.
    pub default_profile: ProfileId,
}

/// The controller failed to decide.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The store failed; nothing was decided.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A status check or end named a call that was never recorded.
    #[error("unknown call {0}")]
    UnknownCall(CallId),
    /// The request does not belong to the call it names (a media stream whose CallSid or
    /// account differs from the call's).
    #[error("refused: {0}")]
    Refused(String),
}

/// The answer to an inbound call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundOutcome {
    /// What the handler does now.
    pub instructions: CallInstructions,
    /// A clone job this call created: the shell must start it at the provider and report with
    /// [`CallController::clone_finished`]. `None` when the call joined or reused a job, and on
    /// every repeat of the same call id.
    pub start_clone: Option<CloneRequest>,
    /// The call would reuse a voice the provider has not confirmed for
    /// [`ControllerConfig::clone_verify_after`]: the shell asks the provider and answers
    /// with [`CallController::voice_checked`]. Meanwhile `instructions` are the hold plan, and
    /// the call has not moved.
    pub verify_voice: Option<VoiceCheck>,
    /// The clone job the call is attached to, as read (the shell caches completed ones, so
    /// that a call can reach the agent while the store is away).
    pub job: Option<CloneJob>,
}

/// A voice to confirm at the provider before a call is sent to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoiceCheck {
    /// The completed job whose voice it is.
    pub job_id: JobId,
    /// The voice.
    pub voice_id: precall_api::VoiceId,
}

/// The protocol-agnostic call controller (see the crate docs).
#[derive(Debug)]
pub struct CallController<S> {
    store: S,
    cfg: ControllerConfig,
}

impl<S: Store> CallController<S> {
    /// A controller over `store`.
    pub fn new(store: S, cfg: ControllerConfig) -> Self {
        Self { store, cfg }
    }

    /// The store, for the shell's own reads (health, history).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The configuration in force.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// An inbound call: record it, start or join the clone job, answer greeting + hold + poll
    /// (or greeting + agent when a completed clone is reused).
    ///
    /// Idempotent per call id: a repeat answers the same plan for the call's current state and
    /// never asks for a second clone job.
    pub async fn handle_inbound_call(
        &self,
        ctx: &CallContext,
        now: Timestamp,
    ) -> Result<InboundOutcome, ControllerError> {
        self.handle_inbound_call_at(ctx, now, now).await
    }

    /// [`CallController::handle_inbound_call`] for a call that arrived at `arrived` (earlier
    /// than `now` when the node journaled it during a store outage): its record and hold time
    /// count from then.
    pub async fn handle_inbound_call_at(
        &self,
        ctx: &CallContext,
        arrived: Timestamp,
        now: Timestamp,
    ) -> Result<InboundOutcome, ControllerError> {
        // One atomic step of the store (one statement with PostgreSQL): profile, record,
        // events, job claim.
        let fresh = CallRecord::inbound(ctx, self.cfg.default_profile.clone(), arrived);
        let number = normalize_number(&ctx.recipient_number);
        let lease = self.lease(now);
        let req = InboundRequest { call: &fresh, number: &number, now, lease: &lease };
        let InboundStep { call, profile, job, created, .. } =
            self.store.record_inbound(&req).await?;
        let start_clone = match (&job, &profile) {
            (Some(job), Some(profile)) if created => Some(CloneRequest {
                job_id: job.id,
                attempt: job.attempt,
                profile: profile.clone(),
            }),
            _ => None,
        };

        if let Some(check) = job.as_ref().and_then(|j| self.voice_to_check(&call, j, now)) {
            // Greeting + hold as if still processing, and no transition: the shell checks the
            // voice first (see voice_checked).
            let waiting = job.as_ref().map(|j| CloneJob {
                status: CloneStatus::Processing,
                started_at: now,
                ..j.clone()
            });
            let plan =
                Planner::new(&self.cfg).plan(&call, waiting.as_ref(), profile.as_ref(), now, true);
            return Ok(InboundOutcome {
                instructions: plan.instructions,
                start_clone,
                verify_voice: Some(check),
                job: None,
            });
        }
        let instructions = self.apply(&call, job.as_ref(), profile.as_ref(), now, true).await?;
        Ok(InboundOutcome { instructions, start_clone, verify_voice: None, job })
    }

    /// The voice a waiting call would be sent to, when it is due a check.
    fn voice_to_check(
        &self,
        call: &CallRecord,
        job: &CloneJob,
        now: Timestamp,
    ) -> Option<VoiceCheck> {
        let due = !self.cfg.clone_verify_after.is_zero()
            && matches!(call.status, CallStatus::Ringing | CallStatus::Holding)
            && job.status == CloneStatus::Completed
            && job.voice_deleted_at.is_none()
            && now.since(job.confirmed_at()) > self.cfg.clone_verify_after;
        let voice_id = job.voice_id.clone().filter(|_| due)?;
        Some(VoiceCheck { job_id: job.id, voice_id })
    }

    /// The provider's answer to an inbound call's [`InboundOutcome::verify_voice`]: a usable
    /// voice connects the call as the inbound answer would have; a voice gone (deleted in the
    /// provider's dashboard) is recorded as deleted and the call waits on a new clone of its
    /// profile (greeting + hold, `start_clone` when this call made the job).
    pub async fn voice_checked(
        &self,
        call_id: &CallId,
        check: &VoiceCheck,
        usable: bool,
        now: Timestamp,
    ) -> Result<InboundOutcome, ControllerError> {
        let mut call = self
            .store
            .get_call(call_id)
            .await?
            .ok_or_else(|| ControllerError::UnknownCall(call_id.clone()))?;
        let profile = self.store.get_profile(&call.profile_id).await?;
        if usable {
            self.store.voice_checked(check.job_id, now).await?;
            let job = self.store.get_clone_job(check.job_id).await?;
            let instructions = self.apply(&call, job.as_ref(), profile.as_ref(), now, true).await?;
            return Ok(InboundOutcome { instructions, start_clone: None, verify_voice: None, job });
        }
        self.store.voice_deleted(check.job_id, now).await?;
        self.event(call_id, now, EventKind::VoiceGone, check.voice_id.as_str()).await?;
        let mut start_clone = None;
        let mut job = None;
        if let Some(profile) = &profile {
            let (new, created) = self.claim(profile, now).await?;
            self.store.attach_job(call_id, new.id).await?;
            call.clone_job_id = Some(new.id);
            if created {
                start_clone = Some(CloneRequest {
                    job_id: new.id,
                    attempt: new.attempt,
                    profile: profile.clone(),
                });
            }
            let kind = if created { EventKind::CloneStarted } else { EventKind::CloneJoined };
            self.event(call_id, now, kind, &new.id.to_string()).await?;
            job = Some(new);
        }
        let instructions = self.apply(&call, job.as_ref(), profile.as_ref(), now, true).await?;
        Ok(InboundOutcome { instructions, start_clone, verify_voice: None, job })
    }

    /// A status check: hold + poll while processing, the agent once completed, error + hang up
    /// on failure or past the hold limit, hang up once the call has ended.
    pub async fn check_clone_status(
        &self,
        call_id: &CallId,
        now: Timestamp,
    ) -> Result<CallInstructions, ControllerError> {
        let CallView { call, job, profile } = self
            .store
            .call_view(call_id)
            .await?
            .ok_or_else(|| ControllerError::UnknownCall(call_id.clone()))?;
        self.apply(&call, job.as_ref(), profile.as_ref(), now, false).await
    }

    /// A Twilio media stream started for `start.call_id`: the call must be a known Twilio call
    /// whose CallSid and account are the stream's. Answers the plan for the shard: like an
    /// inbound answer (greeting included when `start.greeting`) for the call's current state.
    pub async fn stream_started(
        &self,
        start: &StreamStart,
        now: Timestamp,
    ) -> Result<CallInstructions, ControllerError> {
        let CallView { call, job, profile } = self
            .store
            .call_view(&start.call_id)
            .await?
            .ok_or_else(|| ControllerError::UnknownCall(start.call_id.clone()))?;
        if call.protocol != Protocol::Twilio {
            return Err(ControllerError::Refused(format!("{} is not a Twilio call", call.call_id)));
        }
        if call.call_id.as_str() != start.call_sid {
            return Err(ControllerError::Refused(format!(
                "stream CallSid {} is not the call's {}",
                start.call_sid, call.call_id
            )));
        }
        if !call.session_id.is_empty() && call.session_id != start.account_sid {
            return Err(ControllerError::Refused(format!(
                "stream account {} is not the call's",
                start.account_sid
            )));
        }
        let detail = if start.greeting { "greeting" } else { "" };
        self.event(&call.call_id, now, EventKind::StreamStarted, detail).await?;
        self.apply(&call, job.as_ref(), profile.as_ref(), now, start.greeting).await
    }

    /// A shard closed the call's media stream: a failure is recorded as the call's failure
    /// (the poll that follows says the error message and hangs up), anything else as its end.
    pub async fn stream_closed(
        &self,
        call_id: &CallId,
        reason: &str,
        failed: bool,
        now: Timestamp,
    ) -> Result<StatusChange, ControllerError> {
        if !failed {
            return self.call_ended(call_id, reason, now).await;
        }
        // Illegal from failed or ended (CallStatus::can_become): such a call stays as it is.
        self.store
            .move_call(call_id, CallStatus::Failed, now, Some(reason), EventKind::Failed, reason)
            .await?
            .ok_or_else(|| ControllerError::UnknownCall(call_id.clone()))
    }

    /// The call is over (caller hung up, BYE, CANCEL, Twilio's status callback). Idempotent:
    /// the first end is kept. Returns the record afterwards, and whether this report ended it
    /// (a repeated report, from a retried callback or another node, did not).
    pub async fn call_ended(
        &self,
        call_id: &CallId,
        reason: &str,
        now: Timestamp,
    ) -> Result<StatusChange, ControllerError> {
        // Only the request that ended the call records the end (another node's report of the
        // same end finds it ended: ended → ended is no transition).
        self.store
            .move_call(call_id, CallStatus::Ended, now, Some(reason), EventKind::Ended, reason)
            .await?
            .ok_or_else(|| ControllerError::UnknownCall(call_id.clone()))
    }

    /// Keeps what a media leg reports on the call's history (agent and caller transcript,
    /// DTMF, agent failures).
    pub async fn media_event(
        &self,
        call_id: &CallId,
        kind: MediaEventKind,
        detail: &str,
        now: Timestamp,
    ) -> Result<(), ControllerError> {
        let kind = match kind {
            MediaEventKind::AgentConnected => EventKind::AgentConnected,
            MediaEventKind::AgentResponse => EventKind::AgentResponse,
            MediaEventKind::UserTranscript => EventKind::UserTranscript,
            MediaEventKind::Dtmf => EventKind::Dtmf,
            MediaEventKind::AgentFailed => EventKind::AgentFailed,
            MediaEventKind::StreamLost => EventKind::StreamLost,
        };
        Ok(self.event(call_id, now, kind, detail).await?)
    }

    /// The provider finished a job this node ran. A failure backs off (see
    /// [`ControllerConfig::clone_retry`]). Returns the job as stored afterwards: when another
    /// node's result was recorded first, that one (the caller's voice, if any, is then unused).
    pub async fn clone_finished(
        &self,
        job: JobId,
        outcome: &JobOutcome,
        now: Timestamp,
    ) -> Result<CloneJob, ControllerError> {
        let retry_at = match outcome {
            Ok(_) => None,
            Err(failure) => {
                let attempt = self.store.get_clone_job(job).await?.map_or(1, |j| j.attempt);
                Some(now.plus(self.backoff(attempt, failure.permanent)))
            }
        };
        Ok(self.store.finish_clone_job(job, &self.cfg.node_id, outcome, now, retry_at).await?)
    }

    /// How long a sample set whose attempt `attempt` failed waits before the next one.
    pub fn backoff(&self, attempt: u32, permanent: bool) -> Duration {
        let cap = self.cfg.clone_retry_permanent;
        if permanent {
            return cap;
        }
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(24)).unwrap_or(u32::MAX);
        self.cfg.clone_retry.saturating_mul(factor).min(cap)
    }

    /// Renews this node's lease on a job it runs. `false`: the lease was lost (another node
    /// took the job over, or it finished); the caller must stop working on it.
    pub async fn renew_lease(&self, job: JobId, now: Timestamp) -> Result<bool, ControllerError> {
        let until = now.plus(self.cfg.clone_lease);
        Ok(self.store.renew_clone_lease(job, &self.cfg.node_id, until).await?)
    }

    /// Hands a job this node runs back (shutdown): its lease lapses at once, so the next sweep
    /// of any node takes it over.
    pub async fn release_lease(&self, job: JobId) -> Result<bool, ControllerError> {
        Ok(self.store.release_clone_lease(job, &self.cfg.node_id).await?)
    }

    /// Takes over up to `limit` jobs whose lease lapsed (their node died or handed them back)
    /// and answers what to run for them. A job whose profile is gone is failed at once.
    pub async fn take_over_lapsed(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<CloneRequest>, ControllerError> {
        let jobs = self.store.take_over_clone_jobs(now, &self.lease(now), limit).await?;
        let mut run = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.store.get_profile(&job.profile_id).await? {
                Some(profile) if profile.samples_hash() == job.samples_hash => {
                    run.push(CloneRequest { job_id: job.id, attempt: job.attempt, profile })
                }
                // The profile is gone, or has other samples now: cloning its current samples
                // under this job would give its calls a voice of the wrong samples.
                other => {
                    let why = if other.is_some() { SAMPLES_CHANGED } else { NO_PROFILE };
                    let failure = crate::model::JobFailure::transient(why);
                    self.clone_finished(job.id, &Err(failure), now).await?;
                }
            }
        }
        Ok(run)
    }

    async fn claim(
        &self,
        profile: &VoiceProfile,
        now: Timestamp,
    ) -> Result<(CloneJob, bool), StoreError> {
        self.store
            .claim_clone_job(&profile.id, &profile.samples_hash(), now, &self.lease(now))
            .await
    }

    /// A lease for this node from `now`.
    fn lease(&self, now: Timestamp) -> Lease {
        Lease { owner: self.cfg.node_id.clone(), until: now.plus(self.cfg.clone_lease) }
    }

    /// Plans the call's next step and makes its transition. When another request moved the
    /// call first (the transition was no longer legal: another node connected, failed or ended
    /// it), the answer is planned again from where the call stands now, so the loser of a race
    /// never acts on its stale view.
    async fn apply(
        &self,
        call: &CallRecord,
        job: Option<&CloneJob>,
        profile: Option<&VoiceProfile>,
        now: Timestamp,
        inbound: bool,
    ) -> Result<CallInstructions, ControllerError> {
        let planner = Planner::new(&self.cfg);
        let plan = planner.plan(call, job, profile, now, inbound);
        let Some(t) = plan.transition else { return Ok(plan.instructions) };
        let call_id = &call.call_id;
        let kind = if t.status == CallStatus::Connected {
            EventKind::Connected
        } else {
            EventKind::Failed
        };
        let reason = t.reason.as_deref();
        let detail = reason.unwrap_or("");
        // Only the request that made the transition records it (in the same step).
        match self.store.move_call(call_id, t.status, now, reason, kind, detail).await? {
            Some(u) if u.changed => Ok(plan.instructions),
            Some(u) => Ok(planner.plan(&u.record, job, profile, now, inbound).instructions),
            None => Err(ControllerError::UnknownCall(call_id.clone())),
        }
    }

    async fn event(
        &self,
        call_id: &CallId,
        at: Timestamp,
        kind: EventKind,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.store
            .append_event(&CallEvent {
                call_id: call_id.clone(),
                at,
                kind,
                detail: detail.to_owned(),
            })
            .await
    }
}
