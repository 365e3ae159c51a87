//! One call's flow, sans-IO: from the plan to the last frame.
//!
//! # Driving a [`CallFlow`]
//! The owner (a shard) creates one per incoming call and feeds it, with the current time:
//! * the control plane's answers: [`CallFlow::handle_plan`], [`CallFlow::handle_status`];
//! * the caller's leg: [`CallFlow::handle_answered`] (after an [`Action::Answer`]),
//!   [`CallFlow::handle_media_changed`], [`CallFlow::handle_rtp`], [`CallFlow::handle_dtmf`],
//!   [`CallFlow::handle_leg_ended`];
//! * the agent leg: [`CallFlow::handle_agent_open`], [`CallFlow::handle_agent_text`],
//!   [`CallFlow::handle_agent_closed`], [`CallFlow::handle_agent_failed`];
//! * time: [`CallFlow::handle_timeout`] at [`CallFlow::poll_timeout`].
//!
//! After each input it drains [`CallFlow::poll_action`] until `None` and performs each action.
//! On every 20 ms media clock tick of the call's stream it calls [`CallFlow::poll_frame`] and
//! sends the frame it lends (or, when there is none, lets the RTP timestamp run on and marks the
//! next packet as a talkspurt).
//!
//! # Phases
//! `AwaitingPlan` → (answer) → `Holding` (greeting, hold, a status check every poll interval)
//! → `Connecting` (the controller said connect: the agent socket opens while hold goes on) →
//! `Bridged` (the first agent audio replaced hold; caller audio streams to the agent) →
//! `Ending` (error clip) → `HangingUp` (BYE asked) → the leg ends. Any phase ends at once when
//! the caller hangs up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use precall_api::{CallAction, CallId, ControlError, MediaEventKind, Protocol};
use precall_media::{
    Codec, EncodedClip, FRAME_DURATION, FRAME_SAMPLES, PlayItem, Playout, PlayoutTick,
};

use crate::agent::{self, AgentFormat, Initiation, ServerMessage};
use crate::convert::{FromAgent, ToAgent};
use crate::plan::{AgentTarget, MediaPlan, ShardPlan};
use crate::reorder::Reorder;

/// End reasons the flow chooses (the rest come from the leg: `caller_hangup`, `canceled`, …).
pub mod reason {
    /// The controller failed the call (clone failed, hold limit).
    pub const FAILED: &str = "failed";
    /// Status checks kept failing past the hold limit.
    pub const HOLD_TIMEOUT: &str = "hold_timeout";
    /// No caller RTP for the RTP timeout.
    pub const RTP_TIMEOUT: &str = "rtp_timeout";
    /// The agent could not be reached (connect, TLS, handshake, timeout, control plane).
    pub const AGENT_UNAVAILABLE: &str = "agent_unavailable";
    /// The agent refused the conversation (close 1008, or closed before any audio: usually the
    /// agent does not allow the voice override).
    pub const AGENT_REJECTED: &str = "agent_rejected";
    /// The agent failed mid-conversation (error event, close 1002/1011, a broken socket).
    pub const AGENT_ERROR: &str = "agent_error";
    /// The agent ended the conversation (close 1000) and its last audio was played.
    pub const COMPLETED: &str = "completed";
    /// The plan did not arrive in time.
    pub const NO_PLAN: &str = "no_plan";
    /// No RTP port was free to answer with.
    pub const NO_RTP_PORT: &str = "no_rtp_port";
}

/// Settings of every call of a shard.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// No caller RTP for this long ends the call.
    pub rtp_timeout: Duration,
    /// The control plane's answer to an inbound call or a status check must come within this.
    pub plan_timeout: Duration,
    /// Shortest time between two status checks, whatever the plan says.
    pub min_poll_interval: Duration,
    /// TCP + TLS + WebSocket handshake of the agent leg.
    pub agent_connect_timeout: Duration,
    /// From the open socket to the agent's first audio.
    pub agent_first_audio_timeout: Duration,
    /// Caller audio per `user_audio_chunk` (a multiple of 20 ms).
    pub agent_chunk: Duration,
    /// Agent audio queued for the caller at most; the excess is dropped and counted.
    pub agent_buffer: Duration,
    /// After the agent's normal end, longest wait for the leg to confirm that the caller heard
    /// its last audio (a Twilio `mark` echo) before hanging up anyway.
    pub heard_timeout: Duration,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            rtp_timeout: Duration::from_secs(30),
            plan_timeout: Duration::from_secs(11),
            min_poll_interval: Duration::from_millis(100),
            agent_connect_timeout: Duration::from_secs(5),
            agent_first_audio_timeout: Duration::from_secs(10),
            agent_chunk: Duration::from_millis(40),
            agent_buffer: Duration::from_secs(120),
            heard_timeout: Duration::from_secs(5),
        }
    }
}

/// Who the call is, for the agent's dynamic variables.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// The call.
    pub call_id: CallId,
    /// Caller number (SIP From user, Twilio `From`).
    pub caller: String,
    /// Dialed number.
    pub dialed: String,
    /// How the call came in.
    pub protocol: Protocol,
}

/// Where the call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the control plane's plan.
    AwaitingPlan,
    /// Answer asked; waiting for the leg to say it is answered.
    Answering,
    /// Greeting and hold, status checks.
    Holding,
    /// The agent socket is opening or waiting for its first audio; hold plays on.
    Connecting,
    /// Caller and agent hear each other.
    Bridged,
    /// Playing the error clip; hang-up follows.
    Ending,
    /// Hang-up asked; waiting for the leg to end.
    HangingUp,
    /// The leg ended.
    Ended,
}

/// What the owner must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer the caller's leg (SIP: bind RTP, `200 OK`), then call
    /// [`CallFlow::handle_answered`] once the leg carries audio (SIP: when the caller's ACK
    /// confirms the 200, so the greeting is not sent before the caller can hear it), or
    /// [`CallFlow::handle_leg_ended`] if it failed.
    Answer,
    /// Refuse the ringing call with this final response.
    Reject {
        /// SIP status.
        code: u16,
        /// Reason phrase.
        reason: &'static str,
    },
    /// Hang up (BYE once confirmed; `480` while ringing).
    Hangup,
    /// Ask the control plane about the clone; answer with [`CallFlow::handle_status`].
    CheckStatus,
    /// Open the agent WebSocket; report with the `handle_agent_*` inputs.
    ConnectAgent(AgentTarget),
    /// Send a text frame on the agent socket.
    SendAgent(String),
    /// Close the agent socket (1000) and forget it.
    CloseAgent,
    /// Record this on the call's history (transcript, DTMF, agent failures).
    Record(MediaEventKind, String),
    /// The leg must say when the caller has heard every agent frame lent so far (this count):
    /// a Twilio leg sends a `mark` and reports its echo, an RTP leg (nothing buffered past the
    /// socket) reports at once. Either way with [`CallFlow::handle_heard`].
    Mark(u64),
    /// The agent was interrupted: drop what the leg itself still buffers for the caller
    /// (Twilio `clear`; nothing to do on RTP).
    ClearLeg,
}

/// One frame to send to the caller: 160 bytes of G.711 in the leg's codec.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The payload, lent by a shared clip or by the call's agent buffer.
    pub payload: &'a [u8],
    /// First frame of a talkspurt (RFC 3550 §5.1 marker bit).
    pub marker: bool,
}

/// Counters of one call, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Agent messages of a type precall does not act on.
    pub agent_unknown: u64,
    /// Agent messages that did not parse.
    pub agent_malformed: u64,
    /// Agent audio bytes dropped: over the buffer limit.
    pub agent_overflow_bytes: u64,
    /// Agent audio bytes dropped by an interruption (queued, or arriving late).
    pub agent_flushed_bytes: u64,
    /// Interruptions.
    pub interruptions: u64,
    /// `user_audio_chunk` messages sent.
    pub chunks_sent: u64,
    /// Chunks of silence sent because the caller sent nothing.
    pub silent_chunks: u64,
    /// Agent frames lent to the leg (the playout ledger's "played" side).
    pub agent_frames_sent: u64,
    /// Of those, frames the leg confirmed the caller heard.
    pub agent_frames_heard: u64,
    /// Caller packets late, duplicated or lost on the way to the agent.
    pub caller_late: u64,
    /// See `caller_late`.
    pub caller_duplicate: u64,
    /// See `caller_late`.
    pub caller_lost: u64,
}

#[derive(Debug)]
enum Agent {
    /// No agent leg.
    None,
    /// Socket asked for; the handshake must finish by `deadline`.
    Connecting { deadline: Instant },
    /// Open, initiation sent; the first audio must come by `deadline`.
    Open { deadline: Instant, formats: Option<Formats> },
    /// Audio flows both ways.
    Talking { formats: Formats },
    /// Closed normally by the agent: play what is queued, then hang up.
    Finished,
}

#[derive(Debug)]
struct Formats {
    to_agent: ToAgent,
    from_agent: FromAgent,
}

/// The flow of one call. See the module docs for the drive order.
#[derive(Debug)]
pub struct CallFlow {
    info: CallInfo,
    cfg: FlowConfig,
    phase: Phase,
    actions: VecDeque<Action>,
    clips: MediaPlan,
    playout: Playout,
    codec: Codec,
    /// The first status or inbound plan answer must come by this.
    plan_deadline: Option<Instant>,
    poll_interval: Option<Duration>,
    poll_at: Option<Instant>,
    hold_deadline: Option<Instant>,
    /// News came while a status check was in flight: ask again as soon as it is answered.
    recheck: bool,
    last_rtp: Instant,
    rtp_check_at: Option<Instant>,
    /// The caller put the call on hold (it sends no RTP): the RTP timeout waits.
    caller_holding: bool,
    /// A `connect` that arrived before the leg was answered.
    pending_agent: Option<AgentTarget>,
    voice: Option<(String, Option<String>)>,
    agent: Agent,
    /// Agent speech for the caller, in the caller's codec.
    agent_audio: VecDeque<u8>,
    agent_frame: [u8; FRAME_SAMPLES],
    agent_started: bool,
    /// Greeting frames still to play: the agent's first words wait for the greeting's end
    /// (hold, not the greeting, is what the agent cuts off).
    greeting_left: usize,
    /// A silence frame in the caller's codec, sent while the agent is quiet.
    silence: [u8; FRAME_SAMPLES],
    speaking: bool,
    interrupted_up_to: Option<u64>,
    reorder: Reorder,
    caller_audio: Vec<u8>,
    caller_frames: u32,
    chunk_at: Option<Instant>,
    message: String,
    end_reason: Option<&'static str>,
    stats: FlowStats,
    /// When the oldest caller frame of the chunk being gathered arrived.
    chunk_first_at: Option<Instant>,
    /// When agent audio that starts a talkspurt arrived (to its first frame out).
    talkspurt_at: Option<Instant>,
    /// When the agent leg was asked for (to the first agent frame out).
    connect_at: Option<Instant>,
    latencies: Latencies,
    ledger: Ledger,
}

/// What became of the agent's audio: queued in the flow (`agent_audio`), lent to the leg
/// (`sent`), confirmed heard by the caller (`heard`). One ledger for every leg kind: RTP
/// confirms at once, Twilio when its `mark` comes back.
#[derive(Debug, Default)]
struct Ledger {
    sent: u64,
    heard: u64,
    /// The last count a [`Action::Mark`] asked about.
    marked: u64,
    /// The agent finished; hang up once `heard == sent`, or at this time.
    drain_deadline: Option<Instant>,
}

/// Delays measured at the engine's own clock, taken with [`CallFlow::take_latencies`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Caller RTP in → the `user_audio_chunk` holding it handed to the agent leg.
    pub to_agent: Option<Duration>,
    /// The chunk's own deadline (its `AGENT_CHUNK_MS` of gathering over) → the chunk handed
    /// to the agent leg: what the engine adds beyond the chunking it was asked for.
    pub to_agent_added: Option<Duration>,
    /// Agent audio in (starting a talkspurt) → its first RTP frame out.
    pub to_caller: Option<Duration>,
    /// `connect` (the clone is ready) → the agent's first frame out to the caller.
    pub first_audio: Option<Duration>,
}

/// `now + d`, capped: durations come from configuration and the control plane, and an
/// `Instant` overflow would panic.
fn later(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

impl CallFlow {
    /// A call that just arrived; the owner has asked the control plane for its plan.
    #[must_use]
    pub fn new(now: Instant, info: CallInfo, cfg: FlowConfig) -> Self {
        let plan_deadline = Some(later(now, cfg.plan_timeout));
        Self {
            info,
            cfg,
            phase: Phase::AwaitingPlan,
            actions: VecDeque::new(),
            clips: MediaPlan::default(),
            playout: Playout::new(),
            codec: Codec::Pcmu,
            plan_deadline,
            poll_interval: None,
            poll_at: None,
            hold_deadline: None,
            recheck: false,
            last_rtp: now,
            rtp_check_at: None,
            caller_holding: false,
            pending_agent: None,
            voice: None,
            agent: Agent::None,
            agent_audio: VecDeque::new(),
            agent_frame: [0; FRAME_SAMPLES],
            agent_started: false,
            greeting_left: 0,
            silence: [Codec::Pcmu.silence(); FRAME_SAMPLES],
            speaking: false,
            interrupted_up_to: None,
            reorder: Reorder::new(),
            caller_audio: Vec::new(),
            caller_frames: 0,
            chunk_at: None,
            message: String::new(),
            end_reason: None,
            stats: FlowStats::default(),
            chunk_first_at: None,
            talkspurt_at: None,
            connect_at: None,
            latencies: Latencies::default(),
            ledger: Ledger::default(),
        }
    }

    /// The call.
    #[must_use]
    pub fn call_id(&self) -> &CallId {
        &self.info.call_id
    }

    /// Where the call is.
    #[must_use]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The reason to record when the leg ends, when the flow chose it.
    #[must_use]
    pub fn end_reason(&self) -> Option<&'static str> {
        self.end_reason
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> FlowStats {
        let r = self.reorder.stats();
        FlowStats {
            caller_late: r.late,
            caller_duplicate: r.duplicate,
            caller_lost: r.lost,
            agent_frames_sent: self.ledger.sent,
            agent_frames_heard: self.ledger.heard,
            ..self.stats
        }
    }

    /// Agent audio queued for the caller, in bytes (= samples at 8 kHz).
    #[must_use]
    pub fn agent_queued(&self) -> usize {
        self.agent_audio.len()
    }

    /// The delays measured since the last call (each `None` when nothing was measured).
    pub fn take_latencies(&mut self) -> Latencies {
        std::mem::take(&mut self.latencies)
    }

    /// Whether [`CallFlow::poll_action`] has something.
    #[must_use]
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest time [`CallFlow::handle_timeout`] has something to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let agent = match &self.agent {
            Agent::Connecting { deadline } | Agent::Open { deadline, .. } => Some(*deadline),
            _ => None,
        };
        [
            self.plan_deadline,
            self.poll_at,
            self.rtp_check_at,
            self.chunk_at,
            agent,
            self.ledger.drain_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn live(&self) -> bool {
        !matches!(self.phase, Phase::Ending | Phase::HangingUp | Phase::Ended)
    }

    // ----- control plane -----

    /// The answer to the inbound request.
    pub fn handle_plan(&mut self, now: Instant, plan: Result<ShardPlan, ControlError>) {
        if self.phase != Phase::AwaitingPlan {
            return;
        }
        self.plan_deadline = None;
        let plan = match plan {
            Ok(plan) => plan,
            Err(e) => {
                let (code, reason) = refusal(&e);
                self.end_reason = Some(reason::FAILED);
                self.phase = Phase::HangingUp;
                self.actions.push_back(Action::Reject { code, reason });
                return;
            }
        };
        self.clips = plan.media.clone();
        let action = plan.instructions.action();
        let clip = |c: &Option<Arc<EncodedClip>>| c.as_deref().cloned();
        match action {
            CallAction::Hangup => {
                self.end_reason = Some(reason::FAILED);
                match clip(&plan.media.error) {
                    Some(error) => {
                        self.playout.replace([PlayItem::once(error)]);
                        self.phase = Phase::Answering;
                        self.actions.push_back(Action::Answer);
                        // Answered straight into the error clip.
                        self.pending_agent = None;
                        self.poll_interval = None;
                    }
                    None => {
                        // Nothing to say: refuse while still ringing (480).
                        self.phase = Phase::HangingUp;
                        self.actions.push_back(Action::Hangup);
                    }
                }
                return;
            }
            CallAction::Hold | CallAction::Connect => {
                self.greeting_left = plan.media.greeting.as_ref().map_or(0, |g| g.frames());
                let items = clip(&plan.media.greeting)
                    .map(PlayItem::once)
                    .into_iter()
                    .chain(clip(&plan.media.hold).map(PlayItem::forever));
                self.playout.replace(items);
            }
        }
        self.take_poll(now, &plan);
        self.phase = Phase::Answering;
        self.actions.push_back(Action::Answer);
        if action == CallAction::Connect {
            self.accept_connect(now, plan);
        }
    }

    fn take_poll(&mut self, now: Instant, plan: &ShardPlan) {
        if let Some(poll) = &plan.instructions.status_poll {
            self.poll_interval = Some(poll.interval.max(self.cfg.min_poll_interval));
            self.hold_deadline =
                Some(later(now, poll.hold_remaining.saturating_add(poll.interval)));
        }
    }

    /// The answer to a status check.
    pub fn handle_status(&mut self, now: Instant, plan: Result<ShardPlan, ControlError>) {
        self.plan_deadline = None;
        if self.phase != Phase::Holding {
            return;
        }
        match plan {
            Ok(plan) => {
                if plan.media.error.is_some() {
                    self.clips.error = plan.media.error.clone();
                }
                match plan.instructions.action() {
                    CallAction::Hold => {
                        self.take_poll(now, &plan);
                        if std::mem::take(&mut self.recheck) {
                            // The answer may predate the news: ask again at once.
                            self.poll_at = Some(now);
                        } else {
                            self.schedule_poll(now);
                        }
                    }
                    CallAction::Connect => {
                        self.poll_at = None;
                        self.accept_connect(now, plan);
                    }
                    CallAction::Hangup => self.fail(now, reason::FAILED, None),
                }
            }
            Err(e) => {
                if self.hold_deadline.is_some_and(|d| now >= d) {
                    self.fail(now, reason::HOLD_TIMEOUT, Some(e.to_string()));
                } else {
                    self.schedule_poll(now);
                }
            }
        }
    }

    fn accept_connect(&mut self, now: Instant, plan: ShardPlan) {
        let Some(ws) = plan.instructions.websocket else { return };
        self.voice = Some((ws.voice_id.as_str().to_owned(), ws.first_message));
        match plan.agent {
            Some(Ok(target)) => {
                if self.phase == Phase::Answering {
                    self.pending_agent = Some(target);
                } else {
                    self.connect(now, target);
                }
            }
            Some(Err(e)) => self.fail(now, reason::AGENT_UNAVAILABLE, Some(e.0)),
            None => self.fail(now, reason::AGENT_UNAVAILABLE, Some("no agent address".into())),
        }
    }

    fn connect(&mut self, now: Instant, target: AgentTarget) {
        self.phase = Phase::Connecting;
        self.poll_at = None;
        self.agent = Agent::Connecting { deadline: later(now, self.cfg.agent_connect_timeout) };
        self.connect_at = Some(now);
        self.actions.push_back(Action::ConnectAgent(target));
    }

    /// The control plane has news for this call (its clone job finished): check now rather
    /// than at the next poll interval. A check already in flight is followed by another.
    pub fn handle_recheck(&mut self, now: Instant) {
        if self.phase != Phase::Holding {
            return;
        }
        if self.plan_deadline.is_some() {
            self.recheck = true;
        } else {
            self.poll_at = Some(now);
        }
    }

    fn schedule_poll(&mut self, now: Instant) {
        if let Some(interval) = self.poll_interval {
            self.poll_at = Some(later(now, interval));
        }
    }

    // ----- the caller's leg -----

    /// The leg is answered and carries `codec`.
    pub fn handle_answered(&mut self, now: Instant, codec: Codec) {
        if self.phase != Phase::Answering {
            return;
        }
        self.codec = codec;
        self.silence = [codec.silence(); FRAME_SAMPLES];
        self.last_rtp = now;
        if !self.caller_holding {
            self.rtp_check_at = Some(later(now, self.cfg.rtp_timeout));
        }
        if self.end_reason.is_some() {
            // Answered to say the error.
            self.phase = Phase::Ending;
            return;
        }
        self.phase = Phase::Holding;
        match self.pending_agent.take() {
            Some(target) => self.connect(now, target),
            None => self.schedule_poll(now),
        }
    }

    /// The caller put the call on hold (`on_hold`: its SDP says it will send no RTP:
    /// `recvonly`, `inactive`, `c=0.0.0.0`) or took it off hold. While on hold the RTP timeout
    /// does not run; it starts afresh when the caller resumes.
    pub fn handle_caller_hold(&mut self, now: Instant, on_hold: bool) {
        if on_hold == self.caller_holding {
            return;
        }
        self.caller_holding = on_hold;
        if on_hold {
            self.rtp_check_at = None;
        } else if self.rtp_check_at.is_none()
            && !matches!(self.phase, Phase::AwaitingPlan | Phase::Answering)
            && self.live()
        {
            self.last_rtp = now;
            self.rtp_check_at = Some(later(now, self.cfg.rtp_timeout));
        }
    }

    /// The caller's codec changed (re-INVITE, UPDATE).
    pub fn handle_media_changed(&mut self, codec: Codec) {
        self.codec = codec;
        self.silence = [codec.silence(); FRAME_SAMPLES];
        if let Agent::Open { formats: Some(f), .. } | Agent::Talking { formats: f } =
            &mut self.agent
        {
            f.to_agent.set_codec(codec);
            f.from_agent.set_codec(codec);
        }
    }

    /// A caller RTP packet of the call's codec (`payload` without the RTP header).
    pub fn handle_rtp(&mut self, now: Instant, seq: u16, payload: &[u8]) {
        self.last_rtp = now;
        let (Agent::Talking { formats } | Agent::Open { formats: Some(formats), .. }) =
            &mut self.agent
        else {
            return;
        };
        let (audio, frames) = (&mut self.caller_audio, &mut self.caller_frames);
        self.reorder.push(seq, payload, |p| {
            formats.to_agent.push(p, audio);
            *frames += 1;
        });
        if self.caller_frames > 0 && self.chunk_first_at.is_none() {
            self.chunk_first_at = Some(now);
        }
    }

    /// Any caller RTP (DTMF too): it keeps the RTP timeout from firing.
    pub fn handle_rtp_seen(&mut self, now: Instant) {
        self.last_rtp = now;
    }

    /// The caller pressed `digit` (the end of an RFC 4733 event, reported once).
    pub fn handle_dtmf(&mut self, digit: char) {
        self.actions.push_back(Action::Record(MediaEventKind::Dtmf, digit.to_string()));
        if matches!(self.agent, Agent::Open { .. } | Agent::Talking { .. }) {
            let text = format!("The caller pressed the key {digit} on their phone keypad.");
            self.actions.push_back(Action::SendAgent(agent::client_contextual_update(&text)));
        }
    }

    /// The leg could not be answered (no media port): `why` is the recorded end reason; the
    /// owner refuses the call itself.
    pub fn handle_answer_failed(&mut self, why: &'static str) {
        self.end_reason = Some(why);
        self.handle_leg_ended();
    }

    /// The leg is over (caller BYE or CANCEL, our BYE answered, refused): the call is done.
    pub fn handle_leg_ended(&mut self) {
        if self.phase == Phase::Ended {
            return;
        }
        self.phase = Phase::Ended;
        self.close_agent();
        self.plan_deadline = None;
        self.poll_at = None;
        self.rtp_check_at = None;
        self.chunk_at = None;
    }

    // ----- the agent leg -----

    /// The agent WebSocket is open: send the initiation.
    pub fn handle_agent_open(&mut self, now: Instant) {
        if !matches!(self.agent, Agent::Connecting { .. }) {
            return;
        }
        let (voice_id, first) = self.voice.clone().unwrap_or_default();
        let protocol = match self.info.protocol {
            Protocol::Sip => "sip",
            Protocol::Twilio => "twilio",
        };
        let vars = [
            ("caller_number", self.info.caller.as_str()),
            ("dialed_number", self.info.dialed.as_str()),
            ("call_id", self.info.call_id.as_str()),
            ("protocol", protocol),
        ];
        let init = Initiation {
            voice_id: &voice_id,
            first_message: first.as_deref(),
            dynamic_variables: &vars,
        };
        self.actions.push_back(Action::SendAgent(agent::client_initiation(&init)));
        self.agent =
            Agent::Open { deadline: later(now, self.cfg.agent_first_audio_timeout), formats: None };
    }

    /// One text frame from the agent.
    pub fn handle_agent_text(&mut self, now: Instant, text: &str) {
        if matches!(self.agent, Agent::None | Agent::Connecting { .. }) {
            return;
        }
        let msg = match agent::parse_server(text) {
            Ok(msg) => msg,
            Err(agent::ProtocolError::UnsupportedFormat(f)) => {
                return self.fail(
                    now,
                    reason::AGENT_ERROR,
                    Some(format!("unsupported audio format {f}")),
                );
            }
            Err(_) => {
                self.stats.agent_malformed += 1;
                return;
            }
        };
        match msg {
            ServerMessage::Ping { event_id } => {
                self.actions.push_back(Action::SendAgent(agent::client_pong(event_id)));
            }
            ServerMessage::Metadata { conversation_id, output, input } => {
                self.on_metadata(now, &conversation_id, output, input)
            }
            ServerMessage::Audio { event_id, audio } => self.on_audio(now, event_id, &audio),
            ServerMessage::Interruption { event_id } => {
                self.stats.interruptions += 1;
                self.interrupted_up_to =
                    Some(self.interrupted_up_to.map_or(event_id, |e| e.max(event_id)));
                self.stats.agent_flushed_bytes += self.agent_audio.len() as u64;
                self.agent_audio.clear();
                self.talkspurt_at = None;
                if self.ledger.sent > self.ledger.heard {
                    // The leg may still hold some of the interrupted words: drop them too.
                    self.actions.push_back(Action::ClearLeg);
                }
            }
            ServerMessage::AgentResponse(text) => {
                self.actions.push_back(Action::Record(MediaEventKind::AgentResponse, text))
            }
            ServerMessage::UserTranscript(text) => {
                self.actions.push_back(Action::Record(MediaEventKind::UserTranscript, text))
            }
            ServerMessage::ClientToolCall { tool_call_id, .. } => {
                self.actions.push_back(Action::SendAgent(agent::client_tool_error(&tool_call_id)));
            }
            ServerMessage::Error { message } => self.fail(now, reason::AGENT_ERROR, Some(message)),
            ServerMessage::Unknown(_) => self.stats.agent_unknown += 1,
        }
    }

    fn on_metadata(
        &mut self,
        now: Instant,
        conversation_id: &str,
        output: AgentFormat,
        input: AgentFormat,
    ) {
        let Agent::Open { formats, .. } = &mut self.agent else { return };
        let made = ToAgent::new(self.codec, input).and_then(|to_agent| {
            FromAgent::new(output, self.codec).map(|from_agent| Formats { to_agent, from_agent })
        });
        match made {
            Ok(f) => {
                *formats = Some(f);
                self.chunk_at = Some(later(now, self.cfg.agent_chunk));
                let detail = format!(
                    "conversation {conversation_id}, agent sends {}, hears {}",
                    output.name(),
                    input.name()
                );
                self.actions.push_back(Action::Record(MediaEventKind::AgentConnected, detail));
            }
            Err(e) => self.fail(now, reason::AGENT_ERROR, Some(format!("audio format: {e}"))),
        }
    }

    fn on_audio(&mut self, now: Instant, event_id: u64, audio: &[u8]) {
        if self.interrupted_up_to.is_some_and(|up_to| event_id <= up_to) {
            self.stats.agent_flushed_bytes += audio.len() as u64;
            return;
        }
        let agent = std::mem::replace(&mut self.agent, Agent::None);
        let mut formats = match agent {
            Agent::Open { formats: Some(f), .. } => f,
            Agent::Talking { formats } => formats,
            other => {
                // Audio before the metadata names its format: nothing to decode it with.
                self.agent = other;
                self.stats.agent_malformed += 1;
                return;
            }
        };
        let before = self.agent_audio.len();
        if before == 0 && self.talkspurt_at.is_none() {
            self.talkspurt_at = Some(now);
        }
        formats.from_agent.push(audio, &mut self.agent_audio);
        let limit = frames_in(self.cfg.agent_buffer) * FRAME_SAMPLES;
        if self.agent_audio.len() > limit {
            let excess = self.agent_audio.len() - limit.max(before);
            self.agent_audio.truncate(self.agent_audio.len() - excess);
            self.stats.agent_overflow_bytes += excess as u64;
        }
        self.agent = Agent::Talking { formats };
        if !self.agent_started && self.live() {
            // Switch-over: hold stops at the first agent audio, with no gap in between.
            self.agent_started = true;
            self.phase = Phase::Bridged;
            // The agent's first words start a talkspurt (marker bit), contiguous with hold.
            self.speaking = false;
        }
    }

    /// The agent closed the socket (`code` from its close frame, if it sent one).
    pub fn handle_agent_closed(&mut self, now: Instant, code: Option<u16>, why: &str) {
        if matches!(self.agent, Agent::None | Agent::Finished) || !self.live() {
            return;
        }
        let sep = if why.is_empty() { "" } else { ": " };
        let detail = match code {
            Some(c) => format!("agent closed the socket with {c}{sep}{why}"),
            None => format!("agent socket closed without a close frame{sep}{why}"),
        };
        match code {
            Some(1000) if self.agent_started => {
                // Normal end: the caller hears the agent's last words, then BYE.
                self.agent = Agent::Finished;
                self.chunk_at = None;
            }
            Some(1000 | 1008) => self.fail(now, reason::AGENT_REJECTED, Some(detail)),
            _ if !self.agent_started => self.fail(now, reason::AGENT_REJECTED, Some(detail)),
            _ => self.fail(now, reason::AGENT_ERROR, Some(detail)),
        }
    }

    /// The agent socket could not be opened or broke (connect, TLS, handshake, read error).
    pub fn handle_agent_failed(&mut self, now: Instant, error: &str) {
        match self.agent {
            Agent::None | Agent::Finished => {}
            Agent::Connecting { .. } => {
                self.fail(now, reason::AGENT_UNAVAILABLE, Some(error.to_owned()))
            }
            _ => self.fail(now, reason::AGENT_ERROR, Some(error.to_owned())),
        }
    }

    fn close_agent(&mut self) {
        if !matches!(self.agent, Agent::None) {
            self.agent = Agent::None;
            self.actions.push_back(Action::CloseAgent);
        }
        self.chunk_at = None;
    }

    // ----- time -----

    /// Runs what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.plan_deadline.is_some_and(|d| d <= now) {
            self.plan_deadline = None;
            match self.phase {
                Phase::AwaitingPlan => {
                    self.end_reason = Some(reason::NO_PLAN);
                    self.phase = Phase::HangingUp;
                    self.actions
                        .push_back(Action::Reject { code: 500, reason: "Server Internal Error" });
                }
                // A status reply that never came: ask again rather than hold forever.
                Phase::Holding => self.handle_status(now, Err(ControlError::Timeout)),
                _ => {}
            }
        }
        if self.poll_at.is_some_and(|d| d <= now) {
            self.poll_at = None;
            if self.phase == Phase::Holding {
                self.plan_deadline = Some(later(now, self.cfg.plan_timeout));
                self.actions.push_back(Action::CheckStatus);
            }
        }
        if self.rtp_check_at.is_some_and(|d| d <= now) {
            let expires = later(self.last_rtp, self.cfg.rtp_timeout);
            if expires > now {
                self.rtp_check_at = Some(expires);
            } else {
                self.rtp_check_at = None;
                if !matches!(self.phase, Phase::HangingUp | Phase::Ended) {
                    self.end_reason = Some(reason::RTP_TIMEOUT);
                    self.hang_up();
                }
            }
        }
        match &self.agent {
            Agent::Connecting { deadline } if *deadline <= now => {
                self.fail(
                    now,
                    reason::AGENT_UNAVAILABLE,
                    Some("the agent did not answer in time".into()),
                );
            }
            Agent::Open { deadline, .. } if *deadline <= now && !self.agent_started => {
                self.fail(
                    now,
                    reason::AGENT_UNAVAILABLE,
                    Some("no audio from the agent in time".into()),
                );
            }
            _ => {}
        }
        if self.chunk_at.is_some_and(|d| d <= now) {
            self.send_chunk(now);
        }
        if self.ledger.drain_deadline.is_some_and(|d| d <= now) {
            // The leg never confirmed the last words: end anyway.
            self.ledger.drain_deadline = None;
            if self.live() {
                self.end_reason = Some(reason::COMPLETED);
                self.hang_up();
            }
        }
    }

    /// Sends the caller audio gathered since the last chunk; silence when there was none, so
    /// the agent never sees 60 s without input (it closes the socket then).
    fn send_chunk(&mut self, now: Instant) {
        let due = self.chunk_at.filter(|at| *at <= now);
        let next = self.chunk_at.map_or(now, |at| later(at, self.cfg.agent_chunk));
        self.chunk_at = Some(if next <= now { later(now, self.cfg.agent_chunk) } else { next });
        let (Agent::Talking { formats } | Agent::Open { formats: Some(formats), .. }) =
            &mut self.agent
        else {
            return;
        };
        let (audio, frames) = (&mut self.caller_audio, &mut self.caller_frames);
        self.reorder.flush(|p| {
            formats.to_agent.push(p, audio);
            *frames += 1;
        });
        if self.caller_frames == 0 {
            let silence = [self.codec.silence(); FRAME_SAMPLES];
            for _ in 0..frames_in(self.cfg.agent_chunk) {
                formats.to_agent.push(&silence, &mut self.caller_audio);
            }
            self.stats.silent_chunks += 1;
        }
        self.caller_frames = 0;
        if self.caller_audio.is_empty() {
            return;
        }
        agent::client_audio(&self.caller_audio, &mut self.message);
        self.caller_audio.clear();
        if let Some(at) = self.chunk_first_at.take() {
            self.latencies.to_agent = Some(now.saturating_duration_since(at));
            if let Some(due) = due {
                self.latencies.to_agent_added = Some(now.saturating_duration_since(due));
            }
        }
        self.stats.chunks_sent += 1;
        self.actions.push_back(Action::SendAgent(self.message.clone()));
    }

    // ----- endings -----

    /// Error clip, then hang-up; straight to hang-up without a clip or an answered leg.
    fn fail(&mut self, _now: Instant, why: &'static str, detail: Option<String>) {
        // Already ending (error clip, BYE) or over: the first reason stands.
        if !self.live() {
            return;
        }
        self.end_reason = Some(why);
        if let Some(detail) = detail {
            if why.starts_with("agent") {
                self.actions.push_back(Action::Record(
                    MediaEventKind::AgentFailed,
                    format!("{why}: {detail}"),
                ));
            }
        }
        self.close_agent();
        self.poll_at = None;
        self.pending_agent = None;
        self.agent_started = false;
        self.agent_audio.clear();
        match (self.clips.error.as_deref().cloned(), self.phase) {
            (Some(error), Phase::Holding | Phase::Connecting | Phase::Bridged) => {
                self.phase = Phase::Ending;
                self.playout.replace([PlayItem::once(error)]);
            }
            (Some(error), Phase::Answering) => {
                // Answered into the error clip.
                self.playout.replace([PlayItem::once(error)]);
            }
            _ => self.hang_up(),
        }
    }

    fn hang_up(&mut self) {
        if matches!(self.phase, Phase::HangingUp | Phase::Ended) {
            return;
        }
        self.close_agent();
        self.phase = Phase::HangingUp;
        self.poll_at = None;
        self.ledger.drain_deadline = None;
        self.actions.push_back(Action::Hangup);
    }

    /// The leg confirms that the caller heard the first `frames` agent frames it was lent
    /// (the answer to an [`Action::Mark`]; a Twilio `mark` echo, also after a `clear`).
    pub fn handle_heard(&mut self, frames: u64) {
        self.ledger.heard = self.ledger.heard.max(frames.min(self.ledger.sent));
        if matches!(self.agent, Agent::Finished)
            && self.agent_audio.is_empty()
            && self.ledger.heard >= self.ledger.sent
            && self.live()
        {
            self.end_reason = Some(reason::COMPLETED);
            self.hang_up();
        }
    }

    /// Asks the leg to confirm what it was lent so far, once per count.
    fn mark(&mut self) {
        if self.ledger.sent > self.ledger.marked {
            self.ledger.marked = self.ledger.sent;
            self.actions.push_back(Action::Mark(self.ledger.sent));
        }
    }

    // ----- media -----

    /// The frame to send on this 20 ms tick, if any. `None` means "send nothing now": the
    /// owner advances the RTP timestamp, and the next frame starts a talkspurt.
    pub fn poll_frame(&mut self, now: Instant) -> Option<Frame<'_>> {
        match self.phase {
            Phase::Holding | Phase::Connecting | Phase::Ending => self.clip_frame(),
            Phase::Bridged if self.greeting_left > 0 => self.clip_frame(),
            Phase::Bridged => self.agent_frame(now),
            Phase::AwaitingPlan | Phase::Answering | Phase::HangingUp | Phase::Ended => None,
        }
    }

    fn clip_frame(&mut self) -> Option<Frame<'_>> {
        if self.playout.is_finished() {
            self.speaking = false;
            if self.phase == Phase::Ending {
                self.hang_up();
            }
            return None;
        }
        let codec = self.codec;
        let marker = !self.speaking;
        self.speaking = true;
        self.greeting_left = self.greeting_left.saturating_sub(1);
        match self.playout.tick() {
            PlayoutTick::Frame { clip, index } => {
                Some(Frame { payload: clip.frame(codec, index), marker })
            }
            // A finite clip that just ran out: the next tick sees `is_finished`.
            PlayoutTick::Finished => None,
        }
    }

    fn agent_frame(&mut self, now: Instant) -> Option<Frame<'_>> {
        let queued = self.agent_audio.len();
        if queued > 0 {
            if let Some(at) = self.talkspurt_at.take() {
                self.latencies.to_caller = Some(now.saturating_duration_since(at));
            }
            if let Some(at) = self.connect_at.take() {
                self.latencies.first_audio = Some(now.saturating_duration_since(at));
            }
        }
        if queued == 0 {
            if self.speaking {
                // The end of a talkspurt: the ledger learns when the caller has heard it.
                self.mark();
            }
            self.speaking = false;
            if matches!(self.agent, Agent::Finished) {
                // The agent's last words go out; hang up once the leg says they were heard.
                if self.ledger.heard >= self.ledger.sent {
                    self.end_reason = Some(reason::COMPLETED);
                    self.hang_up();
                    return None;
                }
                self.mark();
                if self.ledger.drain_deadline.is_none() {
                    self.ledger.drain_deadline = Some(later(now, self.cfg.heard_timeout));
                }
            }
            // The agent is quiet: RTP goes on with silence, so NATs, session border
            // controllers and the caller's own RTP timeout see a live stream; the agent's next
            // words start a talkspurt (marker).
            return Some(Frame { payload: &self.silence, marker: false });
        }
        let take = queued.min(FRAME_SAMPLES);
        for (dst, src) in self.agent_frame.iter_mut().zip(self.agent_audio.drain(..take)) {
            *dst = src;
        }
        // The tail of a response: pad the last partial frame with silence.
        self.agent_frame[take..].fill(self.codec.silence());
        let marker = !self.speaking;
        self.speaking = true;
        self.ledger.sent += 1;
        Some(Frame { payload: &self.agent_frame, marker })
    }
}

fn frames_in(d: Duration) -> usize {
    usize::try_from(d.as_millis() / FRAME_DURATION.as_millis()).unwrap_or(usize::MAX).max(1)
}

/// The SIP answer to a control plane that could not plan a call.
#[must_use]
pub fn refusal(e: &ControlError) -> (u16, &'static str) {
    match e {
        ControlError::Overloaded
        | ControlError::Timeout
        | ControlError::Stopped
        | ControlError::StoreUnavailable(_) => (503, "Service Unavailable"),
        _ => (500, "Server Internal Error"),
    }
}
