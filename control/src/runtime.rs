//! The side runtime: one thread running a current-thread tokio runtime that owns the
//! `CallController`, the store and the clone provider.
//!
//! Requests arrive on one bounded tokio channel ([`ControlHandle::submit`] never blocks; a full
//! queue is `Overloaded`). Each request runs as its own task under the request deadline and is
//! answered through the caller's reply callback. A clone job that an inbound call created is
//! started here as a task too, and reports back to the controller when the provider answers.

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use precall_api::JobId;
use precall_api::{ControlError, ControlPort, ControlReply, ControlRequest, ReplyFn, Timestamp};
use precall_clone::{AnyProvider, CloneError, CloneProvider};
use precall_controller::{
    CallController, CloneJob, CloneRequest, ControllerError, JobFailure, JobOutcome, Store,
};
use tokio::sync::{mpsc, oneshot};

use crate::journal::{Entry, Journal};
use crate::metrics::{CloneBackoff, Metrics, VoiceDeletion};
use crate::push::{LivePush, PushTarget};

/// Requests waiting for the side runtime at most; past this, submitters get `Overloaded`.
pub const QUEUE_CAPACITY: usize = 4096;

struct Envelope {
    request: ControlRequest,
    reply: ReplyFn,
}

/// A cloneable way into the side runtime, usable from any thread.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Envelope>,
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHandle")
            .field("queued", &(QUEUE_CAPACITY - self.tx.capacity()))
            .finish()
    }
}

impl ControlPort for ControlHandle {
    fn submit(&self, request: ControlRequest, reply: ReplyFn) -> Result<(), ControlError> {
        self.tx.try_send(Envelope { request, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ControlError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => ControlError::Stopped,
        })
    }
}

impl ControlHandle {
    /// Requests waiting for the side runtime now.
    pub fn queued(&self) -> usize {
        QUEUE_CAPACITY.saturating_sub(self.tx.capacity())
    }

    /// Submits and waits for the answer on a may channel: in a may coroutine this parks the
    /// coroutine only, never its worker thread. The side runtime always answers (it enforces
    /// the request deadline), so the wait is bounded.
    pub fn call(&self, request: ControlRequest) -> Result<ControlReply, ControlError> {
        let (tx, rx) = may::sync::mpsc::channel();
        self.submit(
            request,
            Box::new(move |reply| {
                // The waiter may have gone (its connection closed): nothing to do then.
                let _ = tx.send(reply);
            }),
        )?;
        rx.recv().map_err(|_| ControlError::Stopped)
    }
}

/// What the side runtime serves with.
#[derive(Debug)]
pub struct Service<S> {
    /// The controller over the chosen store.
    pub controller: CallController<S>,
    /// The clone provider.
    pub provider: AnyProvider,
    /// Counters and histograms shared with `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The live-call push (`TWILIO_HOLD_MODE=poll` with REST credentials), if on.
    pub push: Option<Arc<LivePush>>,
    /// Tells the engine's shards that these calls' clone job finished (set once the engine
    /// runs; see [`Recheck`]).
    pub recheck: Arc<Recheck>,
    /// Delete a voice at the provider once new samples (or a removed profile) left it unused
    /// and no call is on it (`CLONE_DELETE_REPLACED`).
    pub delete_replaced: bool,
    /// The clone jobs this node runs now.
    pub running: RunningJobs,
    /// The voice profiles from configuration, saved to the store once it is ready.
    pub profiles: Vec<precall_controller::VoiceProfile>,
    /// How long call records are kept, if not forever.
    pub retention: Option<Retention>,
    /// What the store could not take during an outage, in order (see [`crate::journal`]).
    pub journal: JournalCell,
    /// The store's health for `/health`, probed by the side runtime.
    pub store_health: Arc<StoreHealth>,
    /// The completed clones this node has seen, by profile and sample set: during a store
    /// outage a call whose profile has one still reaches the agent.
    pub voices: VoiceCache,
}

/// Completed clones by (profile, samples hash), as this node last saw them.
#[derive(Debug, Default)]
pub struct VoiceCache(std::sync::Mutex<std::collections::HashMap<(String, String), CloneJob>>);

impl VoiceCache {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), CloneJob>> {
        // Each change is one insert or remove: a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a job: a completed one with a live voice is kept, anything else forgets the
    /// sample set's entry.
    fn saw(&self, job: &CloneJob) {
        let key = (job.profile_id.as_str().to_owned(), job.samples_hash.clone());
        let usable = job.status == precall_api::CloneStatus::Completed
            && job.voice_id.is_some()
            && job.voice_deleted_at.is_none();
        let mut map = self.lock();
        if usable {
            map.insert(key, job.clone());
        } else if job.status != precall_api::CloneStatus::Processing {
            map.remove(&key);
        }
    }

    fn forget(&self, job: JobId) {
        self.lock().retain(|_, j| j.id != job);
    }

    fn get(&self, profile: &precall_controller::VoiceProfile) -> Option<CloneJob> {
        self.lock().get(&(profile.id.as_str().to_owned(), profile.samples_hash())).cloned()
    }
}

/// The store's health as the side runtime last probed it (every [`HEALTH_EVERY`]): `/health`
/// reads it without a trip through the side runtime's queue, so a flood of health checks
/// never takes a place a webhook needs.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// `None` until the first probe; then when it was made and its error, if any.
    state: std::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

/// A probe older than this means the side runtime itself is stuck: unhealthy.
const HEALTH_STALE: Duration = Duration::from_secs(5);

impl StoreHealth {
    /// The last probe's result: an error before the first probe, and when the last one is
    /// older than a few seconds (the side runtime does not run its probe: it is wedged).
    pub fn get(&self) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*state {
            None => Err("the store has not been probed yet".to_owned()),
            Some((at, _)) if at.elapsed() > HEALTH_STALE => Err(format!(
                "the control plane's side runtime has not probed the store for {} s",
                at.elapsed().as_secs()
            )),
            Some((_, result)) => result.clone(),
        }
    }

    fn set(&self, result: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), result));
    }
}

/// How often the side runtime probes its store for `/health`.
pub const HEALTH_EVERY: Duration = Duration::from_millis(500);

async fn probe_store<S: Store>(service: Arc<Service<S>>) {
    loop {
        let probe =
            tokio::time::timeout(Duration::from_secs(2), service.controller.store().health());
        let result = match probe.await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("store unavailable: no answer to the health probe within 2 s".to_owned()),
        };
        service.store_health.set(result);
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

/// The node's journal and the wake-up of its replay.
#[derive(Debug, Default)]
pub struct JournalCell {
    journal: std::sync::Mutex<Journal>,
    wake: tokio::sync::Notify,
}

impl JournalCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        // Each change is one push or pop: a poisoned journal is still consistent.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(
        &self,
        metrics: &Metrics,
        call_id: &precall_api::CallId,
        at: Timestamp,
        entry: Entry,
    ) -> bool {
        let mut j = self.lock();
        let kept = j.push(call_id.clone(), at, entry).is_ok();
        metrics.journal_len(j.len());
        drop(j);
        if kept {
            self.wake.notify_one();
        }
        kept
    }

    fn has(&self, call_id: &precall_api::CallId) -> bool {
        self.lock().has(call_id)
    }

    fn has_inbound(&self, call_id: &precall_api::CallId) -> bool {
        self.lock().has_inbound(call_id)
    }

    fn inbound(&self, call_id: &precall_api::CallId) -> Option<precall_api::CallContext> {
        self.lock().inbound(call_id).cloned()
    }
}

/// How long call records (personal data: phone numbers) are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// An ended call is forgotten this long after it started (`CALL_RETENTION_DAYS`).
    pub ended: Duration,
    /// A call that never got an end: this long (the in-memory store: the hold limit plus the
    /// longest call; PostgreSQL: as ended ones, its record is kept for the operator).
    pub unended: Duration,
}

/// How often old calls are looked for.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Calls one statement forgets at most; one sweep runs up to [`RETENTION_BATCHES`] of them.
const RETENTION_BATCH: usize = 1_000;
const RETENTION_BATCHES: usize = 50;

/// Every [`RETENTION_EVERY`] (the first at start): forgets calls past their retention, in
/// batches, so one sweep never holds the store for long.
async fn forget_old_calls<S: Store>(service: Arc<Service<S>>) {
    let Some(retention) = service.retention else { return };
    let store = service.controller.store();
    loop {
        let now = Timestamp::now();
        let ended_before = Timestamp(now.0.saturating_sub(millis(retention.ended)));
        let unended_before = Timestamp(now.0.saturating_sub(millis(retention.unended)));
        let mut forgotten = 0;
        // A store not reachable (yet: the node may have started before its database) is tried
        // again in a second.
        let mut wait = RETENTION_EVERY;
        for _ in 0..RETENTION_BATCHES {
            match store.forget_calls(ended_before, unended_before, RETENTION_BATCH).await {
                Ok(n) => {
                    forgotten += n;
                    if n < RETENTION_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot forget old calls now; retrying");
                    wait = Duration::from_secs(1);
                    break;
                }
            }
        }
        if forgotten > 0 {
            service.metrics.calls_forgotten(forgotten);
            tracing::info!(calls = forgotten, "old call records deleted (CALL_RETENTION_DAYS)");
        }
        tokio::time::sleep(wait).await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The clone jobs this node runs now: one run per job on a node, and the list handed back at
/// shutdown.
#[derive(Debug, Default)]
pub struct RunningJobs(std::sync::Mutex<std::collections::HashSet<JobId>>);

impl RunningJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<JobId>> {
        // Each change is one insert or remove: a poisoned set is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `job` running here; `false` when it already is.
    fn start(&self, job: JobId) -> bool {
        self.lock().insert(job)
    }

    fn stop(&self, job: JobId) {
        self.lock().remove(&job);
    }

    fn all(&self) -> Vec<JobId> {
        self.lock().iter().copied().collect()
    }
}

/// The way from a finished clone job to the shards holding its calls, set after the engine
/// starts (the side runtime starts first).
#[derive(Default)]
pub struct Recheck(std::sync::OnceLock<RecheckFn>);

type RecheckFn = Box<dyn Fn(Vec<precall_api::CallId>) + Send + Sync>;

impl std::fmt::Debug for Recheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recheck").field("set", &self.0.get().is_some()).finish()
    }
}

impl Recheck {
    /// Sets the way to the shards, once.
    pub fn set(&self, f: impl Fn(Vec<precall_api::CallId>) + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(f));
    }

    fn notify(&self, calls: Vec<precall_api::CallId>) {
        if let Some(f) = self.0.get() {
            f(calls);
        }
    }
}

/// The running side runtime.
#[derive(Debug)]
pub struct SideRuntime {
    handle: ControlHandle,
    tokio: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The side runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The tokio runtime or its thread could not be created.
    #[error("cannot start the side runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// Building the service failed (store unreachable, …).
    #[error("{0}")]
    Build(String),
    /// The thread died while starting.
    #[error("the side runtime thread died while starting")]
    Died,
}

impl SideRuntime {
    /// Starts the thread, builds the service on it with `build`, and returns once it serves
    /// (or with the build's error).
    pub fn start<S, F, Fut>(build: F, request_timeout: Duration) -> Result<Self, StartError>
    where
        S: Store,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Service<S>, String>>,
    {
        let (tx, rx) = mpsc::channel::<Envelope>(QUEUE_CAPACITY);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let tokio = runtime.handle().clone();
        let thread =
            std::thread::Builder::new().name("precall-control".into()).spawn(move || {
                runtime.block_on(async move {
                    let service = match build().await {
                        Ok(s) => Arc::new(s),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    serve(service, rx, stop_rx, request_timeout).await;
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                handle: ControlHandle { tx },
                tokio,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(StartError::Build(e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(StartError::Died)
            }
        }
    }

    /// A handle for submitting requests.
    pub fn handle(&self) -> ControlHandle {
        self.handle.clone()
    }

    /// Runs `task` on the side runtime (start-up work such as warming the clip cache).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tokio.spawn(task);
    }

    /// Stops serving: requests still queued are answered `Stopped`; clone jobs in flight are
    /// handed back (their leases lapse at once, so another node's sweep takes them over).
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the side runtime thread panicked");
            }
        }
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn serve<S: Store>(
    service: Arc<Service<S>>,
    mut rx: mpsc::Receiver<Envelope>,
    mut stop: oneshot::Receiver<()>,
    request_timeout: Duration,
) {
    tokio::spawn(prepare_store(Arc::clone(&service)));
    let replay = tokio::spawn(replay_journal(Arc::clone(&service)));
    let probe = tokio::spawn(probe_store(Arc::clone(&service)));
    let retention = tokio::spawn(forget_old_calls(Arc::clone(&service)));
    let sweeper = tokio::spawn(sweep(Arc::clone(&service)));
    loop {
        let env = tokio::select! {
            _ = &mut stop => break,
            env = rx.recv() => match env { Some(env) => env, None => break },
        };
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let step = store_deadline(request_timeout);
            let answer =
                tokio::time::timeout(request_timeout, handle(&service, &env.request, step)).await;
            let reply = answer.unwrap_or_else(|_| timeout_reply(&env.request));
            (env.reply)(reply);
        });
    }
    sweeper.abort();
    retention.abort();
    replay.abort();
    probe.abort();
    let left = service.journal.lock().len();
    if left > 0 {
        tracing::error!(
            entries = left,
            "stopping with journaled calls the store never took: they are lost"
        );
    }
    rx.close();
    while let Ok(env) = rx.try_recv() {
        (env.reply)(stopped_reply(&env.request));
    }
    hand_back(&service).await;
}

/// Makes the store ready (PostgreSQL: reach it, migrate) and saves the configured profiles,
/// retrying while the store is unavailable: a node started while its database is down serves
/// (`/health` 503, SIP 503, Twilio's error message) until the database is there. A store that
/// answers but refuses (bad password, a migration's error) ends the process: that needs an
/// operator, not patience.
async fn prepare_store<S: Store>(service: Arc<Service<S>>) {
    let store = service.controller.store();
    let mut delay = Duration::from_millis(250);
    let mut waited = false;
    loop {
        let mut result = store.prepare().await;
        if result.is_ok() {
            for p in &service.profiles {
                result = store.upsert_profile(p).await;
                if result.is_err() {
                    break;
                }
            }
        }
        match result {
            Ok(()) => {
                if waited {
                    tracing::info!("the store is reachable: serving calls");
                }
                return;
            }
            Err(e @ precall_controller::StoreError::Unavailable(_)) => {
                if !waited {
                    tracing::warn!(error = %e, "the store is not reachable yet: waiting for it (new calls hold and are journaled meanwhile)");
                    waited = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(error = %e, "the store refused to start (check DATABASE_URL, its user and rights)");
                std::process::exit(1);
            }
        }
    }
}

/// Journals what a call's request says instead of storing it, when the store is away
/// (`failed` is its error) or entries about the call already wait (`failed` is `None`: they
/// must be replayed first). `None`: go on with the store's answer.
fn journal_instead<S: Store>(
    service: &Arc<Service<S>>,
    call_id: &precall_api::CallId,
    now: Timestamp,
    entry: impl FnOnce() -> Entry,
    failed: Option<&ControllerError>,
) -> Option<ControlReply> {
    let unavailable = matches!(
        failed,
        Some(ControllerError::Store(precall_controller::StoreError::Unavailable(_)))
    );
    let waiting = failed.is_none() && service.journal.has(call_id);
    if !(unavailable || waiting) {
        return None;
    }
    // Full: the store's error stands (the shard retries its end reports).
    service
        .journal
        .push(&service.metrics, call_id, now, entry())
        .then_some(ControlReply::Ended(Ok(())))
}

/// The answer to a call during a store outage, from the node's own profiles (the configured
/// ones; the default profile for numbers it does not know): greeting and the agent when the
/// node has seen a completed clone of the profile's samples, else greeting + hold + poll.
fn outage_answer<S: Store>(
    service: &Arc<Service<S>>,
    ctx: &precall_api::CallContext,
    now: Timestamp,
) -> precall_api::CallInstructions {
    let cfg = service.controller.config();
    let number = precall_controller::normalize_number(&ctx.recipient_number);
    let profile = service
        .profiles
        .iter()
        .find(|p| !number.is_empty() && p.number.as_deref() == Some(number.as_str()))
        .or_else(|| service.profiles.iter().find(|p| p.id == cfg.default_profile));
    let profile_id = profile.map_or_else(|| cfg.default_profile.clone(), |p| p.id.clone());
    let call = precall_controller::CallRecord::inbound(ctx, profile_id, now);
    // A completed clone of the profile's samples, seen by this node: the call reaches the
    // agent now (the replay records it connected); otherwise it holds.
    let job = profile.and_then(|p| service.voices.get(p));
    let planner = precall_controller::plan::Planner::new(cfg);
    planner.plan(&call, job.as_ref(), profile, now, true).instructions
}

/// Replays the journal, oldest first, as soon as the store takes it; each entry with the time
/// it happened. An entry the store refuses for another reason than being away is logged and
/// dropped (it would block the rest for ever).
async fn replay_journal<S: Store>(service: Arc<Service<S>>) {
    let ctl = &service.controller;
    let mut delay = Duration::from_millis(100);
    loop {
        let head = service.journal.lock().front().cloned();
        let Some(head) = head else {
            service.journal.wake.notified().await;
            continue;
        };
        let now = Timestamp::now();
        let id = &head.call_id;
        let result: Result<(), ControllerError> = match &head.entry {
            Entry::Inbound(ctx) => match ctl.handle_inbound_call_at(ctx, head.at, now).await {
                // The caller was answered from the node's cache already: no check now, the
                // call is recorded as it went.
                Ok(precall_controller::InboundOutcome { verify_voice: Some(check), .. }) => {
                    ctl.voice_checked(id, &check, true, now).await.map(|_| ())
                }
                Ok(o) => {
                    if let Some(job) = o.start_clone {
                        start_clone(Arc::clone(&service), job);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Entry::Ended { reason } => ctl.call_ended(id, reason, head.at).await.map(|c| {
                if c.changed {
                    service.metrics.call_ended(&c.record);
                }
            }),
            Entry::StreamClosed { reason, failed } => {
                ctl.stream_closed(id, reason, *failed, head.at).await.map(|c| {
                    if c.changed && c.record.status == precall_api::CallStatus::Ended {
                        service.metrics.call_ended(&c.record);
                    }
                })
            }
            Entry::Event { kind, detail } => ctl.media_event(id, *kind, detail, head.at).await,
        };
        match result {
            Err(ControllerError::Store(precall_controller::StoreError::Unavailable(_))) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(e) => {
                tracing::warn!(call_id = %id, error = %e, "a journaled entry was refused by the store; dropped")
            }
            Ok(()) => service.metrics.journal_replayed(),
        }
        delay = Duration::from_millis(100);
        let mut j = service.journal.lock();
        j.pop();
        service.metrics.journal_len(j.len());
        if j.is_empty() {
            tracing::info!("journal replayed: the store has every call again");
        }
    }
}

/// Longest the hand-back of running clone jobs may hold up a stop.
const HAND_BACK_DEADLINE: Duration = Duration::from_secs(2);

/// At shutdown: the leases of the jobs this node runs lapse now, so that another node (or this
/// one, restarted) takes them over at its next sweep instead of a lease period later.
async fn hand_back<S: Store>(service: &Arc<Service<S>>) {
    let jobs = service.running.all();
    if jobs.is_empty() {
        return;
    }
    let release = async {
        for job in &jobs {
            match service.controller.release_lease(*job).await {
                Ok(true) => tracing::info!(job = %job, "clone job handed back for another node"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(job = %job, error = %e, "cannot hand the clone job back; another node takes it over once its lease lapses")
                }
            }
        }
    };
    if tokio::time::timeout(HAND_BACK_DEADLINE, release).await.is_err() {
        tracing::warn!(
            jobs = jobs.len(),
            "handing clone jobs back timed out; their leases lapse by themselves"
        );
    }
}

/// How many lapsed jobs one sweep takes over at most.
const TAKE_OVER_BATCH: usize = 8;
/// How often unused voices are looked for (`CLONE_DELETE_REPLACED`).
const VOICE_SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How many unused voices one sweep deletes at most.
const VOICE_SWEEP_BATCH: usize = 8;

/// Every few hundred milliseconds: takes over clone jobs whose lease lapsed (their node died
/// or stopped), so the calls waiting on them get their voice within seconds; every
/// [`VOICE_SWEEP_EVERY`], deletes voices new samples left unused (when allowed).
async fn sweep<S: Store>(service: Arc<Service<S>>) {
    let every = (service.controller.config().clone_lease / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut voices_swept: Option<std::time::Instant> = None;
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        match service.controller.take_over_lapsed(Timestamp::now(), TAKE_OVER_BATCH).await {
            Ok(jobs) => {
                failing = false;
                for job in jobs {
                    tracing::info!(job = %job.job_id, profile = %job.profile.id, "clone job taken over: its node's lease lapsed");
                    service.metrics.clone_taken_over();
                    start_clone(Arc::clone(&service), job);
                }
            }
            // The store is away: /health says so; one line, not one per sweep.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot sweep for lapsed clone jobs; retrying");
            }
            Err(_) => {}
        }
        if service.delete_replaced && voices_swept.is_none_or(|t| t.elapsed() >= VOICE_SWEEP_EVERY)
        {
            match service.controller.store().unused_voices(VOICE_SWEEP_BATCH).await {
                Ok(jobs) => {
                    // Only a sweep that ran counts: a store not ready yet is asked again next.
                    voices_swept = Some(std::time::Instant::now());
                    for job in &jobs {
                        delete_voice(&service, job, VoiceDeletion::Replaced).await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot look for unused voices"),
            }
        }
    }
}

fn error_reply(request: &ControlRequest, e: ControlError) -> ControlReply {
    match request {
        ControlRequest::Inbound(_)
        | ControlRequest::CheckStatus(_)
        | ControlRequest::StreamStart(_) => ControlReply::Instructions(Err(e)),
        ControlRequest::CallEnded { .. }
        | ControlRequest::CallEvent { .. }
        | ControlRequest::StreamClosed { .. } => ControlReply::Ended(Err(e)),
        ControlRequest::Health => ControlReply::Health(Err(e)),
    }
}

fn timeout_reply(request: &ControlRequest) -> ControlReply {
    error_reply(request, ControlError::Timeout)
}

fn stopped_reply(request: &ControlRequest) -> ControlReply {
    error_reply(request, ControlError::Stopped)
}

fn control_error(e: ControllerError) -> ControlError {
    match e {
        ControllerError::UnknownCall(id) => ControlError::UnknownCall(id),
        ControllerError::Store(e @ precall_controller::StoreError::Unavailable(_)) => {
            ControlError::StoreUnavailable(e.to_string())
        }
        ControllerError::Store(e) => ControlError::Store(e.to_string()),
        ControllerError::Refused(why) => ControlError::Refused(why),
    }
}

/// How long a request's store work may take before it counts as the store being away: a
/// second less than the request's own deadline (at least half of it), so that a hung database
/// (a frozen server, a connection whose peer vanished: every query waits) gets the outage
/// answers (greeting and hold from the journal, a poll that keeps holding, an end journaled)
/// instead of the request's timeout, which hangs up.
fn store_deadline(request_timeout: Duration) -> Duration {
    request_timeout.saturating_sub(Duration::from_secs(1)).max(request_timeout / 2)
}

/// Why a store step gave up.
#[derive(Debug, thiserror::Error)]
#[error("the store did not answer within {0:?}")]
struct TooSlow(Duration);

/// `step`, or the store being away when it has not answered within `deadline`. A step cut
/// off here may still complete in the database. The journal then replays it: an inbound call
/// as a repeat (a `duplicate_inbound` event), an end or a transition as no change (so
/// `precall_calls_total` may miss that call); a media event is recorded twice. A clone job
/// such a step created is run by a sweep once its lease lapses.
async fn in_time<T>(
    deadline: Duration,
    step: impl Future<Output = Result<T, ControllerError>>,
) -> Result<T, ControllerError> {
    tokio::time::timeout(deadline, step).await.unwrap_or_else(|_| {
        Err(ControllerError::Store(precall_controller::StoreError::Unavailable(Box::new(TooSlow(
            deadline,
        )))))
    })
}

async fn handle<S: Store>(
    service: &Arc<Service<S>>,
    request: &ControlRequest,
    deadline: Duration,
) -> ControlReply {
    let now = Timestamp::now();
    let ctl = &service.controller;
    match request {
        ControlRequest::Inbound(ctx) => {
            // A retried webhook or retransmitted INVITE of a journaled call: same answer.
            if service.journal.has_inbound(&ctx.call_id) {
                return ControlReply::Instructions(Ok(outage_answer(service, ctx, now)));
            }
            let out = match in_time(deadline, ctl.handle_inbound_call(ctx, now)).await {
                Ok(precall_controller::InboundOutcome { verify_voice: Some(check), .. }) => {
                    let usable = voice_usable(service, &check).await;
                    if !usable {
                        service.voices.forget(check.job_id);
                    }
                    let at = Timestamp::now();
                    let left = deadline.saturating_sub(at.since(now));
                    in_time(left, ctl.voice_checked(&ctx.call_id, &check, usable, at)).await
                }
                other => other,
            };
            // The store is away (or did not answer in time, the voice check's step included):
            // answer greeting + hold from what the node knows and record the call once the
            // store is back (a step that did complete meanwhile is replayed as a repeat).
            let out = match out {
                Err(ControllerError::Store(precall_controller::StoreError::Unavailable(e))) => {
                    if service.journal.push(
                        &service.metrics,
                        &ctx.call_id,
                        now,
                        Entry::Inbound(ctx.clone()),
                    ) {
                        tracing::warn!(call_id = %ctx.call_id, error = %e, "store unavailable: the call holds and is journaled");
                        return ControlReply::Instructions(Ok(outage_answer(service, ctx, now)));
                    }
                    Err(ControllerError::Store(precall_controller::StoreError::Unavailable(e)))
                }
                other => other,
            };
            let out = out.map_err(control_error);
            let out = out.map(|o| {
                if let Some(job) = &o.job {
                    service.voices.saw(job);
                }
                if let Some(job) = o.start_clone {
                    start_clone(Arc::clone(service), job);
                }
                if ctx.protocol == precall_api::Protocol::Twilio
                    && o.instructions.action() == precall_api::CallAction::Hold
                {
                    push_at_hold_limit(service, &ctx.call_id);
                }
                o.instructions
            });
            ControlReply::Instructions(out)
        }
        // A journaled call is not in the store yet: it holds as in the outage.
        ControlRequest::CheckStatus(call_id) if service.journal.has_inbound(call_id) => {
            ControlReply::Instructions(Err(ControlError::StoreUnavailable(
                "the call is journaled until the store takes it".to_owned(),
            )))
        }
        ControlRequest::CheckStatus(call_id) => ControlReply::Instructions(
            in_time(deadline, ctl.check_clone_status(call_id, now)).await.map_err(control_error),
        ),
        ControlRequest::CallEnded { call_id, reason } => {
            let entry = || Entry::Ended { reason: reason.clone() };
            if let Some(reply) = journal_instead(service, call_id, now, entry, None) {
                return reply;
            }
            let ended = in_time(deadline, ctl.call_ended(call_id, reason, now)).await;
            if let Some(reply) = journal_instead(service, call_id, now, entry, ended.as_ref().err())
            {
                return reply;
            }
            let ended = ended.map_err(control_error);
            // Counted once: a repeated end report (a retried callback, a SIP end and a Twilio
            // callback for one call) did not end the call again.
            if let Ok(change) = &ended {
                if change.changed {
                    service.metrics.call_ended(&change.record);
                }
            }
            ControlReply::Ended(ended.map(|_| ()))
        }
        ControlRequest::StreamStart(start) => {
            // The stream of a call answered during an outage (not in the store yet): its plan
            // is the outage answer (the stream hold mode's default).
            if let Some(ctx) = service.journal.inbound(&start.call_id) {
                let mut ins = outage_answer(service, &ctx, now);
                if !start.greeting {
                    ins.greeting_audio = None;
                }
                return ControlReply::Instructions(Ok(ins));
            }
            let started = in_time(deadline, ctl.stream_started(start, now)).await;
            ControlReply::Instructions(started.map_err(control_error))
        }
        ControlRequest::StreamClosed { call_id, reason, failed } => {
            let entry = || Entry::StreamClosed { reason: reason.clone(), failed: *failed };
            if let Some(reply) = journal_instead(service, call_id, now, entry, None) {
                return reply;
            }
            let closed = in_time(deadline, ctl.stream_closed(call_id, reason, *failed, now)).await;
            if let Some(reply) =
                journal_instead(service, call_id, now, entry, closed.as_ref().err())
            {
                return reply;
            }
            let closed = closed.map_err(control_error);
            if let Ok(change) = &closed {
                if change.changed && change.record.status == precall_api::CallStatus::Ended {
                    service.metrics.call_ended(&change.record);
                }
            }
            ControlReply::Ended(closed.map(|_| ()))
        }
        ControlRequest::CallEvent { call_id, kind, detail } => {
            let entry = || Entry::Event { kind: *kind, detail: detail.clone() };
            if let Some(reply) = journal_instead(service, call_id, now, entry, None) {
                return reply;
            }
            let done = in_time(deadline, ctl.media_event(call_id, *kind, detail, now)).await;
            if let Some(reply) = journal_instead(service, call_id, now, entry, done.as_ref().err())
            {
                return reply;
            }
            ControlReply::Ended(done.map_err(control_error))
        }
        ControlRequest::Health => ControlReply::Health(
            ctl.store().health().await.map_err(|e| ControlError::Store(e.to_string())),
        ),
    }
}

/// Longest a reused voice's check may hold up an inbound answer.
const VOICE_CHECK_DEADLINE: Duration = Duration::from_secs(2);

/// Asks the provider whether a reused voice still exists. A check that fails (timeout, 5xx)
/// lets the call go on to the voice: a flaky check must not cost calls.
async fn voice_usable<S: Store>(
    service: &Arc<Service<S>>,
    check: &precall_controller::VoiceCheck,
) -> bool {
    let asked =
        tokio::time::timeout(VOICE_CHECK_DEADLINE, service.provider.check_voice(&check.voice_id));
    match asked.await {
        Ok(Ok(precall_clone::VoiceState::Usable)) => {
            service.metrics.voice_check("usable");
            true
        }
        Ok(Ok(state)) => {
            tracing::warn!(job = %check.job_id, voice = %check.voice_id, ?state, "the reused voice is gone at the provider or may not be used; cloning anew");
            service.metrics.voice_check("gone");
            if state == precall_clone::VoiceState::Unusable {
                // Held by the provider: free its slot (the job is marked deleted next).
                if let Err(e) = service.provider.delete_voice(&check.voice_id).await {
                    tracing::warn!(voice = %check.voice_id, error = %e, "cannot delete the unusable voice at the provider");
                }
            }
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(job = %check.job_id, voice = %check.voice_id, error = %e, "cannot check the reused voice; using it");
            service.metrics.voice_check("error");
            true
        }
        Err(_) => {
            tracing::warn!(job = %check.job_id, voice = %check.voice_id, "the voice check timed out; using the voice");
            service.metrics.voice_check("error");
            true
        }
    }
}

/// Runs a clone job at the provider and records its result, unless this node runs it already.
fn start_clone<S: Store>(service: Arc<Service<S>>, job: CloneRequest) {
    if !service.running.start(job.job_id) {
        return;
    }
    service.metrics.clone_running(true);
    tokio::spawn(async move {
        run_clone(&service, &job).await;
        service.running.stop(job.job_id);
        service.metrics.clone_running(false);
    });
}

/// One run of a clone job: the provider's work under the job's deadline, with the lease
/// renewed meanwhile; stops (records nothing) when the lease is lost to another node.
async fn run_clone<S: Store>(service: &Arc<Service<S>>, job: &CloneRequest) {
    let cfg = service.controller.config();
    let started = std::time::Instant::now();
    tracing::info!(job = %job.job_id, profile = %job.profile.id, attempt = job.attempt, provider = service.provider.name(), "clone job started");
    let deadline = cfg.clone_job_timeout;
    let work = tokio::time::timeout(deadline, clone_with_room(service, job));
    let outcome: JobOutcome = tokio::select! {
        done = work => match done {
            Ok(Ok(voice)) => Ok(voice),
            Ok(Err(e)) => Err(JobFailure { reason: e.to_string(), permanent: e.is_permanent() }),
            Err(_) => Err(JobFailure::transient(format!(
                "the clone job's deadline passed (CLONE_JOB_TIMEOUT_MS={})",
                deadline.as_millis()
            ))),
        },
        () = hold_lease(service, job.job_id) => {
            tracing::warn!(job = %job.job_id, "clone job lease lost: another node took the job over; this node stops working on it");
            service.metrics.clone_lease_lost();
            return;
        }
    };
    service.metrics.clone_finished(outcome.as_ref().err().map(|f| f.permanent), started.elapsed());
    match &outcome {
        Ok(voice) => tracing::info!(job = %job.job_id, voice = %voice, "clone job completed"),
        Err(f) => {
            tracing::warn!(job = %job.job_id, error = %f.reason, permanent = f.permanent, "clone job failed")
        }
    }
    let Some(stored) = record_clone(service, job.job_id, &outcome).await else { return };
    service.voices.saw(&stored);
    let profile = job.profile.id.as_str();
    match (&stored.status, &stored.retry_at) {
        (precall_api::CloneStatus::Failed, Some(retry_at)) => service.metrics.clone_backoff(
            profile,
            Some(CloneBackoff {
                reason: stored.error.clone().unwrap_or_default(),
                permanent: stored.permanent,
                retry_at: *retry_at,
            }),
        ),
        (precall_api::CloneStatus::Completed, _) => service.metrics.clone_backoff(profile, None),
        _ => {}
    }
    // Another run of this job (a node that lost its lease, or took it over) was recorded
    // first: its voice serves, this one is a spare taking a slot.
    if let Ok(voice) = &outcome {
        if stored.voice_id.as_ref() != Some(voice) {
            let spare = CloneJob { voice_id: Some(voice.clone()), ..stored.clone() };
            tracing::info!(job = %job.job_id, voice = %voice, "another run of the job was recorded first; deleting this run's voice");
            delete_voice(service, &spare, VoiceDeletion::Duplicate).await;
        }
    }
    push_waiting(service, job.job_id).await;
}

/// Records a clone result; retried until stored (a database outage must not lose it), or
/// until the node stops (then the lease lapses and another node runs the job again).
async fn record_clone<S: Store>(
    service: &Arc<Service<S>>,
    job: JobId,
    outcome: &JobOutcome,
) -> Option<CloneJob> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1u32.. {
        match service.controller.clone_finished(job, outcome, Timestamp::now()).await {
            Ok(stored) => return Some(stored),
            Err(precall_controller::ControllerError::Store(e))
                if matches!(e, precall_controller::StoreError::Unavailable(_)) =>
            {
                if attempt == 1 {
                    tracing::warn!(job = %job, error = %e, "recording the clone result failed: the store is away; retrying until it is back");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(job = %job, error = %e, "could not record the clone result");
                return None;
            }
        }
    }
    None
}

/// Renews this node's lease on `job` every third of its length; returns only when the lease
/// is lost (another node holds it, or the job finished elsewhere). A store that is away does
/// not lose it: no other node can take the job over through that store either.
async fn hold_lease<S: Store>(service: &Arc<Service<S>>, job: JobId) {
    let every = service.controller.config().clone_lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match service.controller.renew_lease(job, Timestamp::now()).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(job = %job, error = %e, "cannot renew the clone job's lease; retrying")
            }
        }
    }
}

/// The provider's clone; when the voice library is full, frees the oldest voice precall made
/// that nothing uses and tries once more.
async fn clone_with_room<S: Store>(
    service: &Arc<Service<S>>,
    job: &CloneRequest,
) -> Result<precall_api::VoiceId, CloneError> {
    match service.provider.clone_voice(job).await {
        Err(full @ CloneError::VoiceLimitReached { .. }) => {
            let unused = match service.controller.store().unused_voices(1).await {
                Ok(unused) => unused,
                Err(e) => {
                    tracing::warn!(job = %job.job_id, error = %e, "voice library full, and the store cannot say which voice is unused");
                    return Err(full);
                }
            };
            let Some(oldest) = unused.first() else {
                tracing::warn!(job = %job.job_id, "voice library full and no voice of precall's is unused: delete voices at the provider or raise the plan's limit");
                return Err(full);
            };
            if !delete_voice(service, oldest, VoiceDeletion::Slot).await {
                return Err(full);
            }
            service.provider.clone_voice(job).await
        }
        other => other,
    }
}

/// Deletes a job's voice at the provider and records it; `true` when it is gone.
async fn delete_voice<S: Store>(
    service: &Arc<Service<S>>,
    job: &CloneJob,
    why: VoiceDeletion,
) -> bool {
    let Some(voice) = &job.voice_id else { return false };
    match service.provider.delete_voice(voice).await {
        Ok(()) => {
            tracing::info!(job = %job.id, profile = %job.profile_id, voice = %voice, why = ?why, "voice deleted at the provider");
            service.voices.forget(job.id);
            service.metrics.voice_deleted(why);
            if why != VoiceDeletion::Duplicate {
                if let Err(e) =
                    service.controller.store().voice_deleted(job.id, Timestamp::now()).await
                {
                    tracing::warn!(job = %job.id, error = %e, "voice deleted but not recorded; the next sweep deletes it again (a voice already gone is no error)");
                }
            }
            true
        }
        Err(e) => {
            tracing::warn!(job = %job.id, voice = %voice, error = %e, "cannot delete the voice at the provider");
            false
        }
    }
}

/// Tells everyone holding a call on `job` that it finished: the engine's shards (SIP calls,
/// Twilio streams) check those calls at once, and in the poll hold mode each Twilio call is
/// pushed on. Calls held on other nodes' shards learn it at their next poll.
async fn push_waiting<S: Store>(service: &Arc<Service<S>>, job: precall_api::JobId) {
    let calls = match service.controller.store().calls_waiting_on(job).await {
        Ok(calls) => calls,
        Err(e) => {
            tracing::warn!(job = %job, error = %e, "cannot list the calls of a finished job; they poll");
            return;
        }
    };
    if calls.is_empty() {
        return;
    }
    service.recheck.notify(calls.iter().map(|(id, _)| id.clone()).collect());
    if service.push.is_none() {
        return;
    }
    for (call_id, protocol) in calls {
        if protocol == precall_api::Protocol::Twilio {
            let service = Arc::clone(service);
            tokio::spawn(async move { push_call(&service, &call_id).await });
        }
    }
}

/// Schedules the push of a held call's failure when its hold limit passes (poll hold mode).
fn push_at_hold_limit<S: Store>(service: &Arc<Service<S>>, call_id: &precall_api::CallId) {
    if service.push.is_none() {
        return;
    }
    let service = Arc::clone(service);
    let call_id = call_id.clone();
    // Just past the limit, so the planner sees it passed.
    let wait = service.controller.config().max_hold + Duration::from_millis(50);
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        push_call(&service, &call_id).await;
    });
}

/// Pushes what the poll would answer now to a held Twilio call, when that is news (a connect
/// or a hang-up) and this node wins the call's one push.
async fn push_call<S: Store>(service: &Arc<Service<S>>, call_id: &precall_api::CallId) {
    let Some(push) = &service.push else { return };
    let ctl = &service.controller;
    let call = match ctl.store().get_call(call_id).await {
        Ok(Some(call)) => call,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(call_id = %call_id, error = %e, "push skipped: store error; the call polls");
            return;
        }
    };
    let waiting =
        matches!(call.status, precall_api::CallStatus::Ringing | precall_api::CallStatus::Holding);
    if call.protocol != precall_api::Protocol::Twilio || !waiting {
        return;
    }
    let ins = match ctl.check_clone_status(call_id, Timestamp::now()).await {
        Ok(ins) => ins,
        Err(e) => {
            tracing::warn!(call_id = %call_id, error = %e, "push skipped; the call polls");
            return;
        }
    };
    if !LivePush::worth_pushing(&ins) {
        return;
    }
    match ctl.store().claim_push(call_id, Timestamp::now()).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(call_id = %call_id, error = %e, "push not claimed; the call polls");
            return;
        }
    }
    let target = PushTarget {
        call_id,
        account_sid: &call.session_id,
        caller: &call.caller_number,
        dialed: &call.recipient_number,
    };
    let outcome = push.push(&target, &ins).await;
    service.metrics.push(outcome.label());
    match &outcome {
        crate::push::PushOutcome::Updated => {
            tracing::info!(call_id = %call_id, action = ?ins.action(), "live call pushed on")
        }
        crate::push::PushOutcome::AlreadyEnded => {
            tracing::info!(call_id = %call_id, "push: the call had already ended")
        }
        crate::push::PushOutcome::Failed(why) => {
            tracing::warn!(call_id = %call_id, %why, "push failed; the call polls")
        }
    }
}
