//! One shard: what it owns and its run loop. Everything here lives on the shard's executor
//! thread; only [`ShardStats`] and the inboxes cross threads.
//!
//! # Tasks
//! * the **loop** (this file's [`serve`]): awaits the inbox *or* the next deadline (SIP
//!   timers, the media clock, per-call timers) *or* a local nudge, then runs everything due.
//!   Awaiting the inbox is safe to abandon (it only registers a waker), so racing it against a
//!   timer loses nothing;
//! * the **SIP receive task**: awaits datagrams on the SIP socket. A datagram whose Call-ID
//!   another shard owns is forwarded to that shard's inbox; the others go to this shard's
//!   `Endpoint` at once. Then it nudges the loop, whose deadlines may have moved;
//! * one **RTP receive task per answered call**: records arrival time and source (symmetric
//!   RTP latch) in shard-local cells.
//!
//! Socket receives live in their own tasks, never in a `select`, because dropping glommio's
//! in-flight `recv_from` cancels an io_uring request whose datagram may already be taken.
//! All sends are synchronous (`sendmsg` with `MSG_DONTWAIT`, see `socket.rs`), so the shard's
//! state (`Rc<RefCell<Core>>`) is never borrowed across an `.await`.

use std::{
    cell::{Cell, RefCell},
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    future::poll_fn,
    io::IoSlice,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    pin::pin,
    rc::Rc,
    sync::Arc,
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use glommio::{Task, net::UdpSocket};
use precall_api::{CallAction, CallContext, CallId, CallStatus, ControlError, Protocol};
use precall_media::{
    Codec, Due, FRAME_DURATION, MediaClock, PlayItem, Playout, PlayoutTick, RtpPacket, RtpSender,
    RtpTimestamp, SeqNo, Ssrc,
};
use precall_sip::{CallHandle, Direction, EndReason, Endpoint, Event, SdpOffer, SipConfig};
use socket2::Socket;

use crate::{
    EngineError, SendError, ShardMsg,
    call::{Call, CallMedia, Phase, PortPool, RtpIn},
    control::{PlanReply, ShardControl, ShardPlan},
    health::ShardStats,
    ids::RandomIds,
    inbox::{ForwardedDatagram, Inbox, InboxSender, PlanDelivery, PlanKind},
    routing::shard_for_call_id,
    socket::{self, UdpPair},
};

/// Largest UDP payload (65,535 minus the 8-byte UDP header, rounded up): a SIP datagram never
/// needs more, so one buffer of this size, allocated once per shard, is never truncating.
const MAX_DATAGRAM: usize = 64 * 1024;

/// RTP receive buffer per call: only the header is read, a longer datagram is truncated.
const RTP_RECV_BUFFER: usize = 2048;

/// Pause after a failed receive, so a socket that keeps failing cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Shortest time between two status checks of one call, whatever the plan says.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long a stopping shard parks so that glommio submits the cancellation of its pending
/// receives (see [`serve`]); any non-zero pause makes the executor enter the kernel.
const CANCEL_SUBMIT_PAUSE: Duration = Duration::from_micros(100);

/// What a shard says once, right after it starts (or fails to).
#[derive(Debug)]
pub(crate) enum StartReport {
    /// Running; the SIP socket's local address when it has one.
    Started(Option<SocketAddr>),
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
    pub(crate) rtp_timeout: Duration,
    pub(crate) plan_timeout: Duration,
}

/// Everything a shard needs, moved onto its thread.
pub(crate) struct ShardParams {
    pub(crate) index: usize,
    pub(crate) sip: Option<SocketAddr>,
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
    let local = sip.as_ref().map(|p| p.local);
    let nudge = Rc::new(Nudge::default());
    let mut receiver: Option<Task<()>> = None;
    let core = sip.map(|pair| {
        let UdpPair { recv, send, local } = pair;
        let mut sip_cfg = SipConfig::new(local);
        sip_cfg.advertised_ip = settings.advertised_ip;
        let core = Rc::new(RefCell::new(Core {
            index,
            endpoint: Endpoint::new(sip_cfg, RandomIds::new(index)),
            ids: RandomIds::new(index + 1_000),
            sip_send: send,
            sip_ip: local.ip(),
            me: peers[index].clone(),
            control,
            settings,
            stats: stats.clone(),
            calls: HashMap::new(),
            clock: MediaClock::new(FRAME_DURATION, Instant::now()),
            streams: HashMap::new(),
            due: Vec::new(),
            timers: BinaryHeap::new(),
            ports: PortPool::new(rtp_ports.clone()),
        }));
        receiver = Some(glommio::spawn_local(receive_sip(
            index,
            Rc::new(recv),
            peers,
            core.clone(),
            nudge.clone(),
        )));
        core
    });
    stats.set_alive(true);
    reporter.report(StartReport::Started(local));
    tracing::debug!(shard = index, ?rtp_ports, "shard started");

    serve(&inbox, core.as_ref(), &nudge).await;

    if let Some(task) = receiver {
        // Dropping the task's future cancels its pending io_uring receive, but glommio only
        // queues that cancellation: one trip through the reactor submits it, so the kernel
        // drops the ring's reference to the socket now rather than asynchronously after the
        // ring closes (which left the port busy for a moment after `shutdown` in about 1 run
        // in 6).
        task.cancel().await;
    }
    if let Some(core) = core {
        let mut core = core.borrow_mut();
        core.hang_up_all(Instant::now());
        // Drops every call's RTP receive task and sockets (same cancellation as above).
        let calls = std::mem::take(&mut core.calls);
        drop(calls);
    }
    glommio::timer::sleep(CANCEL_SUBMIT_PAUSE).await;
    drop(inbox);
    tracing::debug!(shard = index, "shard stopped");
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
async fn serve(inbox: &Inbox, core: Option<&Rc<RefCell<Core>>>, nudge: &Nudge) {
    loop {
        let deadline = core.and_then(|c| c.borrow().next_deadline());
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
                if nudge.poll(cx.waker()) {
                    return Poll::Ready(None);
                }
                match timer.as_mut().as_pin_mut() {
                    Some(t) => std::future::Future::poll(t, cx).map(|_| None),
                    None => Poll::Pending,
                }
            })
            .await
        };
        match msg {
            Some(ShardMsg::Stop) => return,
            #[cfg(test)]
            Some(ShardMsg::PanicForTest) => panic!("shard panics as asked"),
            Some(other) => {
                if let Some(core) = core {
                    core.borrow_mut().on_message(Instant::now(), other);
                }
            }
            None => {}
        }
        if let Some(core) = core {
            core.borrow_mut().on_tick(Instant::now());
        }
    }
}

/// Receives SIP datagrams until cancelled, routing each by Call-ID.
async fn receive_sip(
    shard: usize,
    socket: Rc<UdpSocket>,
    peers: Vec<InboxSender>,
    core: Rc<RefCell<Core>>,
    nudge: Rc<Nudge>,
) {
    let stats = core.borrow().stats.clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut failures: u64 = 0;
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                failures = 0;
                stats.datagram_in();
                let datagram = &buf[..len];
                // No Call-ID: handled here (the endpoint answers 400 or drops it).
                let owner = precall_sip::peek_call_id(datagram)
                    .map_or(shard, |id| shard_for_call_id(id, peers.len()));
                if owner != shard {
                    let msg = ForwardedDatagram { from, data: datagram.into() };
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
                core.borrow_mut().on_sip(Instant::now(), from, datagram);
                nudge.nudge();
            }
            Err(err) => {
                failures += 1;
                if failures.is_power_of_two() {
                    let err = std::io::Error::from(err);
                    tracing::warn!(shard, failures, error = %err, "SIP socket receive failed");
                }
                glommio::timer::sleep(RECV_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Receives one call's RTP until the call ends (its task is dropped then).
async fn receive_rtp(socket: UdpSocket, rx: Rc<RtpIn>, stats: Arc<ShardStats>) {
    let mut buf = [0u8; RTP_RECV_BUFFER];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                if RtpPacket::new_checked(&buf[..len]).is_ok() {
                    rx.arrived(Instant::now(), from);
                    stats.rtp_in();
                }
            }
            Err(_) => glommio::timer::sleep(RECV_ERROR_BACKOFF).await,
        }
    }
}

/// Per-call timers, in one heap; an entry is acted on only if the call still wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The plan did not come in time.
    PlanWait,
    /// Time for a status check.
    Poll,
    /// Time to look at the caller's last RTP.
    RtpTimeout,
}

/// The shard's SIP endpoint, calls and media: everything the tasks share.
struct Core {
    index: usize,
    endpoint: Endpoint<RandomIds>,
    /// SSRC, first sequence numbers and timestamps (RFC 3550 §5.1: random).
    ids: RandomIds,
    sip_send: Socket,
    sip_ip: IpAddr,
    me: InboxSender,
    control: Arc<dyn ShardControl>,
    settings: CallSettings,
    stats: Arc<ShardStats>,
    calls: HashMap<CallHandle, Call>,
    clock: MediaClock,
    streams: HashMap<precall_media::StreamSlot, CallHandle>,
    /// Reused for every media clock wake-up (no allocation per tick).
    due: Vec<Due>,
    timers: BinaryHeap<Reverse<(Instant, CallHandle, TimerKind)>>,
    ports: PortPool,
}

impl Core {
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.endpoint.poll_timeout(),
            self.clock.poll_timeout(),
            self.timers.peek().map(|Reverse((at, _, _))| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_sip(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.endpoint.handle_datagram(now, from, datagram);
        self.drain(now);
    }

    fn on_message(&mut self, now: Instant, msg: ShardMsg) {
        match msg {
            ShardMsg::Sip(d) => self.on_sip(now, d.from, &d.data),
            ShardMsg::Plan(p) => {
                self.on_plan(now, *p);
                self.drain(now);
            }
            _ => {}
        }
    }

    /// Runs every SIP timer, media frame and call timer that is due.
    fn on_tick(&mut self, now: Instant) {
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        self.send_media(now);
        while let Some(&Reverse((at, call, kind))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.on_timer(now, at, call, kind);
        }
        self.drain(now);
    }

    /// Sends what the endpoint wants sent and acts on its events, until both are empty.
    fn drain(&mut self, now: Instant) {
        loop {
            let mut idle = true;
            while let Some(t) = self.endpoint.poll_transmit() {
                idle = false;
                if socket::send_parts(&self.sip_send, &[IoSlice::new(&t.payload)], t.dest).is_err()
                {
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
            Event::CallConfirmed { .. } => {}
            Event::MediaChanged { call, media } => {
                if let Some(m) = self.calls.get_mut(&call).and_then(|c| c.media.as_mut()) {
                    m.remote = media.remote_rtp;
                    m.payload_type = media.payload_type;
                    m.codec = media_codec(media.codec);
                    m.sending = can_send(media.direction, media.remote_rtp);
                    // A new address (re-INVITE): latch again on what arrives next.
                    m.rx.latched.set(None);
                }
            }
            Event::CallEnded { call, reason } => self.on_ended(call, reason),
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
        if offer.is_some_and(|o| !offers_g711(o)) {
            self.endpoint.reject(now, handle, 488, "Not Acceptable Here");
            return;
        }
        let mut call = Call::new(call_id.clone().into(), source);
        let ctx = CallContext {
            call_id: call_id.into(),
            session_id: String::new(),
            caller_number: from_user,
            recipient_number: to_user,
            status: CallStatus::Ringing,
            protocol: Protocol::Sip,
        };
        let reply = self.reply_for(handle, call.call_id.clone(), PlanKind::Inbound);
        match self.control.inbound(ctx, reply) {
            Ok(()) => {
                call.announced = true;
                self.calls.insert(handle, call);
                self.timers.push(Reverse((
                    later(now, self.settings.plan_timeout),
                    handle,
                    TimerKind::PlanWait,
                )));
            }
            Err(e) => {
                tracing::warn!(shard = self.index, call_id = %call.call_id, error = %e, "control plane refused the call");
                let (code, reason) = refusal(&e);
                self.endpoint.reject(now, handle, code, reason);
            }
        }
    }

    /// The callback that brings a plan back to this shard's inbox (runs on the control thread).
    fn reply_for(&self, call: CallHandle, call_id: CallId, kind: PlanKind) -> PlanReply {
        let inbox = self.me.clone();
        Box::new(move |result| {
            let delivery = PlanDelivery { call, call_id, kind, result };
            if let Err(e) = inbox.send(ShardMsg::Plan(Box::new(delivery))) {
                // The shard's own timers cover a lost plan (PlanWait, the next poll).
                tracing::warn!(error = %e, "could not deliver a plan to its shard");
            }
        })
    }

    fn on_plan(&mut self, now: Instant, p: PlanDelivery) {
        let Some(call) = self.calls.get_mut(&p.call) else {
            // The call ended while the controller was thinking (CANCEL, BYE): record the end
            // again, in case the first report overtook the inbound request.
            if p.kind == PlanKind::Inbound {
                let _ = self.control.call_ended(p.call_id, "canceled".to_owned());
            }
            return;
        };
        match (p.kind, call.phase) {
            (PlanKind::Inbound, Phase::AwaitingPlan) => match p.result {
                Ok(plan) => self.start_call(now, p.call, plan),
                Err(e) => {
                    tracing::warn!(shard = self.index, call_id = %p.call_id, error = %e, "no plan for the call");
                    let (code, reason) = refusal(&e);
                    call.end_reason = Some("failed");
                    self.endpoint.reject(now, p.call, code, reason);
                }
            },
            (PlanKind::Status, _) => {
                call.poll_in_flight = false;
                if !matches!(call.phase, Phase::Holding) {
                    return;
                }
                match p.result {
                    Ok(plan) => {
                        if plan.media.error.is_some() {
                            call.clips.error = plan.media.error.clone();
                        }
                        match plan.instructions.action() {
                            CallAction::Hold => {
                                if let Some(poll) = &plan.instructions.status_poll {
                                    call.poll_interval = Some(poll.interval);
                                    call.hold_deadline = Some(later(
                                        now,
                                        poll.hold_remaining.saturating_add(poll.interval),
                                    ));
                                }
                                self.schedule_poll(now, p.call);
                            }
                            CallAction::Connect => {
                                tracing::info!(shard = self.index, call_id = %p.call_id,
                                    "clone ready; the agent bridge is not built yet, so the call keeps holding");
                                call.phase = Phase::Connected;
                                call.poll_at = None;
                            }
                            CallAction::Hangup => self.end_with_error(now, p.call, "failed"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(shard = self.index, call_id = %p.call_id, error = %e, "status check failed");
                        if call.hold_deadline.is_some_and(|d| now >= d) {
                            self.end_with_error(now, p.call, "hold_timeout");
                        } else {
                            self.schedule_poll(now, p.call);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Answers the call and starts playing what the plan says.
    fn start_call(&mut self, now: Instant, handle: CallHandle, plan: ShardPlan) {
        let Some(call) = self.calls.get_mut(&handle) else { return };
        let action = plan.instructions.action();
        call.clips = plan.media.clone();
        let clip = |c: &Option<Arc<precall_media::EncodedClip>>| c.as_deref().cloned();
        let items: Vec<PlayItem> = match action {
            CallAction::Hangup => match clip(&plan.media.error) {
                Some(error) => vec![PlayItem::once(error)],
                None => {
                    // Nothing to say: refuse while still ringing (480).
                    call.end_reason = Some("failed");
                    call.phase = Phase::HangingUp;
                    self.endpoint.hangup(now, handle);
                    return;
                }
            },
            CallAction::Hold | CallAction::Connect => clip(&plan.media.greeting)
                .map(PlayItem::once)
                .into_iter()
                .chain(clip(&plan.media.hold).map(PlayItem::forever))
                .collect(),
        };
        call.phase = match action {
            CallAction::Hangup => Phase::Ending,
            CallAction::Hold => Phase::Holding,
            CallAction::Connect => {
                tracing::info!(shard = self.index, call_id = %call.call_id,
                    "clone ready; the agent bridge is not built yet, so the call holds");
                Phase::Connected
            }
        };
        if let Some(poll) = &plan.instructions.status_poll {
            call.poll_interval = Some(poll.interval);
            call.hold_deadline =
                Some(later(now, poll.hold_remaining.saturating_add(poll.interval)));
        }
        let source = call.source;
        let ip = self.rtp_ip(source);
        let (port, pair) = match self.ports.bind(ip) {
            Ok(bound) => bound,
            Err(e) => {
                tracing::warn!(shard = self.index, error = %e, "no RTP port for a call");
                if let Some(call) = self.calls.get_mut(&handle) {
                    call.end_reason = Some("no_rtp_port");
                }
                self.endpoint.reject(now, handle, 503, "Service Unavailable");
                return;
            }
        };
        let params = match self.endpoint.accept(now, handle, pair.local) {
            Ok(params) => params,
            Err(e) => {
                // NotAcceptable: 488 went out and CallEnded follows. The others mean the call
                // is already over.
                tracing::debug!(shard = self.index, error = %e, "call not answered");
                self.ports.release(port);
                return;
            }
        };
        let rx = Rc::new(RtpIn::new(now));
        let receiver = glommio::spawn_local(receive_rtp(pair.recv, rx.clone(), self.stats.clone()));
        let random = self.ids.next_u64();
        let sender = RtpSender::new(
            Ssrc(random as u32),
            SeqNo((random >> 32) as u16),
            RtpTimestamp((random >> 16) as u32),
        );
        let mut playout = Playout::new();
        for item in items {
            playout.push(item);
        }
        let slot = self.clock.add_stream(now);
        self.streams.insert(slot, handle);
        let Some(call) = self.calls.get_mut(&handle) else { return };
        call.media = Some(CallMedia {
            port,
            send: pair.send,
            _receiver: receiver,
            rx,
            remote: params.remote_rtp,
            codec: media_codec(params.codec),
            payload_type: params.payload_type,
            sending: can_send(params.direction, params.remote_rtp),
            sender,
            playout,
            slot: Some(slot),
        });
        self.timers.push(Reverse((
            later(now, self.settings.rtp_timeout),
            handle,
            TimerKind::RtpTimeout,
        )));
        if matches!(call.phase, Phase::Holding) {
            self.schedule_poll(now, handle);
        }
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

    fn schedule_poll(&mut self, now: Instant, handle: CallHandle) {
        let Some(call) = self.calls.get_mut(&handle) else { return };
        let Some(interval) = call.poll_interval else { return };
        // A zero interval from a misconfigured controller must not become a busy loop.
        let at = later(now, interval.max(MIN_POLL_INTERVAL));
        call.poll_at = Some(at);
        self.timers.push(Reverse((at, handle, TimerKind::Poll)));
    }

    fn on_timer(&mut self, now: Instant, at: Instant, handle: CallHandle, kind: TimerKind) {
        let Some(call) = self.calls.get_mut(&handle) else { return };
        match kind {
            TimerKind::PlanWait => {
                if call.phase == Phase::AwaitingPlan {
                    tracing::warn!(shard = self.index, call_id = %call.call_id, "no plan in time");
                    call.end_reason = Some("failed");
                    self.endpoint.reject(now, handle, 500, "Server Internal Error");
                }
            }
            TimerKind::Poll => {
                if call.poll_at != Some(at) || call.phase != Phase::Holding || call.poll_in_flight {
                    return;
                }
                call.poll_at = None;
                let call_id = call.call_id.clone();
                let reply = self.reply_for(handle, call_id.clone(), PlanKind::Status);
                match self.control.check_status(call_id, reply) {
                    Ok(()) => {
                        if let Some(call) = self.calls.get_mut(&handle) {
                            call.poll_in_flight = true;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(shard = self.index, error = %e, "status check not queued");
                        self.schedule_poll(now, handle);
                    }
                }
            }
            TimerKind::RtpTimeout => {
                let Some(media) = &call.media else { return };
                if matches!(call.phase, Phase::HangingUp) {
                    return;
                }
                let expires = later(media.rx.last.get(), self.settings.rtp_timeout);
                if expires > now {
                    self.timers.push(Reverse((expires, handle, TimerKind::RtpTimeout)));
                    return;
                }
                tracing::info!(shard = self.index, call_id = %call.call_id, "no RTP from the caller: hanging up");
                call.end_reason = Some("rtp_timeout");
                self.hang_up(now, handle);
            }
        }
    }

    /// Plays the error clip, then BYE; straight to BYE when there is no clip.
    fn end_with_error(&mut self, now: Instant, handle: CallHandle, reason: &'static str) {
        let Some(call) = self.calls.get_mut(&handle) else { return };
        call.end_reason = Some(reason);
        call.poll_at = None;
        let error = call.clips.error.as_deref().cloned();
        match (error, call.media.as_mut()) {
            (Some(error), Some(media)) => {
                call.phase = Phase::Ending;
                media.playout.replace([PlayItem::once(error)]);
                if media.slot.is_none() {
                    let slot = self.clock.add_stream(now);
                    media.slot = Some(slot);
                    self.streams.insert(slot, handle);
                }
            }
            _ => self.hang_up(now, handle),
        }
    }

    /// Stops our media and sends BYE (the SIP layer waits for the ACK first if need be).
    fn hang_up(&mut self, now: Instant, handle: CallHandle) {
        let Some(call) = self.calls.get_mut(&handle) else { return };
        call.phase = Phase::HangingUp;
        call.poll_at = None;
        if let Some(slot) = call.media.as_mut().and_then(|m| m.slot.take()) {
            self.clock.remove_stream(slot);
            self.streams.remove(&slot);
        }
        self.endpoint.hangup(now, handle);
    }

    fn on_ended(&mut self, handle: CallHandle, reason: EndReason) {
        let Some(call) = self.calls.remove(&handle) else { return };
        if let Some(media) = call.media {
            if let Some(slot) = media.slot {
                self.clock.remove_stream(slot);
                self.streams.remove(&slot);
            }
            self.ports.release(media.port);
            // Dropping `media` drops the receive task (cancelling its receive) and the sockets.
        }
        if !call.announced {
            return;
        }
        let reason = call.end_reason.unwrap_or(match reason {
            EndReason::RemoteBye => "caller_hangup",
            EndReason::Cancelled => "canceled",
            EndReason::AckTimeout => "ack_timeout",
            EndReason::LocalBye => "completed",
            EndReason::Rejected => "rejected",
        });
        tracing::debug!(shard = self.index, call_id = %call.call_id, reason, "call ended");
        if let Err(e) = self.control.call_ended(call.call_id, reason.to_owned()) {
            tracing::warn!(shard = self.index, error = %e, "could not record the end of a call");
        }
    }

    /// On shutdown: one BYE (or final response) per live call, sent now, and the end recorded
    /// as `shutdown`. Nobody waits for the answers: the shard is going away.
    fn hang_up_all(&mut self, now: Instant) {
        let handles: Vec<CallHandle> = self.calls.keys().copied().collect();
        for handle in handles {
            if let Some(call) = self.calls.get_mut(&handle) {
                if call.phase != Phase::HangingUp {
                    call.end_reason = Some("shutdown");
                    self.endpoint.hangup(now, handle);
                }
            }
        }
        while let Some(t) = self.endpoint.poll_transmit() {
            let _ = socket::send_parts(&self.sip_send, &[IoSlice::new(&t.payload)], t.dest);
        }
        for (_, call) in self.calls.drain() {
            if call.announced {
                let _ = self.control.call_ended(call.call_id, "shutdown".to_owned());
            }
        }
        self.stats.set_active_calls(0);
    }

    /// Sends one frame for every stream the media clock says is due.
    fn send_media(&mut self, now: Instant) {
        if self.clock.poll_timeout().is_none_or(|t| t > now) {
            return;
        }
        let mut due = std::mem::take(&mut self.due);
        self.clock.poll_due(now, &mut due);
        let mut sent = 0;
        let mut finished: Vec<CallHandle> = Vec::new();
        for d in due.drain(..) {
            let Some(&handle) = self.streams.get(&d.stream) else { continue };
            let Some(media) = self.calls.get_mut(&handle).and_then(|c| c.media.as_mut()) else {
                continue;
            };
            media.sender.skip(d.skipped);
            let dest = media.destination();
            match media.playout.tick() {
                PlayoutTick::Frame { clip, index } => {
                    if !media.sending {
                        continue;
                    }
                    let header = media.sender.next_header(media.payload_type).to_bytes();
                    let payload = clip.frame(media.codec, index);
                    let parts = [IoSlice::new(&header), IoSlice::new(payload)];
                    match socket::send_parts(&media.send, &parts, dest) {
                        Ok(_) => sent += 1,
                        Err(_) => self.stats.send_error(),
                    }
                }
                PlayoutTick::Finished => finished.push(handle),
            }
        }
        self.due = due;
        if sent > 0 {
            self.stats.rtp_out(sent);
        }
        // Rare (a clip ran out), so the small Vec above stays empty and unallocated per tick.
        for handle in finished {
            let Some(call) = self.calls.get_mut(&handle) else { continue };
            if let Some(slot) = call.media.as_mut().and_then(|m| m.slot.take()) {
                self.clock.remove_stream(slot);
                self.streams.remove(&slot);
            }
            if call.phase == Phase::Ending {
                self.hang_up(now, handle);
            }
        }
    }
}

/// `now + d`, capped: durations come from configuration and from the control plane, and an
/// `Instant` overflow would panic the shard.
fn later(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// Whether the offer has an audio stream with PCMU or PCMA (static 0/8, or by rtpmap name).
fn offers_g711(offer: &SdpOffer) -> bool {
    offer.media.iter().any(|m| {
        m.media.eq_ignore_ascii_case("audio")
            && m.port != 0
            && (m.formats.iter().any(|f| f == "0" || f == "8")
                || m.rtpmaps.iter().any(|(_, name, rate)| {
                    *rate == 8000
                        && (name.eq_ignore_ascii_case("PCMU") || name.eq_ignore_ascii_case("PCMA"))
                }))
    })
}

fn can_send(direction: Direction, remote: SocketAddr) -> bool {
    matches!(direction, Direction::SendRecv | Direction::SendOnly)
        && !remote.ip().is_unspecified()
        && remote.port() != 0
}

fn media_codec(codec: precall_sip::Codec) -> Codec {
    match codec {
        precall_sip::Codec::Pcmu => Codec::Pcmu,
        precall_sip::Codec::Pcma => Codec::Pcma,
    }
}

/// The SIP answer to a control plane that could not plan a call.
fn refusal(e: &ControlError) -> (u16, &'static str) {
    match e {
        ControlError::Overloaded | ControlError::Timeout | ControlError::Stopped => {
            (503, "Service Unavailable")
        }
        _ => (500, "Server Internal Error"),
    }
}
