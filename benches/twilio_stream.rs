//! The Twilio leg measured against the real `precall` binary, with a media edge that behaves as
//! Twilio does (`tests/support/fake_twilio.rs`) and, for the poll flow, plays TwiML for the real
//! length of each `<Play>` and takes pushes from a local fake of the REST API.
//!
//! Run: `cargo bench -p precall --bench twilio_stream`
//! Knobs: `STREAM_BENCH_STREAMS` (concurrent streams of the load part, default 500; the load
//! also runs once with 1), `STREAM_BENCH_SECS` (seconds of the load part, default 20),
//! `STREAM_BENCH_SWITCHES` (calls per hold mode in the switch-over part, default 6).
//!
//! 1. **Switch-over**: clone ready → the caller hears the agent's first audio, for the stream
//!    hold mode, the poll mode with the live-call push and the poll mode without it (the
//!    clone is ready `SIMULATED_CLONE_DELAY_MS` after the webhook; the agent answers with a
//!    tone at once, so its first frame is recognisable).
//! 2. **Load**: N streams at once in the stream hold mode with the demo agent in its own
//!    process (`precall demo-agent`; it echoes the caller): the caller talks 1.5 s, pauses 2.5 s, again; prints precall's own
//!    bridge latency histograms (`/metrics`, the engine's clock: caller frame in → agent
//!    message out; agent audio in → its first media message out), how evenly the frames
//!    arrived at the edge (deviation of each inter-arrival from 20 ms), dropped frames,
//!    precall's CPU and RSS.
//!
//! Traffic stays on 127.0.0.1, every phase is bounded in time, precall gets SIGTERM at the end.

#[path = "../tests/support/fake_agent.rs"]
mod fake_agent;
#[path = "../tests/support/fake_twilio.rs"]
mod fake_twilio;
#[path = "../tests/support/fake_twilio_rest.rs"]
mod fake_twilio_rest;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use fake_agent::{Behaviour, FakeAgent, TONE_A_HZ, frequency, ulaw_tone};
use fake_twilio::{StreamTwiml, open, stream_of};
use fake_twilio_rest::FakeRest;
use precall_media::Codec;
use support::free_tcp_port;
use support::precall::{Answer, Precall, signed_webhook};

const TOKEN: &str = "bench-stream-token-0123456789";
const ACCOUNT: &str = "AC00000000000000000000000000000000";
const CLONE_MS: u64 = 2500;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Node {
    p: Precall,
    base: String,
}

fn short_greeting() -> String {
    let path = std::env::temp_dir().join("precall-bench-greeting-20ms.wav");
    std::fs::write(&path, support::wav_pcm16(&[0; 160])).unwrap();
    format!("file://{}", path.display())
}

fn node(extra: &[(&str, String)]) -> Node {
    let port = free_tcp_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut env: Vec<(&str, String)> = vec![
        ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
        ("PUBLIC_BASE_URL", base.clone()),
        ("ENABLE_SIP_HANDLER", "false".to_owned()),
        ("GREETING_AUDIO_URL", short_greeting()),
        ("LOG_LEVEL", "warn".to_owned()),
        ("MAX_HOLD_MS", "600000".to_owned()),
        ("RTP_TIMEOUT_MS", "600000".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    Node { p: Precall::start_on(port, &env), base }
}

impl Node {
    fn webhook(&self, target: &str, sid: &str) -> Answer {
        let params = [
            ("AccountSid", ACCOUNT),
            ("CallSid", sid),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ];
        signed_webhook(self.p.http_port, &self.base, TOKEN, target, &params)
    }

    fn metrics(&self) -> String {
        self.p.get("/metrics").1
    }
}

/// How long Twilio would play `url`: a WAV's data length at 8 kHz 16-bit mono.
fn play_length(node: &Node, url: &str) -> Duration {
    let path = url.strip_prefix(&node.base).unwrap_or(url);
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.p.http_port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |p| p + 4);
    Duration::from_secs_f64(raw.len().saturating_sub(at + 44) as f64 / 16_000.0)
}

/// The first tone-A frame's arrival, following the call through its TwiML as Twilio would.
fn first_agent_audio(node: &Node, rest: Option<&FakeRest>, sid: &str) -> Instant {
    let mut doc = node.webhook("/twilio/voice", sid).body;
    let mut pushes_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no agent audio for {sid}");
        if let Some(st) = stream_of(&doc) {
            return stream_until_tone(&st, sid);
        }
        // Play the document: each <Play> for its real length, then follow its <Redirect>,
        // unless a push replaces it first.
        let xml = roxmltree::Document::parse(&doc).unwrap();
        let mut playing = Duration::ZERO;
        let mut redirect = None;
        for n in xml.root_element().children().filter(|n| n.is_element()) {
            match n.tag_name().name() {
                "Play" => {
                    let loops: u32 = n.attribute("loop").and_then(|l| l.parse().ok()).unwrap_or(1);
                    playing += play_length(node, n.text().unwrap()) * loops.max(1);
                }
                "Pause" => {
                    playing += Duration::from_secs(
                        n.attribute("length").and_then(|l| l.parse().ok()).unwrap_or(1),
                    )
                }
                "Redirect" => redirect = n.text().map(str::to_owned),
                other => panic!("unexpected <{other}> for {sid}: {doc}"),
            }
        }
        let until = Instant::now() + playing;
        let mut pushed = None;
        while Instant::now() < until {
            if let Some(rest) = rest {
                let updates = rest.updates_for(sid);
                if updates.len() > pushes_seen {
                    pushes_seen = updates.len();
                    pushed = updates.last().and_then(|u| u.param("Twiml").map(str::to_owned));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        doc = match pushed {
            Some(twiml) => twiml,
            None => {
                let url = redirect.expect("a redirect after the hold");
                let target = url.strip_prefix(&node.base).unwrap().replace("&amp;", "&");
                node.webhook(&target, sid).body
            }
        };
    }
}

fn stream_until_tone(st: &StreamTwiml, sid: &str) -> Instant {
    let mut s = open(st, Some(TOKEN)).expect("stream");
    s.start(sid, &st.params);
    let started = Instant::now();
    let silence = |_: u64| vec![0xFFu8; 160];
    loop {
        s.run_for(Duration::from_millis(20), Some(&silence));
        if let Some((at, _)) = s
            .session
            .media
            .iter()
            .find(|(_, f)| (frequency(Codec::Pcmu, f) - TONE_A_HZ).abs() < TONE_A_HZ * 0.15)
        {
            // `at` counts from the stream's open, which `started` approximates.
            return started + *at;
        }
        assert!(
            s.session.closed.is_none() && started.elapsed() < Duration::from_secs(30),
            "no tone"
        );
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[allow(clippy::print_stdout)]
fn switch_over(calls: u64) {
    println!(
        "## clone ready -> first agent audio at the caller ({calls} calls per mode, clone {CLONE_MS} ms after the webhook)"
    );
    println!("| mode | p50 | max | mean |");
    println!("|---|---|---|---|");
    type Mode<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
    let modes: [Mode<'_>; 3] = [
        ("stream hold mode", &[], false),
        ("poll mode, with the push", &[("TWILIO_HOLD_MODE", "poll")], true),
        (
            "poll mode, without the push",
            &[("TWILIO_HOLD_MODE", "poll"), ("TWILIO_PUSH", "false")],
            false,
        ),
    ];
    for (name, extra, with_rest) in modes {
        let agent = FakeAgent::start(Behaviour::Talk);
        let rest = FakeRest::start();
        let mut env: Vec<(&str, String)> = vec![
            ("SIMULATED_CLONE_DELAY_MS", CLONE_MS.to_string()),
            ("AGENT_WS_URL", format!("ws://{}/v1/convai/conversation", agent.addr)),
            ("TWILIO_API_BASE", rest.base()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let mut waits = Vec::new();
        for i in 0..calls {
            // A fresh node per call: a completed clone is reused by the profile's next calls,
            // which would then connect at once instead of waiting for the clone.
            let n = node(&env);
            // Let the hold clip load (its segments) before the call.
            std::thread::sleep(Duration::from_millis(300));
            let sid = format!("CA{:032x}", 0xbe00 + i);
            let t0 = Instant::now();
            let heard = first_agent_audio(&n, with_rest.then_some(&rest), &sid);
            let ready = t0 + Duration::from_millis(CLONE_MS);
            waits.push(heard.saturating_duration_since(ready).as_secs_f64() * 1000.0);
        }
        waits.sort_by(f64::total_cmp);
        let mean = waits.iter().sum::<f64>() / waits.len() as f64;
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {mean:.0} ms |",
            percentile(&waits, 0.5),
            waits.last().unwrap()
        );
    }
}

fn proc_stat(pid: u32) -> (u64, u64) {
    // utime + stime in clock ticks, and VmRSS in KiB.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// mean, p50 and p99 (bucket upper bounds) of one direction of the bridge histogram.
fn histogram(metrics: &str, direction: &str) -> String {
    let name = "precall_bridge_latency_seconds";
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let (mut sum, mut count) = (0.0, 0u64);
    for line in metrics.lines() {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        if !key.contains(&format!("direction=\"{direction}\"")) {
            continue;
        }
        if key.starts_with(&format!("{name}_bucket")) {
            let le = key.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            buckets.push((le, value.parse().unwrap_or(0)));
        } else if key.starts_with(&format!("{name}_sum")) {
            sum = value.parse().unwrap_or(0.0);
        } else if key.starts_with(&format!("{name}_count")) {
            count = value.parse().unwrap_or(0);
        }
    }
    if count == 0 {
        return "no samples".to_owned();
    }
    let at = |p: f64| {
        let want = (count as f64 * p).ceil() as u64;
        buckets.iter().find(|(_, c)| *c >= want).map_or(f64::INFINITY, |(le, _)| *le * 1000.0)
    };
    format!("{:.1} / ≤{:.0} / ≤{:.0} ms ({count})", sum / count as f64 * 1000.0, at(0.5), at(0.99))
}

fn metric_sum(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

#[allow(clippy::print_stdout)]
fn load(streams: usize, secs: u64) {
    // The demo agent in its own process (it echoes the caller a second after a pause), so that
    // precall's CPU and memory are precall's alone.
    let agent_port = free_tcp_port();
    let mut agent = std::process::Command::new(support::precall::BIN)
        .args(["demo-agent", &format!("127.0.0.1:{agent_port}")])
        .env("LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the demo agent");
    support::wait_for("the demo agent", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", agent_port)).ok()
    });
    let n = node(&[
        ("SIMULATED_CLONE_DELAY_MS", "0".to_owned()),
        ("STATUS_POLL_INTERVAL_MS", "200".to_owned()),
        ("AGENT_WS_URL", format!("ws://127.0.0.1:{agent_port}/v1/convai/conversation")),
    ]);
    let pid = n.p.pid();
    std::thread::sleep(Duration::from_millis(300));
    let (ticks0, idle_rss) = proc_stat(pid);
    let start = Instant::now();
    // A sample of the streams on threads of their own, timestamping every frame as it arrives
    // (the pacing figures); the rest on one thread, driven every 20 ms without blocking (a
    // thread per stream would starve the 2 cores before precall did).
    let sampled = streams.min(10);
    let barrier = Arc::new(Barrier::new(sampled + 2));
    let deviations = Arc::new(Mutex::new(Vec::<f64>::new()));
    let frames = Arc::new(Mutex::new(0u64));
    let node = Arc::new(n);
    let caller = |chunk: u64| -> Vec<u8> {
        if chunk % 200 < 75 { ulaw_tone(700.0, 20, 6000.0) } else { vec![0xFF; 160] }
    };
    let open_one = |node: &Node, i: usize| {
        let sid = format!("CA{:032x}", 0x5000_0000 + i);
        let st = stream_of(&node.webhook("/twilio/voice", &sid).body).expect("stream");
        let mut s = open(&st, Some(TOKEN)).expect("stream open");
        s.start(&sid, &st.params);
        s
    };
    let mut threads: Vec<_> = (0..sampled)
        .map(|i| {
            let (barrier, deviations, frames, node) =
                (barrier.clone(), deviations.clone(), frames.clone(), node.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut s = open_one(&node, i);
                s.run_for(Duration::from_secs(secs), Some(&caller));
                s.stop();
                let media = &s.session.media;
                let mut d: Vec<f64> = media
                    .windows(2)
                    .skip(50) // the first second: stream start and plan
                    .map(|w| ((w[1].0 - w[0].0).as_secs_f64() * 1000.0 - 20.0).abs())
                    .collect();
                *frames.lock().unwrap() += media.len() as u64;
                deviations.lock().unwrap().append(&mut d);
            })
        })
        .collect();
    {
        let (barrier, frames, node) = (barrier.clone(), frames.clone(), node.clone());
        threads.push(std::thread::spawn(move || {
            barrier.wait();
            let mut many: Vec<_> = (sampled..streams).map(|i| open_one(&node, i)).collect();
            for s in &mut many {
                s.set_nonblocking();
            }
            let until = Instant::now() + Duration::from_secs(secs);
            let mut tick = Instant::now();
            let mut chunk = 0;
            while Instant::now() < until {
                for s in &mut many {
                    s.media(&caller(chunk));
                    s.pump();
                }
                chunk += 1;
                tick += Duration::from_millis(20);
                std::thread::sleep(tick.saturating_duration_since(Instant::now()));
            }
            for s in &mut many {
                s.pump();
                s.stop();
                *frames.lock().unwrap() += s.session.media.len() as u64;
            }
        }));
    }
    barrier.wait();
    let mut peak_rss = idle_rss;
    while threads.iter().any(|t| !t.is_finished()) {
        peak_rss = peak_rss.max(proc_stat(pid).1);
        std::thread::sleep(Duration::from_millis(200));
    }
    for t in threads {
        let _ = t.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let (ticks1, _) = proc_stat(pid);
    let tick_hz = 100.0; // USER_HZ on Linux
    let cpu = (ticks1 - ticks0) as f64 / tick_hz / wall * 100.0;
    let m = node.metrics();
    let mut d = deviations.lock().unwrap().clone();
    d.sort_by(f64::total_cmp);
    println!("## {streams} stream(s) for {secs} s, demo agent");
    println!(
        "- to agent (caller frame in -> user_audio_chunk out), mean / p50 / p99: {}",
        histogram(&m, "to_agent")
    );
    println!(
        "- to caller (agent audio in -> first media message queued), mean / p50 / p99: {}",
        histogram(&m, "to_caller")
    );
    println!("- clone ready -> first agent frame (engine clock): {}", histogram(&m, "first_audio"));
    println!(
        "- media frames at the edge: {} (of {} in real time); inter-arrival - 20 ms over {sampled} sampled streams, p50 / p99 / max: {:.2} / {:.2} / {:.2} ms",
        frames.lock().unwrap(),
        streams as u64 * secs * 50,
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        d.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "- frames dropped (slow socket): {}; streams refused: {}",
        metric_sum(&m, "precall_twilio_stream_frames_dropped_total"),
        metric_sum(&m, "precall_twilio_streams_refused_total")
    );
    println!(
        "- precall CPU {cpu:.1} % of one core over {wall:.1} s; RSS idle {} MB, peak {} MB ({:.0} KB per stream)",
        idle_rss / 1024,
        peak_rss / 1024,
        (peak_rss.saturating_sub(idle_rss)) as f64 / streams as f64
    );
    // SAFETY: our own child's pid, not yet reaped.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    let _ = agent.wait();
}

#[allow(clippy::print_stdout)]
fn main() {
    let streams = env_num("STREAM_BENCH_STREAMS", 500) as usize;
    let secs = env_num("STREAM_BENCH_SECS", 20);
    let switches = env_num("STREAM_BENCH_SWITCHES", 6);
    if switches > 0 {
        switch_over(switches);
    }
    load(1, secs.min(10));
    if streams > 1 {
        load(streams, secs);
    }
}
