//! The `Store` trait and its in-memory implementation.
//!
//! Each method is one atomic step, so that two nodes (or two requests) sharing one PostgreSQL
//! never start two clone jobs for one sample set nor record one call twice.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, ready};
use std::sync::{Mutex, MutexGuard};

use precall_api::{CallId, CallStatus, CloneStatus, JobId, ProfileId, Timestamp};

use crate::model::{CallEvent, CallRecord, CloneJob, EventKind, JobOutcome, Lease, VoiceProfile};

/// A store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool exhausted, timed out).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database answered with an error.
    #[error("store query failed: {0}")]
    Query(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored row could not be read back (unknown status name, …).
    #[error("stored {what} is corrupt: {value:?}")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// What was found there.
        value: String,
    },
    /// An update named a record that does not exist.
    #[error("{0} does not exist")]
    Missing(String),
}

/// What [`Store::insert_call`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertCall {
    /// The call was new and is now recorded.
    Inserted,
    /// A call with that id was already recorded; here it is, unchanged.
    Existing(Box<CallRecord>),
}

/// Where calls, clone jobs, call events and voice profiles are kept.
///
/// Implementations: [`MemoryStore`] (the embedded default) and the PostgreSQL store of the
/// `precall` crate. Both pass one behaviour suite.
pub trait Store: Send + Sync + 'static {
    /// Records a call unless one with the same id exists (then returns that one).
    fn insert_call(
        &self,
        call: &CallRecord,
    ) -> impl Future<Output = Result<InsertCall, StoreError>> + Send;

    /// Reads a call.
    fn get_call(
        &self,
        call_id: &CallId,
    ) -> impl Future<Output = Result<Option<CallRecord>, StoreError>> + Send;

    /// Points a call at the clone job it waits on.
    fn attach_job(
        &self,
        call_id: &CallId,
        job: JobId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Moves a call to `status` at `at`, with a reason (failure reason for
    /// [`CallStatus::Failed`], end reason for [`CallStatus::Ended`]), if that is a legal
    /// transition ([`CallStatus::can_become`]), applied conditionally in one step so that two
    /// nodes racing on one call cannot both make it or undo each other's.
    ///
    /// `connected_at` and `ended_at` are set once. Returns the record as it is afterwards and
    /// whether this call made the change, or `None` for an unknown call.
    fn set_call_status(
        &self,
        call_id: &CallId,
        status: CallStatus,
        at: Timestamp,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<Option<StatusChange>, StoreError>> + Send;

    /// Appends to a call's history.
    fn append_event(
        &self,
        event: &CallEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A call's history, oldest first.
    fn call_events(
        &self,
        call_id: &CallId,
    ) -> impl Future<Output = Result<Vec<CallEvent>, StoreError>> + Send;

    /// Creates or replaces a voice profile (by id).
    fn upsert_profile(
        &self,
        profile: &VoiceProfile,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads a profile by id.
    fn get_profile(
        &self,
        id: &ProfileId,
    ) -> impl Future<Output = Result<Option<VoiceProfile>, StoreError>> + Send;

    /// The profile a normalized dialed number selects, if any.
    fn profile_for_number(
        &self,
        number: &str,
    ) -> impl Future<Output = Result<Option<VoiceProfile>, StoreError>> + Send;

    /// The profile a normalized dialed number selects, or else the `fallback` profile: what
    /// an inbound call needs, in one step (PostgreSQL answers it with one statement).
    fn select_profile(
        &self,
        number: &str,
        fallback: &ProfileId,
    ) -> impl Future<Output = Result<Option<VoiceProfile>, StoreError>> + Send {
        async move {
            if !number.is_empty() {
                if let Some(p) = self.profile_for_number(number).await? {
                    return Ok(Some(p));
                }
            }
            self.get_profile(fallback).await
        }
    }

    /// Returns the job that serves `(profile, samples_hash)`, as [`claim_decision`] rules on
    /// the sample set's newest job: a completed one (its voice not deleted), a processing one
    /// whose lease holds, or a failed one still backing off serves; a processing one whose
    /// lease lapsed is taken over (leased to `lease`, its run restarted at `now`); otherwise a
    /// new job is created, leased to `lease`. The flag is `true` when this call created or
    /// took over the job, and then only this caller may run it at the provider.
    fn claim_clone_job(
        &self,
        profile: &ProfileId,
        samples_hash: &str,
        now: Timestamp,
        lease: &Lease,
    ) -> impl Future<Output = Result<(CloneJob, bool), StoreError>> + Send;

    /// Renews the lease of a processing job `owner` holds. `false` when it no longer holds it (another node took the job over, or
    /// the job finished).
    fn renew_clone_lease(
        &self,
        id: JobId,
        owner: &str,
        until: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes over up to `limit` processing jobs whose lease lapsed at `now` (their node died,
    /// stopped, or lost the database): each is leased to `lease` and its run restarts at `now`.
    /// Oldest first; two nodes sweeping at once never take the same job.
    fn take_over_clone_jobs(
        &self,
        now: Timestamp,
        lease: &Lease,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CloneJob>, StoreError>> + Send;

    /// Reads a job.
    fn get_clone_job(
        &self,
        id: JobId,
    ) -> impl Future<Output = Result<Option<CloneJob>, StoreError>> + Send;

    /// Completes or fails a processing job `owner` holds the lease of (a failure backs off
    /// until `retry_at`). A job that has finished keeps its result, and a node whose lease was
    /// taken over records nothing: only the run under the live lease decides. Returns the job
    /// as it is afterwards.
    fn finish_clone_job(
        &self,
        id: JobId,
        owner: &str,
        outcome: &JobOutcome,
        at: Timestamp,
        retry_at: Option<Timestamp>,
    ) -> impl Future<Output = Result<CloneJob, StoreError>> + Send;

    /// Hands a processing job `owner` holds back (shutdown): no owner, its lease lapsed, so
    /// the next sweep of any node takes it over. `false` when `owner` did not hold it.
    fn release_clone_lease(
        &self,
        id: JobId,
        owner: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Completed jobs whose voice no profile uses any more, oldest first, at most `limit`: it is
    /// not the newest completed job of its profile's current samples (new samples replaced
    /// it, or the profile is gone), its voice is not deleted yet, and no call waiting on or
    /// connected to it remains.
    fn unused_voices(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CloneJob>, StoreError>> + Send;

    /// Records that the provider confirmed a job's voice exists.
    fn voice_checked(
        &self,
        id: JobId,
        at: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that a job's voice was deleted at the provider.
    fn voice_deleted(
        &self,
        id: JobId,
        at: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The calls still holding on `job`, with their protocol: a finished clone job tells their
    /// shards at once and pushes the Twilio ones on. Ordered by call id.
    fn calls_waiting_on(
        &self,
        job: JobId,
    ) -> impl Future<Output = Result<Vec<(CallId, precall_api::Protocol)>, StoreError>> + Send;

    /// Claims the one live-call push of a call (a compare-and-set): `true` for the first
    /// claim only, on any node; `false` for an unknown call or one already claimed.
    fn claim_push(
        &self,
        call_id: &CallId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Forgets up to `limit` calls with their events, oldest first: those that ended and were
    /// recorded before `ended_before`, and those that never got an end (no status callback,
    /// a node that died) recorded before `unended_before`. Returns how many it forgot.
    fn forget_calls(
        &self,
        ended_before: Timestamp,
        unended_before: Timestamp,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// An inbound call's first step, as one atomic step of the store (PostgreSQL: one
    /// statement, `precall_inbound`): selects the profile `req.number` names, or else the
    /// fallback `req.call.profile_id`; records `req.call` with that profile unless the call
    /// id is recorded already (then the stored call, with its own profile, is kept); appends
    /// [`EventKind::Inbound`] (at the call's `started_at`, detail its profile) or
    /// [`EventKind::DuplicateInbound`] (at `req.now`). A call already on a job gets that job
    /// read; a call still waiting (ringing or holding) whose profile exists claims one
    /// ([`Store::claim_clone_job`], at `req.now`, leased to `req.lease`), is attached to it,
    /// and [`EventKind::CloneStarted`] (this call created or took over the job),
    /// [`EventKind::CloneReused`] (completed) or [`EventKind::CloneJoined`] is appended with
    /// the job id.
    fn record_inbound(
        &self,
        req: &InboundRequest<'_>,
    ) -> impl Future<Output = Result<InboundStep, StoreError>> + Send {
        async move {
            let fallback = &req.call.profile_id;
            let profile = self.select_profile(req.number, fallback).await?;
            let mut fresh = req.call.clone();
            if let Some(p) = &profile {
                fresh.profile_id = p.id.clone();
            }
            let (mut call, first) = match self.insert_call(&fresh).await? {
                InsertCall::Inserted => (fresh, true),
                InsertCall::Existing(existing) => (*existing, false),
            };
            let profile = if first || profile.as_ref().is_some_and(|p| p.id == call.profile_id) {
                profile
            } else {
                self.get_profile(&call.profile_id).await?
            };
            let (at, kind, detail) = if first {
                (call.started_at, EventKind::Inbound, call.profile_id.as_str().to_owned())
            } else {
                (req.now, EventKind::DuplicateInbound, String::new())
            };
            self.append_event(&CallEvent { call_id: call.call_id.clone(), at, kind, detail })
                .await?;
            let mut created = false;
            let job = match (call.clone_job_id, &profile) {
                (Some(id), _) => self.get_clone_job(id).await?,
                (None, Some(profile))
                    if matches!(call.status, CallStatus::Ringing | CallStatus::Holding) =>
                {
                    let hash = profile.samples_hash();
                    let (job, made) =
                        self.claim_clone_job(&profile.id, &hash, req.now, req.lease).await?;
                    self.attach_job(&call.call_id, job.id).await?;
                    call.clone_job_id = Some(job.id);
                    created = made;
                    let kind = if made {
                        EventKind::CloneStarted
                    } else if job.status == CloneStatus::Completed {
                        EventKind::CloneReused
                    } else {
                        EventKind::CloneJoined
                    };
                    self.append_event(&CallEvent {
                        call_id: call.call_id.clone(),
                        at: req.now,
                        kind,
                        detail: job.id.to_string(),
                    })
                    .await?;
                    Some(job)
                }
                (None, _) => None,
            };
            Ok(InboundStep { call, first, profile, job, created })
        }
    }

    /// A call with its clone job and its profile, as a status check reads them (PostgreSQL:
    /// one statement). `None` for an unknown call.
    fn call_view(
        &self,
        call_id: &CallId,
    ) -> impl Future<Output = Result<Option<CallView>, StoreError>> + Send {
        async move {
            let Some(call) = self.get_call(call_id).await? else { return Ok(None) };
            let job = match call.clone_job_id {
                Some(id) => self.get_clone_job(id).await?,
                None => None,
            };
            let profile = self.get_profile(&call.profile_id).await?;
            Ok(Some(CallView { call, job, profile }))
        }
    }

    /// [`Store::set_call_status`], and when this request made the transition, appends the
    /// event `kind` with `detail` at `at` in the same atomic step (PostgreSQL: one statement):
    /// only the request that moved the call records that it did.
    fn move_call(
        &self,
        call_id: &CallId,
        status: CallStatus,
        at: Timestamp,
        reason: Option<&str>,
        kind: EventKind,
        detail: &str,
    ) -> impl Future<Output = Result<Option<StatusChange>, StoreError>> + Send {
        async move {
            let change = self.set_call_status(call_id, status, at, reason).await?;
            if change.as_ref().is_some_and(|c| c.changed) {
                let event =
                    CallEvent { call_id: call_id.clone(), at, kind, detail: detail.to_owned() };
                self.append_event(&event).await?;
            }
            Ok(change)
        }
    }

    /// Answers when the store can serve requests.
    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes the store ready to serve (PostgreSQL: reaches the server and applies pending
    /// migrations); until it succeeds, the store may answer `Unavailable`. Called again until
    /// it does; once it has, a no-op.
    fn prepare(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(Ok(()))
    }
}

/// An inbound call to record: see [`Store::record_inbound`].
#[derive(Debug, Clone, Copy)]
pub struct InboundRequest<'a> {
    /// The call as it is recorded when new, arrived at its `started_at`; its `profile_id` is
    /// the fallback, replaced by the profile `number` selects.
    pub call: &'a CallRecord,
    /// The dialed number, normalized ([`crate::normalize_number`]).
    pub number: &'a str,
    /// When the request is handled: the job claim's time, and a repeat's event's.
    pub now: Timestamp,
    /// The lease of a job this call creates or takes over.
    pub lease: &'a Lease,
}

/// What [`Store::record_inbound`] recorded and read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundStep {
    /// The call as stored afterwards (attached to its job).
    pub call: CallRecord,
    /// Whether this request recorded the call (`false`: it was recorded before).
    pub first: bool,
    /// The call's profile, if it exists.
    pub profile: Option<VoiceProfile>,
    /// The call's clone job, if it has one.
    pub job: Option<CloneJob>,
    /// Whether this request created or took over `job`: then only it may run the job at
    /// the provider.
    pub created: bool,
}

/// A call with what its next step depends on: see [`Store::call_view`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallView {
    /// The call.
    pub call: CallRecord,
    /// Its clone job, if it has one.
    pub job: Option<CloneJob>,
    /// Its profile, if it exists.
    pub profile: Option<VoiceProfile>,
}

/// What [`Store::set_call_status`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The call as it is afterwards.
    pub record: CallRecord,
    /// Whether this request made the transition (false: it was not legal from where the call
    /// stood, e.g. another node got there first).
    pub changed: bool,
}

/// Applies a status change to a record, with the rules of [`Store::set_call_status`]; returns
/// whether it changed anything. The in-memory store's rule; PostgreSQL's conditional `UPDATE`
/// says the same in SQL, and the store test suite holds both to it.
pub fn apply_status(
    call: &mut CallRecord,
    status: CallStatus,
    at: Timestamp,
    reason: Option<&str>,
) -> bool {
    if !call.status.can_become(status) {
        return false;
    }
    call.status = status;
    match status {
        CallStatus::Connected => {
            call.connected_at.get_or_insert(at);
        }
        CallStatus::Failed => {
            if call.failure.is_none() {
                call.failure = reason.map(str::to_owned);
            }
        }
        CallStatus::Ended => {
            call.ended_at.get_or_insert(at);
            call.end_reason = reason.map(str::to_owned);
        }
        CallStatus::Ringing | CallStatus::Holding => {}
    }
    true
}

/// What [`Store::claim_clone_job`] does, from the newest job of the sample set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// The job serves the call (completed, running under a live lease, or failed and still
    /// backing off).
    Serve,
    /// The job is processing but its lease lapsed: the claimant takes it over.
    TakeOver,
    /// A new job, with this attempt number.
    Create {
        /// See [`CloneJob::attempt`].
        attempt: u32,
    },
}

/// The rule of [`Store::claim_clone_job`], shared by both stores (PostgreSQL applies it under
/// the sample set's advisory lock).
pub fn claim_decision(newest: Option<&CloneJob>, now: Timestamp) -> ClaimDecision {
    let Some(job) = newest else { return ClaimDecision::Create { attempt: 1 } };
    match job.status {
        CloneStatus::Completed if job.voice_deleted_at.is_none() => ClaimDecision::Serve,
        CloneStatus::Completed => ClaimDecision::Create { attempt: 1 },
        CloneStatus::Processing if job.lease_lapsed(now) => ClaimDecision::TakeOver,
        CloneStatus::Processing => ClaimDecision::Serve,
        CloneStatus::Failed if job.retry_at.is_some_and(|t| t > now) => ClaimDecision::Serve,
        CloneStatus::Failed => ClaimDecision::Create { attempt: job.attempt.saturating_add(1) },
    }
}

/// Applies a finished job's outcome to its record, when it is still processing; returns
/// whether it did. The in-memory store's rule, as PostgreSQL's conditional `UPDATE`.
pub fn apply_finish(
    job: &mut CloneJob,
    owner: &str,
    outcome: &JobOutcome,
    at: Timestamp,
    retry_at: Option<Timestamp>,
) -> bool {
    if job.status != CloneStatus::Processing || job.lease_owner.as_deref() != Some(owner) {
        return false;
    }
    match outcome {
        Ok(voice) => {
            job.status = CloneStatus::Completed;
            job.voice_id = Some(voice.clone());
        }
        Err(failure) => {
            job.status = CloneStatus::Failed;
            job.error = Some(failure.reason.clone());
            job.permanent = failure.permanent;
            job.retry_at = retry_at;
        }
    }
    job.finished_at = Some(at);
    job.lease_owner = None;
    job.lease_until = None;
    true
}

/// Leases a processing job to `lease`'s node and restarts its run at `now`.
fn take_over(job: &mut CloneJob, now: Timestamp, lease: &Lease) {
    job.lease_owner = Some(lease.owner.clone());
    job.lease_until = Some(lease.until);
    job.started_at = now;
}

/// The embedded store: everything in one process's memory, gone at exit.
///
/// Right for a single node and for demos; use PostgreSQL (`DATABASE_URL`) for anything that
/// must survive a restart or be shared by several nodes.
///
/// Memory is bounded: past [`MemoryStore::DEFAULT_RETAINED_CALLS`] calls (or the number given
/// to [`MemoryStore::with_retention`]), recording a call forgets the oldest *ended* call and its
/// events. Calls still in progress are never forgotten.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    retain: usize,
}

#[derive(Debug, Default)]
struct Inner {
    calls: HashMap<CallId, CallRecord>,
    /// Call ids, oldest first, for retention.
    order: VecDeque<CallId>,
    events: HashMap<CallId, Vec<CallEvent>>,
    profiles: HashMap<ProfileId, VoiceProfile>,
    jobs: Vec<CloneJob>,
    /// Calls whose live-call push was claimed.
    pushed: std::collections::HashSet<CallId>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_retention(Self::DEFAULT_RETAINED_CALLS)
    }
}

impl MemoryStore {
    /// Calls kept before the oldest ended ones are forgotten.
    /// 20,000: about 25 MB of records (the controller bench prints the bytes per call); the
    /// store is for trying precall and for single nodes, whose history belongs in PostgreSQL.
    pub const DEFAULT_RETAINED_CALLS: usize = 20_000;

    /// An empty store keeping the default number of calls.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping about `calls` calls (at least one).
    pub fn with_retention(calls: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), retain: calls.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change: every change below
        // is a single assignment or push. So a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Forgets the oldest ended calls until at most `retain` are kept. Looks at no more than
    /// 4 calls per insert, so an insert stays cheap even when the oldest calls are still in
    /// progress (measured: looking at 64 cost a third of the webhook throughput with 100k live
    /// calls); each insert can forget up to 4, so the excess is worked off over the next ones.
    fn forget_beyond(&mut self, retain: usize) {
        let mut looked = 0;
        while self.calls.len() > retain && looked < self.order.len().min(4) {
            looked += 1;
            let Some(id) = self.order.pop_front() else { break };
            let ended = self.calls.get(&id).is_none_or(|c| c.status.is_terminal());
            if ended {
                self.calls.remove(&id);
                self.events.remove(&id);
                self.pushed.remove(&id);
            } else {
                self.order.push_back(id);
            }
        }
    }
}

impl Store for MemoryStore {
    fn insert_call(
        &self,
        call: &CallRecord,
    ) -> impl Future<Output = Result<InsertCall, StoreError>> + Send {
        let mut inner = self.lock();
        let out = match inner.calls.get(&call.call_id) {
            Some(existing) => InsertCall::Existing(Box::new(existing.clone())),
            None => {
                inner.calls.insert(call.call_id.clone(), call.clone());
                inner.order.push_back(call.call_id.clone());
                inner.forget_beyond(self.retain);
                InsertCall::Inserted
            }
        };
        ready(Ok(out))
    }

    fn get_call(
        &self,
        call_id: &CallId,
    ) -> impl Future<Output = Result<Option<CallRecord>, StoreError>> + Send {
        ready(Ok(self.lock().calls.get(call_id).cloned()))
    }

    fn attach_job(
        &self,
        call_id: &CallId,
        job: JobId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let out = match self.lock().calls.get_mut(call_id) {
            Some(call) => {
                call.clone_job_id = Some(job);
                Ok(())
            }
            None => Err(StoreError::Missing(format!("call {call_id}"))),
        };
        ready(out)
    }

    fn set_call_status(
        &self,
        call_id: &CallId,
        status: CallStatus,
        at: Timestamp,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<Option<StatusChange>, StoreError>> + Send {
        let out = self.lock().calls.get_mut(call_id).map(|call| {
            let changed = apply_status(call, status, at, reason);
            StatusChange { record: call.clone(), changed }
        });
        ready(Ok(out))
    }

    fn append_event(
        &self,
        event: &CallEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.lock().events.entry(event.call_id.clone()).or_default().push(event.clone());
        ready(Ok(()))
    }

    fn call_events(
        &self,
        call_id: &CallId,
    ) -> impl Future<Output = Result<Vec<CallEvent>, StoreError>> + Send {
        ready(Ok(self.lock().events.get(call_id).cloned().unwrap_or_default()))
    }

    fn upsert_profile(
        &self,
        profile: &VoiceProfile,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut inner = self.lock();
        // A number selects one profile: the newest claim on it wins, as in PostgreSQL.
        if let Some(number) = &profile.number {
            for p in inner.profiles.values_mut() {
                if p.id != profile.id && p.number.as_deref() == Some(number) {
                    p.number = None;
                }
            }
        }
        inner.profiles.insert(profile.id.clone(), profile.clone());
        ready(Ok(()))
    }

    fn get_profile(
        &self,
        id: &ProfileId,
    ) -> impl Future<Output = Result<Option<VoiceProfile>, StoreError>> + Send {
        ready(Ok(self.lock().profiles.get(id).cloned()))
    }

    fn profile_for_number(
        &self,
        number: &str,
    ) -> impl Future<Output = Result<Option<VoiceProfile>, StoreError>> + Send {
        let found =
            self.lock().profiles.values().find(|p| p.number.as_deref() == Some(number)).cloned();
        ready(Ok(found))
    }

    fn claim_clone_job(
        &self,
        profile: &ProfileId,
        samples_hash: &str,
        now: Timestamp,
        lease: &Lease,
    ) -> impl Future<Output = Result<(CloneJob, bool), StoreError>> + Send {
        let mut inner = self.lock();
        let newest = inner
            .jobs
            .iter()
            .rposition(|j| &j.profile_id == profile && j.samples_hash == samples_hash);
        let out = match claim_decision(newest.map(|i| &inner.jobs[i]), now) {
            ClaimDecision::Serve => (newest.map(|i| inner.jobs[i].clone()), false),
            ClaimDecision::TakeOver => (
                newest.map(|i| {
                    let job = &mut inner.jobs[i];
                    take_over(job, now, lease);
                    job.clone()
                }),
                true,
            ),
            ClaimDecision::Create { attempt } => {
                let id = JobId(i64::try_from(inner.jobs.len()).unwrap_or(i64::MAX - 1) + 1);
                let job = CloneJob::new(id, profile.clone(), samples_hash, attempt, now, lease);
                inner.jobs.push(job.clone());
                (Some(job), true)
            }
        };
        let (job, run) = out;
        ready(job.map(|j| (j, run)).ok_or_else(|| StoreError::Missing("clone job".to_owned())))
    }

    fn renew_clone_lease(
        &self,
        id: JobId,
        owner: &str,
        until: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let mut inner = self.lock();
        let held = inner.jobs.iter_mut().find(|j| j.id == id).filter(|j| {
            j.status == CloneStatus::Processing && j.lease_owner.as_deref() == Some(owner)
        });
        let renewed = held.map(|j| j.lease_until = Some(until)).is_some();
        ready(Ok(renewed))
    }

    fn release_clone_lease(
        &self,
        id: JobId,
        owner: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let mut inner = self.lock();
        let held = inner.jobs.iter_mut().find(|j| j.id == id).filter(|j| {
            j.status == CloneStatus::Processing && j.lease_owner.as_deref() == Some(owner)
        });
        let released = held
            .map(|j| {
                j.lease_owner = None;
                j.lease_until = None;
            })
            .is_some();
        ready(Ok(released))
    }

    fn take_over_clone_jobs(
        &self,
        now: Timestamp,
        lease: &Lease,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CloneJob>, StoreError>> + Send {
        let mut inner = self.lock();
        let taken = inner
            .jobs
            .iter_mut()
            .filter(|j| j.status == CloneStatus::Processing && j.lease_lapsed(now))
            .take(limit)
            .map(|j| {
                take_over(j, now, lease);
                j.clone()
            })
            .collect();
        ready(Ok(taken))
    }

    fn get_clone_job(
        &self,
        id: JobId,
    ) -> impl Future<Output = Result<Option<CloneJob>, StoreError>> + Send {
        ready(Ok(self.lock().jobs.iter().find(|j| j.id == id).cloned()))
    }

    fn finish_clone_job(
        &self,
        id: JobId,
        owner: &str,
        outcome: &JobOutcome,
        at: Timestamp,
        retry_at: Option<Timestamp>,
    ) -> impl Future<Output = Result<CloneJob, StoreError>> + Send {
        let mut inner = self.lock();
        let out = match inner.jobs.iter_mut().find(|j| j.id == id) {
            Some(job) => {
                apply_finish(job, owner, outcome, at, retry_at);
                Ok(job.clone())
            }
            None => Err(StoreError::Missing(format!("clone {id}"))),
        };
        ready(out)
    }

    fn unused_voices(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<CloneJob>, StoreError>> + Send {
        let inner = self.lock();
        let in_use: std::collections::HashSet<JobId> = inner
            .calls
            .values()
            .filter(|c| !c.status.is_terminal())
            .filter_map(|c| c.clone_job_id)
            .collect();
        let completed = |j: &&CloneJob| j.status == CloneStatus::Completed && j.voice_id.is_some();
        // The voice speaking for a profile: the newest completed job of its current samples.
        let speaks = |j: &CloneJob| {
            inner.profiles.get(&j.profile_id).is_some_and(|p| {
                p.samples_hash() == j.samples_hash
                    && !inner.jobs.iter().filter(completed).any(|n| {
                        n.profile_id == j.profile_id
                            && n.samples_hash == j.samples_hash
                            && n.id > j.id
                    })
            })
        };
        let mut unused: Vec<CloneJob> = inner
            .jobs
            .iter()
            .filter(completed)
            .filter(|j| j.voice_deleted_at.is_none() && !in_use.contains(&j.id) && !speaks(j))
            .cloned()
            .collect();
        unused.sort_by_key(|j| (j.finished_at, j.id));
        unused.truncate(limit);
        ready(Ok(unused))
    }

    fn voice_checked(
        &self,
        id: JobId,
        at: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        if let Some(job) = self.lock().jobs.iter_mut().find(|j| j.id == id) {
            job.checked_at = Some(at);
        }
        ready(Ok(()))
    }

    fn voice_deleted(
        &self,
        id: JobId,
        at: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        if let Some(job) = self.lock().jobs.iter_mut().find(|j| j.id == id) {
            job.voice_deleted_at.get_or_insert(at);
        }
        ready(Ok(()))
    }

    fn calls_waiting_on(
        &self,
        job: JobId,
    ) -> impl Future<Output = Result<Vec<(CallId, precall_api::Protocol)>, StoreError>> + Send {
        let inner = self.lock();
        let mut out: Vec<(CallId, precall_api::Protocol)> = inner
            .calls
            .values()
            .filter(|c| {
                c.clone_job_id == Some(job)
                    && matches!(c.status, CallStatus::Ringing | CallStatus::Holding)
            })
            .map(|c| (c.call_id.clone(), c.protocol))
            .collect();
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        ready(Ok(out))
    }

    fn claim_push(
        &self,
        call_id: &CallId,
        _at: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let mut inner = self.lock();
        let claimed = inner.calls.contains_key(call_id) && inner.pushed.insert(call_id.clone());
        ready(Ok(claimed))
    }

    fn forget_calls(
        &self,
        ended_before: Timestamp,
        unended_before: Timestamp,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        let mut inner = self.lock();
        let mut old: Vec<(Timestamp, CallId)> = inner
            .calls
            .values()
            .filter(|c| {
                let before = if c.status.is_terminal() { ended_before } else { unended_before };
                c.started_at < before
            })
            .map(|c| (c.started_at, c.call_id.clone()))
            .collect();
        old.sort();
        old.truncate(limit);
        for (_, id) in &old {
            inner.calls.remove(id);
            inner.events.remove(id);
            inner.pushed.remove(id);
        }
        if !old.is_empty() {
            let Inner { calls, order, .. } = &mut *inner;
            order.retain(|id| calls.contains_key(id));
        }
        ready(Ok(old.len()))
    }

    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(Ok(()))
    }
}
