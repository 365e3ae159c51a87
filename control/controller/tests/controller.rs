//! Table-driven tests of the CallController over the in-memory store and a fake clock.
//!
//! Each case is a script of steps (inbound, clone result, status check, end) at given times,
//! with what the instructions must say after each step.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use precall_api::{
    CallAction, CallContext, CallId, CallStatus, CloneStatus, ProfileId, Protocol, Timestamp,
    VoiceId,
};
use precall_controller::{
    CallController, ControllerConfig, ControllerError, EventKind, InboundOutcome, JobFailure,
    MemoryStore, Store, VoiceProfile,
};

/// The in-memory store never waits, so one poll finishes every future.
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the in-memory store never waits"),
    }
}

fn config() -> ControllerConfig {
    ControllerConfig {
        greeting_url: "https://media.test/greeting.wav".into(),
        hold_url: "https://media.test/hold.wav".into(),
        error_message: "Sorry, we could not connect your call.".into(),
        error_audio_url: Some("https://media.test/error.wav".into()),
        poll_interval: Duration::from_millis(2_000),
        max_hold: Duration::from_millis(60_000),
        clone_job_timeout: Duration::from_millis(120_000),
        clone_lease: Duration::from_millis(10_000),
        clone_retry: Duration::from_millis(10_000),
        clone_retry_permanent: Duration::from_millis(900_000),
        node_id: "node-a".to_owned(),
        clone_verify_after: Duration::from_millis(3_600_000),
        agent_ws_url: "wss://agents.test/v1/convai/conversation".into(),
        default_agent_id: "agent_default".into(),
        default_profile: ProfileId::new("default"),
    }
}

fn profile(id: &str, number: Option<&str>, samples: &[&str]) -> VoiceProfile {
    VoiceProfile {
        id: id.into(),
        number: number.map(str::to_owned),
        name: format!("Voice {id}"),
        sample_urls: samples.iter().map(|s| (*s).to_owned()).collect(),
        agent_id: None,
        greeting_url: None,
        hold_url: None,
        first_message: None,
    }
}

fn controller() -> CallController<MemoryStore> {
    let store = MemoryStore::new();
    run(store.upsert_profile(&profile("default", None, &["https://s/default.mp3"]))).unwrap();
    let mut sales = profile("sales", Some("+18005550100"), &["https://s/sales.mp3"]);
    sales.agent_id = Some("agent_sales".into());
    sales.greeting_url = Some("https://media.test/sales-greeting.wav".into());
    run(store.upsert_profile(&sales)).unwrap();
    CallController::new(store, config())
}

fn ctx(call_id: &str, to: &str) -> CallContext {
    CallContext {
        call_id: call_id.into(),
        session_id: "ACtest".into(),
        caller_number: "+12349013030".into(),
        recipient_number: to.into(),
        status: CallStatus::Ringing,
        protocol: Protocol::Twilio,
    }
}

/// One step of a script, at a time in ms from the start.
#[derive(Debug)]
enum Step {
    Inbound {
        call: &'static str,
        to: &'static str,
    },
    /// Finish the job the named call waits on.
    CloneDone {
        call: &'static str,
        ok: bool,
    },
    /// Fail the job the named call waits on with a permanent failure.
    CloneFailedPermanently {
        call: &'static str,
    },
    /// Renew this node's lease on the job the named call waits on.
    Renew {
        call: &'static str,
    },
    Check {
        call: &'static str,
    },
    End {
        call: &'static str,
    },
}

/// What the instructions of a step must show.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Greeting + hold + poll; `starts_job` says whether a clone job must be started.
    GreetHold {
        starts_job: bool,
    },
    HoldPoll,
    /// Agent websocket with the cloned voice id; `greeting` whether a greeting comes first.
    Connect {
        greeting: bool,
    },
    ErrorHangup,
    /// Hang up without an error message (the call is over).
    SilentHangup,
    /// `call_ended` succeeded.
    Ended,
}

struct Harness {
    ctl: CallController<MemoryStore>,
    jobs_started: Vec<precall_controller::CloneRequest>,
}

impl Harness {
    fn job_of(&self, call: &str) -> precall_api::JobId {
        let rec = run(self.ctl.store().get_call(&CallId::new(call))).unwrap().unwrap();
        rec.clone_job_id.expect("call attached to a job")
    }

    fn step(&mut self, at_ms: u64, step: &Step) -> Expect {
        let now = Timestamp(1_000_000 + at_ms);
        match *step {
            Step::Inbound { call, to } => {
                let InboundOutcome { instructions, start_clone, .. } =
                    run(self.ctl.handle_inbound_call(&ctx(call, to), now)).unwrap();
                let starts_job = start_clone.is_some();
                self.jobs_started.extend(start_clone);
                classify(&instructions, Some(starts_job))
            }
            Step::CloneDone { call, ok } => {
                let job = self.job_of(call);
                let outcome = if ok {
                    Ok(VoiceId::new(format!("voice-{job}")))
                } else {
                    Err(JobFailure::transient("the clone provider failed with 503"))
                };
                run(self.ctl.clone_finished(job, &outcome, now)).unwrap();
                Expect::Ended
            }
            Step::CloneFailedPermanently { call } => {
                let job = self.job_of(call);
                let failure = JobFailure::permanent("the clone provider rejected the API key");
                run(self.ctl.clone_finished(job, &Err(failure), now)).unwrap();
                Expect::Ended
            }
            Step::Renew { call } => {
                assert!(run(self.ctl.renew_lease(self.job_of(call), now)).unwrap(), "lease held");
                Expect::Ended
            }
            Step::Check { call } => {
                let ins = run(self.ctl.check_clone_status(&CallId::new(call), now)).unwrap();
                classify(&ins, None)
            }
            Step::End { call } => {
                run(self.ctl.call_ended(&CallId::new(call), "caller_hangup", now)).unwrap();
                Expect::Ended
            }
        }
    }
}

fn classify(ins: &precall_api::CallInstructions, starts_job: Option<bool>) -> Expect {
    match ins.action() {
        CallAction::Hangup if ins.error_message.is_some() => {
            assert!(
                ins.websocket.is_none() && ins.hold_audio.is_none() && ins.status_poll.is_none()
            );
            Expect::ErrorHangup
        }
        CallAction::Hangup => Expect::SilentHangup,
        CallAction::Connect => {
            let ws = ins.websocket.as_ref().unwrap();
            assert_eq!(ins.clone_status, CloneStatus::Completed);
            assert!(ws.voice_id.as_str().starts_with("voice-job-"), "{ws:?}");
            assert!(ws.url.contains("agent_id="), "{ws:?}");
            assert!(ins.status_poll.is_none() && ins.hold_audio.is_none());
            Expect::Connect { greeting: ins.greeting_audio.is_some() }
        }
        CallAction::Hold => {
            assert_eq!(ins.clone_status, CloneStatus::Processing);
            let poll = ins.status_poll.as_ref().expect("hold always polls");
            assert_eq!(poll.interval, Duration::from_millis(2_000));
            assert_eq!(poll.call_id, ins.call_id);
            assert!(ins.hold_audio.is_some());
            match starts_job {
                Some(starts_job) => {
                    assert!(ins.greeting_audio.is_some(), "inbound answers greet");
                    Expect::GreetHold { starts_job }
                }
                None => {
                    assert!(ins.greeting_audio.is_none(), "polls do not greet again");
                    Expect::HoldPoll
                }
            }
        }
    }
}

type Script = &'static [(u64, Step, Expect)];

const CASES: &[(&str, Script)] = &[
    (
        "inbound answers greeting + hold + poll and starts one job",
        &[(
            0,
            Step::Inbound { call: "CA1", to: "+15550001" },
            Expect::GreetHold { starts_job: true },
        )],
    ),
    (
        "processing keeps hold + poll",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (2_000, Step::Check { call: "CA1" }, Expect::HoldPoll),
            (4_000, Step::Check { call: "CA1" }, Expect::HoldPoll),
        ],
    ),
    (
        "completed connects to the agent with the cloned voice",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (3_000, Step::CloneDone { call: "CA1", ok: true }, Expect::Ended),
            (4_000, Step::Check { call: "CA1" }, Expect::Connect { greeting: false }),
            (6_000, Step::Check { call: "CA1" }, Expect::Connect { greeting: false }),
        ],
    ),
    (
        "failed speaks the error and hangs up",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (3_000, Step::CloneDone { call: "CA1", ok: false }, Expect::Ended),
            (4_000, Step::Check { call: "CA1" }, Expect::ErrorHangup),
            (6_000, Step::Check { call: "CA1" }, Expect::ErrorHangup),
        ],
    ),
    (
        "over the hold limit: error + hang up, even if the job completes later",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (60_000, Step::Check { call: "CA1" }, Expect::HoldPoll),
            (60_001, Step::Check { call: "CA1" }, Expect::ErrorHangup),
            (61_000, Step::CloneDone { call: "CA1", ok: true }, Expect::Ended),
            (62_000, Step::Check { call: "CA1" }, Expect::ErrorHangup),
        ],
    ),
    (
        "duplicate inbound returns the same plan and starts no second job",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (
                500,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: false },
            ),
            (
                900,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: false },
            ),
        ],
    ),
    (
        "a second call to the same profile joins the running job",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (
                1_000,
                Step::Inbound { call: "CA2", to: "+15550002" },
                Expect::GreetHold { starts_job: false },
            ),
            (3_000, Step::CloneDone { call: "CA1", ok: true }, Expect::Ended),
            (4_000, Step::Check { call: "CA2" }, Expect::Connect { greeting: false }),
        ],
    ),
    (
        "a reused clone connects at once",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (3_000, Step::CloneDone { call: "CA1", ok: true }, Expect::Ended),
            (
                10_000,
                Step::Inbound { call: "CA2", to: "+15550001" },
                Expect::Connect { greeting: true },
            ),
        ],
    ),
    (
        "a failed clone backs off, doubling per failed attempt, then the next call retries it",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (3_000, Step::CloneDone { call: "CA1", ok: false }, Expect::Ended),
            // clone_retry is 10 s: until 13 s the failure serves new calls.
            (12_999, Step::Inbound { call: "CA2", to: "+15550001" }, Expect::ErrorHangup),
            (
                13_000,
                Step::Inbound { call: "CA3", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (14_000, Step::CloneDone { call: "CA3", ok: false }, Expect::Ended),
            // Attempt 2 failed: 20 s.
            (33_999, Step::Inbound { call: "CA4", to: "+15550001" }, Expect::ErrorHangup),
            (
                34_000,
                Step::Inbound { call: "CA5", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (35_000, Step::CloneDone { call: "CA5", ok: true }, Expect::Ended),
            (35_001, Step::Check { call: "CA5" }, Expect::Connect { greeting: false }),
        ],
    ),
    (
        "a permanent failure backs off for clone_retry_permanent",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (1_000, Step::CloneFailedPermanently { call: "CA1" }, Expect::Ended),
            (900_999, Step::Inbound { call: "CA2", to: "+15550001" }, Expect::ErrorHangup),
            (
                901_000,
                Step::Inbound { call: "CA3", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
        ],
    ),
    (
        "a job whose lease lapsed (its node died) is taken over by the next call",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (
                9_999,
                Step::Inbound { call: "CA2", to: "+15550001" },
                Expect::GreetHold { starts_job: false },
            ),
            (
                10_000,
                Step::Inbound { call: "CA3", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            // The calls that waited on it wait on the same job, now run again.
            (11_000, Step::CloneDone { call: "CA1", ok: true }, Expect::Ended),
            (11_001, Step::Check { call: "CA2" }, Expect::Connect { greeting: false }),
        ],
    ),
    (
        "a renewed lease keeps the job its node's",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (6_000, Step::Renew { call: "CA1" }, Expect::Ended),
            (
                15_999,
                Step::Inbound { call: "CA2", to: "+15550001" },
                Expect::GreetHold { starts_job: false },
            ),
        ],
    ),
    (
        "a poll after the call ended hangs up silently",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (1_000, Step::End { call: "CA1" }, Expect::Ended),
            (2_000, Step::Check { call: "CA1" }, Expect::SilentHangup),
            (3_000, Step::Inbound { call: "CA1", to: "+15550001" }, Expect::SilentHangup),
        ],
    ),
    (
        "the dialed number selects its own profile and job",
        &[
            (
                0,
                Step::Inbound { call: "CA1", to: "+15550001" },
                Expect::GreetHold { starts_job: true },
            ),
            (
                1_000,
                Step::Inbound { call: "CA2", to: "+1 (800) 555-0100" },
                Expect::GreetHold { starts_job: true },
            ),
        ],
    ),
];

#[test]
fn scripts() {
    for (name, script) in CASES {
        let mut h = Harness { ctl: controller(), jobs_started: Vec::new() };
        for (i, (at, step, want)) in script.iter().enumerate() {
            let got = h.step(*at, step);
            assert_eq!(got, *want, "case {name:?}, step {i} ({step:?} at {at} ms)");
        }
    }
}

#[test]
fn duplicate_inbound_records_one_call_and_one_job() {
    let ctl = controller();
    let now = Timestamp(5_000);
    let first = run(ctl.handle_inbound_call(&ctx("CA1", "+15550001"), now)).unwrap();
    let again = run(ctl.handle_inbound_call(&ctx("CA1", "+15550001"), now)).unwrap();
    assert!(first.start_clone.is_some());
    assert!(again.start_clone.is_none());
    assert_eq!(first.instructions, again.instructions, "same plan for the same state");
    let events = run(ctl.store().call_events(&CallId::new("CA1"))).unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Inbound, EventKind::CloneStarted, EventKind::DuplicateInbound]);
}

#[test]
fn profile_overrides_reach_the_instructions() {
    let ctl = controller();
    let out = run(ctl.handle_inbound_call(&ctx("CA9", "+18005550100"), Timestamp(0))).unwrap();
    let job = out.start_clone.expect("first call of the profile starts the job");
    assert_eq!(job.profile.id, ProfileId::new("sales"));
    assert_eq!(
        out.instructions.greeting_audio.unwrap().url,
        "https://media.test/sales-greeting.wav"
    );
    assert_eq!(out.instructions.hold_audio.unwrap().url, "https://media.test/hold.wav");
    run(ctl.clone_finished(job.job_id, &Ok(VoiceId::new("v-sales")), Timestamp(10))).unwrap();
    let ins = run(ctl.check_clone_status(&CallId::new("CA9"), Timestamp(20))).unwrap();
    let ws = ins.websocket.unwrap();
    assert_eq!(ws.agent_id, "agent_sales");
    assert_eq!(ws.voice_id, VoiceId::new("v-sales"));
    assert_eq!(ws.url, "wss://agents.test/v1/convai/conversation?agent_id=agent_sales");
    let rec = run(ctl.store().get_call(&CallId::new("CA9"))).unwrap().unwrap();
    assert_eq!(rec.status, CallStatus::Connected);
    assert_eq!(rec.connected_at, Some(Timestamp(20)));
}

#[test]
fn hold_timeout_is_recorded_as_the_failure() {
    let ctl = controller();
    run(ctl.handle_inbound_call(&ctx("CA1", "+1"), Timestamp(0))).unwrap();
    let ins = run(ctl.check_clone_status(&CallId::new("CA1"), Timestamp(60_001))).unwrap();
    assert_eq!(
        ins.error_message.unwrap().audio_url.as_deref(),
        Some("https://media.test/error.wav")
    );
    let rec = run(ctl.store().get_call(&CallId::new("CA1"))).unwrap().unwrap();
    assert_eq!(rec.status, CallStatus::Failed);
    assert_eq!(rec.failure.as_deref(), Some("hold_timeout"));
    let ended = run(ctl.call_ended(&CallId::new("CA1"), "completed", Timestamp(61_000))).unwrap();
    assert!(ended.changed, "the first report ends the call");
    let ended = ended.record;
    assert_eq!(ended.status, CallStatus::Ended);
    assert_eq!(ended.failure.as_deref(), Some("hold_timeout"), "the failure reason is kept");
    let again = run(ctl.call_ended(&CallId::new("CA1"), "other", Timestamp(70_000))).unwrap();
    assert!(!again.changed, "a repeated report does not end it again");
    let again = again.record;
    assert_eq!(again.end_reason.as_deref(), Some("completed"), "the first end is kept");
    assert_eq!(again.ended_at, Some(Timestamp(61_000)));
}

#[test]
fn a_clone_ready_at_the_poll_after_the_hold_limit_still_connects() {
    let ctl = controller();
    let out = run(ctl.handle_inbound_call(&ctx("CA7", "+18005550100"), Timestamp(0))).unwrap();
    let job = out.start_clone.unwrap();
    // The clone finished just before the poll that comes after the limit (60 s).
    run(ctl.clone_finished(job.job_id, &Ok(VoiceId::new("v-late")), Timestamp(59_900))).unwrap();
    let ins = run(ctl.check_clone_status(&CallId::new("CA7"), Timestamp(60_500))).unwrap();
    assert!(ins.error_message.is_none() && !ins.should_hangup, "{ins:?}");
    assert_eq!(ins.websocket.unwrap().voice_id, VoiceId::new("v-late"));
    let rec = run(ctl.store().get_call(&CallId::new("CA7"))).unwrap().unwrap();
    assert_eq!(rec.status, CallStatus::Connected);
    // A clone still running at that poll ends the hold, as before.
    run(ctl.handle_inbound_call(&ctx("CA8", "+15550002"), Timestamp(0))).unwrap();
    let ins = run(ctl.check_clone_status(&CallId::new("CA8"), Timestamp(60_500))).unwrap();
    assert!(ins.should_hangup);
    let rec = run(ctl.store().get_call(&CallId::new("CA8"))).unwrap().unwrap();
    assert_eq!(rec.failure.as_deref(), Some("hold_timeout"));
}

#[test]
fn a_connected_call_whose_agent_leg_fails_hears_the_error_at_the_next_poll() {
    let ctl = controller();
    let out = run(ctl.handle_inbound_call(&ctx("CA6", "+18005550100"), Timestamp(0))).unwrap();
    run(ctl.clone_finished(out.start_clone.unwrap().job_id, &Ok(VoiceId::new("v6")), Timestamp(5)))
        .unwrap();
    let ins = run(ctl.check_clone_status(&CallId::new("CA6"), Timestamp(10))).unwrap();
    assert!(ins.websocket.is_some(), "connected");
    let closed =
        run(ctl.stream_closed(&CallId::new("CA6"), "agent_error", true, Timestamp(20))).unwrap();
    assert!(closed.changed);
    assert_eq!(
        (closed.record.status, closed.record.failure.as_deref()),
        (CallStatus::Failed, Some("agent_error"))
    );
    // Twilio follows the stream's <Redirect>: the error message and a hang-up, not the agent
    // again.
    let ins = run(ctl.check_clone_status(&CallId::new("CA6"), Timestamp(30))).unwrap();
    assert!(ins.websocket.is_none() && ins.should_hangup && ins.error_message.is_some(), "{ins:?}");
}

#[test]
fn a_retried_webhook_for_a_failed_call_starts_no_clone() {
    let ctl = controller();
    // Recorded and failed (by another node) before any job was attached.
    let rec = precall_controller::CallRecord::inbound(
        &ctx("CA5", "+15550003"),
        precall_api::ProfileId::new("default"),
        Timestamp(0),
    );
    run(ctl.store().insert_call(&rec)).unwrap();
    run(ctl.store().set_call_status(
        &CallId::new("CA5"),
        CallStatus::Failed,
        Timestamp(1),
        Some("x"),
    ))
    .unwrap();
    let again = run(ctl.handle_inbound_call(&ctx("CA5", "+15550003"), Timestamp(2))).unwrap();
    assert!(again.start_clone.is_none(), "a failed call started a clone");
    assert!(again.instructions.should_hangup);
}

#[test]
fn unknown_calls_are_reported() {
    let ctl = controller();
    let err = run(ctl.check_clone_status(&CallId::new("nope"), Timestamp(0))).unwrap_err();
    assert!(matches!(err, ControllerError::UnknownCall(ref id) if id.as_str() == "nope"));
    let err = run(ctl.call_ended(&CallId::new("nope"), "x", Timestamp(0))).unwrap_err();
    assert!(matches!(err, ControllerError::UnknownCall(_)));
}

#[test]
fn poll_reports_remaining_hold() {
    let ctl = controller();
    run(ctl.handle_inbound_call(&ctx("CA1", "+1"), Timestamp(0))).unwrap();
    let ins = run(ctl.check_clone_status(&CallId::new("CA1"), Timestamp(45_000))).unwrap();
    assert_eq!(ins.status_poll.unwrap().hold_remaining, Duration::from_millis(15_000));
}

#[test]
fn memory_store_forgets_old_ended_calls_only() {
    let store = MemoryStore::with_retention(3);
    let record = |id: &str| {
        precall_controller::CallRecord::inbound(
            &ctx(id, "+1"),
            ProfileId::new("default"),
            Timestamp(0),
        )
    };
    for id in ["A", "B", "C"] {
        run(store.insert_call(&record(id))).unwrap();
    }
    // A is in progress, B ended: the fourth call forgets B, never A.
    run(store.set_call_status(&CallId::new("B"), CallStatus::Ended, Timestamp(1), None)).unwrap();
    run(store.insert_call(&record("D"))).unwrap();
    let kept = |id: &str| run(store.get_call(&CallId::new(id))).unwrap().is_some();
    assert!(kept("A") && !kept("B") && kept("C") && kept("D"));
    // With nothing ended, the store grows rather than forget a live call.
    run(store.insert_call(&record("E"))).unwrap();
    assert!(["A", "C", "D", "E"].iter().all(|id| kept(id)));
}

#[test]
fn a_reused_voice_due_a_check_holds_until_the_provider_answers() {
    let ctl = controller();
    let first = run(ctl.handle_inbound_call(&ctx("CA1", "+15550001"), Timestamp(0))).unwrap();
    let job = first.start_clone.unwrap().job_id;
    run(ctl.clone_finished(job, &Ok(VoiceId::new("voice-job-1")), Timestamp(1_000))).unwrap();
    // Within clone_verify_after (1 h) of its creation the voice is reused without a check.
    let fresh = run(ctl.handle_inbound_call(&ctx("CA2", "+15550001"), Timestamp(2_000))).unwrap();
    assert_eq!(fresh.verify_voice, None);
    assert_eq!(classify(&fresh.instructions, Some(false)), Expect::Connect { greeting: true });

    // An hour later: checked first; meanwhile the plan holds and the call has not moved.
    let later = Timestamp(1_000 + 3_600_001);
    let out = run(ctl.handle_inbound_call(&ctx("CA3", "+15550001"), later)).unwrap();
    let check = out.verify_voice.clone().expect("due a check");
    assert_eq!((check.job_id, check.voice_id.as_str()), (job, "voice-job-1"));
    assert_eq!(classify(&out.instructions, Some(false)), Expect::GreetHold { starts_job: false });
    let rec = run(ctl.store().get_call(&CallId::new("CA3"))).unwrap().unwrap();
    assert_eq!(rec.status, CallStatus::Holding);
    // Usable: it connects, and the check is remembered.
    let ok = run(ctl.voice_checked(&CallId::new("CA3"), &check, true, later)).unwrap();
    assert_eq!(classify(&ok.instructions, Some(false)), Expect::Connect { greeting: true });
    let again = run(ctl.handle_inbound_call(&ctx("CA4", "+15550001"), later)).unwrap();
    assert_eq!(again.verify_voice, None, "just checked");

    // Gone (an hour after that check): the call waits on a new job, which it starts.
    let much_later = Timestamp(later.0 + 3_600_001);
    let out = run(ctl.handle_inbound_call(&ctx("CA5", "+15550001"), much_later)).unwrap();
    let check = out.verify_voice.expect("due again");
    let gone = run(ctl.voice_checked(&CallId::new("CA5"), &check, false, much_later)).unwrap();
    let new_job = gone.start_clone.expect("a new clone").job_id;
    assert_ne!(new_job, job);
    assert_eq!(classify(&gone.instructions, Some(true)), Expect::GreetHold { starts_job: true });
    let rec = run(ctl.store().get_call(&CallId::new("CA5"))).unwrap().unwrap();
    assert_eq!(rec.clone_job_id, Some(new_job));
    let events = run(ctl.store().call_events(&CallId::new("CA5"))).unwrap();
    assert!(events.iter().any(|e| e.kind == EventKind::VoiceGone && e.detail == "voice-job-1"));
    // The next caller joins the new job instead of the deleted voice.
    let next = run(ctl.handle_inbound_call(&ctx("CA6", "+15550001"), much_later)).unwrap();
    assert!(next.start_clone.is_none() && next.verify_voice.is_none());
    assert_eq!(classify(&next.instructions, Some(false)), Expect::GreetHold { starts_job: false });
}
