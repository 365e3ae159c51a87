//! Per-shard statistics: the only state shared across threads. A shard writes its own counters
//! (relaxed atomics, one cache line per shard); anyone may read them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Upper bounds of the bridge latency histograms' buckets, in microseconds (a last bucket
/// holds the rest).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 200_000,
    500_000, 1_000_000,
];

/// Upper bounds of the media send lateness histogram's buckets, in microseconds: how long
/// after its 20 ms grid instant a frame left (`sendmsg` returned). A last bucket holds the rest.
pub const PACING_BUCKETS_US: [u64; 10] =
    [50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000];

/// One RTP frame in this many has its send lateness measured (a clock read per frame would
/// cost more than the frame's send at ten thousand calls).
pub const PACING_SAMPLE_EVERY: u32 = 8;

/// A histogram as read: counts per bucket (not cumulative; the last entry counts the samples
/// above every bound) and the sum of all samples in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot<const N: usize> {
    /// Samples per bucket; the last entry counts those above every bound.
    pub counts: [u64; N],
    /// Sum of all samples, µs.
    pub sum_us: u64,
}

impl<const N: usize> Default for Snapshot<N> {
    fn default() -> Self {
        Self { counts: [0; N], sum_us: 0 }
    }
}

/// The bridge latency histograms as read, over [`LATENCY_BUCKETS_US`].
pub type LatencySnapshot = Snapshot<15>;
/// The send lateness histogram as read, over [`PACING_BUCKETS_US`].
pub type PacingSnapshot = Snapshot<11>;

/// `N - 1` bounds and an overflow bucket, written with relaxed atomics.
#[derive(Debug)]
pub(crate) struct Histogram<const N: usize> {
    counts: [AtomicU64; N],
    sum_us: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_us: AtomicU64::new(0) }
    }
}

impl<const N: usize> Histogram<N> {
    fn add(&self, bounds: &[u64], d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = bounds.iter().position(|&b| us <= b).unwrap_or(bounds.len()).min(N - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot<N> {
        Snapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

pub(crate) type LatencyHistogram = Histogram<15>;
pub(crate) type PacingHistogram = Histogram<11>;
// Each histogram has a bucket per bound and one for the rest.
const _: () = assert!(LATENCY_BUCKETS_US.len() + 1 == 15 && PACING_BUCKETS_US.len() + 1 == 11);

impl LatencyHistogram {
    pub(crate) fn record(&self, d: std::time::Duration) {
        self.add(&LATENCY_BUCKETS_US, d);
    }
}

impl PacingHistogram {
    pub(crate) fn record(&self, d: std::time::Duration) {
        self.add(&PACING_BUCKETS_US, d);
    }
}

/// A snapshot of one shard, from [`Engine::health`](crate::Engine::health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHealth {
    /// The shard index.
    pub shard: usize,
    /// The executor runs and the shard's loop has not exited (false after a stop or a panic).
    pub alive: bool,
    /// Calls owned by the shard: from the INVITE until the call has ended.
    pub active_calls: u64,
    /// Datagrams received on the shard's SIP socket.
    pub datagrams_in: u64,
    /// Received datagrams for a Call-ID another shard owns, forwarded to it.
    pub datagrams_forwarded: u64,
    /// Datagrams that could not be handled: forwarding to a full or stopped inbox, or dropped
    /// by the SIP layer without an answer (not SIP, no Via, unmatched ACK or response).
    pub datagrams_dropped: u64,
    /// RTP packets sent to callers.
    pub rtp_packets_out: u64,
    /// RTP packets received from callers.
    pub rtp_packets_in: u64,
    /// RTP packets dropped by strict RTP: not from the call's latched (or allowed) source.
    pub rtp_packets_rejected: u64,
    /// Sends (SIP or RTP) the kernel refused (full send buffer, unreachable address).
    pub send_errors: u64,
    /// Calls whose agent leg is open (connecting, or bridged).
    pub agent_legs: u64,
    /// Text frames received from agents.
    pub agent_messages_in: u64,
    /// Text frames sent to agents.
    pub agent_messages_out: u64,
    /// Frames for an agent dropped because its send queue was full (a stalled agent).
    pub agent_messages_dropped: u64,
    /// Agent messages of types precall ignores, or that did not parse.
    pub agent_messages_ignored: u64,
    /// Agent audio dropped, in bytes: over a call's buffer limit.
    pub agent_audio_overflow_bytes: u64,
    /// Caller RTP in → the agent message carrying it out.
    pub latency_to_agent: LatencySnapshot,
    /// RTP frames' send lateness: how long after its grid instant a frame left (one frame in
    /// [`PACING_SAMPLE_EVERY`]).
    pub send_lateness: PacingSnapshot,
    /// Agent audio in (a talkspurt's start) → its first RTP frame out.
    pub latency_to_caller: LatencySnapshot,
    /// The clone ready (`connect`) → the agent's first frame out to the caller.
    pub latency_first_audio: LatencySnapshot,
    /// What the engine adds to caller audio beyond the `AGENT_CHUNK_MS` it gathers: the
    /// chunk's deadline → the chunk handed to the agent leg (over [`PACING_BUCKETS_US`]).
    pub added_to_agent: PacingSnapshot,
    /// What the engine adds to agent audio beyond the 20 ms framing: the first grid instant of
    /// the call's stream after the audio came in → its first RTP frame (or Twilio message)
    /// out. A frame that misses that instant counts the ticks it missed.
    pub added_to_caller: PacingSnapshot,
    /// Twilio media streams open on the shard (upgraded, not yet gone).
    pub streams: u64,
    /// Media stream connections refused before the upgrade (bad path, method, signature, …)
    /// or closed before `start` (no start in time, a start that did not parse).
    pub streams_refused: u64,
    /// Media Streams messages that did not parse.
    pub stream_messages_malformed: u64,
    /// Frames for Twilio dropped because the stream's send queue was full (a slow socket).
    pub stream_frames_dropped: u64,
    /// New calls refused `503` because the shard holds `SHARD_MAX_CALLS` already.
    pub calls_refused_full: u64,
    /// New calls refused `503` by overload admission (any reading of `overload`, and a full
    /// setup queue), before any record.
    pub calls_refused_overload: u64,
    /// Why the shard refuses new calls now: 0 it admits, 1 the media clock runs late, 2 the
    /// inbox is deep, 3 the SIP socket's receive queue is over half full, 4 SIP datagrams
    /// wait too long (a full shard, `SHARD_MAX_CALLS`, is counted apart).
    pub overload: u64,
    /// The shard took the drain: it refuses new calls (`Engine::drain`).
    pub draining: bool,
    /// Call-end reports waiting for room in the control plane's queue (retried in order,
    /// never dropped).
    pub end_reports_pending: u64,
    /// Media frames sent to Twilio.
    pub stream_frames_out: u64,
    /// Media frames received from Twilio.
    pub stream_frames_in: u64,
    /// SIP server transactions with work left (INVITEs ringing, or refused and awaiting the
    /// ACK).
    pub sip_transactions_live: u64,
    /// Answered SIP server transactions absorbing retransmissions until their timer ends.
    pub sip_transactions_absorbed: u64,
    /// What the absorbed ones count against their budget (64 MiB per shard).
    pub sip_absorbed_bytes: u64,
}

/// The counters behind [`ShardHealth`]. Aligned to a cache line so shards do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct ShardStats {
    alive: AtomicBool,
    active_calls: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_forwarded: AtomicU64,
    datagrams_dropped: AtomicU64,
    rtp_packets_out: AtomicU64,
    rtp_packets_in: AtomicU64,
    rtp_packets_rejected: AtomicU64,
    send_errors: AtomicU64,
    agent_legs: AtomicU64,
    agent_messages_in: AtomicU64,
    agent_messages_out: AtomicU64,
    agent_messages_dropped: AtomicU64,
    agent_messages_ignored: AtomicU64,
    agent_audio_overflow_bytes: AtomicU64,
    pub(crate) latency_to_agent: LatencyHistogram,
    pub(crate) send_lateness: PacingHistogram,
    pub(crate) latency_to_caller: LatencyHistogram,
    pub(crate) latency_first_audio: LatencyHistogram,
    pub(crate) added_to_agent: PacingHistogram,
    pub(crate) added_to_caller: PacingHistogram,
    streams: AtomicU64,
    streams_refused: AtomicU64,
    stream_messages_malformed: AtomicU64,
    stream_frames_dropped: AtomicU64,
    stream_frames_out: AtomicU64,
    stream_frames_in: AtomicU64,
    calls_refused_full: AtomicU64,
    calls_refused_overload: AtomicU64,
    overload: AtomicU64,
    draining: std::sync::atomic::AtomicBool,
    end_reports_pending: AtomicU64,
    sip_transactions_live: AtomicU64,
    sip_transactions_absorbed: AtomicU64,
    sip_absorbed_bytes: AtomicU64,
}

impl ShardStats {
    pub(crate) fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::Release);
    }

    pub(crate) fn set_active_calls(&self, calls: usize) {
        self.active_calls.store(calls as u64, Ordering::Relaxed);
    }

    pub(crate) fn datagram_in(&self) {
        self.datagrams_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn datagram_forwarded(&self) {
        self.datagrams_forwarded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn datagram_dropped(&self) {
        self.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rtp_out(&self, packets: u64) {
        self.rtp_packets_out.fetch_add(packets, Ordering::Relaxed);
    }

    pub(crate) fn rtp_in(&self) {
        self.rtp_packets_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rtp_rejected(&self) {
        self.rtp_packets_rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn send_error(&self) {
        self.send_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_agent_legs(&self, legs: usize) {
        self.agent_legs.store(legs as u64, Ordering::Relaxed);
    }

    pub(crate) fn agent_in(&self) {
        self.agent_messages_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn agent_out(&self) {
        self.agent_messages_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn agent_dropped(&self) {
        self.agent_messages_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a finished call's agent counters.
    pub(crate) fn agent_call_done(&self, ignored: u64, overflow_bytes: u64) {
        self.agent_messages_ignored.fetch_add(ignored, Ordering::Relaxed);
        self.agent_audio_overflow_bytes.fetch_add(overflow_bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_streams(&self, streams: usize) {
        self.streams.store(streams as u64, Ordering::Relaxed);
    }

    pub(crate) fn stream_refused(&self) {
        self.streams_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_malformed(&self) {
        self.stream_messages_malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_dropped(&self) {
        self.stream_frames_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_out(&self, frames: u64) {
        self.stream_frames_out.fetch_add(frames, Ordering::Relaxed);
    }

    pub(crate) fn stream_in(&self) {
        self.stream_frames_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn call_refused_full(&self) {
        self.calls_refused_full.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_calls_refused_overload(&self, total: u64) {
        self.calls_refused_overload.store(total, Ordering::Relaxed);
    }

    pub(crate) fn set_overload(&self, code: u64) {
        self.overload.store(code, Ordering::Relaxed);
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn set_transactions(&self, t: precall_sip::Transactions) {
        self.sip_transactions_live.store(t.live as u64, Ordering::Relaxed);
        self.sip_transactions_absorbed.store(t.absorbed as u64, Ordering::Relaxed);
        self.sip_absorbed_bytes.store(t.absorbed_bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_end_reports_pending(&self, pending: usize) {
        self.end_reports_pending.store(pending as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, shard: usize) -> ShardHealth {
        ShardHealth {
            shard,
            alive: self.alive.load(Ordering::Acquire),
            active_calls: self.active_calls.load(Ordering::Relaxed),
            datagrams_in: self.datagrams_in.load(Ordering::Relaxed),
            datagrams_forwarded: self.datagrams_forwarded.load(Ordering::Relaxed),
            datagrams_dropped: self.datagrams_dropped.load(Ordering::Relaxed),
            rtp_packets_out: self.rtp_packets_out.load(Ordering::Relaxed),
            rtp_packets_in: self.rtp_packets_in.load(Ordering::Relaxed),
            rtp_packets_rejected: self.rtp_packets_rejected.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
            agent_legs: self.agent_legs.load(Ordering::Relaxed),
            agent_messages_in: self.agent_messages_in.load(Ordering::Relaxed),
            agent_messages_out: self.agent_messages_out.load(Ordering::Relaxed),
            agent_messages_dropped: self.agent_messages_dropped.load(Ordering::Relaxed),
            agent_messages_ignored: self.agent_messages_ignored.load(Ordering::Relaxed),
            agent_audio_overflow_bytes: self.agent_audio_overflow_bytes.load(Ordering::Relaxed),
            latency_to_agent: self.latency_to_agent.snapshot(),
            send_lateness: self.send_lateness.snapshot(),
            latency_to_caller: self.latency_to_caller.snapshot(),
            latency_first_audio: self.latency_first_audio.snapshot(),
            added_to_agent: self.added_to_agent.snapshot(),
            added_to_caller: self.added_to_caller.snapshot(),
            streams: self.streams.load(Ordering::Relaxed),
            streams_refused: self.streams_refused.load(Ordering::Relaxed),
            stream_messages_malformed: self.stream_messages_malformed.load(Ordering::Relaxed),
            stream_frames_dropped: self.stream_frames_dropped.load(Ordering::Relaxed),
            stream_frames_out: self.stream_frames_out.load(Ordering::Relaxed),
            stream_frames_in: self.stream_frames_in.load(Ordering::Relaxed),
            calls_refused_full: self.calls_refused_full.load(Ordering::Relaxed),
            calls_refused_overload: self.calls_refused_overload.load(Ordering::Relaxed),
            overload: self.overload.load(Ordering::Relaxed),
            draining: self.draining.load(Ordering::Acquire),
            end_reports_pending: self.end_reports_pending.load(Ordering::Relaxed),
            sip_transactions_live: self.sip_transactions_live.load(Ordering::Relaxed),
            sip_transactions_absorbed: self.sip_transactions_absorbed.load(Ordering::Relaxed),
            sip_absorbed_bytes: self.sip_absorbed_bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_sample_lands_in_the_first_bucket_whose_bound_holds_it() {
        let h = PacingHistogram::default();
        for us in [0, 50, 51, 999, 1_000, 50_000, 50_001, 10_000_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        // ≤ 50 µs: 0 and 50; ≤ 100: 51; ≤ 1 ms: 999 and 1,000; ≤ 50 ms: 50,000; the rest: 2.
        assert_eq!(s.counts, [2, 1, 0, 0, 2, 0, 0, 0, 0, 1, 2]);
        assert_eq!(s.sum_us, 50 + 51 + 999 + 1_000 + 50_000 + 50_001 + 10_000_000);
        let l = LatencyHistogram::default();
        l.record(Duration::from_millis(3));
        assert_eq!(l.snapshot().counts[2], 1, "3 ms is within the 5 ms bound");
    }
}
