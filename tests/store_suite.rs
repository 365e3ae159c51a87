//! One behaviour suite for every `Store`: the in-memory store and PostgreSQL (a real server the
//! harness starts). Both must agree on every rule the controller relies on.

mod support;

use std::time::Duration;

use precall::store::{PgStore, PgStoreConfig};
use precall_api::{
    CallContext, CallId, CallStatus, CloneStatus, JobId, ProfileId, Protocol, Timestamp, VoiceId,
};
use precall_controller::{
    CallEvent, CallRecord, CloneJob, EventKind, InboundRequest, InsertCall, JobFailure, Lease,
    MemoryStore, Store, StoreError, VoiceProfile,
};
use support::pg::PgServer;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn record(id: &str, at: u64) -> CallRecord {
    let ctx = CallContext {
        call_id: id.into(),
        session_id: "AC123".into(),
        caller_number: "+12349013030".into(),
        recipient_number: "+18005551212".into(),
        status: CallStatus::Ringing,
        protocol: Protocol::Sip,
    };
    CallRecord::inbound(&ctx, "default".into(), Timestamp(at))
}

fn profile(id: &str, number: Option<&str>) -> VoiceProfile {
    VoiceProfile {
        id: id.into(),
        number: number.map(str::to_owned),
        name: format!("Voice {id}"),
        sample_urls: vec!["https://s/a.mp3".into(), "file:///srv/b.wav".into()],
        agent_id: Some("agent_1".into()),
        greeting_url: None,
        hold_url: Some("https://m/hold.wav".into()),
        first_message: Some("Hello!".into()),
    }
}

async fn calls_are_recorded_once<S: Store>(s: &S) {
    let rec = record("CA-once", 1_764_000_000_123);
    assert_eq!(s.insert_call(&rec).await.unwrap(), InsertCall::Inserted);
    match s.insert_call(&record("CA-once", 1_764_000_009_999)).await.unwrap() {
        InsertCall::Existing(existing) => assert_eq!(*existing, rec, "the first record is kept"),
        InsertCall::Inserted => panic!("a second insert of one call id must not insert"),
    }
    assert_eq!(s.get_call(&"CA-once".into()).await.unwrap(), Some(rec));
    assert_eq!(s.get_call(&"CA-missing".into()).await.unwrap(), None);
}

async fn status_rules<S: Store>(s: &S) {
    let id = CallId::new("CA-status");
    s.insert_call(&record("CA-status", 1_000)).await.unwrap();
    let set = |status, at, reason| s.set_call_status(&id, status, Timestamp(at), reason);
    let c = set(CallStatus::Connected, 2_000, None).await.unwrap().unwrap();
    assert!(c.changed, "holding -> connected");
    assert_eq!(
        (c.record.status, c.record.connected_at),
        (CallStatus::Connected, Some(Timestamp(2_000)))
    );
    let c = set(CallStatus::Connected, 3_000, None).await.unwrap().unwrap();
    assert!(!c.changed, "connected -> connected is no transition");
    assert_eq!(c.record.connected_at, Some(Timestamp(2_000)), "connected_at is set once");
    // Illegal: a connected call never goes back to holding (another node's stale view).
    let c = set(CallStatus::Holding, 3_500, None).await.unwrap().unwrap();
    assert!(!c.changed, "connected -> holding");
    assert_eq!(c.record.status, CallStatus::Connected);
    // Its agent leg failing fails it (and a failed call never connects again).
    let c = set(CallStatus::Failed, 4_000, Some("agent_error")).await.unwrap().unwrap();
    assert!(c.changed, "connected -> failed");
    assert_eq!(c.record.failure.as_deref(), Some("agent_error"));
    let c = set(CallStatus::Connected, 4_500, None).await.unwrap().unwrap();
    assert!(!c.changed, "failed -> connected");
    assert_eq!(c.record.status, CallStatus::Failed);
    let c = set(CallStatus::Ended, 5_000, Some("caller_hangup")).await.unwrap().unwrap();
    assert!(c.changed);
    assert_eq!(
        (c.record.status, c.record.ended_at, c.record.end_reason.as_deref()),
        (CallStatus::Ended, Some(Timestamp(5_000)), Some("caller_hangup"))
    );
    for status in [CallStatus::Connected, CallStatus::Ended, CallStatus::Failed] {
        let c = set(status, 6_000, Some("late")).await.unwrap().unwrap();
        assert!(!c.changed, "an ended call never changes ({status})");
        assert_eq!(c.record.end_reason.as_deref(), Some("caller_hangup"), "the first end is kept");
    }
    assert_eq!(s.get_call(&id).await.unwrap().unwrap().ended_at, Some(Timestamp(5_000)));

    // holding -> failed -> ended; the failure is kept, a second failure is no transition.
    let id2 = CallId::new("CA-status-failed");
    s.insert_call(&record("CA-status-failed", 1_000)).await.unwrap();
    let set2 = |status, at, reason| s.set_call_status(&id2, status, Timestamp(at), reason);
    assert!(set2(CallStatus::Failed, 2_000, Some("clone_timeout")).await.unwrap().unwrap().changed);
    let again = set2(CallStatus::Failed, 2_500, Some("other")).await.unwrap().unwrap();
    assert!(!again.changed);
    assert_eq!(again.record.failure.as_deref(), Some("clone_timeout"), "the first failure is kept");
    let connected = set2(CallStatus::Connected, 2_600, None).await.unwrap().unwrap();
    assert!(!connected.changed, "a failed call never connects");
    let ended = set2(CallStatus::Ended, 3_000, Some("completed")).await.unwrap().unwrap();
    assert!(ended.changed);
    assert_eq!(
        (ended.record.failure.as_deref(), ended.record.end_reason.as_deref()),
        (Some("clone_timeout"), Some("completed"))
    );
    assert_eq!(
        s.set_call_status(&"CA-nope".into(), CallStatus::Ended, Timestamp(1), None).await.unwrap(),
        None
    );
}

async fn jobs_attach_to_calls<S: Store>(s: &S) {
    s.insert_call(&record("CA-attach", 1_000)).await.unwrap();
    let (job, _) = s
        .claim_clone_job(&"attach".into(), "h", Timestamp(1_000), &lease("A", 2_000))
        .await
        .unwrap();
    s.attach_job(&"CA-attach".into(), job.id).await.unwrap();
    assert_eq!(s.get_call(&"CA-attach".into()).await.unwrap().unwrap().clone_job_id, Some(job.id));
    let err = s.attach_job(&"CA-nope".into(), job.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Missing(_)), "{err:?}");
}

async fn live_call_pushes_are_claimed_once<S: Store>(s: &S) {
    let (job, _) =
        s.claim_clone_job(&"push".into(), "h", Timestamp(1_000), &lease("A", 2_000)).await.unwrap();
    let twilio = |id: &str| CallRecord { protocol: Protocol::Twilio, ..record(id, 1_000) };
    for id in ["CA-push-b", "CA-push-a", "CA-push-ended"] {
        s.insert_call(&twilio(id)).await.unwrap();
        s.attach_job(&id.into(), job.id).await.unwrap();
    }
    // A SIP call on the same job: its shard is told, it is never pushed.
    s.insert_call(&record("CA-push-sip", 1_000)).await.unwrap();
    s.attach_job(&"CA-push-sip".into(), job.id).await.unwrap();
    s.set_call_status(&"CA-push-ended".into(), CallStatus::Ended, Timestamp(2_000), None)
        .await
        .unwrap();
    let ids = |v: Vec<(CallId, Protocol)>| {
        v.into_iter().map(|(c, p)| format!("{c} {}", p.as_str())).collect::<Vec<_>>()
    };
    // Every call still holding on the job, with its protocol (the ended one is done).
    assert_eq!(
        ids(s.calls_waiting_on(job.id).await.unwrap()),
        ["CA-push-a twilio", "CA-push-b twilio", "CA-push-sip sip"]
    );
    // The first claim wins, on any node; a claimed call no longer waits.
    assert!(s.claim_push(&"CA-push-a".into(), Timestamp(3_000)).await.unwrap());
    assert!(!s.claim_push(&"CA-push-a".into(), Timestamp(3_001)).await.unwrap());
    assert!(!s.claim_push(&"CA-push-nope".into(), Timestamp(3_000)).await.unwrap());
    let b: CallId = "CA-push-b".into();
    let claims = join_all((0..8).map(|_| s.claim_push(&b, Timestamp(4_000)))).await;
    assert_eq!(claims.into_iter().filter(|c| *c.as_ref().unwrap()).count(), 1);
}

async fn events_keep_order<S: Store>(s: &S) {
    let id = CallId::new("CA-events");
    for (i, kind) in
        [EventKind::Inbound, EventKind::CloneStarted, EventKind::Ended].into_iter().enumerate()
    {
        let at = Timestamp(10_000 + i as u64);
        s.append_event(&CallEvent { call_id: id.clone(), at, kind, detail: format!("d{i}") })
            .await
            .unwrap();
    }
    let got = s.call_events(&id).await.unwrap();
    let kinds: Vec<_> = got.iter().map(|e| (e.kind, e.detail.as_str(), e.at)).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Inbound, "d0", Timestamp(10_000)),
            (EventKind::CloneStarted, "d1", Timestamp(10_001)),
            (EventKind::Ended, "d2", Timestamp(10_002)),
        ]
    );
    assert!(s.call_events(&"CA-none".into()).await.unwrap().is_empty());
}

async fn profiles_by_id_and_number<S: Store>(s: &S) {
    let a = profile("a", Some("+18005550100"));
    s.upsert_profile(&a).await.unwrap();
    assert_eq!(s.get_profile(&"a".into()).await.unwrap(), Some(a.clone()));
    assert_eq!(s.profile_for_number("+18005550100").await.unwrap(), Some(a.clone()));
    assert_eq!(s.profile_for_number("+1").await.unwrap(), None);
    // An inbound call's lookup: the number's profile, else the fallback, else nothing.
    s.upsert_profile(&profile("fallback", None)).await.unwrap();
    assert_eq!(pick(s, "+18005550100", "fallback").await, Some("a".into()));
    assert_eq!(pick(s, "+1999", "fallback").await, Some("fallback".into()));
    assert_eq!(pick(s, "", "fallback").await, Some("fallback".into()));
    assert_eq!(pick(s, "+1999", "missing").await, None);
    // Another profile claims the number: it moves.
    let b = profile("b", Some("+18005550100"));
    s.upsert_profile(&b).await.unwrap();
    assert_eq!(s.profile_for_number("+18005550100").await.unwrap().map(|p| p.id), Some("b".into()));
    assert_eq!(s.get_profile(&"a".into()).await.unwrap().unwrap().number, None);
    // Replacing a profile replaces every field.
    let mut b2 = profile("b", None);
    b2.sample_urls = vec!["https://s/new.mp3".into()];
    b2.agent_id = None;
    s.upsert_profile(&b2).await.unwrap();
    assert_eq!(s.get_profile(&"b".into()).await.unwrap(), Some(b2));
    assert_eq!(s.profile_for_number("+18005550100").await.unwrap(), None);
}

async fn pick<S: Store>(s: &S, number: &str, fallback: &str) -> Option<ProfileId> {
    s.select_profile(number, &ProfileId::new(fallback)).await.unwrap().map(|p| p.id)
}

fn lease(owner: &str, until: u64) -> Lease {
    Lease { owner: owner.to_owned(), until: Timestamp(until) }
}

async fn clone_jobs_are_claimed_once<S: Store>(s: &S) {
    let p = "claim".into();
    let (j1, created) =
        s.claim_clone_job(&p, "h1", Timestamp(1_000), &lease("A", 11_000)).await.unwrap();
    assert!(created);
    assert_eq!((j1.status, j1.started_at), (CloneStatus::Processing, Timestamp(1_000)));
    assert_eq!(
        (j1.lease_owner.as_deref(), j1.lease_until, j1.attempt),
        (Some("A"), Some(Timestamp(11_000)), 1)
    );
    let (again, created) =
        s.claim_clone_job(&p, "h1", Timestamp(2_000), &lease("B", 12_000)).await.unwrap();
    assert!(!created, "a processing job under a live lease serves");
    assert_eq!(again, j1);
    let (other, created) =
        s.claim_clone_job(&p, "h2", Timestamp(2_000), &lease("A", 12_000)).await.unwrap();
    assert!(created && other.id != j1.id, "changed samples need a new job");

    let done = s
        .finish_clone_job(j1.id, "A", &Ok(VoiceId::new("v1")), Timestamp(3_000), None)
        .await
        .unwrap();
    assert_eq!(
        (done.status, done.voice_id.clone(), done.finished_at, done.lease_owner.clone()),
        (CloneStatus::Completed, Some(VoiceId::new("v1")), Some(Timestamp(3_000)), None)
    );
    let late = Err(JobFailure::transient("late"));
    let kept = s
        .finish_clone_job(j1.id, "A", &late, Timestamp(4_000), Some(Timestamp(9_000)))
        .await
        .unwrap();
    assert_eq!(kept, done, "a finished job keeps its result");
    let (reused, created) =
        s.claim_clone_job(&p, "h1", Timestamp(9_000_000), &lease("B", 9_010_000)).await.unwrap();
    assert!(!created, "a completed clone is reused however old");
    assert_eq!(reused.id, j1.id);

    let bad = Err(JobFailure::permanent("422 bad sample"));
    let failed = s
        .finish_clone_job(other.id, "A", &bad, Timestamp(5_000), Some(Timestamp(8_000)))
        .await
        .unwrap();
    assert_eq!(
        (failed.status, failed.error.as_deref(), failed.permanent, failed.retry_at),
        (CloneStatus::Failed, Some("422 bad sample"), true, Some(Timestamp(8_000)))
    );
    let (same, created) =
        s.claim_clone_job(&p, "h2", Timestamp(7_999), &lease("A", 17_999)).await.unwrap();
    assert!(!created, "a failed job serves its failure while it backs off");
    assert_eq!(same.id, other.id);
    let (retry, created) =
        s.claim_clone_job(&p, "h2", Timestamp(8_000), &lease("A", 18_000)).await.unwrap();
    assert!(created && retry.id != other.id, "after the backoff a new job is made");
    assert_eq!(retry.attempt, 2, "the attempt after a failure counts on");
    assert_eq!(s.get_clone_job(retry.id).await.unwrap(), Some(retry));
    assert_eq!(s.get_clone_job(JobId(987_654)).await.unwrap(), None);
    let err = s
        .finish_clone_job(JobId(987_654), "A", &Ok(VoiceId::new("v")), Timestamp(1), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Missing(_)), "{err:?}");
}

/// The jobs of `profile` among `jobs`.
fn of(jobs: Vec<CloneJob>, profile: &str) -> Vec<CloneJob> {
    jobs.into_iter().filter(|j| j.profile_id.as_str() == profile).collect()
}

async fn leases_lapse_and_are_taken_over_once<S: Store>(s: &S) {
    let p = "lease".into();
    let (job, _) = s.claim_clone_job(&p, "h", Timestamp(1_000), &lease("A", 2_000)).await.unwrap();
    assert!(!s.renew_clone_lease(job.id, "B", Timestamp(5_000)).await.unwrap(), "B holds no lease");
    assert!(s.renew_clone_lease(job.id, "A", Timestamp(3_000)).await.unwrap(), "A renews");
    let (held, created) =
        s.claim_clone_job(&p, "h", Timestamp(2_999), &lease("B", 12_999)).await.unwrap();
    assert!(!created && held.lease_owner.as_deref() == Some("A"), "the renewed lease holds");
    assert!(
        of(
            s.take_over_clone_jobs(Timestamp(2_999), &lease("B", 12_999), 100).await.unwrap(),
            "lease"
        )
        .is_empty()
    );

    // A stops renewing (it died): at the lease's end the next claim takes the job over.
    let (taken, created) =
        s.claim_clone_job(&p, "h", Timestamp(3_000), &lease("B", 13_000)).await.unwrap();
    assert!(created, "a lapsed lease is taken over");
    assert_eq!(taken.id, job.id, "the same job (its calls keep waiting on it)");
    assert_eq!(
        (taken.lease_owner.as_deref(), taken.lease_until, taken.started_at),
        (Some("B"), Some(Timestamp(13_000)), Timestamp(3_000))
    );
    assert!(!s.renew_clone_lease(job.id, "A", Timestamp(9_000)).await.unwrap(), "A lost it");

    // B hands it back (shutdown): two nodes sweeping at once, exactly one takes it.
    assert!(s.renew_clone_lease(job.id, "B", Timestamp(0)).await.unwrap());
    let sweepers = [lease("C", 14_000), lease("D", 14_000)];
    let sweeps = sweepers.iter().map(|l| s.take_over_clone_jobs(Timestamp(4_000), l, 100));
    let swept: Vec<CloneJob> =
        join_all(sweeps).await.into_iter().flat_map(|r| of(r.unwrap(), "lease")).collect();
    assert_eq!(swept.len(), 1, "one sweep takes it: {swept:?}");
    assert_eq!(swept[0].id, job.id);

    // A (which lost its lease but finished anyway) reports: refused, the run under the live
    // lease decides. The taker's result is recorded; a late one after it changes nothing.
    let taker = swept[0].lease_owner.clone().unwrap();
    let from_a = s
        .finish_clone_job(job.id, "A", &Ok(VoiceId::new("v-A")), Timestamp(5_000), None)
        .await
        .unwrap();
    assert_eq!((from_a.status, from_a.voice_id.clone()), (CloneStatus::Processing, None));
    let done = s
        .finish_clone_job(job.id, &taker, &Ok(VoiceId::new("v-C")), Timestamp(6_000), None)
        .await
        .unwrap();
    assert_eq!(done.voice_id, Some(VoiceId::new("v-C")));
    let late = Err(JobFailure::transient("late"));
    let again = s.finish_clone_job(job.id, &taker, &late, Timestamp(7_000), None).await.unwrap();
    assert_eq!(again, done, "a finished job keeps its result");
    assert!(!s.renew_clone_lease(job.id, &taker, Timestamp(9_000)).await.unwrap(), "no lease left");

    // A hand-back clears the owner: the runner's next renewal fails, a sweep takes it at once.
    let (other, _) =
        s.claim_clone_job(&p, "h-other", Timestamp(1_000), &lease("A", 99_000)).await.unwrap();
    assert!(s.release_clone_lease(other.id, "A").await.unwrap());
    assert!(!s.renew_clone_lease(other.id, "A", Timestamp(99_000)).await.unwrap());
    assert!(!s.release_clone_lease(other.id, "A").await.unwrap(), "A holds it no more");
    let swept = of(
        s.take_over_clone_jobs(Timestamp(1_001), &lease("B", 9_000), 100).await.unwrap(),
        "lease",
    );
    assert_eq!(swept.iter().map(|j| j.id).collect::<Vec<_>>(), [other.id]);
}

async fn unused_voices_are_the_replaced_ones<S: Store>(s: &S) {
    let old = profile("voices", None);
    let new = VoiceProfile { sample_urls: vec!["https://s/new.mp3".into()], ..old.clone() };
    let (ha, hb) = (old.samples_hash(), new.samples_hash());
    s.upsert_profile(&old).await.unwrap();
    let pv: ProfileId = "voices".into();
    let unused = || async { of(s.unused_voices(1_000).await.unwrap(), "voices") };
    let (a, _) = s.claim_clone_job(&pv, &ha, Timestamp(1_000), &lease("A", 9_000)).await.unwrap();
    s.finish_clone_job(a.id, "A", &Ok(VoiceId::new("va")), Timestamp(2_000), None).await.unwrap();
    assert!(unused().await.is_empty(), "the voice of the profile's samples is in use");

    // New samples: job b. Until it completes, voice a is still the profile's newest, but it
    // speaks for samples the profile no longer has: unused unless a call is on it.
    s.upsert_profile(&new).await.unwrap();
    let (b, _) = s.claim_clone_job(&pv, &hb, Timestamp(3_000), &lease("A", 9_000)).await.unwrap();
    // A call still connected to voice a.
    s.insert_call(&record("CA-on-va", 1_000)).await.unwrap();
    s.attach_job(&"CA-on-va".into(), a.id).await.unwrap();
    s.set_call_status(&"CA-on-va".into(), CallStatus::Connected, Timestamp(1_500), None)
        .await
        .unwrap();
    s.finish_clone_job(b.id, "A", &Ok(VoiceId::new("vb")), Timestamp(4_000), None).await.unwrap();
    assert!(unused().await.is_empty(), "a voice with a call connected to it is in use");
    s.set_call_status(&"CA-on-va".into(), CallStatus::Ended, Timestamp(5_000), Some("completed"))
        .await
        .unwrap();
    let found = unused().await;
    assert_eq!(found.iter().map(|j| j.id).collect::<Vec<_>>(), [a.id], "replaced and idle");
    assert_eq!(found[0].voice_id, Some(VoiceId::new("va")));

    s.voice_deleted(a.id, Timestamp(6_000)).await.unwrap();
    assert!(unused().await.is_empty(), "a deleted voice is not offered again");
    assert_eq!(
        s.get_clone_job(a.id).await.unwrap().unwrap().voice_deleted_at,
        Some(Timestamp(6_000))
    );
    assert!(unused().await.is_empty(), "voice b speaks for the profile's samples");
    s.voice_checked(b.id, Timestamp(8_000)).await.unwrap();
    let checked = s.get_clone_job(b.id).await.unwrap().unwrap();
    assert_eq!(
        (checked.checked_at, checked.confirmed_at()),
        (Some(Timestamp(8_000)), Timestamp(8_000))
    );
    // The old samples again: their voice is gone, so they are cloned anew.
    let (again, created) =
        s.claim_clone_job(&pv, &ha, Timestamp(7_000), &lease("A", 17_000)).await.unwrap();
    assert!(created && again.id != a.id && again.attempt == 1);

    // A profile that no longer exists uses no voice.
    let gone: ProfileId = "no-such-profile".into();
    let (g, _) = s.claim_clone_job(&gone, "h", Timestamp(1_000), &lease("A", 9_000)).await.unwrap();
    s.finish_clone_job(g.id, "A", &Ok(VoiceId::new("vg")), Timestamp(2_000), None).await.unwrap();
    let orphans = of(s.unused_voices(1_000).await.unwrap(), "no-such-profile");
    assert_eq!(orphans.iter().map(|j| j.id).collect::<Vec<_>>(), [g.id]);
}

async fn concurrent_claims_create_one_job<S: Store>(s: &S) {
    let p = "race".into();
    let leases: Vec<Lease> = (0..16).map(|i| lease(&format!("N{i}"), 10_000)).collect();
    let claims = leases
        .iter()
        .enumerate()
        .map(|(i, l)| s.claim_clone_job(&p, "h", Timestamp(100 + i as u64), l));
    let results = join_all(claims).await;
    let created = results.iter().filter(|r| r.as_ref().unwrap().1).count();
    assert_eq!(created, 1, "exactly one of 16 concurrent claims creates the job");
    let ids: std::collections::HashSet<_> =
        results.iter().map(|r| r.as_ref().unwrap().0.id).collect();
    assert_eq!(ids.len(), 1);

    let records: Vec<_> = (0..16).map(|i| record("CA-race", 1_000 + i)).collect();
    let inserts = records.iter().map(|r| s.insert_call(r));
    let inserted = join_all(inserts)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap() == InsertCall::Inserted)
        .count();
    assert_eq!(inserted, 1, "exactly one of 16 concurrent inserts records the call");
}

/// Two nodes racing on one call (a poll and a stream start both connecting it, then two end
/// reports, a BYE and a status callback): each transition is made exactly once, and the call
/// ends up as the request that made it left it.
async fn racing_transitions_are_made_once<S: Store>(s: &S) {
    let id = CallId::new("CA-race-status");
    s.insert_call(&record("CA-race-status", 1_000)).await.unwrap();
    for (status, at) in [(CallStatus::Connected, 2_000), (CallStatus::Ended, 3_000)] {
        let moves =
            (0..16).map(|i| s.set_call_status(&id, status, Timestamp(at + i), Some("race")));
        let results: Vec<_> =
            join_all(moves).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter(|r| r.changed).collect();
        assert_eq!(winners.len(), 1, "exactly one of 16 racing moves to {status} is made");
        let stored = s.get_call(&id).await.unwrap().unwrap();
        assert_eq!(stored, winners[0].record, "the winner's view is what is stored");
    }
}

/// An inbound request for `call` dialing `number`, handled at `now` by node `owner`.
fn inbound_req<'a>(
    call: &'a CallRecord,
    number: &'a str,
    now: u64,
    l: &'a Lease,
) -> InboundRequest<'a> {
    InboundRequest { call, number, now: Timestamp(now), lease: l }
}

/// The events of `id` as (kind, detail, at).
async fn history<S: Store>(s: &S, id: &str) -> Vec<(EventKind, String, Timestamp)> {
    let events = s.call_events(&id.into()).await.unwrap();
    events.into_iter().map(|e| (e.kind, e.detail, e.at)).collect()
}

/// An inbound call's first step in one store step: profile, record, events, job claim.
async fn inbound_calls_record_and_claim_in_one_step<S: Store>(s: &S) {
    let mut p = profile("in-p", Some("+18005550123"));
    // The job's samples_hash is the profile's (PostgreSQL computes it in SQL): non-ASCII too.
    p.sample_urls.push("https://s/caf\u{e9}-\u{1f600}.wav".into());
    s.upsert_profile(&p).await.unwrap();
    let a = lease("A", 11_500);
    let first = record("CA-in1", 1_000);
    let step = s.record_inbound(&inbound_req(&first, "+18005550123", 1_500, &a)).await.unwrap();
    assert!(step.first && step.created, "a new call of a new sample set creates the job");
    assert_eq!(step.profile.as_ref(), Some(&p));
    let job = step.job.clone().expect("a waiting call gets a job");
    assert_eq!(
        (job.status, job.samples_hash.as_str(), job.started_at, job.lease_owner.as_deref()),
        (CloneStatus::Processing, p.samples_hash().as_str(), Timestamp(1_500), Some("A"))
    );
    assert_eq!((job.lease_until, job.attempt), (Some(Timestamp(11_500)), 1));
    let expected = CallRecord { profile_id: p.id.clone(), clone_job_id: Some(job.id), ..first };
    assert_eq!(step.call, expected);
    assert_eq!(s.get_call(&"CA-in1".into()).await.unwrap(), Some(expected.clone()));
    let inbound = (EventKind::Inbound, "in-p".to_owned(), Timestamp(1_000));
    let started = (EventKind::CloneStarted, job.id.to_string(), Timestamp(1_500));
    assert_eq!(history(s, "CA-in1").await, [inbound.clone(), started.clone()]);

    // A repeat (retried webhook, another node) keeps the record and its job, claims nothing.
    let repeat = record("CA-in1", 2_000);
    let again = s.record_inbound(&inbound_req(&repeat, "+18005550123", 2_500, &a)).await.unwrap();
    assert!(!again.first && !again.created);
    assert_eq!(
        (again.call, again.job.as_ref(), again.profile.as_ref()),
        (expected, Some(&job), Some(&p))
    );
    let dup = (EventKind::DuplicateInbound, String::new(), Timestamp(2_500));
    assert_eq!(history(s, "CA-in1").await, [inbound, started, dup]);

    // Another call joins the running job; once it completed, a third reuses it.
    let b = lease("B", 12_000);
    let second = record("CA-in2", 2_000);
    let joined = s.record_inbound(&inbound_req(&second, "+18005550123", 2_000, &b)).await.unwrap();
    assert!(joined.first && !joined.created);
    assert_eq!(joined.job.as_ref().map(|j| j.id), Some(job.id));
    assert_eq!(
        history(s, "CA-in2").await[1],
        (EventKind::CloneJoined, job.id.to_string(), Timestamp(2_000))
    );
    s.finish_clone_job(job.id, "A", &Ok(VoiceId::new("v-in")), Timestamp(3_000), None)
        .await
        .unwrap();
    let fourth = CallRecord { profile_id: "in-p".into(), ..record("CA-in4", 4_000) };
    let reused = s.record_inbound(&inbound_req(&fourth, "", 4_000, &b)).await.unwrap();
    assert!(reused.first && !reused.created);
    assert_eq!(reused.call.profile_id.as_str(), "in-p", "no number's profile: the fallback");
    assert_eq!(
        reused.job.as_ref().map(|j| (j.id, j.status)),
        Some((job.id, CloneStatus::Completed))
    );
    assert_eq!(
        history(s, "CA-in4").await[1],
        (EventKind::CloneReused, job.id.to_string(), Timestamp(4_000))
    );

    // No profile at all: recorded on the fallback's id, no job, one event.
    let lost = CallRecord { profile_id: "in-missing".into(), ..record("CA-in5", 5_000) };
    let alone = s.record_inbound(&inbound_req(&lost, "+18005559999", 5_000, &b)).await.unwrap();
    assert!(alone.first && !alone.created);
    assert_eq!((alone.profile, alone.job, alone.call.clone_job_id), (None, None, None));
    assert_eq!(alone.call.profile_id.as_str(), "in-missing");
    assert_eq!(history(s, "CA-in5").await.len(), 1);
    // Its repeat with a number that has a profile now still answers from its own profile.
    s.upsert_profile(&profile("in-q", Some("+18005559999"))).await.unwrap();
    let back = s.record_inbound(&inbound_req(&lost, "+18005559999", 5_500, &b)).await.unwrap();
    assert!(!back.first);
    assert_eq!((back.profile, back.job), (None, None));

    // A call that failed before it got a job claims none on a retried webhook.
    let failed = record("CA-in6", 6_000);
    s.insert_call(&failed).await.unwrap();
    s.set_call_status(&"CA-in6".into(), CallStatus::Failed, Timestamp(6_100), Some("x"))
        .await
        .unwrap();
    let retried = CallRecord { profile_id: "in-p".into(), ..failed };
    let none = s.record_inbound(&inbound_req(&retried, "+18005550123", 6_200, &b)).await.unwrap();
    assert!(!none.first && !none.created);
    assert_eq!((none.job, none.call.status), (None, CallStatus::Failed));
    assert_eq!(
        history(s, "CA-in6").await,
        [(EventKind::DuplicateInbound, String::new(), Timestamp(6_200))]
    );
}

/// A status check's read, and a transition with its event in one step.
async fn views_and_moves<S: Store>(s: &S) {
    let a = lease("A", 20_000);
    s.upsert_profile(&profile("mv-p", Some("+18005550456"))).await.unwrap();
    let call = record("CA-mv", 7_000);
    let step = s.record_inbound(&inbound_req(&call, "+18005550456", 7_000, &a)).await.unwrap();
    let view = s.call_view(&"CA-mv".into()).await.unwrap().expect("recorded");
    assert_eq!(
        (&view.call, view.job.as_ref(), view.profile.as_ref()),
        (&step.call, step.job.as_ref(), step.profile.as_ref())
    );
    assert!(view.job.is_some() && view.profile.is_some());
    let bare = s.call_view(&"CA-in5".into()).await.unwrap().expect("recorded");
    assert_eq!((bare.job, bare.profile), (None, None));
    assert_eq!(s.call_view(&"CA-mv-none".into()).await.unwrap(), None);

    // Reads at once (PostgreSQL sends them as one statement): each gets its own answer, an
    // id asked twice gets it twice, an unknown one gets none.
    let ids: Vec<CallId> = ["CA-mv", "CA-in5", "CA-mv-none", "CA-mv", "CA-in1"]
        .into_iter()
        .map(CallId::from)
        .collect();
    let many = join_all(ids.iter().map(|id| s.call_view(id))).await;
    let many: Vec<_> = many.into_iter().map(Result::unwrap).collect();
    assert_eq!(many[0].as_ref(), Some(&view));
    assert_eq!(many[3].as_ref(), Some(&view));
    assert_eq!(many[1].as_ref().map(|v| v.call.call_id.as_str()), Some("CA-in5"));
    assert_eq!(many[2], None);
    assert_eq!(many[4], s.call_view(&"CA-in1".into()).await.unwrap());
    assert!(many[4].as_ref().is_some_and(|v| v.job.is_some()));

    let id = CallId::new("CA-mv");
    let kinds =
        |h: Vec<(EventKind, String, Timestamp)>| h.into_iter().map(|e| e.0).collect::<Vec<_>>();
    let moved = s
        .move_call(&id, CallStatus::Connected, Timestamp(8_000), None, EventKind::Connected, "")
        .await
        .unwrap()
        .unwrap();
    assert!(moved.changed);
    assert_eq!(
        (moved.record.status, moved.record.connected_at),
        (CallStatus::Connected, Some(Timestamp(8_000)))
    );
    let again = s
        .move_call(&id, CallStatus::Connected, Timestamp(8_100), None, EventKind::Connected, "")
        .await
        .unwrap()
        .unwrap();
    assert!(!again.changed, "staying connected is no transition");
    assert_eq!(again.record, moved.record);
    let ended = s
        .move_call(
            &id,
            CallStatus::Ended,
            Timestamp(9_000),
            Some("completed"),
            EventKind::Ended,
            "completed",
        )
        .await
        .unwrap()
        .unwrap();
    assert!(ended.changed);
    assert_eq!(
        (ended.record.ended_at, ended.record.end_reason.as_deref()),
        (Some(Timestamp(9_000)), Some("completed"))
    );
    let late = s
        .move_call(
            &id,
            CallStatus::Failed,
            Timestamp(9_100),
            Some("late"),
            EventKind::Failed,
            "late",
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!late.changed && late.record == ended.record, "an ended call stays ended");
    assert_eq!(
        kinds(history(s, "CA-mv").await),
        [EventKind::Inbound, EventKind::CloneStarted, EventKind::Connected, EventKind::Ended]
    );
    let last = history(s, "CA-mv").await.pop().unwrap();
    assert_eq!(last, (EventKind::Ended, "completed".to_owned(), Timestamp(9_000)));
    let unknown = s
        .move_call(
            &"CA-mv-none".into(),
            CallStatus::Ended,
            Timestamp(1),
            None,
            EventKind::Ended,
            "",
        )
        .await
        .unwrap();
    assert_eq!(unknown, None);

    // 16 calls of a new sample set at once: one creates the job, all wait on it; 16 repeats
    // of one call id at once: one records it.
    s.upsert_profile(&profile("mv-race", Some("+18005550789"))).await.unwrap();
    let calls: Vec<_> = (0..16).map(|i| record(&format!("CA-mv-r{i}"), 10_000 + i)).collect();
    let reqs: Vec<_> = calls.iter().map(|c| inbound_req(c, "+18005550789", 10_000, &a)).collect();
    let steps = join_all(reqs.iter().map(|r| s.record_inbound(r))).await;
    let steps: Vec<_> = steps.into_iter().map(Result::unwrap).collect();
    assert_eq!(steps.iter().filter(|st| st.created).count(), 1, "one of 16 creates the job");
    let jobs: std::collections::HashSet<_> =
        steps.iter().map(|st| st.job.as_ref().unwrap().id).collect();
    assert_eq!(jobs.len(), 1, "all 16 wait on one job");
    let same: Vec<_> = (0..16).map(|i| record("CA-mv-same", 11_000 + i)).collect();
    let same_reqs: Vec<_> =
        same.iter().map(|c| inbound_req(c, "+18005550789", 11_000, &a)).collect();
    let steps = join_all(same_reqs.iter().map(|r| s.record_inbound(r))).await;
    let steps: Vec<_> = steps.into_iter().map(Result::unwrap).collect();
    assert_eq!(steps.iter().filter(|st| st.first).count(), 1, "one of 16 records the call");
    let winner = steps.iter().find(|st| st.first).unwrap();
    assert!(steps.iter().all(|st| st.call == winner.call), "all answer from one record");
    // 16 copies of the first call of a new sample set at once (a retransmitted INVITE on
    // two nodes): the job is created once, by one of them, and that one is told so.
    s.upsert_profile(&profile("mv-race2", Some("+18005550790"))).await.unwrap();
    let copies: Vec<_> = (0..16).map(|i| record("CA-mv-copy", 12_000 + i)).collect();
    let copy_reqs: Vec<_> =
        copies.iter().map(|c| inbound_req(c, "+18005550790", 12_000, &a)).collect();
    let copy_steps = join_all(copy_reqs.iter().map(|r| s.record_inbound(r))).await;
    let copy_steps: Vec<_> = copy_steps.into_iter().map(Result::unwrap).collect();
    assert_eq!(copy_steps.iter().filter(|st| st.created).count(), 1, "one runs the new job");
    assert_eq!(copy_steps.iter().filter(|st| st.first).count(), 1);
    let copy_jobs: std::collections::HashSet<_> =
        copy_steps.iter().map(|st| st.job.as_ref().unwrap().id).collect();
    assert_eq!(copy_jobs.len(), 1);
    let stored = s.get_call(&"CA-mv-copy".into()).await.unwrap().unwrap();
    assert_eq!(stored.clone_job_id, copy_jobs.into_iter().next());
    let h = history(s, "CA-mv-same").await;
    assert_eq!(h.iter().filter(|e| e.0 == EventKind::Inbound).count(), 1);
    assert_eq!(h.iter().filter(|e| e.0 == EventKind::DuplicateInbound).count(), 15);
}

/// Runs futures concurrently on the current task (no spawning, so `&S` borrows are fine).
async fn join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(|f| Some(Box::pin(f))).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in out.iter_mut().zip(futs.iter_mut()) {
            if let Some(f) = fut {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *slot = Some(v);
                        *fut = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// Runs last: it deletes calls recorded before the suite's other calls' times.
async fn old_calls_are_forgotten<S: Store>(s: &S) {
    let call = |id: &str, at| CallRecord { started_at: Timestamp(at), ..record(id, at) };
    for (id, at) in [("CA-old-ended", 10), ("CA-old-open", 20), ("CA-recent-ended", 90)] {
        s.insert_call(&call(id, at)).await.unwrap();
    }
    for id in ["CA-old-ended", "CA-recent-ended"] {
        s.set_call_status(&id.into(), CallStatus::Ended, Timestamp(95), Some("completed"))
            .await
            .unwrap();
    }
    let event = |id: &str| CallEvent {
        call_id: id.into(),
        at: Timestamp(10),
        kind: EventKind::Inbound,
        detail: String::new(),
    };
    s.append_event(&event("CA-old-ended")).await.unwrap();
    // Ended before 50, or never ended and before 15: only the old ended call.
    assert_eq!(s.forget_calls(Timestamp(50), Timestamp(15), 10).await.unwrap(), 1);
    assert_eq!(s.get_call(&"CA-old-ended".into()).await.unwrap(), None);
    assert!(s.call_events(&"CA-old-ended".into()).await.unwrap().is_empty(), "events go too");
    assert!(s.get_call(&"CA-old-open".into()).await.unwrap().is_some());
    // Oldest first, at most `limit`.
    assert_eq!(s.forget_calls(Timestamp(100), Timestamp(100), 1).await.unwrap(), 1);
    assert_eq!(s.get_call(&"CA-old-open".into()).await.unwrap(), None);
    assert!(s.get_call(&"CA-recent-ended".into()).await.unwrap().is_some());
    assert_eq!(s.forget_calls(Timestamp(100), Timestamp(100), 10).await.unwrap(), 1);
    assert_eq!(s.forget_calls(Timestamp(100), Timestamp(100), 10).await.unwrap(), 0);
    assert!(s.get_call(&"CA-once".into()).await.unwrap().is_some(), "newer calls stay");
}

async fn suite<S: Store>(s: &S) {
    s.health().await.unwrap();
    calls_are_recorded_once(s).await;
    status_rules(s).await;
    jobs_attach_to_calls(s).await;
    events_keep_order(s).await;
    profiles_by_id_and_number(s).await;
    clone_jobs_are_claimed_once(s).await;
    leases_lapse_and_are_taken_over_once(s).await;
    unused_voices_are_the_replaced_ones(s).await;
    concurrent_claims_create_one_job(s).await;
    racing_transitions_are_made_once(s).await;
    live_call_pushes_are_claimed_once(s).await;
    inbound_calls_record_and_claim_in_one_step(s).await;
    views_and_moves(s).await;
    old_calls_are_forgotten(s).await;
}

fn pg_config(url: String) -> PgStoreConfig {
    PgStoreConfig { url, pool_size: 8, connect_timeout: Duration::from_secs(5) }
}

#[test]
fn memory_store_passes_the_suite() {
    rt().block_on(suite(&MemoryStore::new()));
}

#[test]
fn postgres_store_passes_the_suite() {
    let pg = PgServer::start();
    rt().block_on(async {
        let store = PgStore::connect(&pg_config(pg.url())).await.unwrap();
        suite(&store).await;
    });
}

#[test]
fn postgres_keeps_calls_across_reconnects_and_migrates_once() {
    let pg = PgServer::start();
    let rec = record("CA-persist", 1_764_000_000_000);
    rt().block_on(async {
        let store = PgStore::connect(&pg_config(pg.url())).await.unwrap();
        store.insert_call(&rec).await.unwrap();
    });
    // A new runtime and pool, as after a restart of precall; migrations run again harmlessly.
    rt().block_on(async {
        let store = PgStore::connect(&pg_config(pg.url())).await.unwrap();
        assert_eq!(store.get_call(&rec.call_id).await.unwrap(), Some(rec.clone()));
    });
}

#[test]
fn postgres_unreachable_is_reported_as_unavailable() {
    let port = support::free_tcp_port();
    let cfg = PgStoreConfig {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        pool_size: 1,
        connect_timeout: Duration::from_secs(2),
    };
    let err = rt().block_on(PgStore::connect(&cfg)).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_) | StoreError::Query(_)), "{err:?}");
}

/// `precall_samples_hash` (migration 4) is `VoiceProfile::samples_hash`, and a profile row
/// that an older writer left without a hash still claims the job of its samples.
#[test]
fn postgres_samples_hash_is_the_rust_one() {
    let pg = PgServer::start();
    rt().block_on(async {
        let store = PgStore::connect(&pg_config(pg.url())).await.unwrap();
        let (client, conn) =
            tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let lists: [&[&str]; 5] =
            [&[], &["a"], &["ab", "c"], &["a", "bc"], &["https://s/caf\u{e9}.wav", "\u{1f600}"]];
        for urls in lists {
            let mut p = profile("hash", None);
            p.sample_urls = urls.iter().map(|u| (*u).to_owned()).collect();
            let sql: String = client
                .query_one("SELECT precall_samples_hash($1::text[])", &[&p.sample_urls])
                .await
                .unwrap()
                .get(0);
            assert_eq!(sql, p.samples_hash(), "{urls:?}");
        }

        let p = profile("unhashed", Some("+18005550999"));
        store.upsert_profile(&p).await.unwrap();
        let n = client
            .execute("UPDATE voice_profiles SET samples_hash = NULL WHERE id = 'unhashed'", &[])
            .await
            .unwrap();
        assert_eq!(n, 1);
        let call = record("CA-unhashed", 1_000);
        let l = lease("A", 11_000);
        let step =
            store.record_inbound(&inbound_req(&call, "+18005550999", 1_000, &l)).await.unwrap();
        assert_eq!(step.job.unwrap().samples_hash, p.samples_hash());
    });
}

/// Two batches (transactions) that each created the job of one new sample set never wait for
/// each other's: a batched claim (`wait_` false) that finds the lock taken does nothing and
/// says so, where waiting would deadlock; alone, the claim then waits and joins the job.
#[test]
fn postgres_batched_claims_never_wait_for_another_batch() {
    let pg = PgServer::start();
    rt().block_on(async {
        let store = PgStore::connect(&pg_config(pg.url())).await.unwrap();
        store.upsert_profile(&profile("bp", Some("+18005550301"))).await.unwrap();
        store.upsert_profile(&profile("bq", Some("+18005550302"))).await.unwrap();
        let connect = || async {
            let (client, conn) =
                tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client
        };
        let (a, b) = (connect().await, connect().await);
        let inbound = |call: &str, number: &str| {
            format!(
                "SELECT r.contended, r.created, (r.job_row).id FROM precall_inbound('{call}', \
                 'AC1', 'sip', '+1', '{number}', 'holding', now(), '{number}', 'default', now(), \
                 'N', now() + interval '10 s', false) r"
            )
        };
        let step = |row: tokio_postgres::Row| -> (bool, bool, Option<i64>) {
            (row.get(0), row.get(1), row.get(2))
        };
        a.batch_execute("BEGIN").await.unwrap();
        b.batch_execute("BEGIN").await.unwrap();
        let p1 = step(a.query_one(&inbound("CA-bp1", "+18005550301"), &[]).await.unwrap());
        let q1 = step(b.query_one(&inbound("CA-bq1", "+18005550302"), &[]).await.unwrap());
        assert!(!p1.0 && p1.1 && p1.2.is_some(), "{p1:?}: creates P's job");
        assert!(!q1.0 && q1.1 && q1.2.is_some(), "{q1:?}: creates Q's job");
        // Each now wants the other's sample set: neither waits.
        let q2 = step(a.query_one(&inbound("CA-bq2", "+18005550302"), &[]).await.unwrap());
        let p2 = step(b.query_one(&inbound("CA-bp2", "+18005550301"), &[]).await.unwrap());
        assert_eq!(q2, (true, false, None), "contended, nothing done");
        assert_eq!(p2, (true, false, None));
        a.batch_execute("COMMIT").await.unwrap();
        b.batch_execute("COMMIT").await.unwrap();
        for id in ["CA-bq2", "CA-bp2"] {
            assert_eq!(store.get_call(&id.into()).await.unwrap(), None, "{id} was not recorded");
        }
        // Alone (what the store does next), each joins the job the other batch made.
        let l = lease("N2", 99_999_999_999_999);
        let call = record("CA-bq2", 1_000);
        let step = store.record_inbound(&inbound_req(&call, "+18005550302", 1_000, &l)).await;
        let step = step.unwrap();
        assert!(step.first && !step.created);
        assert_eq!(step.job.map(|j| j.id.0), q1.2);
    });
}
