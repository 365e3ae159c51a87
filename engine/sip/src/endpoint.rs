//! The endpoint: every UAS transaction, dialog and BYE client transaction of the calls one
//! shard owns, behind the handle_/poll_ interface described in the crate docs.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use crate::body;
use crate::build::{self, ResponseSpec, host_port, reason_phrase};
use crate::call::{Call, CallState, Retransmit2xx};
use crate::config::{IdGen, SipConfig};
use crate::dialog::Dialog;
use crate::error::{AcceptError, DropReason, RequestError};
use crate::event::{CallHandle, EndReason, Event, Transmit};
use crate::message::{
    self, ALLOW, MAGIC_COOKIE, Method, Request, SUPPORTED, StartLine, StartLineError,
};
use crate::sdp::SessionDescription;
use crate::sdp::{self, Codec, Direction, LocalMedia, MediaParams, NegotiationError, SdpError};
use crate::timers::{TimerQueue, TimerValues};
use crate::transaction::client_non_invite::{ClientNonInvite, ResponseEffect};
use crate::transaction::server_invite::ServerInvite;
use crate::transaction::server_non_invite::ServerNonInvite;
use crate::transaction::{ServerKey, TimerEffect, TxnId};
use crate::uri;
use crate::wire::{self, HeaderLine};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Call(CallHandle),
    Server(TxnId),
    Client(TxnId),
}

#[derive(Debug)]
enum ServerTxn {
    Invite(ServerInvite),
    NonInvite(ServerNonInvite),
}

#[derive(Debug)]
struct ServerEntry {
    key: Option<ServerKey>,
    txn: ServerTxn,
}

impl ServerEntry {
    fn dest_and_last(&self) -> (SocketAddr, &[u8]) {
        match &self.txn {
            ServerTxn::Invite(t) => (t.dest, t.last_response()),
            ServerTxn::NonInvite(t) => (t.dest, t.last_response()),
        }
    }
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
    servers: HashMap<TxnId, ServerEntry>,
    server_index: HashMap<ServerKey, TxnId>,
    clients: HashMap<TxnId, ClientNonInvite>,
    client_index: HashMap<String, TxnId>,
    timers: TimerQueue<Owner>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl<G: IdGen> Endpoint<G> {
    /// A new endpoint with no calls.
    pub fn new(cfg: SipConfig, ids: G) -> Self {
        let t = TimerValues { t1: cfg.t1, t2: cfg.t2, t4: cfg.t4 };
        Self {
            cfg,
            t,
            ids,
            next_id: 0,
            calls: HashMap::new(),
            calls_by_id: HashMap::new(),
            servers: HashMap::new(),
            server_index: HashMap::new(),
            clients: HashMap::new(),
            client_index: HashMap::new(),
            timers: TimerQueue::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
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

    /// The earliest deadline of all timers; call [`Self::handle_timeout`] then. May be earlier
    /// than needed (a wake-up that finds nothing due is harmless).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
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
        match message::parse_start_line(head.start_line) {
            Ok(StartLine::Response { code }) => self.on_response(now, code, &head.headers),
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
        let head = wire::parse_head(&c.invite_head);
        let mut extra = String::new();
        for rr in message::list(&head.headers, "Record-Route", None) {
            extra.push_str(&format!("Record-Route: {rr}\r\n"));
        }
        extra.push_str(&self.dialog_headers(self.signalling_addr(&c), c.session_expires));
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
        if let Some(ServerEntry { txn: ServerTxn::Invite(txn), .. }) =
            self.servers.get_mut(&c.invite_txn)
        {
            txn.accepted(now, &self.t, payload.clone());
        }
        self.arm(Owner::Server(c.invite_txn));
        c.retransmit = Some(Retransmit2xx::start(
            now,
            &self.t,
            c.invite_source,
            c.dialog.remote_seq,
            payload.clone(),
        ));
        c.state = CallState::Answered;
        c.media = Some(media);
        self.send(c.invite_source, payload);
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

    // ----- requests -----

    #[allow(clippy::too_many_arguments)]
    fn on_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        method_str: &str,
        uri_str: &str,
        head: &wire::Head<'_>,
        head_text: &str,
        rest: &[u8],
    ) {
        let headers = &head.headers;
        let is_ack = method_str == "ACK";
        if message::list(headers, "Via", Some("v")).is_empty() {
            // No Via: the sender could not match any answer (RFC 3261 §8.1.1.7).
            let reason = if is_ack { DropReason::UnmatchedAck } else { DropReason::Unanswerable };
            return self.dropped(reason);
        }
        let key = server_key(method_str, headers);
        // Retransmissions first (RFC 3261 §17.2.3), before any costly parsing.
        if let Some(id) = key.as_ref().and_then(|k| self.server_index.get(k)).copied() {
            if is_ack {
                if let Some(ServerEntry { txn: ServerTxn::Invite(txn), .. }) =
                    self.servers.get_mut(&id)
                {
                    if txn.on_ack(now, &self.t) {
                        self.arm(Owner::Server(id));
                        return;
                    }
                }
            } else {
                if let Some(entry) = self.servers.get(&id) {
                    let (dest, last) = entry.dest_and_last();
                    if !last.is_empty() {
                        let last = last.to_vec();
                        self.send(dest, last);
                    }
                }
                return;
            }
        }
        let body = match wire::frame_body(headers, rest) {
            Ok(body) => body,
            Err(e) => return self.answer_error(now, from, key, is_ack, headers, &e.into()),
        };
        if head.bad_line {
            return self.answer_error(
                now,
                from,
                key,
                is_ack,
                headers,
                &RequestError::BadHeaderLine,
            );
        }
        let req = match message::parse_request(method_str, uri_str, headers, body) {
            Ok(req) => req,
            Err(e) => return self.answer_error(now, from, key, is_ack, headers, &e),
        };
        match req.method {
            Method::Invite if req.to.tag().is_some() => {
                self.on_reinvite(now, from, key, &req, headers, body)
            }
            Method::Invite => self.on_invite(now, from, key, &req, headers, head_text, body),
            Method::Ack => self.on_ack(now, &req, body),
            Method::Cancel => self.on_cancel(now, from, key, headers),
            Method::Bye => self.on_bye(now, from, key, &req, headers),
            Method::Options => self.on_options(now, from, key, &req, headers),
            Method::Update | Method::Info => {
                self.on_update_info(now, from, key, &req, headers, body)
            }
            Method::NotAllowed | Method::Unknown => {
                self.answer_error(now, from, key, false, headers, &RequestError::UnknownMethod)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_invite(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
        head_text: &str,
        body: &[u8],
    ) {
        if self.calls_by_id.contains_key(req.call_id) {
            // Same Call-ID, new transaction: a merged or looped request (§8.2.2.2).
            return self.answer_error(now, from, key, false, headers, &RequestError::MergedRequest);
        }
        let offer = match read_offer(req, body) {
            Ok(offer) => offer,
            Err(e) => return self.answer_error(now, from, key, false, headers, &e),
        };
        if let Some(offer) = &offer {
            // Refuse at once what accept() could never answer, before the application starts
            // work for the call (RFC 3264 §6: no common codec -> 488).
            let probe = LocalMedia { rtp: self.cfg.local, session_id: 0, session_version: 0 };
            if let Err(e) = sdp::answer(offer, &probe) {
                return self.answer_error(now, from, key, false, headers, &negotiation_error(e));
            }
        }
        let handle = CallHandle(self.fresh_id());
        let txn_id = TxnId(self.fresh_id());
        let trying = build::response(
            headers,
            from,
            &ResponseSpec {
                code: 100,
                reason: "Trying",
                to_tag: None,
                extra: "",
                body: None,
                server: &self.cfg.user_agent,
            },
        );
        self.send(from, trying.clone());
        let txn = ServerInvite::proceeding(Some(handle), from, trying);
        if let Some(k) = &key {
            self.server_index.insert(k.clone(), txn_id);
        }
        self.servers.insert(txn_id, ServerEntry { key, txn: ServerTxn::Invite(txn) });

        let session_expires =
            req.session_expires.filter(|_| req.supports_timer).map(|(delta, _)| delta);
        let call = Call {
            state: CallState::Ringing,
            dialog: Dialog::from_invite(req, req.from_raw, req.to_raw, from),
            invite_head: head_text.to_owned(),
            invite_txn: txn_id,
            invite_source: from,
            offer: offer.clone(),
            session_expires,
            retransmit: None,
            local_rtp: None,
            session_id: 0,
            session_version: 0,
            awaiting_answer: false,
            media: None,
            bye_pending: false,
        };
        self.calls_by_id.insert(req.call_id.to_owned(), handle);
        self.calls.insert(handle, call);
        let to_user = uri::user_of(&req.uri).or_else(|| uri::user_of(&req.to.uri));
        self.events.push_back(Event::IncomingCall {
            call: handle,
            call_id: req.call_id.to_owned(),
            from_user: uri::user_of(&req.from.uri).unwrap_or_default(),
            to_user: to_user.unwrap_or_default(),
            source: from,
            offer,
        });
    }

    fn on_reinvite(
        &mut self,
        now: Instant,
        from: SocketAddr,
        mut key: Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
        body: &[u8],
    ) {
        let Some((h, mut c)) = self.take_in_dialog(now, from, &mut key, req, headers) else {
            return;
        };
        // The caller re-INVITEs inside the dialog, so it has our 2xx: stop resending it and
        // count the dialog as confirmed even if that ACK was lost.
        if c.retransmit.take().is_some() {
            self.confirm(now, h, &mut c);
        }
        if let Some(contact) = &req.contact {
            c.dialog.remote_target = Some(contact.uri.raw.to_owned()); // target refresh §12.2.2
        }
        let offer = match read_offer(req, body) {
            Ok(offer) => offer,
            Err(e) => {
                self.calls.insert(h, c);
                return self.answer_error(now, from, key, false, headers, &e);
            }
        };
        let local = LocalMedia {
            rtp: c.local_rtp.unwrap_or(self.cfg.public_addr()),
            session_id: c.session_id,
            session_version: c.session_version + 1,
        };
        let (sdp_text, media) = match &offer {
            Some(offer) => match sdp::answer(offer, &local) {
                Ok((text, media)) => (text, Some(media)),
                Err(e) => {
                    self.calls.insert(h, c);
                    let err = negotiation_error(e);
                    return self.answer_error(now, from, key, false, headers, &err);
                }
            },
            None => {
                c.awaiting_answer = true;
                (sdp::offer(&local), None)
            }
        };
        c.session_version += 1;
        let se = req.session_expires.filter(|_| req.supports_timer).map(|(d, _)| d);
        let extra = self.dialog_headers(self.signalling_addr(&c), se);
        let payload = build::response(
            headers,
            from,
            &ResponseSpec {
                code: 200,
                reason: "OK",
                to_tag: None,
                extra: &extra,
                body: Some(("application/sdp", sdp_text.as_bytes())),
                server: &self.cfg.user_agent,
            },
        );
        let txn_id = TxnId(self.fresh_id());
        let mut txn = ServerInvite::proceeding(Some(h), from, Vec::new());
        txn.accepted(now, &self.t, payload.clone());
        if let Some(k) = &key {
            self.server_index.insert(k.clone(), txn_id);
        }
        self.servers.insert(txn_id, ServerEntry { key, txn: ServerTxn::Invite(txn) });
        self.arm(Owner::Server(txn_id));
        c.retransmit = Some(Retransmit2xx::start(now, &self.t, from, req.cseq, payload.clone()));
        self.send(from, payload);
        if let Some(media) = media {
            c.media = Some(media);
            self.events.push_back(Event::MediaChanged { call: h, media });
        }
        self.calls.insert(h, c);
        self.arm(Owner::Call(h));
    }

    fn on_ack(&mut self, now: Instant, req: &Request<'_>, body: &[u8]) {
        let Some((h, mut c)) = self.take_dialog(req) else {
            return self.dropped(DropReason::UnmatchedAck);
        };
        let acks_our_2xx = c.retransmit.as_ref().is_some_and(|r| r.cseq == req.cseq);
        if acks_our_2xx {
            c.retransmit = None;
            if c.awaiting_answer && !body.is_empty() {
                c.awaiting_answer = false;
                let media = body::sdp_of(req.content_type, body)
                    .and_then(|b| SessionDescription::parse(b).ok())
                    .and_then(|sd| sdp::read_answer(&sd).ok());
                if let Some(media) = media {
                    c.media = Some(media);
                    self.events.push_back(Event::MediaChanged { call: h, media });
                }
            }
            self.confirm(now, h, &mut c);
        }
        // Otherwise a retransmitted ACK: absorbed.
        self.calls.insert(h, c);
    }

    fn on_cancel(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        headers: &[HeaderLine<'_>],
    ) {
        // §9.2: the CANCEL carries the INVITE's branch and sent-by.
        let invite_key =
            key.as_ref().map(|k| ServerKey { method: "INVITE".to_owned(), ..k.clone() });
        let txn_id = invite_key.and_then(|k| self.server_index.get(&k).copied());
        let Some(txn_id) = txn_id else {
            return self.answer_error(
                now,
                from,
                key,
                false,
                headers,
                &RequestError::NoSuchCallOrTransaction,
            );
        };
        let call = match self.servers.get(&txn_id) {
            Some(ServerEntry { txn: ServerTxn::Invite(txn), .. }) if txn.is_proceeding() => {
                txn.call
            }
            _ => None,
        };
        let ringing = call.and_then(|h| self.calls.remove(&h).map(|c| (h, c)));
        // §9.2: the 200 to the CANCEL and the 487 to the INVITE carry the same To tag.
        let tag = match ringing {
            Some((_, ref c)) if c.dialog.local_tag.is_some() => c.dialog.local_tag.clone(),
            _ => None,
        }
        .unwrap_or_else(|| self.ids.tag());
        let ok = build::response(
            headers,
            from,
            &ResponseSpec {
                code: 200,
                reason: "OK",
                to_tag: Some(&tag),
                extra: "",
                body: None,
                server: &self.cfg.user_agent,
            },
        );
        self.send_final(now, from, key, ok);
        if let Some((h, mut c)) = ringing {
            if c.state == CallState::Ringing {
                c.dialog.local_tag = Some(tag);
                self.final_to_invite(now, &mut c, 487, reason_phrase(487), "");
                self.end(h, c, EndReason::Cancelled);
            } else {
                self.calls.insert(h, c);
            }
        }
    }

    fn on_bye(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
    ) {
        let Some((h, c)) = self.take_dialog(req) else {
            return self.answer_error(
                now,
                from,
                key,
                false,
                headers,
                &RequestError::NoSuchCallOrTransaction,
            );
        };
        let ok = self.plain_ok(headers, from, "");
        self.send_final(now, from, key, ok);
        self.end(h, c, EndReason::RemoteBye);
    }

    fn on_options(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
    ) {
        if req.to.tag().is_some() {
            match self.take_dialog(req) {
                Some((h, c)) => {
                    self.calls.insert(h, c);
                }
                None => {
                    return self.answer_error(
                        now,
                        from,
                        key,
                        false,
                        headers,
                        &RequestError::NoSuchCallOrTransaction,
                    );
                }
            }
        }
        // Carriers probe trunks with OPTIONS (RFC 3261 §11.2).
        let extra =
            format!("Allow: {ALLOW}\r\nAccept: application/sdp\r\nSupported: {SUPPORTED}\r\n");
        let ok = self.plain_ok(headers, from, &extra);
        self.send_final(now, from, key, ok);
    }

    fn on_update_info(
        &mut self,
        now: Instant,
        from: SocketAddr,
        mut key: Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
        body: &[u8],
    ) {
        let Some((h, mut c)) = self.take_in_dialog(now, from, &mut key, req, headers) else {
            return;
        };
        let offer = if req.method == Method::Update { read_offer(req, body) } else { Ok(None) };
        let offer = match offer {
            Ok(o) => o,
            Err(e) => {
                self.calls.insert(h, c);
                return self.answer_error(now, from, key, false, headers, &e);
            }
        };
        let ok = match offer {
            None => self.plain_ok(headers, from, ""),
            Some(offer) => {
                // RFC 3311 §5.2: an UPDATE offer is answered in its 200.
                let local = LocalMedia {
                    rtp: c.local_rtp.unwrap_or(self.cfg.public_addr()),
                    session_id: c.session_id,
                    session_version: c.session_version + 1,
                };
                match sdp::answer(&offer, &local) {
                    Ok((text, media)) => {
                        c.session_version += 1;
                        c.media = Some(media);
                        self.events.push_back(Event::MediaChanged { call: h, media });
                        let contact =
                            format!("Contact: <sip:{}>\r\n", host_port(self.signalling_addr(&c)));
                        build::response(
                            headers,
                            from,
                            &ResponseSpec {
                                code: 200,
                                reason: "OK",
                                to_tag: None,
                                extra: &contact,
                                body: Some(("application/sdp", text.as_bytes())),
                                server: &self.cfg.user_agent,
                            },
                        )
                    }
                    Err(e) => {
                        self.calls.insert(h, c);
                        let err = negotiation_error(e);
                        return self.answer_error(now, from, key, false, headers, &err);
                    }
                }
            }
        };
        self.calls.insert(h, c);
        self.send_final(now, from, key, ok);
    }

    // ----- responses -----

    fn on_response(&mut self, now: Instant, code: u16, headers: &[HeaderLine<'_>]) {
        let Some(resp) = message::parse_response(code, headers) else {
            return self.dropped(DropReason::MalformedResponse);
        };
        let Some(&id) = self.client_index.get(resp.branch) else {
            return self.dropped(DropReason::UnmatchedResponse);
        };
        if resp.cseq_method != "BYE" {
            return self.dropped(DropReason::UnmatchedResponse);
        }
        let Some(txn) = self.clients.get_mut(&id) else { return };
        match txn.on_response(now, &self.t, resp.code) {
            ResponseEffect::Final(_) => {
                let (call, ends_call) = (txn.call, txn.ends_call);
                if ends_call {
                    if let Some(c) = self.calls.remove(&call) {
                        self.end(call, c, EndReason::LocalBye);
                    }
                }
                self.arm(Owner::Client(id));
            }
            ResponseEffect::Provisional => self.arm(Owner::Client(id)),
            ResponseEffect::Absorbed => {}
        }
    }

    // ----- timers -----

    fn call_timer(&mut self, now: Instant, h: CallHandle) {
        let Some(mut c) = self.calls.remove(&h) else { return };
        let mut fired = false;
        while let Some(r) = c.retransmit.as_mut() {
            if r.give_up_at <= now {
                // §13.3.1.4: no ACK within 64*T1: end the dialog with a BYE.
                c.retransmit = None;
                self.send_bye(now, h, &mut c, false);
                self.end(h, c, EndReason::AckTimeout);
                return;
            }
            if r.next_at > now {
                break;
            }
            fired = true;
            r.interval = self.t.double(r.interval);
            r.next_at += r.interval;
            let (dest, payload) = (r.dest, r.payload.clone());
            self.send(dest, payload);
        }
        self.calls.insert(h, c);
        if fired {
            self.arm(Owner::Call(h));
        }
    }

    fn server_timer(&mut self, now: Instant, id: TxnId) {
        let mut fired = false;
        let mut done = false;
        loop {
            let Some(entry) = self.servers.get_mut(&id) else { return };
            let effect = match &mut entry.txn {
                ServerTxn::Invite(t) => t.poll_timer(now, &self.t),
                ServerTxn::NonInvite(t) => t.poll_timer(now),
            };
            match effect {
                None => break,
                Some(TimerEffect::Retransmit) => {
                    fired = true;
                    let (dest, last) = entry.dest_and_last();
                    let last = last.to_vec();
                    self.send(dest, last);
                }
                Some(TimerEffect::TimedOut | TimerEffect::Terminated) => {
                    done = true;
                    break;
                }
            }
        }
        if done {
            if let Some(entry) = self.servers.remove(&id) {
                if let Some(k) = entry.key {
                    if self.server_index.get(&k) == Some(&id) {
                        self.server_index.remove(&k);
                    }
                }
            }
        } else if fired {
            self.arm(Owner::Server(id));
        }
    }

    fn client_timer(&mut self, now: Instant, id: TxnId) {
        let mut fired = false;
        loop {
            let Some(txn) = self.clients.get_mut(&id) else { return };
            match txn.poll_timer(now, &self.t) {
                None => break,
                Some(TimerEffect::Retransmit) => {
                    fired = true;
                    let (dest, req) = (txn.dest, txn.request().to_vec());
                    self.send(dest, req);
                }
                Some(effect) => {
                    let (call, ends_call) = (txn.call, txn.ends_call);
                    self.clients.remove(&id);
                    self.client_index.retain(|_, v| *v != id);
                    if effect == TimerEffect::TimedOut && ends_call {
                        if let Some(c) = self.calls.remove(&call) {
                            self.end(call, c, EndReason::LocalBye);
                        }
                    }
                    return;
                }
            }
        }
        if fired {
            self.arm(Owner::Client(id));
        }
    }

    // ----- helpers -----

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn send(&mut self, dest: SocketAddr, payload: Vec<u8>) {
        self.transmits.push_back(Transmit { dest, payload });
    }

    fn dropped(&mut self, reason: DropReason) {
        self.events.push_back(Event::Dropped { reason });
    }

    fn arm(&mut self, owner: Owner) {
        let next = match owner {
            Owner::Call(h) => self.calls.get(&h).and_then(Call::next_deadline),
            Owner::Server(id) => self.servers.get(&id).and_then(|e| match &e.txn {
                ServerTxn::Invite(t) => t.next_deadline(),
                ServerTxn::NonInvite(t) => t.next_deadline(),
            }),
            Owner::Client(id) => self.clients.get(&id).and_then(ClientNonInvite::next_deadline),
        };
        if let Some(at) = next {
            self.timers.schedule(at, owner);
        }
    }

    fn local_tag(&mut self, c: &mut Call) -> String {
        if let Some(tag) = &c.dialog.local_tag {
            return tag.clone();
        }
        let tag = self.ids.tag();
        c.dialog.local_tag = Some(tag.clone());
        tag
    }

    /// The address this call's Contact and Via announce. With an advertised IP, that one. Bound
    /// to a wildcard address (`0.0.0.0`, the default) with none advertised, `public_addr` would
    /// announce `0.0.0.0`, where no caller can send its ACK or BYE: use the address the shard
    /// chose for the call's RTP instead (the local address that routes to the caller).
    fn signalling_addr(&self, c: &Call) -> SocketAddr {
        let public = self.cfg.public_addr();
        match c.local_rtp {
            Some(rtp) if public.ip().is_unspecified() && !rtp.ip().is_unspecified() => {
                SocketAddr::new(rtp.ip(), public.port())
            }
            _ => public,
        }
    }

    /// Contact, Allow, Supported and the session timer of our 2xx to an INVITE.
    fn dialog_headers(&self, addr: SocketAddr, session_expires: Option<u32>) -> String {
        let mut extra = format!(
            "Contact: <sip:{}>\r\nAllow: {ALLOW}\r\nSupported: {SUPPORTED}\r\n",
            host_port(addr)
        );
        if let Some(se) = session_expires {
            // RFC 4028 §9: the caller refreshes; we only answer its re-INVITEs/UPDATEs.
            extra.push_str(&format!("Session-Expires: {se};refresher=uac\r\nRequire: timer\r\n"));
        }
        extra
    }

    fn plain_ok(&mut self, headers: &[HeaderLine<'_>], from: SocketAddr, extra: &str) -> Vec<u8> {
        let has_tag = message::single(headers, "To", Some("t"))
            .ok()
            .flatten()
            .and_then(|to| uri::parse_name_addr(to).ok())
            .and_then(|n| n.tag())
            .is_some();
        let tag = if has_tag { None } else { Some(self.ids.tag()) };
        build::response(
            headers,
            from,
            &ResponseSpec {
                code: 200,
                reason: "OK",
                to_tag: tag.as_deref(),
                extra,
                body: None,
                server: &self.cfg.user_agent,
            },
        )
    }

    /// Sends a final response and keeps a server transaction that resends it to
    /// retransmissions (§17.2.1 Timer G/H for INVITE, §17.2.2 Timer J otherwise).
    fn send_final(
        &mut self,
        now: Instant,
        dest: SocketAddr,
        key: Option<ServerKey>,
        payload: Vec<u8>,
    ) {
        self.send(dest, payload.clone());
        let Some(key) = key else { return };
        if self.server_index.contains_key(&key) {
            return;
        }
        let txn = if key.method == "INVITE" {
            ServerTxn::Invite(ServerInvite::refused(now, &self.t, dest, payload))
        } else {
            ServerTxn::NonInvite(ServerNonInvite::completed(now, &self.t, dest, payload))
        };
        let id = TxnId(self.fresh_id());
        self.server_index.insert(key.clone(), id);
        self.servers.insert(id, ServerEntry { key: Some(key), txn });
        self.arm(Owner::Server(id));
    }

    fn answer_error(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        is_ack: bool,
        headers: &[HeaderLine<'_>],
        err: &RequestError,
    ) {
        if is_ack {
            // ACK is never answered (RFC 3261 §17.2.3).
            return self.dropped(DropReason::UnmatchedAck);
        }
        let extra = match err {
            RequestError::UnknownMethod | RequestError::MethodNotAllowed => {
                format!("Allow: {ALLOW}\r\n")
            }
            RequestError::BadExtension(tags) => format!("Unsupported: {}\r\n", tags.join(", ")),
            RequestError::UnsupportedMediaType | RequestError::NotAcceptable => {
                "Accept: application/sdp\r\n".to_owned()
            }
            RequestError::SessionIntervalTooSmall => format!("Min-SE: {}\r\n", message::MIN_SE),
            _ => String::new(),
        };
        let reason = err.to_string();
        let tag = self.ids.tag();
        let payload = build::response(
            headers,
            from,
            &ResponseSpec {
                code: err.status_code(),
                reason: &reason,
                to_tag: Some(&tag),
                extra: &extra,
                body: None,
                server: &self.cfg.user_agent,
            },
        );
        self.send_final(now, from, key, payload);
    }

    /// A final non-2xx to the call's INVITE, with our To tag.
    fn final_to_invite(
        &mut self,
        now: Instant,
        c: &mut Call,
        code: u16,
        reason: &str,
        extra: &str,
    ) {
        let tag = self.local_tag(c);
        let head = wire::parse_head(&c.invite_head);
        let payload = build::response(
            &head.headers,
            c.invite_source,
            &ResponseSpec {
                code,
                reason,
                to_tag: Some(&tag),
                extra,
                body: None,
                server: &self.cfg.user_agent,
            },
        );
        if let Some(ServerEntry { txn: ServerTxn::Invite(txn), .. }) =
            self.servers.get_mut(&c.invite_txn)
        {
            txn.final_non2xx(now, &self.t, payload.clone());
        }
        self.arm(Owner::Server(c.invite_txn));
        self.send(c.invite_source, payload);
    }

    fn send_bye(&mut self, now: Instant, h: CallHandle, c: &mut Call, ends_call: bool) {
        let tag = self.local_tag(c);
        c.dialog.local_seq += 1;
        let (request_uri, routes, dest) = c.dialog.request_target();
        let mut branch = self.ids.branch();
        if !branch.starts_with(MAGIC_COOKIE) {
            branch.insert_str(0, MAGIC_COOKIE);
        }
        let payload = build::request(&build::RequestSpec {
            method: "BYE",
            request_uri: &request_uri,
            routes: &routes,
            sent_by: &host_port(self.signalling_addr(c)),
            branch: &branch,
            from: &format!("{};tag={tag}", c.dialog.local_uri),
            to: &c.dialog.remote_uri,
            call_id: &c.dialog.call_id,
            cseq: c.dialog.local_seq,
            user_agent: &self.cfg.user_agent,
        });
        let id = TxnId(self.fresh_id());
        let txn = ClientNonInvite::start(now, &self.t, h, ends_call, dest, payload.clone());
        self.clients.insert(id, txn);
        self.client_index.insert(branch, id);
        self.arm(Owner::Client(id));
        self.send(dest, payload);
    }

    /// ACK (or a later in-dialog INVITE) for our 2xx to the initial INVITE.
    fn confirm(&mut self, now: Instant, h: CallHandle, c: &mut Call) {
        if c.state != CallState::Answered {
            return;
        }
        c.state = CallState::Confirmed;
        self.events.push_back(Event::CallConfirmed { call: h });
        if c.bye_pending {
            c.bye_pending = false;
            self.send_bye(now, h, c, true);
            c.state = CallState::Ending;
        }
    }

    /// The call matching an in-dialog request (§12.2.2), taken out of the table.
    /// The dialog of an in-dialog request that may change it (re-INVITE, UPDATE, INFO), with
    /// its remote CSeq advanced; answers 481 for an unknown dialog and 500 for a CSeq lower
    /// than the last one (§12.2.2) and returns `None` then.
    fn take_in_dialog(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: &mut Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
    ) -> Option<(CallHandle, Call)> {
        let error = match self.take_dialog(req) {
            None => RequestError::NoSuchCallOrTransaction,
            Some((h, c)) if req.cseq < c.dialog.remote_seq => {
                self.calls.insert(h, c);
                RequestError::CSeqOutOfOrder
            }
            Some((h, mut c)) => {
                c.dialog.remote_seq = req.cseq;
                return Some((h, c));
            }
        };
        self.answer_error(now, from, key.take(), false, headers, &error);
        None
    }

    fn take_dialog(&mut self, req: &Request<'_>) -> Option<(CallHandle, Call)> {
        let h = *self.calls_by_id.get(req.call_id)?;
        let c = self.calls.remove(&h)?;
        if c.dialog.matches(req.call_id, req.from.tag(), req.to.tag()) {
            Some((h, c))
        } else {
            self.calls.insert(h, c);
            None
        }
    }

    fn end(&mut self, h: CallHandle, c: Call, reason: EndReason) {
        if self.calls_by_id.get(&c.dialog.call_id) == Some(&h) {
            self.calls_by_id.remove(&c.dialog.call_id);
        }
        self.events.push_back(Event::CallEnded { call: h, reason });
    }
}

/// §17.2.3 matching key, built from the raw header fields before full validation so that
/// retransmissions are recognised cheaply.
fn server_key(method: &str, headers: &[HeaderLine<'_>]) -> Option<ServerKey> {
    let vias = message::list(headers, "Via", Some("v"));
    let via = message::parse_via(vias.first()?)?;
    let method = if method == "ACK" { "INVITE" } else { method };
    let sent_by = via.sent_by.to_ascii_lowercase();
    match via.branch {
        Some(b) if b.starts_with(MAGIC_COOKIE) => (b.len() > MAGIC_COOKIE.len())
            .then(|| ServerKey { branch: b.to_owned(), sent_by, method: method.to_owned() }),
        other => {
            // RFC 2543 peer: Call-ID, CSeq number, From tag and the Via branch stand in.
            let call_id = message::single(headers, "Call-ID", Some("i")).ok()??;
            let cseq = message::single(headers, "CSeq", None).ok()??;
            let seq = cseq.split_whitespace().next()?;
            let from = message::single(headers, "From", Some("f")).ok()??;
            let from_tag = uri::parse_name_addr(from).ok().and_then(|n| n.tag()).unwrap_or("");
            Some(ServerKey {
                branch: format!("2543|{call_id}|{seq}|{from_tag}|{}", other.unwrap_or("")),
                sent_by,
                method: method.to_owned(),
            })
        }
    }
}

fn read_offer(req: &Request<'_>, body: &[u8]) -> Result<Option<SessionDescription>, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let Some(sdp_bytes) = body::sdp_of(req.content_type, body) else {
        return Err(RequestError::UnsupportedMediaType);
    };
    match SessionDescription::parse(sdp_bytes) {
        Ok(sd) => Ok(Some(sd)),
        Err(SdpError::UnsupportedAddress) => Err(RequestError::NotAcceptableHere),
        Err(e) => Err(RequestError::Sdp(e)),
    }
}

fn negotiation_error(e: NegotiationError) -> RequestError {
    match e {
        NegotiationError::NoCommonCodec | NegotiationError::Sdp(SdpError::UnsupportedAddress) => {
            RequestError::NotAcceptableHere
        }
        NegotiationError::Sdp(e) => RequestError::Sdp(e),
    }
}

/// Media of an offerless call until the ACK brings the answer.
fn placeholder_media() -> MediaParams {
    MediaParams {
        remote_rtp: SocketAddr::from(([0, 0, 0, 0], 0)),
        payload_type: 0,
        codec: Codec::Pcmu,
        telephone_event: Some(101),
        ptime_ms: 20,
        direction: Direction::SendRecv,
    }
}
