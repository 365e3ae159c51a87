//! The HTTP routes of the control plane.

use std::sync::Arc;

use precall_http::{Handler, Request, Response};

use crate::metrics::Metrics;
use crate::runtime::ControlHandle;
use crate::twilio::Twilio;

/// One engine shard as `/health` and `/metrics` show it: the engine's own snapshot.
pub use precall_engine::ShardHealth as ShardState;

/// A per-shard counter in `/metrics`: name, help text, how to read it.
type ShardCounter = (&'static str, &'static str, fn(&ShardState) -> u64);

/// Reads the shards' state (atomics; cheap).
pub type ShardProbe = Arc<dyn Fn() -> Vec<ShardState> + Send + Sync>;

/// The control plane's HTTP application.
pub struct App {
    control: ControlHandle,
    shards: ShardProbe,
    metrics: Arc<Metrics>,
    store_kind: &'static str,
    twilio: Twilio,
    /// A graceful stop is under way: `/health` says so (503) and new Twilio calls get 503.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The store's health, as the side runtime last probed it.
    store_health: Arc<crate::runtime::StoreHealth>,
    /// `/metrics` is served on a listener of its own (`METRICS_ADDR`), not here.
    metrics_elsewhere: bool,
}

/// The `METRICS_ADDR` listener's routes: `/metrics` and `/health` of the same [`App`].
#[derive(Debug)]
pub struct Observer(pub Arc<App>);

impl Handler for Observer {
    fn handle(&self, req: &Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/health") => self.0.health(),
            ("GET" | "HEAD", "/metrics") => self.0.metrics(),
            (_, "/health" | "/metrics") => {
                Response::text(405, "use GET\n").header("Allow", "GET, HEAD")
            }
            _ => Response::text(404, "not found\n"),
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("store", &self.store_kind).finish_non_exhaustive()
    }
}

impl App {
    /// Routes over the side runtime `control`, the engine's `shards`, shared `metrics`, and the
    /// Twilio webhooks.
    pub fn new(
        control: ControlHandle,
        shards: ShardProbe,
        metrics: Arc<Metrics>,
        store_kind: &'static str,
        twilio: Twilio,
        store_health: Arc<crate::runtime::StoreHealth>,
    ) -> Self {
        Self {
            control,
            shards,
            metrics,
            store_kind,
            twilio,
            draining: Arc::default(),
            store_health,
            metrics_elsewhere: false,
        }
    }

    /// Leaves `/metrics` to the `METRICS_ADDR` listener ([`Observer`]).
    pub fn with_metrics_elsewhere(mut self) -> Self {
        self.metrics_elsewhere = true;
        self
    }

    /// The flag that puts the node in draining mode (see [`App::handle`]).
    pub fn draining(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.draining)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    fn health(&self) -> Response {
        // The side runtime's last probe: no trip through its queue (a flood of health checks
        // must not take the places webhooks need), at most HEALTH_EVERY old.
        let store = self.store_health.get();
        let shards = (self.shards)();
        let shards_ok = !shards.is_empty() && shards.iter().all(|s| s.alive);
        let draining = self.is_draining();
        let ok = store.is_ok() && shards_ok && !draining;
        let status = match (draining, ok) {
            (true, _) => "draining",
            (false, true) => "ok",
            (false, false) => "unavailable",
        };
        let body = serde_json::json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "store": {
                "kind": self.store_kind,
                "ok": store.is_ok(),
                "error": store.err(),
            },
            // Clone jobs on this node, and the profiles whose last clone failed (their new
            // calls get the error message until retry_at): the reason to fix is here.
            "clones": {
                "running": self.metrics.clones_running(),
                "backing_off": self.metrics.clone_backoffs(precall_api::Timestamp::now())
                    .into_iter()
                    .map(|(profile, b)| serde_json::json!({
                        "profile": profile,
                        "reason": b.reason,
                        "permanent": b.permanent,
                        "retry_in_ms": b.retry_at.0.saturating_sub(precall_api::Timestamp::now().0),
                    }))
                    .collect::<Vec<_>>(),
            },
            "shards": shards.iter().map(|s| serde_json::json!({
                "shard": s.shard, "alive": s.alive, "active_calls": s.active_calls,
                // The shard took the drain (its new calls get 503): /health's status says
                // draining from the signal on, a shard a moment later.
                "draining": s.draining,
            })).collect::<Vec<_>>(),
        });
        Response::json(if ok { 200 } else { 503 }, body.to_string())
            .header("Cache-Control", "no-store")
    }

    fn metrics(&self) -> Response {
        let mut out = String::with_capacity(4096);
        self.metrics.render(&mut out);
        out.push_str("# HELP precall_control_queue_depth Requests (webhooks, shard polls and ends) waiting for the control plane's side runtime; past 4096 they get 503.\n");
        out.push_str("# TYPE precall_control_queue_depth gauge\n");
        out.push_str(&format!("precall_control_queue_depth {}\n", self.control.queued()));
        out.push_str("# HELP precall_active_calls Calls on this node: SIP calls and Twilio media streams on each engine shard, and Twilio calls on TwiML hold in poll mode (shard=\"control\": no media here; each counts until its next poll is due).\n");
        out.push_str("# TYPE precall_active_calls gauge\n");
        out.push_str(&format!(
            "precall_active_calls{{protocol=\"twilio\",shard=\"control\"}} {}\n",
            self.metrics.twilio_holding_now()
        ));
        // One read of the shards' counters for the whole page.
        let shards = (self.shards)();
        for s in &shards {
            out.push_str(&format!(
                "precall_active_calls{{protocol=\"sip\",shard=\"{}\"}} {}\n",
                s.shard,
                s.active_calls.saturating_sub(s.streams)
            ));
            out.push_str(&format!(
                "precall_active_calls{{protocol=\"twilio\",shard=\"{}\"}} {}\n",
                s.shard, s.streams
            ));
        }
        out.push_str("# HELP precall_twilio_streams Twilio media streams open on each shard.\n");
        out.push_str("# TYPE precall_twilio_streams gauge\n");
        for s in &shards {
            out.push_str(&format!(
                "precall_twilio_streams{{shard=\"{}\"}} {}\n",
                s.shard, s.streams
            ));
        }
        let gauges: [ShardCounter; 6] = [
            (
                "precall_sip_transactions_live",
                "SIP server transactions with work left: INVITEs ringing, or refused and awaiting their ACK (at most 250,000 per shard; past it new INVITEs get 503).",
                |s| s.sip_transactions_live,
            ),
            (
                "precall_sip_transactions_absorbed",
                "Answered SIP server transactions kept compactly to absorb retransmissions until Timer J, L or I.",
                |s| s.sip_transactions_absorbed,
            ),
            (
                "precall_sip_absorbed_bytes",
                "What the absorbed SIP transactions count against their budget of 64 MiB per shard (past it the oldest goes first).",
                |s| s.sip_absorbed_bytes,
            ),
            ("precall_agent_legs", "Agent WebSocket legs open (connecting or bridged).", |s| {
                s.agent_legs
            }),
            (
                "precall_end_reports_pending",
                "Call-end reports waiting for room in the control plane's queue (retried, never dropped).",
                |s| s.end_reports_pending,
            ),
            (
                "precall_shard_overload",
                "Why the shard refuses new calls now: 0 it admits, 1 its media clock runs late (ADMIT_CLOCK_LATE_MS), 2 its inbox is deep (ADMIT_INBOX_DEPTH), 3 its SIP socket's receive queue is over half full, 4 its SIP datagrams wait too long (ADMIT_SIP_LAG_MS).",
                |s| s.overload,
            ),
        ];
        for (name, help, value) in gauges {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for s in &shards {
                out.push_str(&format!("{name}{{shard=\"{}\"}} {}\n", s.shard, value(s)));
            }
        }
        let name = "precall_media_send_lateness_seconds";
        out.push_str(&format!("# HELP {name} How long after its 20 ms grid instant an RTP frame left the shard (sendmsg returned), one frame in {}.\n# TYPE {name} histogram\n", precall_engine::PACING_SAMPLE_EVERY));
        let lateness: Vec<_> = shards.iter().map(|s| &s.send_lateness).collect();
        write_histogram(&mut out, name, "", &precall_engine::PACING_BUCKETS_US, &lateness);
        let name = "precall_bridge_latency_seconds";
        out.push_str(&format!("# HELP {name} Agent bridge delays at the engine's clock: caller RTP in to the agent message out (to_agent), agent audio in to its first RTP frame out (to_caller), clone ready to the agent's first frame at the caller (first_audio).\n# TYPE {name} histogram\n"));
        type Latency = fn(&ShardState) -> &precall_engine::LatencySnapshot;
        let histograms: [(&str, Latency); 3] = [
            ("to_agent", |s| &s.latency_to_agent),
            ("to_caller", |s| &s.latency_to_caller),
            ("first_audio", |s| &s.latency_first_audio),
        ];
        for (direction, histogram) in histograms {
            let label = format!("direction=\"{direction}\"");
            let each: Vec<_> = shards.iter().map(histogram).collect();
            write_histogram(&mut out, name, &label, &precall_engine::LATENCY_BUCKETS_US, &each);
        }
        let name = "precall_bridge_added_latency_seconds";
        out.push_str(&format!("# HELP {name} What the engine adds to bridged audio beyond its framing: a caller chunk's AGENT_CHUNK_MS deadline to the chunk handed to the agent leg (to_agent); agent audio's first 20 ms grid instant after it came in to its first frame out (to_caller).\n# TYPE {name} histogram\n"));
        type Added = fn(&ShardState) -> &precall_engine::PacingSnapshot;
        let added: [(&str, Added); 2] =
            [("to_agent", |s| &s.added_to_agent), ("to_caller", |s| &s.added_to_caller)];
        for (direction, histogram) in added {
            let label = format!("direction=\"{direction}\"");
            let each: Vec<_> = shards.iter().map(histogram).collect();
            write_histogram(&mut out, name, &label, &precall_engine::PACING_BUCKETS_US, &each);
        }
        let counters: [ShardCounter; 18] = [
            (
                "precall_twilio_streams_refused_total",
                "Media stream connections refused before the upgrade (path, method, signature) or closed before a valid start.",
                |s| s.streams_refused,
            ),
            (
                "precall_twilio_stream_messages_malformed_total",
                "Media Streams messages that did not parse.",
                |s| s.stream_messages_malformed,
            ),
            ("precall_twilio_stream_frames_sent_total", "Media frames sent to Twilio.", |s| {
                s.stream_frames_out
            }),
            (
                "precall_twilio_stream_frames_received_total",
                "Media frames received from Twilio.",
                |s| s.stream_frames_in,
            ),
            (
                "precall_twilio_stream_frames_dropped_total",
                "Frames for Twilio dropped because a stream's send queue was full (a slow socket).",
                |s| s.stream_frames_dropped,
            ),
            (
                "precall_calls_refused_overload_total",
                "New INVITEs refused 503 by overload admission (media clock late, inbox deep, or ADMIT_SETUP_DEPTH calls waiting for their plan), before any record.",
                |s| s.calls_refused_overload,
            ),
            (
                "precall_calls_refused_full_total",
                "New calls refused 503 because their shard held SHARD_MAX_CALLS already.",
                |s| s.calls_refused_full,
            ),
            (
                "precall_sip_datagrams_forwarded_total",
                "SIP datagrams forwarded to the shard owning their Call-ID.",
                |s| s.datagrams_forwarded,
            ),
            (
                "precall_sip_datagrams_dropped_total",
                "SIP datagrams dropped unanswered: not SIP, unmatched, from an untrusted source, or forwarding to a full shard inbox.",
                |s| s.datagrams_dropped,
            ),
            ("precall_rtp_packets_sent_total", "RTP packets sent to callers.", |s| {
                s.rtp_packets_out
            }),
            ("precall_rtp_packets_received_total", "RTP packets received from callers.", |s| {
                s.rtp_packets_in
            }),
            (
                "precall_rtp_packets_rejected_total",
                "RTP packets dropped by strict RTP: not from the call's latched or allowed source.",
                |s| s.rtp_packets_rejected,
            ),
            ("precall_udp_send_errors_total", "SIP and RTP sends the kernel refused.", |s| {
                s.send_errors
            }),
            ("precall_agent_messages_received_total", "Text frames received from agents.", |s| {
                s.agent_messages_in
            }),
            ("precall_agent_messages_sent_total", "Text frames sent to agents.", |s| {
                s.agent_messages_out
            }),
            (
                "precall_agent_messages_dropped_total",
                "Frames for a stalled agent dropped because its send queue was full.",
                |s| s.agent_messages_dropped,
            ),
            (
                "precall_agent_messages_ignored_total",
                "Agent messages of types precall ignores, or that did not parse.",
                |s| s.agent_messages_ignored,
            ),
            (
                "precall_agent_audio_overflow_bytes_total",
                "Agent audio dropped over a call's buffer limit (flooding agents).",
                |s| s.agent_audio_overflow_bytes,
            ),
        ];
        for (name, help, value) in counters {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for s in &shards {
                out.push_str(&format!("{name}{{shard=\"{}\"}} {}\n", s.shard, value(s)));
            }
        }
        Response::new(200).body("text/plain; version=0.0.4; charset=utf-8", out)
    }
}

impl Handler for App {
    fn handle(&self, req: &Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            // Draining: a new Twilio call goes to the number's fallback URL (or is retried);
            // the calls already up keep their polls, status callbacks and streams.
            ("POST", "/twilio/voice") if self.is_draining() => {
                Response::text(503, "draining, retry elsewhere\n").header("Retry-After", "5")
            }
            (_, path) if path.starts_with("/twilio/") => self.twilio.handle(req),
            ("GET" | "HEAD", path) if path.starts_with("/audio/hold/") => {
                match self.twilio.hold_segment(&path["/audio/hold/".len()..]) {
                    Some(bytes) => Response::new(200)
                        .body("audio/wav", bytes)
                        .header("Cache-Control", "public, max-age=3600"),
                    None => Response::text(404, "no such hold segment\n"),
                }
            }
            ("GET" | "HEAD", path) if path.starts_with("/audio/") => {
                match crate::audio::clip(&path["/audio/".len()..]) {
                    Some(bytes) => Response::new(200)
                        .body("audio/wav", bytes)
                        .header("Cache-Control", "public, max-age=86400"),
                    None => Response::text(404, "no such clip\n"),
                }
            }
            (_, "/metrics") if self.metrics_elsewhere => Response::text(404, "not found\n"),
            ("GET" | "HEAD", "/health") => self.health(),
            ("GET" | "HEAD", "/metrics") => self.metrics(),
            (_, "/health" | "/metrics") => {
                Response::text(405, "use GET\n").header("Allow", "GET, HEAD")
            }
            _ => Response::text(404, "not found\n"),
        }
    }
}

/// One Prometheus histogram summed over the shards: cumulative buckets over `bounds` (µs)
/// and `+Inf`, sum and count; `label` (`k="v"`, or empty) on every line.
fn write_histogram<const N: usize>(
    out: &mut String,
    name: &str,
    label: &str,
    bounds: &[u64],
    shards: &[&precall_engine::Snapshot<N>],
) {
    let mut counts = [0u64; N];
    let mut sum_us = 0u64;
    for s in shards {
        for (c, v) in counts.iter_mut().zip(s.counts) {
            *c += v;
        }
        sum_us += s.sum_us;
    }
    let (open, sep, close) = if label.is_empty() { ("", "", "") } else { ("{", ",", "}") };
    let mut cumulative = 0;
    for (count, bound) in counts.iter().zip(bounds) {
        cumulative += count;
        let le = *bound as f64 / 1e6;
        out.push_str(&format!("{name}_bucket{{{label}{sep}le=\"{le}\"}} {cumulative}\n"));
    }
    cumulative += counts[N - 1];
    out.push_str(&format!("{name}_bucket{{{label}{sep}le=\"+Inf\"}} {cumulative}\n"));
    out.push_str(&format!("{name}_sum{open}{label}{close} {}\n", sum_us as f64 / 1e6));
    out.push_str(&format!("{name}_count{open}{label}{close} {cumulative}\n"));
}
