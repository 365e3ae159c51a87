//! One shard: what it owns and its run loop. Everything here lives on the shard's executor
//! thread; only [`ShardStats`] and the inboxes cross threads.
//!
//! # Tasks
//! * the **loop** (this file's [`serve`]): awaits the inbox *or* the next deadline (SIP
//!   timers, the media clock, per-call timers) *or* a local nudge, then runs everything due.
//!   Awaiting the inbox is safe to abandon (it only registers a waker), so racing it against a
//!   timer loses nothing;
//! * the **SIP receive task**: awaits a datagram on the SIP socket, then takes what is queued
//!   with `recvmmsg`, each datagram with its kernel arrival time. A datagram whose Call-ID
//!   another shard owns is forwarded to that shard's inbox; the others go to this shard's
//!   `Endpoint` at once. Then it nudges the loop, whose deadlines may have moved;
//! * no task for RTP: the loop drains each answered call's RTP socket at the call's media-clock
//!   tick, after its frame is sent (`drain_rtp`), and hands each packet to the call's flow
//!   (symmetric RTP latch, caller audio to the agent, DTMF);
//! * one **agent leg task per bridged call** (`agent_leg.rs`): the WebSocket to the agent; each
//!   frame goes to the call's flow at once, the flow's messages go out through a bounded
//!   outbox.
//!
//! The rules of a call live in its `precall_call::CallFlow`; this file performs the flows'
//! actions (answer, reject, BYE, status checks, agent legs, call events), keeps one heap of
//! their deadlines, and on every media clock tick sends the frame each flow lends.
//!
//! Socket receives live in their own tasks, never in a `select`, because dropping glommio's
//! in-flight `recv_from` cancels an io_uring request whose datagram may already be taken.
//! All sends are synchronous (`sendmsg` with `MSG_DONTWAIT`, see `socket.rs`), so the shard's
//! state (`Rc<RefCell<Core>>`) is never borrowed across an `.await`.

use std::{
    cell::{Cell, RefCell},
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    future::poll_fn,
    io::IoSlice,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    pin::pin,
    rc::{Rc, Weak},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use futures_rustls::rustls;
use glommio::net::{TcpListener, UdpSocket};
use precall_api::{CallContext, CallId, CallStatus, MediaEventKind, Protocol, StreamStart};
use precall_call::{
    Action, AgentTarget, CallFlow, CallInfo, FlowConfig, Phase, refusal,
    twilio::{self, StreamStartInfo},
};
use precall_media::{
    Codec, Due, FRAME_DURATION, MediaClock, RtpPacket, RtpSender, RtpTimestamp, SeqNo, Ssrc,
    TelephoneEvent,
};
use precall_sip::{CallHandle, Direction, EndReason, Endpoint, Event, SdpOffer, SipConfig};
use socket2::Socket;

use crate::{
    EngineError, MediaStreamsConfig, SendError, ShardMsg,
    admission::{self, Admission, Overload},
    agent_leg::{self, AgentInput, Outbox},
    call::{AgentLeg, Call, CallKey, CallMedia, PortPool, RtpLatch, RtpSource, StreamLeg},
    control::{PlanReply, ShardControl},
    health::ShardStats,
    ids::RandomIds,
    inbox::{ForwardedDatagram, Inbox, InboxSender, PlanDelivery, PlanKind, StreamRelease},
    routing::shard_for_call_id,
    socket::{self, UdpPair},
    stream_leg::{self, StreamAuth, StreamInput},
};

/// `recvmmsg` calls one drain of a call's RTP socket makes at most (of `socket::RECV_BATCH`
/// datagrams each): a caller sends one packet per 20 ms.
const RTP_DRAIN_BATCHES: usize = 4;

/// Admission changes are logged at most this often per shard.
const OVERLOAD_LOG_EVERY: Duration = Duration::from_secs(1);

/// A call-end report the control plane's queue had no room for is tried again this much later.
const REPORT_RETRY: Duration = Duration::from_millis(20);

/// Pause after a failed receive, so a socket that keeps failing cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// How long a stopping shard parks so that glommio submits the cancellation of its pending
/// receives (see [`serve`]); any non-zero pause makes the executor enter the kernel.
const CANCEL_SUBMIT_PAUSE: Duration = Duration::from_micros(100);

/// SO_SNDBUF of each media stream connection (the kernel doubles it): about 2 s of outbound
/// media messages, then the connection's queue fills and its frames are dropped and counted.
const STREAM_SEND_BUFFER: usize = 16 * 1024;

/// A media message for Twilio: about 60 bytes of JSON around 216 of base64.
const STREAM_MESSAGE_BYTES: usize = 320;

/// How long a stopping shard lets its media streams send their close frames.
const STREAM_CLOSE_PAUSE: Duration = Duration::from_millis(200);

/// Longest a stream waits for its outcome to be recorded before it closes anyway (Twilio asks
/// the poll URL as soon as it closes; see [`ShardControl::stream_closed`]).
const STREAM_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a shard says once, right after it starts (or fails to).
#[derive(Debug)]
pub(crate) enum StartReport {
    /// Running; the SIP socket's and the media streams listener's local addresses, when
    /// there are.
    Started(Option<SocketAddr>, Option<SocketAddr>),
    /// Could not start; the shard's thread is ending.
    Failed(EngineError),
    /// The shard's future was dropped without running or panicked before reporting (glommio
    /// could not create the executor, for one): join the thread to learn why.
    Vanished,
}

/// Sends the shard's [`StartReport`] exactly once: [`StartReport::Vanished`] if dropped unsent.
#[derive(Debug)]
pub(crate) struct Reporter {
    shard: usize,
    tx: Option<Sender<(usize, StartReport)>>,
}

impl Reporter {
    pub(crate) fn new(shard: usize, tx: Sender<(usize, StartReport)>) -> Self {
        Self { shard, tx: Some(tx) }
    }

    fn report(&mut self, report: StartReport) {
        if let Some(tx) = self.tx.take() {
            // The engine waits for every report; if it is gone, nobody needs this one.
            let _ = tx.send((self.shard, report));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.report(StartReport::Vanished);
    }
}

/// The call settings every shard gets a copy of.
#[derive(Debug, Clone)]
pub(crate) struct CallSettings {
    pub(crate) advertised_ip: Option<IpAddr>,
    /// `SIP_TRUSTED_CIDRS`.
    pub(crate) sip_trusted: Vec<precall_sip::Cidr>,
    /// `SIP_FORCE_RPORT`.
    pub(crate) sip_force_rport: bool,
    /// `SIP_DIGEST_USERS`.
    pub(crate) sip_digest: Option<precall_sip::DigestConfig>,
    /// Every call flow's settings.
    pub(crate) flow: FlowConfig,
    /// For `wss://` agents.
    pub(crate) agent_tls: Option<Arc<rustls::ClientConfig>>,
    /// Strict RTP's source rule (`RTP_STRICT_SOURCE`): latch only the SDP or INVITE address.
    pub(crate) strict_rtp_source: bool,
    /// `SHARD_MAX_CALLS`: past it new calls get `503` (SIP) or a closed stream (Twilio).
    pub(crate) max_calls: usize,
    /// `ADMIT_CLOCK_LATE_MS` and `ADMIT_INBOX_DEPTH`: overload admission's limits.
    pub(crate) admission: admission::Limits,
    /// Shards of the node shedding load now (shared by all): probes answer for the node.
    pub(crate) overloaded_shards: Arc<AtomicUsize>,
}

/// Everything a shard needs, moved onto its thread.
pub(crate) struct ShardParams {
    pub(crate) index: usize,
    pub(crate) sip: Option<SocketAddr>,
    /// The Twilio Media Streams server, with the address to bind.
    pub(crate) media_streams: Option<MediaStreamsConfig>,
    pub(crate) recv_buffer_bytes: usize,
    pub(crate) rtp_ports: RangeInclusive<u16>,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) inbox: Inbox,
    /// Every shard's inbox, in shard order (this shard's included).
    pub(crate) peers: Vec<InboxSender>,
    pub(crate) control: Arc<dyn ShardControl>,
    pub(crate) settings: CallSettings,
    pub(crate) reporter: Reporter,
}

impl std::fmt::Debug for ShardParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardParams").field("index", &self.index).field("sip", &self.sip).finish()
    }
}

/// Marks the shard dead when its loop ends, however it ends (return or panic).
struct AliveGuard(Arc<ShardStats>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.set_alive(false);
    }
}

/// Wakes the loop from the shard's own tasks (same thread: no atomics needed).
#[derive(Debug, Default)]
struct Nudge {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Nudge {
    fn nudge(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn poll(&self, waker: &Waker) -> bool {
        if self.set.replace(false) {
            return true;
        }
        *self.waker.borrow_mut() = Some(waker.clone());
        false
    }
}

/// The shard's whole life: bind, report, serve until stopped. Runs as the executor's main future.
pub(crate) async fn run(params: ShardParams) {
    let ShardParams {
        index,
        sip,
        media_streams,
        recv_buffer_bytes,
        rtp_ports,
        stats,
        inbox,
        peers,
        control,
        settings,
        mut reporter,
    } = params;
    // Declared first so it drops last: by the time `alive` reads false, the inbox and the
    // sockets are gone.
    let _alive = AliveGuard(stats.clone());

    let sip = match sip.map(|addr| bind_sip(index, addr, recv_buffer_bytes)).transpose() {
        Ok(bound) => bound,
        Err(err) => {
            reporter.report(StartReport::Failed(err));
            return;
        }
    };
    let listener = match media_streams.as_ref().map(|m| bind_streams(index, m.addr)).transpose() {
        Ok(bound) => bound,
        Err(err) => {
            reporter.report(StartReport::Failed(err));
            return;
        }
    };
    let local = sip.as_ref().map(|p| p.local);
    let media_local = listener.as_ref().and_then(|l| l.local_addr().ok());
    let nudge = Rc::new(Nudge::default());
    let (sip_recv, sip_send, sip_local) = match sip {
        Some(UdpPair { recv, send, local }) => (Some(recv), Some(send), local),
        // SIP off: the endpoint exists but is never fed, so it never asks to send.
        None => (None, None, SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))),
    };
    let mut sip_cfg = SipConfig::new(sip_local);
    sip_cfg.advertised_ip = settings.advertised_ip;
    sip_cfg.trusted = settings.sip_trusted.clone();
    sip_cfg.force_rport = settings.sip_force_rport;
    sip_cfg.digest = settings.sip_digest.clone();
    let settings_admission = settings.admission;
    let core = Rc::new_cyclic(|this| {
        RefCell::new(Core {
            index,
            endpoint: Endpoint::new(sip_cfg, RandomIds::new(index)),
            ids: RandomIds::new(index + 1_000),
            sip_send,
            sip_ip: sip_local.ip(),
            me: peers[index].clone(),
            control,
            settings,
            stats: stats.clone(),
            calls: HashMap::new(),
            clock: MediaClock::new(FRAME_DURATION, Instant::now()),
            streams: HashMap::new(),
            due: Vec::new(),
            timers: BinaryHeap::new(),
            ports: PortPool::new(rtp_ports.clone(), RandomIds::new(index + 2_000).next_u64()),
            pacing_count: 0,
            this: this.clone(),
            nudge: nudge.clone(),
            closed_agents: Vec::new(),
            next_stream: 0,
            unreported: VecDeque::new(),
            report_retry_at: None,
            admission: Admission::new(settings_admission, Box::new(admission::thread_cpu_time)),
            inbox_depth: 0,
            setup_waiting: 0,
            sip_queue_percent: 0,
            overload_changes: 0,
            overload_logged_at: None,
            rtp_batch: Some(Box::new(socket::RtpBatch::new(socket::RECV_DATAGRAM))),
            phase_calls: Vec::new(),
            overload: None,
        })
    });
    let receiver = sip_recv.map(|recv| {
        glommio::spawn_local(receive_sip(index, Rc::new(recv), peers, core.clone(), nudge.clone()))
    });
    let acceptor = listener.zip(media_streams).map(|(listener, cfg)| {
        let auth = Rc::new(StreamAuth {
            validator: cfg.auth_token.as_deref().map(precall_twilio::RequestValidator::new),
            skip_signature: cfg.skip_signature,
            public_url: cfg.public_url.clone(),
        });
        glommio::spawn_local(stream_leg::accept(
            index,
            listener,
            auth,
            stats.clone(),
            stream_opener(&core, &nudge),
        ))
    });
    stats.set_alive(true);
    reporter.report(StartReport::Started(local, media_local));
    tracing::debug!(shard = index, ?rtp_ports, ?media_local, "shard started");

    serve(&inbox, &core, &nudge).await;

    for task in [receiver, acceptor].into_iter().flatten() {
        // Dropping the task's future cancels its pending io_uring receive, but glommio only
        // queues that cancellation: one trip through the reactor submits it, so the kernel
        // drops the ring's reference to the socket now rather than asynchronously after the
        // ring closes (which left the port busy for a moment after `shutdown` in about 1 run
        // in 6).
        task.cancel().await;
    }
    let streams = {
        let mut core = core.borrow_mut();
        // Sends the BYEs, closes the media streams, and drops every call's RTP receive task,
        // agent leg and sockets (same cancellation as above).
        let streams = core.hang_up_all(Instant::now());
        core.closed_agents.clear();
        streams
    };
    let pause = if streams > 0 { STREAM_CLOSE_PAUSE } else { CANCEL_SUBMIT_PAUSE };
    glommio::timer::sleep(pause).await;
    drop(inbox);
    tracing::debug!(shard = index, "shard stopped");
}

/// The callback factory the media streams listener calls for each connection: each gets a
/// key of its own, and its inputs go to the core.
fn stream_opener(core: &Rc<RefCell<Core>>, nudge: &Rc<Nudge>) -> stream_leg::Open {
    let this = Rc::downgrade(core);
    let nudge = nudge.clone();
    Rc::new(move |outbox: Rc<Outbox>, peer: SocketAddr| {
        let key = match this.upgrade() {
            Some(core) => core.borrow_mut().next_stream_key(),
            None => CallKey::Stream(u64::MAX),
        };
        let this = this.clone();
        let nudge = nudge.clone();
        Box::new(move |now: Instant, input: StreamInput<'_>| {
            if let Some(core) = this.upgrade() {
                if core.borrow_mut().on_stream(now, key, &outbox, peer, input) {
                    nudge.nudge();
                }
            }
        })
    })
}

fn bind_streams(shard: usize, addr: SocketAddr) -> Result<TcpListener, EngineError> {
    socket::bind_tcp_listener(addr, STREAM_SEND_BUFFER).map_err(|source| EngineError::Bind {
        shard,
        addr,
        source,
    })
}

fn bind_sip(
    shard: usize,
    addr: SocketAddr,
    recv_buffer_bytes: usize,
) -> Result<UdpPair, EngineError> {
    socket::bind_udp(addr, recv_buffer_bytes).map_err(|source| EngineError::Bind {
        shard,
        addr,
        source,
    })
}

/// The loop: one wait for "inbox, deadline or nudge", then everything due.
async fn serve(inbox: &Inbox, core: &Rc<RefCell<Core>>, nudge: &Nudge) {
    loop {
        let deadline = core.borrow().next_deadline();
        let now = Instant::now();
        let timer = deadline.filter(|d| *d > now).map(|d| glommio::timer::Timer::new(d - now));
        let due_now = deadline.is_some_and(|d| d <= now);
        let mut timer = pin!(timer);
        let msg = if due_now {
            None
        } else {
            poll_fn(|cx| {
                if let Poll::Ready(msg) = inbox.poll_next(cx) {
                    return Poll::Ready(Some(msg));
                }
                let other = if nudge.poll(cx.waker()) {
                    Poll::Ready(None)
                } else {
                    match timer.as_mut().as_pin_mut() {
                        Some(t) => std::future::Future::poll(t, cx).map(|_| None),
                        None => Poll::Pending,
                    }
                };
                if other.is_ready() {
                    // The loop goes on instead of parking: senders need not ring, so foreign
                    // wakes stay one per real park (`inbox::Doorbell::parked`).
                    inbox.not_parking();
                }
                other
            })
            .await
        };
        match msg {
            Some(ShardMsg::Stop) => return,
            #[cfg(test)]
            Some(ShardMsg::PanicForTest) => panic!("shard panics as asked"),
            Some(other) => {
                let mut core = core.borrow_mut();
                core.inbox_depth = inbox.sip_depth();
                core.on_message(Instant::now(), other);
            }
            None => {}
        }
        core.borrow_mut().on_tick(Instant::now());
    }
}

/// Receives SIP datagrams until cancelled, routing each by Call-ID.
///
/// glommio only says when a datagram is queued (a one-byte `peek_from`: io_uring when the
/// queue is empty, a plain syscall when it is not); the datagrams are then taken with one
/// `recvmmsg` of up to [`socket::SIP_BATCH`] into buffers of the shard's, each with the
/// kernel's arrival time, so a busy socket costs a syscall per batch and no allocation per
/// datagram, and admission learns how long each one waited.
async fn receive_sip(
    shard: usize,
    socket: Rc<UdpSocket>,
    peers: Vec<InboxSender>,
    core: Rc<RefCell<Core>>,
    nudge: Rc<Nudge>,
) {
    let stats = core.borrow().stats.clone();
    let mut batch = socket::SipBatch::new(socket::SIP_DATAGRAM);
    let mut peek = [0u8; 1];
    let mut failures: u64 = 0;
    // Datagrams handled since the task last let the loop run.
    let mut since_yield = 0;
    loop {
        if let Err(err) = socket.peek_from(&mut peek).await {
            receive_failed(shard, &mut failures, err.into());
            glommio::timer::sleep(RECV_ERROR_BACKOFF).await;
            continue;
        }
        loop {
            let n = match batch.recv(&*socket) {
                Ok(n) => n,
                Err(err) => {
                    receive_failed(shard, &mut failures, err);
                    glommio::timer::sleep(RECV_ERROR_BACKOFF).await;
                    break;
                }
            };
            failures = 0;
            let (now, wall) = (Instant::now(), std::time::SystemTime::now());
            for i in 0..n {
                let Some((datagram, from)) = batch.get(i) else { continue };
                stats.datagram_in();
                let arrived = socket::arrival(now, wall, batch.arrived(i));
                // No Call-ID: handled here (the endpoint answers 400 or drops it).
                let owner = precall_sip::peek_call_id(datagram)
                    .map_or(shard, |id| shard_for_call_id(&id, peers.len()));
                if owner != shard {
                    let msg = ForwardedDatagram { from, data: datagram.into(), arrived };
                    match peers[owner].send(ShardMsg::Sip(msg)) {
                        Ok(()) => stats.datagram_forwarded(),
                        // A full inbox is overload: the sender retransmits (SIP over UDP).
                        Err(
                            SendError::Overloaded
                            | SendError::Stopped
                            | SendError::NoSuchShard { .. },
                        ) => stats.datagram_dropped(),
                    }
                    continue;
                }
                core.borrow_mut().on_sip(Instant::now(), from, datagram, arrived);
            }
            if n > 0 {
                nudge.nudge();
            }
            since_yield += n;
            if since_yield >= socket::SIP_BATCH {
                // A batch's worth: more may wait. How many is admission's socket reading (one
                // getsockopt per batch; the tick reads it when traffic stops), and the loop
                // (the media clock) runs before the next batch, so a flood cannot hold back RTP
                // pacing (a `peek_from` that finds a datagram queued returns without yielding).
                since_yield = 0;
                core.borrow_mut().read_sip_queue();
                futures_lite::future::yield_now().await;
            }
            if n < socket::SIP_BATCH {
                break;
            }
        }
    }
}

/// Counts a failed receive of the SIP socket, logging the 1st, 2nd, 4th, 8th… in a row.
fn receive_failed(shard: usize, failures: &mut u64, err: std::io::Error) {
    *failures += 1;
    if failures.is_power_of_two() {
        tracing::warn!(shard, failures = *failures, error = %err, "SIP socket receive failed");
    }
}

/// The shard's SIP endpoint, calls and media: everything the tasks share. The call rules live
/// in each call's [`CallFlow`]; this moves bytes and time between them and the sockets.
struct Core {
    index: usize,
    endpoint: Endpoint<RandomIds>,
    /// SSRC, first sequence numbers and timestamps (RFC 3550 §5.1: random).
    ids: RandomIds,
    /// `None` when SIP is off.
    sip_send: Option<Socket>,
    sip_ip: IpAddr,
    me: InboxSender,
    control: Arc<dyn ShardControl>,
    settings: CallSettings,
    stats: Arc<ShardStats>,
    calls: HashMap<CallKey, Call>,
    clock: MediaClock,
    streams: HashMap<precall_media::StreamSlot, CallKey>,
    /// Reused for every media clock wake-up (no allocation per tick).
    due: Vec<Due>,
    /// Each call's next flow deadline; an entry is stale unless it equals the call's `armed`.
    timers: BinaryHeap<Reverse<(Instant, CallKey)>>,
    ports: PortPool,
    /// RTP frames sent, for sampling their send lateness.
    pacing_count: u32,
    /// This core, for the tasks it spawns (RTP receive, agent legs).
    this: Weak<RefCell<Core>>,
    nudge: Rc<Nudge>,
    /// Agent legs whose flow let go, dropped (cancelled) on the next loop turn rather than
    /// from inside their own task.
    closed_agents: Vec<AgentLeg>,
    next_stream: u64,
    /// Call-end reports the control plane's queue refused (full), in order; retried at
    /// `report_retry_at` until taken. Never dropped: the record would stay `holding` forever.
    unreported: VecDeque<(CallId, String)>,
    report_retry_at: Option<Instant>,
    /// Overload admission, fed by the media clock and the inbox.
    admission: Admission,
    /// Datagrams waiting on the SIP lane of this shard's inbox, as last seen by the loop.
    inbox_depth: usize,
    /// SIP calls whose inbound request is with the control plane (no plan back yet).
    setup_waiting: usize,
    /// How full the SIP socket's kernel receive queue was at its last reading, in percent.
    sip_queue_percent: u32,
    /// Admission changes since the last one logged, and when that was.
    overload_changes: u64,
    overload_logged_at: Option<Instant>,
    /// The buffers every call's RTP is drained into (`drain_rtp`; taken while in use).
    rtp_batch: Option<Box<socket::RtpBatch>>,
    /// The SIP calls of the media-clock phase being sent, drained after their frames are out.
    phase_calls: Vec<CallKey>,
    /// Why new calls are refused now (what the endpoint was last told).
    overload: Option<Overload>,
}

impl Core {
    fn next_stream_key(&mut self) -> CallKey {
        self.next_stream += 1;
        CallKey::Stream(self.next_stream)
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.endpoint.poll_timeout(),
            self.clock.poll_timeout(),
            self.timers.peek().map(|Reverse((at, _))| *at),
            self.report_retry_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Takes a reading of the SIP socket's receive queue for admission.
    fn read_sip_queue(&mut self) {
        if let Some(send) = &self.sip_send {
            self.sip_queue_percent = socket::receive_queue_percent(send).unwrap_or(0);
        }
    }

    /// A SIP datagram the kernel received at `arrived`.
    fn on_sip(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], arrived: Instant) {
        self.admission.on_sip_lag(now, now.saturating_duration_since(arrived));
        self.admit(now);
        self.endpoint.handle_datagram(now, from, datagram);
        self.stats.set_calls_refused_overload(self.endpoint.overload_refusals());
        self.stats.set_transactions(self.endpoint.transactions());
        self.drain(now);
    }

    /// Tells the endpoint whether new calls and probes are refused now (overload admission),
    /// logging each change once.
    fn admit(&mut self, now: Instant) {
        let overload = self.admission.check(now, self.inbox_depth, self.sip_queue_percent);
        if overload != self.overload {
            self.overload_changes += 1;
            let shared = &self.settings.overloaded_shards;
            match (self.overload.is_some(), overload.is_some()) {
                (false, true) => shared.fetch_add(1, Ordering::AcqRel),
                (true, false) => shared.fetch_sub(1, Ordering::AcqRel),
                _ => 0,
            };
            self.overload = overload;
            self.stats.set_overload(Overload::code(overload));
        }
        // The queue readings can change many times a second at the edge of capacity: the state
        // is logged when it changed, a line a second at most, with how many changes it sums up
        // (so the last line always tells the state the shard is in).
        if self.overload_changes > 0
            && self.overload_logged_at.is_none_or(|at| now >= at + OVERLOAD_LOG_EVERY)
        {
            let changes = std::mem::take(&mut self.overload_changes);
            self.overload_logged_at = Some(now);
            match self.overload {
                Some(why) => tracing::warn!(
                    shard = self.index,
                    reason = why.label(),
                    calls = self.calls.len(),
                    inbox = self.inbox_depth,
                    socket_queue_percent = self.sip_queue_percent,
                    changes,
                    "overloaded: new calls get 503 until the shard has headroom again"
                ),
                None => {
                    tracing::info!(
                        shard = self.index,
                        changes,
                        "headroom again: admitting new calls"
                    )
                }
            }
        }
        // The setup queue is read for each INVITE, not held for a window (and not logged: it
        // fills and empties many times a second at the node's capacity; the refusals count).
        let setup_full = admission::setup_full(&self.settings.admission, self.setup_waiting);
        self.endpoint.set_overloaded(overload.is_some() || setup_full);
        let node = self.settings.overloaded_shards.load(Ordering::Acquire) > 0;
        self.endpoint.set_node_overloaded(node);
    }

    fn on_message(&mut self, now: Instant, msg: ShardMsg) {
        match msg {
            ShardMsg::Sip(d) => self.on_sip(now, d.from, &d.data, d.arrived),
            ShardMsg::Plan(p) => {
                self.on_plan(now, *p);
                self.drain(now);
            }
            ShardMsg::Drain => {
                tracing::info!(
                    shard = self.index,
                    calls = self.calls.len(),
                    "draining: no new calls"
                );
                self.endpoint.set_draining(true);
                // Seen by /health only now that the endpoint refuses.
                self.stats.set_draining();
            }
            ShardMsg::Recheck(ids) => {
                let ids: std::collections::HashSet<&CallId> = ids.iter().collect();
                let keys: Vec<CallKey> = self
                    .calls
                    .iter()
                    .filter(|(_, c)| ids.contains(c.flow.call_id()))
                    .map(|(k, _)| *k)
                    .collect();
                for key in keys {
                    if let Some(call) = self.calls.get_mut(&key) {
                        call.flow.handle_recheck(now);
                    }
                    self.after_flow(now, key);
                }
            }
            ShardMsg::Release(r) => {
                if let Some(leg) = self.calls.get(&r.call).and_then(|c| c.stream.as_ref()) {
                    leg.outbox.close();
                }
            }
            _ => {}
        }
    }

    /// Runs every SIP timer, media frame and call timer that is due.
    fn on_tick(&mut self, now: Instant) {
        self.closed_agents.clear();
        // Admission's state follows the clock even when no SIP arrives (the gauge, and the
        // node-wide probe answer); a socket that was full is read again here, since a burst
        // of the receive loop may not come.
        if self.sip_queue_percent > 0 {
            self.read_sip_queue();
        }
        self.admit(now);
        if self.report_retry_at.is_some_and(|at| at <= now) {
            self.retry_reports(now);
        }
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
            self.stats.set_transactions(self.endpoint.transactions());
        }
        self.send_media(now);
        while let Some(&Reverse((at, handle))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(call) = self.calls.get_mut(&handle) else { continue };
            if call.armed != Some(at) {
                continue;
            }
            call.armed = None;
            // A deadline may need the caller's latest audio (the next chunk for the agent) or
            // silence (the RTP timeout): take what the socket holds first.
            self.drain_rtp(now, handle);
            let Some(call) = self.calls.get_mut(&handle) else { continue };
            call.flow.handle_timeout(now);
            self.after_flow(now, handle);
            self.stats.set_active_calls(self.calls.len());
        }
        self.drain(now);
    }

    /// Sends what the endpoint wants sent and acts on its events, until both are empty.
    fn drain(&mut self, now: Instant) {
        loop {
            let mut idle = true;
            while let Some(t) = self.endpoint.poll_transmit() {
                idle = false;
                let Some(send) = &self.sip_send else { continue };
                if socket::send_parts(send, &[IoSlice::new(&t.payload)], t.dest).is_err() {
                    self.stats.send_error();
                }
            }
            while let Some(event) = self.endpoint.poll_event() {
                idle = false;
                self.on_event(now, event);
            }
            if idle {
                break;
            }
        }
        self.stats.set_active_calls(self.calls.len());
    }

    fn on_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::IncomingCall { call, call_id, from_user, to_user, source, offer } => {
                self.on_incoming(now, call, call_id, from_user, to_user, source, offer.as_ref())
            }
            Event::CallConfirmed { call } => {
                // The caller has our 200 (its ACK, or a re-INVITE): the greeting starts now,
                // not at the 200. A caller whose 200 was lost and resent hears it from its
                // start, and a call whose ACK and BYE come together (a caller that hangs up
                // at once, or one the node is slow to read past its capacity) sends no RTP:
                // at 18,000 calls/s asked, greeting RTP to calls whose BYE was queued was
                // 18 % of the shards' CPU (docs/PERFORMANCE.md).
                let key = CallKey::Sip(call);
                let Some(c) = self.calls.get_mut(&key) else { return };
                let Some(m) = c.media.as_ref() else { return };
                c.flow.handle_answered(now, m.codec);
                c.flow.handle_caller_hold(now, m.caller_holds);
                self.after_flow(now, key);
            }
            Event::MediaChanged { call, media } => {
                let call = CallKey::Sip(call);
                let Some(c) = self.calls.get_mut(&call) else { return };
                if let Some(m) = c.media.as_mut() {
                    m.remote = media.remote_rtp;
                    // A new address (re-INVITE): learn the source again.
                    m.latch.media_changed(media.remote_rtp);
                    m.payload_type = media.payload_type;
                    m.codec = media_codec(media.codec);
                    m.telephone_event = media.telephone_event;
                    m.sending = can_send(media.direction, media.remote_rtp);
                    m.caller_holds = caller_holds(media.direction, media.remote_rtp);
                    c.flow.handle_caller_hold(now, m.caller_holds);
                    c.flow.handle_media_changed(m.codec);
                }
                self.after_flow(now, call);
            }
            Event::CallEnded { call, reason } => self.on_ended(now, call, reason),
            Event::Dropped { reason } => {
                tracing::debug!(shard = self.index, %reason, "SIP datagram dropped");
                self.stats.datagram_dropped();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_incoming(
        &mut self,
        now: Instant,
        handle: CallHandle,
        call_id: String,
        from_user: String,
        to_user: String,
        source: SocketAddr,
        offer: Option<&SdpOffer>,
    ) {
        // Refuse what cannot be answered before the controller records a call for it.
        if offer.is_some_and(|o| !o.has_g711_audio()) {
            self.endpoint.reject(now, handle, 488, "Not Acceptable Here");
            return;
        }
        if self.calls.len() >= self.settings.max_calls || self.ports.free_pairs() == 0 {
            // Full (calls, or every RTP port taken): `503` + Retry-After, no record, no
            // control-plane work.
            self.stats.call_refused_full();
            self.endpoint.reject(now, handle, 503, "Service Unavailable");
            return;
        }
        let call_id = CallId::from(call_id);
        let info = CallInfo {
            call_id: call_id.clone(),
            caller: from_user.clone(),
            dialed: to_user.clone(),
            protocol: Protocol::Sip,
        };
        let ctx = CallContext {
            call_id: call_id.clone(),
            session_id: String::new(),
            caller_number: from_user,
            recipient_number: to_user,
            status: CallStatus::Ringing,
            protocol: Protocol::Sip,
        };
        let key = CallKey::Sip(handle);
        let reply = self.reply_for(key, call_id.clone(), PlanKind::Inbound);
        match self.control.inbound(ctx, reply) {
            Ok(()) => {
                self.setup_waiting += 1;
                let flow = CallFlow::new(now, info, self.settings.flow.clone());
                let call =
                    Call { flow, source, media: None, stream: None, agent: None, armed: None };
                self.calls.insert(key, call);
                self.after_flow(now, key);
            }
            Err(e) => {
                tracing::warn!(shard = self.index, call_id = %call_id, error = %e, "control plane refused the call");
                let (code, reason) = refusal(&e);
                self.endpoint.reject(now, handle, code, reason);
            }
        }
    }

    /// The callback that brings a plan back to this shard's inbox (runs on the control thread).
    fn reply_for(&self, call: CallKey, call_id: CallId, kind: PlanKind) -> PlanReply {
        let inbox = self.me.clone();
        Box::new(move |result| {
            let delivery = PlanDelivery { call, call_id, kind, result };
            if let Err(e) = inbox.send(ShardMsg::Plan(Box::new(delivery))) {
                // The call flow's own deadlines cover a lost plan (no plan: 500; a lost
                // status reply: asked again).
                tracing::warn!(error = %e, "could not deliver a plan to its shard");
            }
        })
    }

    fn on_plan(&mut self, now: Instant, p: PlanDelivery) {
        if p.kind == PlanKind::Inbound && matches!(p.call, CallKey::Sip(_)) {
            // Every inbound request gets exactly one reply (the side runtime enforces a
            // deadline), whether or not its call is still here.
            self.setup_waiting = self.setup_waiting.saturating_sub(1);
        }
        let Some(call) = self.calls.get_mut(&p.call) else {
            // The call ended while the controller was thinking (CANCEL, BYE): record the end
            // again, in case the first report overtook the inbound request.
            if p.kind == PlanKind::Inbound && matches!(p.call, CallKey::Sip(_)) {
                self.report_end(now, p.call_id, "canceled".to_owned());
            }
            return;
        };
        if let (CallKey::Stream(_), Err(e)) = (p.call, &p.result) {
            // Unknown call, a CallSid or account not the call's, or the control plane failing.
            self.stats.stream_refused();
            tracing::info!(shard = self.index, call_id = %p.call_id, error = %e, "media stream refused; closing it");
        }
        match p.kind {
            PlanKind::Inbound => call.flow.handle_plan(now, p.result),
            PlanKind::Status => call.flow.handle_status(now, p.result),
        }
        self.after_flow(now, p.call);
    }

    /// Performs what a call's flow asks for, then re-arms its deadline. Returns whether the
    /// call's deadline moved earlier (the loop must then recompute its wake-up).
    fn after_flow(&mut self, now: Instant, handle: CallKey) -> bool {
        loop {
            let Some(call) = self.calls.get_mut(&handle) else { return true };
            let Some(action) = call.flow.poll_action() else { break };
            self.perform(now, handle, action);
        }
        let Some(call) = self.calls.get_mut(&handle) else { return true };
        record_latencies(&self.stats, &mut call.flow, None);
        let next = call.flow.poll_timeout();
        if next == call.armed {
            return false;
        }
        let earlier = match (next, call.armed) {
            (Some(n), Some(a)) => n < a,
            (Some(_), None) => true,
            (None, _) => false,
        };
        call.armed = next;
        if let Some(at) = next {
            self.timers.push(Reverse((at, handle)));
        }
        earlier
    }

    fn perform(&mut self, now: Instant, handle: CallKey, action: Action) {
        match action {
            Action::Answer => self.answer(now, handle),
            Action::Reject { code, reason } => match handle {
                CallKey::Sip(h) => self.endpoint.reject(now, h, code, reason),
                // No plan for the stream: close it; Twilio asks the poll URL next.
                CallKey::Stream(_) => self.close_stream(handle),
            },
            Action::Hangup => self.hang_up(now, handle),
            Action::Mark(frames) => {
                let Some(call) = self.calls.get_mut(&handle) else { return };
                match &call.stream {
                    Some(leg) => {
                        let msg = twilio::mark_message(&leg.stream_sid, &twilio::mark_name(frames));
                        if !leg.outbox.push(msg) {
                            self.stats.stream_dropped();
                        }
                    }
                    // RTP: what was sent is what the caller hears.
                    None => call.flow.handle_heard(frames),
                }
            }
            Action::ClearLeg => {
                let Some(leg) = self.calls.get(&handle).and_then(|c| c.stream.as_ref()) else {
                    return;
                };
                if !leg.outbox.push(twilio::clear_message(&leg.stream_sid)) {
                    self.stats.stream_dropped();
                }
            }
            Action::CheckStatus => {
                let Some(call) = self.calls.get(&handle) else { return };
                let call_id = call.flow.call_id().clone();
                let reply = self.reply_for(handle, call_id.clone(), PlanKind::Status);
                if let Err(e) = self.control.check_status(call_id, reply) {
                    // The flow's status deadline asks again.
                    tracing::warn!(shard = self.index, error = %e, "status check not queued");
                }
            }
            Action::ConnectAgent(target) => self.connect_agent(handle, target),
            Action::SendAgent(msg) => {
                let Some(agent) = self.calls.get(&handle).and_then(|c| c.agent.as_ref()) else {
                    return;
                };
                if agent.outbox.push(msg) {
                    self.stats.agent_out();
                } else {
                    self.stats.agent_dropped();
                }
            }
            Action::CloseAgent => {
                if let Some(leg) = self.calls.get_mut(&handle).and_then(|c| c.agent.take()) {
                    self.close_agent(leg);
                }
            }
            Action::Record(kind, detail) => {
                let Some(call) = self.calls.get(&handle) else { return };
                let call_id = call.flow.call_id().clone();
                match kind {
                    MediaEventKind::AgentFailed => {
                        tracing::warn!(shard = self.index, call_id = %call_id, %detail, "agent leg failed");
                    }
                    MediaEventKind::AgentConnected => {
                        tracing::info!(shard = self.index, call_id = %call_id, %detail, "agent conversation started");
                    }
                    _ => {}
                }
                if let Err(e) = self.control.call_event(call_id, kind, detail) {
                    tracing::warn!(shard = self.index, error = %e, "could not record a call event");
                }
            }
        }
    }

    /// Lets an agent leg go: a graceful close (1000) when it is open, else a cancel.
    fn close_agent(&mut self, leg: AgentLeg) {
        if leg.open {
            leg.outbox.close();
            leg.task.detach();
        } else {
            self.closed_agents.push(leg);
        }
        self.update_agent_gauge();
    }

    fn update_agent_gauge(&self) {
        self.stats.set_agent_legs(self.calls.values().filter(|c| c.agent.is_some()).count());
    }

    fn connect_agent(&mut self, handle: CallKey, target: AgentTarget) {
        let Some(call) = self.calls.get_mut(&handle) else { return };
        tracing::debug!(shard = self.index, call_id = %call.flow.call_id(), addr = %target.addr, tls = target.tls, "opening the agent leg");
        let outbox = Rc::new(Outbox::default());
        let this = self.this.clone();
        let nudge = self.nudge.clone();
        let deliver = move |now: Instant, input: AgentInput<'_>| {
            if let Some(core) = this.upgrade() {
                if core.borrow_mut().on_agent(now, handle, input) {
                    nudge.nudge();
                }
            }
        };
        let task = glommio::spawn_local(agent_leg::run(
            target,
            self.settings.agent_tls.clone(),
            outbox.clone(),
            deliver,
        ));
        call.agent = Some(AgentLeg { task, outbox, open: false });
        self.update_agent_gauge();
    }

    /// One happening of a call's agent leg. Returns whether the loop must look at its
    /// deadlines again.
    fn on_agent(&mut self, now: Instant, handle: CallKey, input: AgentInput<'_>) -> bool {
        let sip_before = self.endpoint.poll_timeout();
        let Some(call) = self.calls.get_mut(&handle) else { return false };
        if call.agent.is_none() {
            return false;
        }
        match input {
            AgentInput::Open => {
                if let Some(a) = call.agent.as_mut() {
                    a.open = true;
                }
                call.flow.handle_agent_open(now);
            }
            AgentInput::Text(text) => {
                self.stats.agent_in();
                call.flow.handle_agent_text(now, text);
            }
            AgentInput::Closed(code, why) => {
                // The socket is gone: nothing to close on our side.
                if let Some(leg) = call.agent.take() {
                    self.closed_agents.push(leg);
                }
                call.flow.handle_agent_closed(now, code, why);
            }
            AgentInput::Failed(e) => {
                if let Some(leg) = call.agent.take() {
                    self.closed_agents.push(leg);
                }
                call.flow.handle_agent_failed(now, e);
            }
        }
        let moved = self.after_flow(now, handle);
        // An ending may have queued SIP (a BYE, a final response).
        self.drain(now);
        moved || self.endpoint.poll_timeout() != sip_before
    }

    /// Answers the call: a stream joins the media clock; a SIP call binds its RTP port and
    /// answers with `200 OK`.
    fn answer(&mut self, now: Instant, key: CallKey) {
        let handle = match key {
            CallKey::Sip(h) => h,
            CallKey::Stream(_) => {
                let slot = self.clock.add_stream(now);
                let Some(call) = self.calls.get_mut(&key) else { return };
                let Some(leg) = call.stream.as_mut() else { return };
                leg.slot = Some(slot);
                self.streams.insert(slot, key);
                // Media Streams audio is always µ-law 8 kHz.
                call.flow.handle_answered(now, Codec::Pcmu);
                return;
            }
        };
        let Some(call) = self.calls.get(&key) else { return };
        let ip = self.rtp_ip(call.source);
        let (port, rtp) = match self.ports.bind(ip) {
            Ok(bound) => bound,
            Err(e) => {
                tracing::warn!(shard = self.index, error = %e, "no RTP port for a call");
                if let Some(call) = self.calls.get_mut(&key) {
                    call.flow.handle_answer_failed(precall_call::reason::NO_RTP_PORT);
                }
                self.endpoint.reject(now, handle, 503, "Service Unavailable");
                return;
            }
        };
        let params = match self.endpoint.accept(now, handle, rtp.local) {
            Ok(params) => params,
            Err(e) => {
                // NotAcceptable: 488 went out and CallEnded follows. The others mean the call
                // is already over.
                tracing::debug!(shard = self.index, error = %e, "call not answered");
                self.ports.release(port);
                return;
            }
        };
        let random = self.ids.next_u64();
        let sender = RtpSender::new(
            Ssrc(random as u32),
            SeqNo((random >> 32) as u16),
            RtpTimestamp((random >> 16) as u32),
        );
        let slot = self.clock.add_stream(now);
        self.streams.insert(slot, key);
        let Some(call) = self.calls.get_mut(&key) else { return };
        let source_ip = call.source.ip();
        let codec = media_codec(params.codec);
        call.media = Some(CallMedia {
            port,
            socket: rtp.socket,
            remote: params.remote_rtp,
            latch: RtpLatch::new(params.remote_rtp, source_ip, self.settings.strict_rtp_source),
            codec,
            payload_type: params.payload_type,
            telephone_event: params.telephone_event,
            last_dtmf: None,
            sending: can_send(params.direction, params.remote_rtp),
            caller_holds: caller_holds(params.direction, params.remote_rtp),
            sender,
            slot,
        });
        // The flow hears it is answered when the caller confirms (`Event::CallConfirmed`).
    }

    /// Takes the caller RTP queued on a SIP call's socket, at the call's media-clock tick
    /// (every 20 ms) and before its flow's deadlines run: no task, wake-up, io_uring operation
    /// or allocation per packet, one `recvmmsg` per call and tick (docs/PERFORMANCE.md). A
    /// packet waits at most one tick in the kernel: the agent gets caller audio in 40 ms
    /// chunks, and RTP timeouts and DTMF are far coarser.
    fn drain_rtp(&mut self, now: Instant, handle: CallKey) {
        let Some(mut batch) = self.rtp_batch.take() else { return };
        // A few batches at most: a flood on one port waits in (and overflows) its own socket
        // buffer instead of holding the shard.
        for _ in 0..RTP_DRAIN_BATCHES {
            let Some(media) = self.calls.get(&handle).and_then(|c| c.media.as_ref()) else {
                break;
            };
            // An error (none is expected of an unconnected UDP socket) reads as an empty queue:
            // the next tick tries again.
            let n = batch.recv(&media.socket).unwrap_or(0);
            for i in 0..n {
                if let Some((datagram, from)) = batch.get(i) {
                    self.on_rtp(now, handle, from, datagram);
                }
            }
            if n < socket::RECV_BATCH {
                break;
            }
        }
        self.rtp_batch = Some(batch);
    }

    /// One caller RTP datagram. Returns whether the loop must look at its deadlines again
    /// (rare: most packets only feed the flow).
    fn on_rtp(&mut self, now: Instant, handle: CallKey, from: SocketAddr, datagram: &[u8]) -> bool {
        let Ok(packet) = RtpPacket::new_checked(datagram) else { return false };
        self.stats.rtp_in();
        let sip_before = self.endpoint.poll_timeout();
        let Some(call) = self.calls.get_mut(&handle) else { return false };
        let Some(media) = call.media.as_mut() else { return false };
        if media.latch.on_packet(from, packet.ssrc().0) == RtpSource::Rejected {
            // Not the caller's stream (strict RTP): dropped, counted, and it does not keep the
            // call alive.
            self.stats.rtp_rejected();
            return false;
        }
        let pt = packet.payload_type();
        if pt == media.payload_type {
            call.flow.handle_rtp(now, packet.sequence().0, packet.payload());
        } else if Some(pt) == media.telephone_event {
            call.flow.handle_rtp_seen(now);
            if let Ok(ev) = TelephoneEvent::parse(packet.payload()) {
                let ts = packet.timestamp().0;
                if ev.end && media.last_dtmf != Some(ts) {
                    media.last_dtmf = Some(ts);
                    if let Some(digit) = ev.digit() {
                        call.flow.handle_dtmf(digit);
                    }
                }
            }
        } else {
            call.flow.handle_rtp_seen(now);
        }
        let moved = self.after_flow(now, handle);
        moved || self.endpoint.poll_timeout() != sip_before
    }

    /// Our RTP address: the SIP socket's, or, when that is a wildcard, the local address the
    /// kernel routes to the caller from (so SDP never announces 0.0.0.0, which means hold).
    fn rtp_ip(&self, caller: SocketAddr) -> IpAddr {
        if !self.sip_ip.is_unspecified() {
            return self.sip_ip;
        }
        let any = SocketAddr::new(self.sip_ip, 0);
        std::net::UdpSocket::bind(any)
            .and_then(|s| s.connect(caller).and_then(|()| s.local_addr()))
            .map_or(self.sip_ip, |a| a.ip())
    }

    /// Stops our media and sends BYE (the SIP layer waits for the ACK first if need be); a
    /// stream records its outcome, then closes (Twilio runs the TwiML after `</Connect>`).
    fn hang_up(&mut self, now: Instant, key: CallKey) {
        let Some(call) = self.calls.get_mut(&key) else { return };
        if let Some(media) = call.media.as_mut() {
            media.sending = false;
        }
        match key {
            CallKey::Sip(handle) => self.endpoint.hangup(now, handle),
            CallKey::Stream(_) => self.release_stream(key),
        }
    }

    /// Records a stream call's outcome and closes the stream once it is stored (or after
    /// [`STREAM_RELEASE_TIMEOUT`]). The call itself goes when the connection is gone.
    fn release_stream(&mut self, key: CallKey) {
        let Some(call) = self.calls.get_mut(&key) else { return };
        let Some(leg) = call.stream.as_mut() else { return };
        if leg.closing {
            return;
        }
        leg.closing = true;
        if let Some(slot) = leg.slot.take() {
            self.clock.remove_stream(slot);
            self.streams.remove(&slot);
        }
        let outbox = leg.outbox.clone();
        let reason = call.flow.end_reason().unwrap_or(precall_call::reason::COMPLETED);
        let failed = reason != precall_call::reason::COMPLETED;
        let call_id = call.flow.call_id().clone();
        tracing::debug!(shard = self.index, call_id = %call_id, reason, "closing the media stream");
        let inbox = self.me.clone();
        let done: crate::control::Done = Box::new(move |result| {
            if let Err(e) = result {
                tracing::warn!(error = %e, "recording a stream's outcome failed");
            }
            // A full inbox: the release timer closes the stream instead.
            let _ = inbox.send(ShardMsg::Release(StreamRelease { call: key }));
        });
        match self.control.stream_closed(call_id, reason.to_owned(), failed, done) {
            Ok(()) => {
                glommio::spawn_local(async move {
                    glommio::timer::sleep(STREAM_RELEASE_TIMEOUT).await;
                    outbox.close();
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!(shard = self.index, error = %e, "stream outcome not queued; closing");
                outbox.close();
            }
        }
    }

    fn close_stream(&mut self, key: CallKey) {
        let Some(call) = self.calls.get_mut(&key) else { return };
        if let Some(leg) = call.stream.as_mut() {
            leg.closing = true;
            leg.outbox.close();
        }
    }

    /// One happening of a media stream. Returns whether the loop must look at its deadlines
    /// again.
    fn on_stream(
        &mut self,
        now: Instant,
        key: CallKey,
        outbox: &Rc<Outbox>,
        peer: SocketAddr,
        input: StreamInput<'_>,
    ) -> bool {
        let sip_before = self.endpoint.poll_timeout();
        match input {
            StreamInput::Start(info) => self.on_stream_start(now, key, outbox, peer, info),
            StreamInput::Media(chunk, audio) => {
                self.stats.stream_in();
                let Some(call) = self.calls.get_mut(&key) else { return false };
                // TCP keeps the order; the chunk number stands in for the RTP sequence.
                call.flow.handle_rtp(now, chunk as u16, audio);
            }
            StreamInput::Mark(name) => {
                let Some(call) = self.calls.get_mut(&key) else { return false };
                if let Some(frames) = twilio::parse_mark_name(name) {
                    call.flow.handle_heard(frames);
                }
            }
            StreamInput::Dtmf(digit) => {
                let Some(call) = self.calls.get_mut(&key) else { return false };
                call.flow.handle_dtmf(digit);
            }
            StreamInput::Stop => {
                // The call is over on Twilio's side: record its end; the socket closes next.
                self.finish_stream(key, true);
                return false;
            }
            StreamInput::Gone => {
                self.finish_stream(key, false);
                return false;
            }
        }
        let moved = self.after_flow(now, key);
        moved || self.endpoint.poll_timeout() != sip_before
    }

    fn on_stream_start(
        &mut self,
        now: Instant,
        key: CallKey,
        outbox: &Rc<Outbox>,
        peer: SocketAddr,
        info: StreamStartInfo,
    ) {
        if self.calls.contains_key(&key) {
            return;
        }
        if self.calls.len() >= self.settings.max_calls {
            // Full: the stream closes and Twilio runs the TwiML after `</Connect>` (the poll
            // flow, on any node behind the webhook URL).
            self.stats.call_refused_full();
            outbox.close();
            return;
        }
        let call_id = CallId::from(info.call_id.clone());
        let start = StreamStart {
            call_id: call_id.clone(),
            call_sid: info.call_sid.clone(),
            account_sid: info.account_sid.clone(),
            greeting: info.greeting,
        };
        let reply = self.reply_for(key, call_id.clone(), PlanKind::Inbound);
        if let Err(e) = self.control.stream_start(start, reply) {
            tracing::warn!(shard = self.index, call_id = %call_id, error = %e, "control plane refused the stream");
            outbox.close();
            return;
        }
        tracing::debug!(shard = self.index, call_id = %call_id, stream = %info.stream_sid, "media stream started");
        let flow_info = CallInfo {
            call_id,
            caller: info.caller.clone(),
            dialed: info.dialed.clone(),
            protocol: Protocol::Twilio,
        };
        let flow = CallFlow::new(now, flow_info, self.settings.flow.clone());
        let stream = StreamLeg {
            stream_sid: info.stream_sid,
            outbox: outbox.clone(),
            slot: None,
            closing: false,
        };
        let call = Call {
            flow,
            source: peer,
            media: None,
            stream: Some(stream),
            agent: None,
            armed: None,
        };
        self.calls.insert(key, call);
        self.update_stream_gauge();
    }

    /// A stream call is over for the shard: Twilio's `stop` (`stopped`: the call ended, record
    /// it), or the socket gone. A socket gone without our close or a `stop` is a broken stream:
    /// the call goes on at Twilio (the poll flow), so its record is not ended.
    fn finish_stream(&mut self, key: CallKey, stopped: bool) {
        let Some(call) = self.calls.get(&key) else { return };
        let closing = call.stream.as_ref().is_some_and(|l| l.closing);
        let ended_by_us = closing || matches!(call.flow.phase(), Phase::HangingUp);
        let Some(call) = self.remove_call(key) else { return };
        let call_id = call.flow.call_id().clone();
        if stopped && !ended_by_us {
            tracing::debug!(shard = self.index, call_id = %call_id, "media stream stopped by Twilio");
            self.report_end(Instant::now(), call_id, "caller_hangup".to_owned());
        } else if !ended_by_us {
            tracing::info!(shard = self.index, call_id = %call_id, "media stream broke; Twilio falls back to polling");
            let detail = "the stream closed without Twilio's stop".to_owned();
            if let Err(e) = self.control.call_event(call_id, MediaEventKind::StreamLost, detail) {
                tracing::warn!(shard = self.index, error = %e, "could not record a call event");
            }
        }
        self.update_stream_gauge();
        self.stats.set_active_calls(self.calls.len());
    }

    fn update_stream_gauge(&self) {
        self.stats.set_streams(self.calls.values().filter(|c| c.stream.is_some()).count());
    }

    /// Takes a call out of the shard: its flow ended, its media clock stream, RTP port or
    /// media stream, and agent leg let go, its counters added to the shard's.
    fn remove_call(&mut self, key: CallKey) -> Option<Call> {
        let mut call = self.calls.remove(&key)?;
        call.flow.handle_leg_ended();
        while call.flow.poll_action().is_some() {}
        if let Some(media) = call.media.take() {
            self.clock.remove_stream(media.slot);
            self.streams.remove(&media.slot);
            self.ports.release(media.port);
            // Dropping `media` drops the receive task (cancelling its receive) and the sockets.
        }
        if let Some(leg) = call.stream.take() {
            if let Some(slot) = leg.slot {
                self.clock.remove_stream(slot);
                self.streams.remove(&slot);
            }
            leg.outbox.close();
        }
        if let Some(leg) = call.agent.take() {
            self.close_agent(leg);
        }
        let stats = call.flow.stats();
        self.stats.agent_call_done(
            stats.agent_unknown + stats.agent_malformed,
            stats.agent_overflow_bytes,
        );
        Some(call)
    }

    /// Records the end of a call with the control plane. A full queue keeps the report (and
    /// every later one, to keep their order) for [`Self::retry_reports`].
    fn report_end(&mut self, now: Instant, call_id: CallId, reason: String) {
        if self.unreported.is_empty() {
            match self.control.call_ended(call_id.clone(), reason.clone()) {
                Ok(()) => return,
                Err(precall_api::ControlError::Overloaded) => {}
                Err(e) => {
                    // Stopped: the process is going away; nothing can take it any more.
                    tracing::warn!(shard = self.index, call_id = %call_id, error = %e, "could not record the end of a call");
                    return;
                }
            }
        }
        self.unreported.push_back((call_id, reason));
        self.report_retry_at.get_or_insert(now + REPORT_RETRY);
        self.stats.set_end_reports_pending(self.unreported.len());
    }

    /// Hands the kept call-end reports over, oldest first, until the queue is full again.
    fn retry_reports(&mut self, now: Instant) {
        self.report_retry_at = None;
        while let Some((call_id, reason)) = self.unreported.front().cloned() {
            match self.control.call_ended(call_id, reason) {
                Err(precall_api::ControlError::Overloaded) => {
                    self.report_retry_at = Some(now + REPORT_RETRY);
                    break;
                }
                Ok(()) | Err(_) => {
                    self.unreported.pop_front();
                }
            }
        }
        self.stats.set_end_reports_pending(self.unreported.len());
    }

    fn on_ended(&mut self, now: Instant, handle: CallHandle, reason: EndReason) {
        let Some(call) = self.remove_call(CallKey::Sip(handle)) else { return };
        let reason = call.flow.end_reason().unwrap_or(match reason {
            EndReason::RemoteBye => "caller_hangup",
            EndReason::Cancelled => "canceled",
            EndReason::AckTimeout => "ack_timeout",
            EndReason::LocalBye => "completed",
            EndReason::Rejected => "rejected",
            EndReason::SessionExpired => "session_expired",
        });
        let call_id = call.flow.call_id().clone();
        tracing::debug!(shard = self.index, call_id = %call_id, reason, "call ended");
        self.report_end(now, call_id, reason.to_owned());
    }

    /// On shutdown: one BYE (or final response) per live SIP call, sent now, and the end
    /// recorded as `shutdown`. Media streams are closed without ending their calls: Twilio
    /// runs the TwiML after `</Connect>` and the call goes on in the poll flow (on another
    /// node behind the same URL, or on this one once restarted). Nobody waits for the
    /// answers: the shard is going away. Returns how many streams were closed.
    fn hang_up_all(&mut self, now: Instant) -> usize {
        for key in self.calls.keys() {
            if let CallKey::Sip(handle) = key {
                self.endpoint.hangup(now, *handle);
            }
        }
        while let Some(t) = self.endpoint.poll_transmit() {
            if let Some(send) = &self.sip_send {
                let _ = socket::send_parts(send, &[IoSlice::new(&t.payload)], t.dest);
            }
        }
        let mut streams = 0;
        for (key, mut call) in self.calls.drain() {
            if let Some(leg) = call.agent.take() {
                leg.outbox.close();
            }
            match (key, call.stream.take()) {
                (CallKey::Stream(_), Some(leg)) => {
                    leg.outbox.close();
                    streams += 1;
                }
                _ => {
                    let call_id = call.flow.call_id().clone();
                    self.unreported.push_back((call_id, "shutdown".to_owned()));
                }
            }
        }
        // Whatever the control plane's queue takes now is recorded; it is going away too.
        self.retry_reports(now);
        self.stats.set_active_calls(0);
        self.stats.set_agent_legs(0);
        self.stats.set_streams(0);
        streams
    }

    /// Sends one frame for every stream the media clock says is due.
    fn send_media(&mut self, now: Instant) {
        let Some(due_at) = self.clock.poll_timeout().filter(|t| *t <= now) else {
            return;
        };
        // How late this wake-up is for its frames: the media clock's own headroom reading.
        self.admission.on_clock_tick(now, due_at);
        let mut due = std::mem::take(&mut self.due);
        self.clock.poll_due(now, &mut due);
        let mut sent = 0;
        let mut streamed = 0;
        let mut acted: Vec<CallKey> = Vec::new();
        for d in due.drain(..) {
            let Some(&handle) = self.streams.get(&d.stream) else { continue };
            let Some(call) = self.calls.get_mut(&handle) else { continue };
            if let Some(leg) = call.stream.as_ref() {
                // A Twilio stream: one media message per 20 ms frame, in real time (Twilio
                // buffers what it is sent ahead; precall never runs ahead of the clock).
                if let Some(frame) = call.flow.poll_frame(now) {
                    // Written straight into the message the outbox keeps: one allocation, no
                    // copy.
                    let mut msg = String::with_capacity(STREAM_MESSAGE_BYTES);
                    twilio::media_message(&leg.stream_sid, frame.payload, &mut msg);
                    if leg.outbox.push(msg) {
                        streamed += 1;
                    } else {
                        self.stats.stream_dropped();
                    }
                }
                record_latencies(&self.stats, &mut call.flow, Some((now, d.at)));
                if call.flow.has_actions() {
                    acted.push(handle);
                }
                continue;
            }
            let Some(media) = call.media.as_mut() else { continue };
            self.phase_calls.push(handle);
            media.sender.skip(d.skipped);
            let dest = media.destination();
            match call.flow.poll_frame(now) {
                Some(frame) if media.sending => {
                    if frame.marker {
                        media.sender.talkspurt();
                    }
                    let header = media.sender.next_header(media.payload_type).to_bytes();
                    let parts = [IoSlice::new(&header), IoSlice::new(frame.payload)];
                    match socket::send_parts(&media.socket, &parts, dest) {
                        Ok(_) => {
                            sent += 1;
                            self.pacing_count = self.pacing_count.wrapping_add(1);
                            if self.pacing_count.is_multiple_of(crate::health::PACING_SAMPLE_EVERY)
                            {
                                let late = Instant::now().saturating_duration_since(d.at);
                                self.stats.send_lateness.record(late);
                            }
                        }
                        Err(_) => self.stats.send_error(),
                    }
                }
                // Nothing to say now (or not allowed to send): time runs on, and the next
                // packet starts a talkspurt (RFC 3550 §5.1).
                _ => {
                    media.sender.skip(1);
                    media.sender.talkspurt();
                }
            }
            record_latencies(&self.stats, &mut call.flow, Some((now, d.at)));
            // Rare (a clip ran out, the agent finished): the Vec stays unallocated per tick.
            if call.flow.has_actions() {
                acted.push(handle);
            }
        }
        self.due = due;
        if sent > 0 {
            self.stats.rtp_out(sent);
        }
        // The frames are out on time; now what the callers sent since their last tick.
        let mut phase = std::mem::take(&mut self.phase_calls);
        for handle in phase.drain(..) {
            self.drain_rtp(now, handle);
        }
        self.phase_calls = phase;
        if streamed > 0 {
            self.stats.stream_out(streamed);
        }
        for handle in acted {
            self.after_flow(now, handle);
        }
    }
}

/// Records what `flow` measured; `tick` is `(now, due)` when the flow just lent the frame due
/// at `due` (the media clock's grid instant), for what the engine added to agent audio.
fn record_latencies(stats: &ShardStats, flow: &mut CallFlow, tick: Option<(Instant, Instant)>) {
    let l = flow.take_latencies();
    if let Some(d) = l.to_agent {
        stats.latency_to_agent.record(d);
    }
    if let Some(d) = l.to_agent_added {
        stats.added_to_agent.record(d);
    }
    if let Some(d) = l.to_caller {
        stats.latency_to_caller.record(d);
        if let Some((now, due)) = tick {
            stats.added_to_caller.record(added_to_caller(now, due, d));
        }
    }
    if let Some(d) = l.first_audio {
        stats.latency_first_audio.record(d);
    }
}

/// What the engine added to agent audio that came in `waited` before `now` and went out in
/// the frame due at `due`: the time since the first grid instant after its arrival (the grid
/// is `due` minus whole frames; audio that comes in at an instant is for the next one). Audio
/// that came in after `due` (a late tick sent it at once) added only `waited`.
fn added_to_caller(now: Instant, due: Instant, waited: Duration) -> Duration {
    let arrived = now.checked_sub(waited).unwrap_or(now);
    let Some(before_due) = due.checked_duration_since(arrived) else { return waited };
    let frame = FRAME_DURATION.as_nanos();
    let frames = before_due.as_nanos().saturating_sub(1) / frame;
    let whole = Duration::from_nanos(u64::try_from(frames * frame).unwrap_or(u64::MAX));
    now.saturating_duration_since(due.checked_sub(whole).unwrap_or(due))
}

fn can_send(direction: Direction, remote: SocketAddr) -> bool {
    matches!(direction, Direction::SendRecv | Direction::SendOnly)
        && !remote.ip().is_unspecified()
        && remote.port() != 0
}

/// Whether the caller has put the call on hold or said it sends nothing, from our side of the
/// negotiated direction: `sendonly` (hold, RFC 3264 §8.4; music on hold, if any, is not
/// audio to wait for), `recvonly` or `inactive` from the caller, or the old `c=0.0.0.0`.
/// The RTP timeout is suspended meanwhile.
fn caller_holds(direction: Direction, remote: SocketAddr) -> bool {
    direction != Direction::SendRecv || remote.ip().is_unspecified()
}

fn media_codec(codec: precall_sip::Codec) -> Codec {
    match codec {
        precall_sip::Codec::Pcmu => Codec::Pcmu,
        precall_sip::Codec::Pcma => Codec::Pcma,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn added_latency_to_the_caller_counts_from_the_first_grid_instant_after_arrival() {
        let due = Instant::now() + Duration::from_secs(1);
        // In 7 ms before its frame's instant, out 300 µs after it: 300 µs added.
        let now = due + Duration::from_micros(300);
        assert_eq!(added_to_caller(now, due, 7 * MS + Duration::from_micros(300)), now - due);
        // In 27 ms before: it missed the instant 20 ms earlier, a whole frame added.
        assert_eq!(
            added_to_caller(now, due, 27 * MS + Duration::from_micros(300)),
            20 * MS + (now - due)
        );
        // In after the instant (a tick 5 ms late sent it at once): only its own wait.
        assert_eq!(added_to_caller(due + 5 * MS, due, 2 * MS), 2 * MS);
        // In exactly on the instant before: for this frame, out on time.
        assert_eq!(added_to_caller(due, due, 20 * MS), Duration::ZERO);
        // In at the frame's own instant, out 1 ms later.
        assert_eq!(added_to_caller(due + MS, due, MS), MS);
    }
}
