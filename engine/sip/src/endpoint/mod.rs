//! The endpoint: every UAS transaction, dialog and BYE client transaction of the calls one
//! shard owns, behind the handle_/poll_ interface described in the crate docs.
//!
//! One concern per file: this one holds the state, the run-loop interface and the
//! application's answers (`accept`, `reject`, `hangup`); `requests.rs` handles each request
//! method, `responses.rs` the answers to our BYEs and every timer, `send.rs` builds and sends
//! what goes out (responses, BYE, dialog headers), `matching.rs` the RFC 3261 §17.2.3 keys and
//! the small parsing helpers they share.

mod matching;
mod requests;
mod responses;
mod send;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use crate::build::{self, ResponseSpec, reason_phrase};
use crate::call::{Call, CallState, Retransmit2xx};
use crate::config::{IdGen, SipConfig};
use crate::error::{AcceptError, DropReason, RequestError};
use crate::event::{CallHandle, EndReason, Event, Transmit};
use crate::message::{self, StartLine, StartLineError};
use crate::sdp::{self, LocalMedia, MediaParams};
use crate::session_timer::SessionTimer;
use crate::timers::{TimerQueue, TimerValues};
use crate::transaction::absorbed::{Absorbed, Answer};
use crate::transaction::client_invite::ClientInvite;
use crate::transaction::client_non_invite::ClientNonInvite;
use crate::transaction::server_invite::ServerInvite;
use crate::transaction::{ServerKey, TxnId};
use crate::wire::{self};

use matching::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Call(CallHandle),
    Server(TxnId),
    Client(TxnId),
}

#[derive(Debug)]
struct ServerEntry {
    key: Option<ServerKey>,
    txn: ServerInvite,
}

impl ServerEntry {
    fn dest_and_last(&self) -> (SocketAddr, &[u8]) {
        (self.txn.dest, self.txn.last_response())
    }
}

/// How late an absorbed transaction may end (its lifetime is a minimum): expiries within
/// this much of each other are run by one wake-up, not one each.
const ABSORB_EXPIRY_SLACK: std::time::Duration = std::time::Duration::from_millis(100);

/// Server transactions of an endpoint, by kind (see [`Endpoint::transactions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transactions {
    /// Live: INVITEs ringing, or refused and waiting for their ACK.
    pub live: usize,
    /// Answered, absorbing retransmissions until Timer J, L or I.
    pub absorbed: usize,
    /// What the absorbed ones count against [`SipConfig::absorbed_bytes`].
    pub absorbed_bytes: usize,
}

/// Sent with every `503` to an INVITE (seconds before the caller retries).
const RETRY_AFTER_503: &str = "Retry-After: 5\r\n";

/// One shard's SIP user-agent server. See the crate docs for the run loop.
#[derive(Debug)]
pub struct Endpoint<G: IdGen> {
    cfg: SipConfig,
    t: TimerValues,
    ids: G,
    next_id: u64,
    calls: HashMap<CallHandle, Call>,
    calls_by_id: HashMap<String, CallHandle>,
    /// Live server transactions: INVITEs ringing, or refused and waiting for the ACK.
    servers: HashMap<TxnId, ServerEntry>,
    server_index: HashMap<ServerKey, TxnId>,
    /// Answered transactions that only absorb retransmissions now (compact; see
    /// `transaction/absorbed.rs`).
    absorbed: Absorbed,
    clients: HashMap<TxnId, ClientNonInvite>,
    /// Our refreshing re-INVITEs; their ids share `Owner::Client` and `client_index`.
    invite_clients: HashMap<TxnId, ClientInvite>,
    client_index: HashMap<String, TxnId>,
    timers: TimerQueue<Owner>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// New calls and out-of-dialog OPTIONS get `503` + `Retry-After` (a graceful stop).
    draining: bool,
    /// The same answers while the application says it has no headroom (overload admission).
    overloaded: bool,
    /// Out-of-dialog OPTIONS get `503` while any shard of the node is overloaded (a probe
    /// reaches one shard at random; it must speak for the node).
    node_overloaded: bool,
    /// New INVITEs refused because of `overloaded`.
    overload_refusals: u64,
    /// Untrusted sources' request counts (see [`SipConfig::untrusted_limit`]).
    pike: HashMap<std::net::IpAddr, Pike>,
    /// Digest challenges' nonces (with [`SipConfig::digest`]).
    nonces: crate::auth::Nonces,
}

/// One untrusted source's requests in the current window, and its ban.
#[derive(Debug, Clone, Copy)]
struct Pike {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

/// Untrusted sources tracked at most; past it the idle ones are forgotten.
const PIKE_SOURCES: usize = 10_000;

impl<G: IdGen> Endpoint<G> {
    /// A new endpoint with no calls.
    pub fn new(cfg: SipConfig, mut ids: G) -> Self {
        let t = TimerValues { t1: cfg.t1, t2: cfg.t2, t4: cfg.t4 };
        let absorbed = Absorbed::new(cfg.absorbed_bytes);
        // The nonce key, drawn only when digest users are set (so the other ids stay as they
        // were for a deployment without them).
        let mut secret = [0u8; 32];
        if cfg.digest.is_some() {
            for chunk in secret.chunks_mut(8) {
                chunk.copy_from_slice(&ids.session_id().to_le_bytes());
            }
        }
        Self {
            cfg,
            t,
            ids,
            next_id: 0,
            calls: HashMap::new(),
            calls_by_id: HashMap::new(),
            servers: HashMap::new(),
            server_index: HashMap::new(),
            absorbed,
            clients: HashMap::new(),
            invite_clients: HashMap::new(),
            client_index: HashMap::new(),
            timers: TimerQueue::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            draining: false,
            overloaded: false,
            node_overloaded: false,
            overload_refusals: 0,
            pike: HashMap::new(),
            nonces: crate::auth::Nonces::new(secret),
        }
    }

    /// Whether an untrusted source is ignored for now (pike-style; see [`Self::pike_count`]).
    fn pike_banned(&mut self, now: Instant, ip: std::net::IpAddr) -> bool {
        match self.pike.get_mut(&ip) {
            Some(p) => match p.banned_until {
                Some(until) if now < until => true,
                Some(_) => {
                    *p = Pike { window_start: now, count: 0, banned_until: None };
                    false
                }
                None => false,
            },
            // A full table ignores new sources until idle ones can be forgotten.
            None => self.pike.len() >= PIKE_SOURCES && !self.pike_make_room(now),
        }
    }

    /// Counts one refusal (`403`) sent to an untrusted source; past
    /// [`SipConfig::untrusted_limit`] per window it is banned (ignored) for a while, so a scan,
    /// a flood or a password guesser cannot use precall as a reflector or an oracle.
    fn pike_count(&mut self, now: Instant, ip: std::net::IpAddr) {
        let (window, ban, limit) =
            (self.cfg.untrusted_window, self.cfg.untrusted_ban, self.cfg.untrusted_limit);
        if self.pike.len() >= PIKE_SOURCES
            && !self.pike.contains_key(&ip)
            && !self.pike_make_room(now)
        {
            return;
        }
        let p =
            self.pike.entry(ip).or_insert(Pike { window_start: now, count: 0, banned_until: None });
        if now.duration_since(p.window_start) >= window {
            p.window_start = now;
            p.count = 0;
        }
        p.count += 1;
        if p.count >= limit {
            p.banned_until = Some(now + ban);
        }
    }

    /// Forgets the sources that are neither banned nor in their window; whether room was made.
    fn pike_make_room(&mut self, now: Instant) -> bool {
        let window = self.cfg.untrusted_window;
        self.pike.retain(|_, p| {
            p.banned_until.is_some_and(|b| b > now) || now.duration_since(p.window_start) < window
        });
        self.pike.len() < PIKE_SOURCES
    }

    /// Whether an INVITE from `ip` must answer a digest challenge first: digest users are set
    /// and `ip` is not in a trusted list.
    pub(super) fn must_authenticate(&self, ip: std::net::IpAddr) -> bool {
        let listed =
            !self.cfg.trusted.is_empty() && crate::config::is_trusted(&self.cfg.trusted, ip);
        self.cfg.digest.is_some() && !listed
    }

    /// Draining: new INVITEs and out-of-dialog OPTIONS are answered `503` with `Retry-After`
    /// (so a dispatcher probing with OPTIONS takes this node out); calls already up go on.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Overloaded: the same `503` answers as draining, for as long as the application says so
    /// (it measures its own headroom); unlike a drain it is undone as soon as it is cleared.
    pub fn set_overloaded(&mut self, overloaded: bool) {
        self.overloaded = overloaded;
    }

    /// Whether some shard of the node sheds load: probes (out-of-dialog OPTIONS) are then
    /// answered `503` by every shard, so a dispatcher sees one state for the node.
    pub fn set_node_overloaded(&mut self, overloaded: bool) {
        self.node_overloaded = overloaded;
    }

    /// New INVITEs answered `503` because the endpoint was overloaded, since it was made.
    pub fn overload_refusals(&self) -> u64 {
        self.overload_refusals
    }

    /// Whether new calls are refused now (draining, or this endpoint overloaded). Probes are
    /// refused also while another shard of the node is (`node_overloaded`).
    fn refusing(&self) -> bool {
        self.draining || self.overloaded
    }

    /// Live calls: ringing, answered, confirmed or hanging up.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Server transactions held now: live ones (ringing or refused INVITEs) and the answered
    /// ones that only absorb retransmissions, with the bytes the latter count against
    /// [`SipConfig::absorbed_bytes`].
    pub fn transactions(&self) -> Transactions {
        Transactions {
            live: self.servers.len(),
            absorbed: self.absorbed.len(),
            absorbed_bytes: self.absorbed.used_bytes(),
        }
    }

    /// The earliest deadline of all timers; call [`Self::handle_timeout`] then. May be earlier
    /// than needed (a wake-up that finds nothing due is harmless). Absorbed transactions end
    /// up to [`ABSORB_EXPIRY_SLACK`] late, so that their expiries share wake-ups.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let absorbed = self.absorbed.next_expiry().map(|at| at + ABSORB_EXPIRY_SLACK);
        match (self.timers.next(), absorbed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.absorbed.expire(now);
        while let Some(owner) = self.timers.pop_due(now) {
            match owner {
                Owner::Call(h) => self.call_timer(now, h),
                Owner::Server(id) => self.server_timer(now, id),
                Owner::Client(id) => self.client_timer(now, id),
            }
        }
    }

    /// Processes one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if datagram.len() > self.cfg.max_message_bytes {
            return self.dropped(DropReason::TooLarge);
        }
        let datagram = wire::skip_leading_crlf(datagram);
        if datagram.is_empty() {
            return; // CRLF keepalive (RFC 5626 §4.4.1)
        }
        let (head_bytes, rest) = wire::split_head_body(datagram);
        let head_text = wire::normalize_head(head_bytes);
        let head = wire::parse_head(&head_text);
        let trusted = crate::config::is_trusted(&self.cfg.trusted, from.ip());
        // With digest users, an unlisted source is served once its INVITE authenticates.
        let digest = self.cfg.digest.is_some();
        match message::parse_start_line(head.start_line) {
            Ok(StartLine::Response { .. }) if !trusted && !digest => {
                self.dropped(DropReason::Untrusted)
            }
            Ok(StartLine::Response { code }) => self.on_response(now, code, &head.headers, rest),
            Ok(StartLine::Request { .. }) if !trusted && self.pike_banned(now, from.ip()) => {
                self.dropped(DropReason::RateLimited)
            }
            Ok(StartLine::Request { method, .. }) if !trusted && !digest => {
                // Trunk access control: a clear answer, and nothing else happens.
                self.pike_count(now, from.ip());
                let key = server_key(method, &head.headers);
                self.answer_error(
                    now,
                    from,
                    key,
                    method == "ACK",
                    &head.headers,
                    &RequestError::Forbidden,
                );
            }
            Ok(StartLine::Request { method, uri }) => {
                self.on_request(now, from, method, uri, &head, &head_text, rest)
            }
            Err(StartLineError::NotSip) => self.dropped(DropReason::NotSip),
            Err(StartLineError::BadStatusLine) => self.dropped(DropReason::MalformedResponse),
            Err(StartLineError::Request(kind)) => {
                let err = match kind {
                    message::RequestErrorKind::BadRequestLine => RequestError::BadRequestLine,
                    message::RequestErrorKind::Version => RequestError::VersionNotSupported,
                };
                let method = head.start_line.split(' ').next().unwrap_or("");
                let key = server_key(method, &head.headers);
                self.answer_error(now, from, key, method == "ACK", &head.headers, &err);
            }
        }
    }

    // ----- the application's answers -----

    /// Answers the call with `200 OK` and our SDP (answer to the offer, or an offer when the
    /// INVITE had none) and starts retransmitting it until the ACK (RFC 3261 §13.3.1.4).
    /// `local_rtp` is our RTP socket; SDP announces `advertised_ip` when configured.
    pub fn accept(
        &mut self,
        now: Instant,
        call: CallHandle,
        local_rtp: SocketAddr,
    ) -> Result<MediaParams, AcceptError> {
        let Some(mut c) = self.calls.remove(&call) else {
            return Err(AcceptError::UnknownCall);
        };
        if c.state != CallState::Ringing {
            self.calls.insert(call, c);
            return Err(AcceptError::NotRinging);
        }
        let tag = self.local_tag(&mut c);
        c.session_id = self.ids.session_id();
        c.session_version = 1;
        let ip = self.cfg.advertised_ip.unwrap_or_else(|| {
            if local_rtp.ip().is_unspecified() { self.cfg.local.ip() } else { local_rtp.ip() }
        });
        let local = LocalMedia {
            rtp: SocketAddr::new(ip, local_rtp.port()),
            session_id: c.session_id,
            session_version: c.session_version,
        };
        c.local_rtp = Some(local.rtp);
        let (sdp_text, media) = match &c.offer {
            Some(offer) => match sdp::answer(offer, &local) {
                Ok(answered) => answered,
                Err(_) => {
                    self.final_to_invite(now, &mut c, 488, reason_phrase(488), "");
                    self.end(call, c, EndReason::Rejected);
                    return Err(AcceptError::NotAcceptable);
                }
            },
            None => {
                c.awaiting_answer = true;
                (sdp::offer(&local), placeholder_media())
            }
        };
        c.session = c.negotiated.map(|(interval, who)| SessionTimer::start(now, interval, who));
        let head = wire::parse_head(&c.invite_head);
        let mut extra = String::new();
        for rr in message::list(&head.headers, "Record-Route", None) {
            extra.push_str(&format!("Record-Route: {rr}\r\n"));
        }
        extra.push_str(&self.dialog_headers(self.signalling_addr(&c), c.session.as_ref()));
        let payload = build::response(
            &head.headers,
            c.invite_source,
            &ResponseSpec {
                code: 200,
                reason: "OK",
                to_tag: Some(&tag),
                extra: &extra,
                body: Some(("application/sdp", sdp_text.as_bytes())),
                server: &self.cfg.user_agent,
            },
        );
        c.local_sdp = sdp_text;
        // RFC 6026 §8.5: Accepted. The core retransmits the 2xx (`c.retransmit`); all the
        // transaction does until Timer L is absorb retransmitted INVITEs.
        self.absorb_accepted(now, c.invite_txn, call);
        c.retransmit = Some(Retransmit2xx::start(
            now,
            &self.t,
            c.invite_reply,
            c.dialog.remote_seq,
            payload.clone(),
        ));
        c.state = CallState::Answered;
        c.media = Some(media);
        self.send(c.invite_reply, payload);
        self.calls.insert(call, c);
        self.arm(Owner::Call(call));
        Ok(media)
    }

    /// Refuses a ringing call with a final non-2xx (`code` outside 300–699 becomes 500). The
    /// INVITE transaction then retransmits it on Timer G until the ACK or Timer H.
    pub fn reject(&mut self, now: Instant, call: CallHandle, code: u16, reason: &str) {
        let Some(mut c) = self.calls.remove(&call) else { return };
        if c.state != CallState::Ringing {
            self.calls.insert(call, c);
            return;
        }
        let code = if (300..=699).contains(&code) { code } else { 500 };
        // RFC 3261 §21.5.4: an overloaded server tells the caller when to retry, so a trunk
        // backs off (or fails over) instead of retrying at once.
        let extra = if code == 503 { RETRY_AFTER_503 } else { "" };
        self.final_to_invite(now, &mut c, code, reason, extra);
        self.end(call, c, EndReason::Rejected);
    }

    /// Ends the call: a BYE once the dialog is confirmed (RFC 3261 §15: not before the ACK or
    /// the 2xx give-up); `480` while still ringing. `CallEnded` follows the BYE's outcome.
    pub fn hangup(&mut self, now: Instant, call: CallHandle) {
        let Some(mut c) = self.calls.remove(&call) else { return };
        match c.state {
            CallState::Ringing => {
                self.final_to_invite(now, &mut c, 480, reason_phrase(480), "");
                self.end(call, c, EndReason::Rejected);
            }
            CallState::Answered => {
                c.bye_pending = true;
                self.calls.insert(call, c);
            }
            CallState::Confirmed => {
                self.send_bye(now, call, &mut c, true);
                c.state = CallState::Ending;
                self.calls.insert(call, c);
            }
            CallState::Ending => {
                self.calls.insert(call, c);
            }
        }
    }
}
