//! CallController throughput over the in-memory store: the decision cost a webhook or an
//! INVITE pays before any I/O. Prints calls/s, per-operation latency percentiles, and the heap
//! the in-memory store keeps per ended call (its default bound holds 100,000 of them).
//!
//! Run: `cargo bench -p precall-benches --bench controller`

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use precall_api::{CallContext, CallId, CallStatus, ProfileId, Protocol, Timestamp, VoiceId};
use precall_controller::{CallController, ControllerConfig, MemoryStore, Store, VoiceProfile};

/// Counts the bytes held on the heap, so the bench can print what the store keeps per call.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's own arguments; the
// counter is a relaxed atomic and never affects the allocation itself.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size, Ordering::Relaxed);
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
    let held_before = HELD.load(Ordering::Relaxed);
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
        run(ctl.call_ended(&ctx.call_id, "caller_hangup", Timestamp(i + 2))).unwrap();
    }
    let total = start.elapsed();
    // The timing vectors are the bench's own, not the store's.
    let own = 2 * calls as usize * std::mem::size_of::<Duration>();
    let kept = HELD.load(Ordering::Relaxed).saturating_sub(held_before + own);
    inbound.sort();
    polls.sort();
    println!("controller over MemoryStore, {calls} calls (inbound + one status check each)");
    println!("  calls/s: {:.0}", calls as f64 / total.as_secs_f64());
    println!(
        "  heap kept by the store after {calls} ended calls: {:.1} MB, {} bytes per call",
        kept as f64 / 1e6,
        kept / calls as usize
    );
    for (name, v) in [("inbound", &inbound), ("check_clone_status", &polls)] {
        println!(
            "  {name}: p50 {:?}  p99 {:?}  max {:?}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
}
