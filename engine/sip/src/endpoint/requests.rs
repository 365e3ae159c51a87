//! Each request method: INVITE, re-INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE/INFO.

use std::net::SocketAddr;
use std::time::Instant;

use crate::auth;
use crate::body;
use crate::build::{self, ResponseSpec, host_port, reason_phrase};
use crate::call::{Call, CallState, Retransmit2xx};
use crate::config::IdGen;
use crate::dialog::Dialog;
use crate::error::{DropReason, RequestError};
use crate::event::{CallHandle, EndReason, Event};
use crate::message::{self, ALLOW, Method, Request, SUPPORTED};
use crate::sdp::SessionDescription;
use crate::sdp::{self, LocalMedia};
use crate::session_timer::{self, SessionTimer};
use crate::transaction::server_invite::ServerInvite;
use crate::transaction::{ServerKey, TxnId};
use crate::uri;
use crate::wire::{self, HeaderLine};

use super::matching::*;
use super::*;

impl<G: IdGen> Endpoint<G> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_request(
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
        let Some(top_via) = message::first(headers, "Via", Some("v")) else {
            // No Via: the sender could not match any answer (RFC 3261 §8.1.1.7).
            let reason = if is_ack { DropReason::UnmatchedAck } else { DropReason::Unanswerable };
            return self.dropped(reason);
        };
        let key = server_key_at(method_str, top_via, headers);
        // Retransmissions first (RFC 3261 §17.2.3), before any costly parsing. Only INVITE
        // transactions (ringing, or refused and awaiting the ACK) are live; every other
        // method's answered transaction is in the absorbed table.
        let live = key.as_ref().filter(|k| k.method == "INVITE");
        if let Some(id) = live.and_then(|k| self.server_index.get(k)).copied() {
            if is_ack {
                if let Some(ServerEntry { txn, .. }) = self.servers.get_mut(&id) {
                    if txn.on_ack(now, &self.t) {
                        self.absorb_confirmed(now, id);
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
        } else if key.as_ref().is_some_and(|k| self.absorb_retransmission(k, is_ack, headers, from))
        {
            return;
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
    pub(super) fn on_invite(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
        head_text: &str,
        body: &[u8],
    ) {
        if let Some(c) = self.calls_by_id.get(req.call_id).and_then(|h| self.calls.get(h)) {
            // §8.2.2.2: the same From tag, Call-ID and CSeq as a transaction of ours, but another
            // transaction: the request was merged (it forked and both copies reached us), 482.
            // Anything else with a live call's Call-ID cannot start a call of its own (calls are
            // routed and recorded by Call-ID): 500 with Retry-After, as §14.2 answers an INVITE
            // that overlaps another.
            let merged =
                c.dialog.remote_tag == req.from.tag().unwrap_or("") && c.invite_cseq == req.cseq;
            let err = if merged { RequestError::MergedRequest } else { RequestError::CallIdInUse };
            return self.answer_error(now, from, key, false, headers, &err);
        }
        if self.refusing() || self.servers.len() >= self.cfg.max_transactions {
            if self.overloaded && !self.draining {
                self.overload_refusals += 1;
            }
            // Stateless (RFC 3261 §8.2.7): a refusal keeps no transaction, no Timer G
            // retransmissions and no absorbed entry, so refusing costs a fraction of a call
            // however many are refused. A lost 503 is repaired by the caller's retransmitted
            // INVITE, which gets the same 503 (the To tag is a function of the request); its
            // ACK is swallowed by `on_ack`.
            return self.answer_stateless(from, headers, &RequestError::Unavailable);
        }
        if let Some(err) = self.authenticate(now, from, req, headers) {
            return self.answer_error(now, from, key, false, headers, &err);
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
        let reply = self.reply_addr(headers, from);
        self.send(reply, trying.clone());
        let txn = ServerInvite::proceeding(Some(handle), reply, trying);
        if let Some(k) = &key {
            self.server_index.insert(k.clone(), txn_id);
        }
        self.servers.insert(txn_id, ServerEntry { key, txn });

        let allows_update = message::list(headers, "Allow", None)
            .iter()
            .any(|m| m.trim().eq_ignore_ascii_case("UPDATE"));
        let call = Call {
            state: CallState::Ringing,
            dialog: Dialog::from_invite(req, req.from_raw, req.to_raw, from),
            invite_head: head_text.to_owned(),
            invite_txn: txn_id,
            invite_source: from,
            invite_reply: reply,
            invite_cseq: req.cseq,
            offer: offer.clone(),
            negotiated: session_timer::negotiate(req.session_expires, req.supports_timer),
            session: None,
            min_se: message::MIN_SE,
            allows_update,
            offer_in_flight: false,
            retransmit: None,
            local_sdp: String::new(),
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

    /// RFC 8760 digest authentication of a new call from an address outside the trusted list:
    /// `None` when it may go on, else the `401` challenge or the `403` to answer. Refusals count
    /// against the source's pike limit; challenges do not (every call gets one).
    fn authenticate(
        &mut self,
        now: Instant,
        from: SocketAddr,
        req: &Request<'_>,
        headers: &[HeaderLine<'_>],
    ) -> Option<RequestError> {
        if !self.must_authenticate(from.ip()) {
            return None;
        }
        let digest = self.cfg.digest.as_ref()?;
        let authorizations = message::list_whole(headers, "Authorization");
        let verdict =
            self.nonces.verify(now, from.ip(), digest, "INVITE", req.uri.raw, &authorizations);
        match verdict {
            auth::Verdict::Accepted => None,
            auth::Verdict::Challenge { stale } => {
                let challenge = self.nonces.challenge(now, from.ip(), digest, stale);
                Some(RequestError::Unauthorized(challenge))
            }
            auth::Verdict::Refused => {
                self.pike_count(now, from.ip());
                Some(RequestError::Forbidden)
            }
        }
    }

    pub(super) fn on_reinvite(
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
        if c.offer_outstanding() {
            // The offers cross (RFC 3261 §14.2); the caller retries after a random pause.
            self.calls.insert(h, c);
            return self.answer_error(
                now,
                from,
                key,
                false,
                headers,
                &RequestError::RequestPending,
            );
        }
        // The caller re-INVITEs inside the dialog, so it has our 2xx: stop resending it and
        // count the dialog as confirmed even if that ACK was lost.
        if c.retransmit.take().is_some() {
            self.confirm(now, h, &mut c);
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
        refresh_session(now, &mut c, req);
        let extra = self.dialog_headers(self.signalling_addr(&c), c.session.as_ref());
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
        c.local_sdp = sdp_text;
        let reply = self.reply_addr(headers, from);
        // Answered at once: Accepted (RFC 6026 §8.5) from the start.
        if let Some(k) = &key {
            self.absorbed.insert(now, self.t.t1x64(), k, reply, Answer::Accepted(h));
        }
        c.retransmit = Some(Retransmit2xx::start(now, &self.t, reply, req.cseq, payload.clone()));
        self.send(reply, payload);
        if let Some(media) = media {
            c.media = Some(media);
            self.events.push_back(Event::MediaChanged { call: h, media });
        }
        self.calls.insert(h, c);
        self.arm(Owner::Call(h));
    }

    pub(super) fn on_ack(&mut self, now: Instant, req: &Request<'_>, body: &[u8]) {
        let Some((h, mut c)) = self.take_dialog(req) else {
            if req.to.tag().is_some_and(is_stateless_tag) {
                return; // the ACK of a stateless refusal (§8.2.7: nothing to do)
            }
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
        // Confirmed: the session timer counts from now on.
        self.arm(Owner::Call(h));
    }

    pub(super) fn on_cancel(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: Option<ServerKey>,
        headers: &[HeaderLine<'_>],
    ) {
        // §9.2: the CANCEL carries the INVITE's branch and sent-by.
        let invite_key = key.as_ref().map(|k| ServerKey { method: "INVITE".into(), ..k.clone() });
        let txn_id = invite_key.as_ref().and_then(|k| self.server_index.get(k).copied());
        // An INVITE already answered with a 2xx is absorbed now: the CANCEL gets its 200 and
        // no effect (§9.2), as a live transaction past Proceeding gives it.
        let answered = invite_key.as_ref().is_some_and(|k| self.absorbed.get(k).is_some());
        if txn_id.is_none() && !answered {
            return self.answer_error(
                now,
                from,
                key,
                false,
                headers,
                &RequestError::NoSuchCallOrTransaction,
            );
        }
        let call = match txn_id.and_then(|id| self.servers.get(&id)) {
            Some(ServerEntry { txn, .. }) if txn.is_proceeding() => txn.call,
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
        self.send_final(now, headers, from, key, ok);
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

    pub(super) fn on_bye(
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
        // take_dialog matched our To tag, so the 200 is a function of the request alone.
        self.send_rebuildable_ok(now, headers, from, key);
        self.end(h, c, EndReason::RemoteBye);
    }

    pub(super) fn on_options(
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
        // Out of a dialog, OPTIONS is answered statelessly (RFC 3261 §8.2.7): a retransmission
        // gets the same answer again, To tag included, and a probe or a flood of them keeps no
        // transaction for 32 s.
        let out_of_dialog = req.to.tag().is_none();
        let key = if out_of_dialog { None } else { key };
        if (self.refusing() || self.node_overloaded) && out_of_dialog {
            // The probe of a dispatcher (Kamailio's ds_ping): take this node out.
            return self.answer_stateless(from, headers, &RequestError::Unavailable);
        }
        // Carriers probe trunks with OPTIONS (RFC 3261 §11.2).
        let extra =
            format!("Allow: {ALLOW}\r\nAccept: application/sdp\r\nSupported: {SUPPORTED}\r\n");
        let ok = if out_of_dialog {
            let tag = stateless_tag(headers);
            self.ok_with_tag(headers, from, Some(&tag), &extra)
        } else {
            self.plain_ok(headers, from, &extra)
        };
        self.send_final(now, headers, from, key, ok);
    }

    pub(super) fn on_update_info(
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
        if offer.is_some() && c.offer_outstanding() {
            // RFC 3311 §5.2: an UPDATE offer while ours is outstanding.
            self.calls.insert(h, c);
            return self.answer_error(
                now,
                from,
                key,
                false,
                headers,
                &RequestError::RequestPending,
            );
        }
        // An UPDATE is a session refresh (RFC 4028 §9): its 2xx carries the session interval.
        let timer = if req.method == Method::Update {
            refresh_session(now, &mut c, req);
            c.session.as_ref().map(SessionTimer::response_headers).unwrap_or_default()
        } else {
            String::new()
        };
        let ok = match offer {
            None => self.plain_ok(headers, from, &timer),
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
                        c.local_sdp.clone_from(&text);
                        c.media = Some(media);
                        self.events.push_back(Event::MediaChanged { call: h, media });
                        let contact = format!(
                            "Contact: <sip:{}>\r\n{timer}",
                            host_port(self.signalling_addr(&c))
                        );
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
        self.arm(Owner::Call(h));
        self.send_final(now, headers, from, key, ok);
    }
}

/// A re-INVITE or UPDATE of the caller's refreshes the session (RFC 4028 §9, §10): its
/// `Session-Expires` negotiates interval and refresher anew. Without the header the timer
/// goes on at its interval when the caller supports the extension (§9 lets the UAS put the
/// header in its 2xx), and stops when it does not.
fn refresh_session(now: Instant, c: &mut Call, req: &Request<'_>) {
    c.session = match session_timer::negotiate(req.session_expires, req.supports_timer) {
        Some((interval, who)) => Some(SessionTimer::start(now, interval, who)),
        None if req.supports_timer => {
            c.session.as_ref().map(|s| SessionTimer::start(now, s.interval, s.refresher))
        }
        None => None,
    };
}

/// The To tag of a stateless answer: the same for every retransmission of one request (RFC 3261
/// §8.2.7), from its Call-ID, From tag, CSeq and top Via branch.
pub(super) fn stateless_tag(headers: &[HeaderLine<'_>]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, compact) in [("Call-ID", Some("i")), ("From", Some("f")), ("CSeq", None)] {
        message::single(headers, name, compact).ok().flatten().hash(&mut h);
    }
    message::first(headers, "Via", Some("v")).hash(&mut h);
    format!("{STATELESS_TAG_PREFIX}{:016x}", h.finish())
}

/// What starts every [`stateless_tag`]; dialog tags are hex digits only, so none starts so.
const STATELESS_TAG_PREFIX: &str = "sl";

/// Whether `tag` is one of our stateless answers' To tags.
fn is_stateless_tag(tag: &str) -> bool {
    tag.len() == STATELESS_TAG_PREFIX.len() + 16 && tag.starts_with(STATELESS_TAG_PREFIX)
}
