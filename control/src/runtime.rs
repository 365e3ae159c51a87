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

use precall_api::{ControlError, ControlPort, ControlReply, ControlRequest, ReplyFn, Timestamp};
use precall_clone::{AnyProvider, CloneProvider};
use precall_controller::{CallController, CloneRequest, ControllerError, Store};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
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
    /// abandoned (their records stay `processing` until `CLONE_JOB_TIMEOUT_MS` passes).
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
    loop {
        let env = tokio::select! {
            _ = &mut stop => break,
            env = rx.recv() => match env { Some(env) => env, None => break },
        };
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let answer =
                tokio::time::timeout(request_timeout, handle(&service, &env.request)).await;
            let reply = answer.unwrap_or_else(|_| timeout_reply(&env.request));
            (env.reply)(reply);
        });
    }
    rx.close();
    while let Ok(env) = rx.try_recv() {
        (env.reply)(stopped_reply(&env.request));
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

async fn handle<S: Store>(service: &Arc<Service<S>>, request: &ControlRequest) -> ControlReply {
    let now = Timestamp::now();
    let ctl = &service.controller;
    match request {
        ControlRequest::Inbound(ctx) => {
            let out = ctl.handle_inbound_call(ctx, now).await.map_err(control_error);
            let out = out.map(|o| {
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
        ControlRequest::CheckStatus(call_id) => ControlReply::Instructions(
            ctl.check_clone_status(call_id, now).await.map_err(control_error),
        ),
        ControlRequest::CallEnded { call_id, reason } => {
            let ended = ctl.call_ended(call_id, reason, now).await.map_err(control_error);
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
            ControlReply::Instructions(ctl.stream_started(start, now).await.map_err(control_error))
        }
        ControlRequest::StreamClosed { call_id, reason, failed } => {
            let closed =
                ctl.stream_closed(call_id, reason, *failed, now).await.map_err(control_error);
            if let Ok(change) = &closed {
                if change.changed && change.record.status == precall_api::CallStatus::Ended {
                    service.metrics.call_ended(&change.record);
                }
            }
            ControlReply::Ended(closed.map(|_| ()))
        }
        ControlRequest::CallEvent { call_id, kind, detail } => ControlReply::Ended(
            ctl.media_event(call_id, *kind, detail, now).await.map_err(control_error),
        ),
        ControlRequest::Health => ControlReply::Health(
            ctl.store().health().await.map_err(|e| ControlError::Store(e.to_string())),
        ),
    }
}

/// Runs a clone job at the provider and records its result.
fn start_clone<S: Store>(service: Arc<Service<S>>, job: CloneRequest) {
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        tracing::info!(job = %job.job_id, profile = %job.profile.id, provider = service.provider.name(), "clone job started");
        let outcome = service.provider.clone_voice(&job).await.map_err(|e| e.to_string());
        service.metrics.clone_finished(outcome.is_ok(), started.elapsed());
        match &outcome {
            Ok(voice) => tracing::info!(job = %job.job_id, voice = %voice, "clone job completed"),
            Err(e) => tracing::warn!(job = %job.job_id, error = %e, "clone job failed"),
        }
        // The result must not be lost to a passing store error: retry a few times.
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=5 {
            match service.controller.clone_finished(job.job_id, &outcome, Timestamp::now()).await {
                Ok(_) => {
                    push_waiting(&service, job.job_id).await;
                    return;
                }
                Err(e) if attempt < 5 => {
                    tracing::warn!(job = %job.job_id, error = %e, attempt, "recording the clone result failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::error!(job = %job.job_id, error = %e, "could not record the clone result")
                }
            }
        }
    });
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
