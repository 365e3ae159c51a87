//! CallController throughput over the in-memory store: the decision cost a webhook or an
//! INVITE pays before any I/O. Prints calls/s and per-operation latency percentiles.
//!
//! Run: `cargo bench -p precall-benches --bench controller`

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use precall_api::{CallContext, CallId, CallStatus, ProfileId, Protocol, Timestamp, VoiceId};
use precall_controller::{CallController, ControllerConfig, MemoryStore, Store, VoiceProfile};

fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the in-memory store never waits"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

#[allow(clippy::print_stdout)]
fn main() {
    let store = MemoryStore::new();
    run(store.upsert_profile(&VoiceProfile {
        id: "default".into(),
        number: None,
        name: "bench".into(),
        sample_urls: vec!["https://s/a.mp3".into()],
        agent_id: None,
        greeting_url: None,
        hold_url: None,
        first_message: None,
    }))
    .unwrap();
    let ctl = CallController::new(
        store,
        ControllerConfig {
            greeting_url: "https://m/g.wav".into(),
            hold_url: "https://m/h.wav".into(),
            error_message: "sorry".into(),
            error_audio_url: None,
            poll_interval: Duration::from_secs(2),
            max_hold: Duration::from_secs(3600),
            clone_job_timeout: Duration::from_secs(3600),
            clone_lease: Duration::from_millis(10_000),
            clone_retry: Duration::from_millis(10_000),
            clone_retry_permanent: Duration::from_millis(900_000),
            node_id: "node-a".to_owned(),
            clone_verify_after: Duration::from_millis(3_600_000),
            agent_ws_url: "wss://a/v1/convai/conversation".into(),
            default_agent_id: "agent".into(),
            default_profile: ProfileId::new("default"),
        },
    );
    let calls = 100_000u64;
    let mut inbound = Vec::with_capacity(calls as usize);
    let mut polls = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    for i in 0..calls {
        let ctx = CallContext {
            call_id: CallId::new(format!("CA{i:032x}")),
            session_id: String::new(),
            caller_number: "+12349013030".into(),
            recipient_number: "+18005551212".into(),
            status: CallStatus::Ringing,
            protocol: Protocol::Twilio,
        };
        let t = Instant::now();
        let out = run(ctl.handle_inbound_call(&ctx, Timestamp(i))).unwrap();
        inbound.push(t.elapsed());
        if let Some(job) = out.start_clone {
            run(ctl.clone_finished(job.job_id, &Ok(VoiceId::new("v")), Timestamp(i))).unwrap();
        }
        let t = Instant::now();
        run(ctl.check_clone_status(&ctx.call_id, Timestamp(i + 1))).unwrap();
        polls.push(t.elapsed());
    }
    let total = start.elapsed();
    inbound.sort();
    polls.sort();
    println!("controller over MemoryStore, {calls} calls (inbound + one status check each)");
    println!("  calls/s: {:.0}", calls as f64 / total.as_secs_f64());
    for (name, v) in [("inbound", &inbound), ("check_clone_status", &polls)] {
        println!(
            "  {name}: p50 {:?}  p99 {:?}  max {:?}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
}
