//! What goes out: responses, final answers, BYE, dialog headers, and the bookkeeping around them.

use std::net::SocketAddr;
use std::time::Instant;

use crate::build::{self, ResponseSpec, host_port};
use crate::call::{Call, CallState};
use crate::config::IdGen;
use crate::error::{DropReason, RequestError};
use crate::event::{CallHandle, EndReason, Event, Transmit};
use crate::message::{self, ALLOW, MAGIC_COOKIE, Method, Request, SUPPORTED};

/// `Retry-After` (seconds) of the `503` a draining endpoint answers.
const DRAIN_RETRY_AFTER_S: u32 = 5;
use crate::session_timer::SessionTimer;
use crate::transaction::Purpose;
use crate::transaction::client_invite::ClientInvite;
use crate::transaction::client_non_invite::ClientNonInvite;
use crate::transaction::server_invite::ServerInvite;
use crate::transaction::{ServerKey, TxnId};
use crate::uri;
use crate::wire::{self, HeaderLine};

use super::*;

impl<G: IdGen> Endpoint<G> {
    /// Where a response to a request from `source` goes (RFC 3261 §18.2.2 over UDP): the
    /// source IP (the `received` we add), at the top Via's sent-by port (5060 when absent), or
    /// at the source port when the Via has `rport` (RFC 3581 §4) or `force_rport` is set.
    pub(super) fn reply_addr(&self, headers: &[HeaderLine<'_>], source: SocketAddr) -> SocketAddr {
        if self.cfg.force_rport {
            return source;
        }
        let via = message::first(headers, "Via", Some("v")).and_then(message::parse_via);
        match via {
            Some(via) if !via.rport => {
                let port = uri::split_host_port(via.sent_by).ok().and_then(|(_, p)| p);
                SocketAddr::new(source.ip(), port.unwrap_or(5060))
            }
            _ => source,
        }
    }

    pub(super) fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn send(&mut self, dest: SocketAddr, payload: Vec<u8>) {
        self.transmits.push_back(Transmit { dest, payload });
    }

    pub(super) fn dropped(&mut self, reason: DropReason) {
        self.events.push_back(Event::Dropped { reason });
    }

    pub(super) fn arm(&mut self, owner: Owner) {
        let next = match owner {
            Owner::Call(h) => self.calls.get(&h).and_then(Call::next_deadline),
            Owner::Server(id) => self.servers.get(&id).and_then(|e| e.txn.next_deadline()),
            Owner::Client(id) => match self.clients.get(&id) {
                Some(txn) => txn.next_deadline(),
                None => self.invite_clients.get(&id).and_then(ClientInvite::next_deadline),
            },
        };
        if let Some(at) = next {
            self.timers.schedule(at, owner);
        }
    }

    pub(super) fn local_tag(&mut self, c: &mut Call) -> String {
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
    pub(super) fn signalling_addr(&self, c: &Call) -> SocketAddr {
        let public = self.cfg.public_addr();
        match c.local_rtp {
            Some(rtp) if public.ip().is_unspecified() && !rtp.ip().is_unspecified() => {
                SocketAddr::new(rtp.ip(), public.port())
            }
            _ => public,
        }
    }

    /// Contact, Allow, Supported and the session timer of our 2xx to an INVITE, or of a
    /// refresh we send (`Supported` then comes with the timer's headers).
    pub(super) fn dialog_headers(&self, addr: SocketAddr, timer: Option<&SessionTimer>) -> String {
        let mut extra = format!(
            "Contact: <sip:{}>\r\nAllow: {ALLOW}\r\nSupported: {SUPPORTED}\r\n",
            host_port(addr)
        );
        if let Some(timer) = timer {
            extra.push_str(&timer.response_headers());
        }
        extra
    }

    pub(super) fn plain_ok(
        &mut self,
        headers: &[HeaderLine<'_>],
        from: SocketAddr,
        extra: &str,
    ) -> Vec<u8> {
        let has_tag = message::single(headers, "To", Some("t"))
            .ok()
            .flatten()
            .and_then(|to| uri::parse_name_addr(to).ok())
            .and_then(|n| n.tag())
            .is_some();
        let tag = if has_tag { None } else { Some(self.ids.tag()) };
        self.ok_with_tag(headers, from, tag.as_deref(), extra)
    }

    /// `200 OK` adding `to_tag` (none when the request's To has one).
    pub(super) fn ok_with_tag(
        &self,
        headers: &[HeaderLine<'_>],
        from: SocketAddr,
        to_tag: Option<&str>,
        extra: &str,
    ) -> Vec<u8> {
        build::response(
            headers,
            from,
            &ResponseSpec {
                code: 200,
                reason: "OK",
                to_tag,
                extra,
                body: None,
                server: &self.cfg.user_agent,
            },
        )
    }

    /// Sends `200 OK` to an in-dialog request whose To carries our tag (a BYE) and absorbs
    /// its transaction without storing the response: a retransmission gets the same response
    /// built again ([`Answer::RebuildOk`]).
    pub(super) fn send_rebuildable_ok(
        &mut self,
        now: Instant,
        headers: &[HeaderLine<'_>],
        from: SocketAddr,
        key: Option<ServerKey>,
    ) {
        let dest = self.reply_addr(headers, from);
        let ok = self.ok_with_tag(headers, from, None, "");
        self.send(dest, ok);
        if let Some(key) = key.filter(|k| k.method != "INVITE") {
            self.absorbed.insert(now, self.t.t1x64(), &key, dest, Answer::RebuildOk);
        }
    }

    pub(super) fn send_final(
        &mut self,
        now: Instant,
        headers: &[HeaderLine<'_>],
        from: SocketAddr,
        key: Option<ServerKey>,
        payload: Vec<u8>,
    ) {
        let dest = self.reply_addr(headers, from);
        let Some(key) = key else { return self.send(dest, payload) };
        self.send(dest, payload.clone());
        if key.method != "INVITE" {
            // §17.2.2: Completed at once; until Timer J it only resends this response (a key
            // already absorbed keeps its first answer).
            let answer = Answer::Resend(payload.into_boxed_slice());
            return self.absorbed.insert(now, self.t.t1x64(), &key, dest, answer);
        }
        if self.server_index.contains_key(&key)
            || self.absorbed.get(&key).is_some()
            || self.servers.len() >= self.cfg.max_transactions
        {
            return;
        }
        let txn = ServerInvite::refused(now, &self.t, dest, payload);
        let id = TxnId(self.fresh_id());
        self.server_index.insert(key.clone(), id);
        self.servers.insert(id, ServerEntry { key: Some(key), txn });
        self.arm(Owner::Server(id));
    }

    /// The INVITE transaction `id` answered its call with a 2xx (RFC 6026 §8.5, Accepted):
    /// from now on it only absorbs retransmitted INVITEs until Timer L, so it leaves the live
    /// table for the compact one.
    pub(super) fn absorb_accepted(&mut self, now: Instant, id: TxnId, call: CallHandle) {
        let Some(entry) = self.servers.remove(&id) else { return };
        let (dest, _) = entry.dest_and_last();
        let Some(key) = entry.key else { return };
        if self.server_index.get(&key) == Some(&id) {
            self.server_index.remove(&key);
        }
        self.absorbed.insert(now, self.t.t1x64(), &key, dest, Answer::Accepted(call));
    }

    /// The ACK of a non-2xx final came (§17.2.1, Confirmed): until Timer I the transaction
    /// only swallows retransmitted ACKs, so it leaves the live table for the compact one.
    pub(super) fn absorb_confirmed(&mut self, now: Instant, id: TxnId) {
        let Some(entry) = self.servers.remove(&id) else { return };
        let (dest, _) = entry.dest_and_last();
        let Some(key) = entry.key else { return };
        if self.server_index.get(&key) == Some(&id) {
            self.server_index.remove(&key);
        }
        self.absorbed.insert(now, self.t.t4, &key, dest, Answer::Silent);
    }

    /// A retransmitted request matching an absorbed transaction: answer it as that
    /// transaction would. ACKs are swallowed only by a Confirmed one; false when the request
    /// is not absorbed here (it goes on to the core).
    pub(super) fn absorb_retransmission(
        &mut self,
        key: &ServerKey,
        is_ack: bool,
        headers: &[HeaderLine<'_>],
        from: SocketAddr,
    ) -> bool {
        let Some(entry) = self.absorbed.get(key) else { return false };
        let resend = match (&entry.answer, is_ack) {
            (Answer::Silent, _) => return true,
            // The 2xx's ACK is a transaction of its own; one with the INVITE's branch is the
            // core's to judge, as before the 2xx.
            (_, true) => return false,
            (Answer::Resend(bytes), false) => Some((entry.dest, bytes.to_vec())),
            (Answer::RebuildOk, false) => {
                Some((entry.dest, self.ok_with_tag(headers, from, None, "")))
            }
            (Answer::Accepted(call), false) => self
                .calls
                .get(call)
                .and_then(|c| c.retransmit.as_ref())
                .map(|r| (r.dest, r.payload.clone())),
        };
        if let Some((dest, payload)) = resend {
            self.send(dest, payload);
        }
        true
    }

    /// Answers `err` statelessly (RFC 3261 §8.2.7): no transaction, the To tag derived from
    /// the request so a retransmission gets the same response.
    pub(super) fn answer_stateless(
        &mut self,
        from: SocketAddr,
        headers: &[HeaderLine<'_>],
        err: &RequestError,
    ) {
        let tag = super::requests::stateless_tag(headers);
        let payload = self.error_response(headers, from, &tag, err);
        let dest = self.reply_addr(headers, from);
        self.send(dest, payload);
    }

    pub(super) fn answer_error(
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
        let tag = self.ids.tag();
        let payload = self.error_response(headers, from, &tag, err);
        self.send_final(now, headers, from, key, payload);
    }

    /// The response that answers `err`, with our To tag `tag`.
    fn error_response(
        &self,
        headers: &[HeaderLine<'_>],
        from: SocketAddr,
        tag: &str,
        err: &RequestError,
    ) -> Vec<u8> {
        let extra = match err {
            RequestError::UnknownMethod | RequestError::MethodNotAllowed => {
                format!("Allow: {ALLOW}\r\n")
            }
            RequestError::BadExtension(tags) => format!("Unsupported: {}\r\n", tags.join(", ")),
            RequestError::UnsupportedMediaType | RequestError::NotAcceptable => {
                "Accept: application/sdp\r\n".to_owned()
            }
            RequestError::SessionIntervalTooSmall => format!("Min-SE: {}\r\n", message::MIN_SE),
            RequestError::Unauthorized(challenge) => challenge.clone(),
            RequestError::Unavailable | RequestError::CallIdInUse => {
                format!("Retry-After: {DRAIN_RETRY_AFTER_S}\r\n")
            }
            _ => String::new(),
        };
        let reason = err.to_string();
        build::response(
            headers,
            from,
            &ResponseSpec {
                code: err.status_code(),
                reason: &reason,
                to_tag: Some(tag),
                extra: &extra,
                body: None,
                server: &self.cfg.user_agent,
            },
        )
    }

    /// A final non-2xx to the call's INVITE, with our To tag.
    pub(super) fn final_to_invite(
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
        if let Some(ServerEntry { txn, .. }) = self.servers.get_mut(&c.invite_txn) {
            txn.final_non2xx(now, &self.t, payload.clone());
        }
        self.arm(Owner::Server(c.invite_txn));
        self.send(c.invite_reply, payload);
    }

    /// One of our in-dialog requests (§12.2.1.1): its branch, destination and bytes. `branch`
    /// reuses a transaction's (the ACK of a non-2xx, §17.1.1.3); `None` makes a fresh one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dialog_request(
        &mut self,
        c: &mut Call,
        method: &str,
        cseq: u32,
        branch: Option<String>,
        extra: &str,
        body: Option<(&str, &[u8])>,
    ) -> (String, SocketAddr, Vec<u8>) {
        let tag = self.local_tag(c);
        let (request_uri, routes, dest) = c.dialog.request_target();
        let branch = branch.unwrap_or_else(|| {
            let mut b = self.ids.branch();
            if !b.starts_with(MAGIC_COOKIE) {
                b.insert_str(0, MAGIC_COOKIE);
            }
            b
        });
        let payload = build::request(&build::RequestSpec {
            method,
            request_uri: &request_uri,
            routes: &routes,
            sent_by: &host_port(self.signalling_addr(c)),
            branch: &branch,
            from: &format!("{};tag={tag}", c.dialog.local_uri),
            to: &c.dialog.remote_uri,
            call_id: &c.dialog.call_id,
            cseq,
            user_agent: &self.cfg.user_agent,
            extra,
            body,
        });
        (branch, dest, payload)
    }

    pub(super) fn send_bye(&mut self, now: Instant, h: CallHandle, c: &mut Call, ends_call: bool) {
        c.dialog.local_seq += 1;
        let cseq = c.dialog.local_seq;
        let (branch, dest, payload) = self.dialog_request(c, "BYE", cseq, None, "", None);
        let id = TxnId(self.fresh_id());
        let purpose = Purpose::Bye { ends_call };
        let txn =
            ClientNonInvite::start(now, &self.t, h, purpose, branch.clone(), dest, payload.clone());
        self.clients.insert(id, txn);
        self.client_index.insert(branch, id);
        self.arm(Owner::Client(id));
        self.send(dest, payload);
    }

    /// Refreshes the session (RFC 4028 §7.4): UPDATE without a body when the caller allows it,
    /// else a re-INVITE offering our last SDP unchanged (same `o=` version).
    pub(super) fn send_refresh(&mut self, now: Instant, h: CallHandle, c: &mut Call) {
        let Some(interval) = c.session.as_ref().map(|s| s.interval) else { return };
        c.dialog.local_seq += 1;
        let cseq = c.dialog.local_seq;
        let mut extra =
            format!("Contact: <sip:{}>\r\nAllow: {ALLOW}\r\n", host_port(self.signalling_addr(c)));
        extra.push_str(&crate::session_timer::request_headers(interval, c.min_se));
        let id = TxnId(self.fresh_id());
        if c.allows_update {
            let (branch, dest, payload) =
                self.dialog_request(c, "UPDATE", cseq, None, &extra, None);
            let txn = ClientNonInvite::start(
                now,
                &self.t,
                h,
                Purpose::Refresh,
                branch.clone(),
                dest,
                payload.clone(),
            );
            self.clients.insert(id, txn);
            self.client_index.insert(branch, id);
            self.send(dest, payload);
        } else {
            let sdp = std::mem::take(&mut c.local_sdp);
            let body = Some(("application/sdp", sdp.as_bytes()));
            let (branch, dest, payload) =
                self.dialog_request(c, "INVITE", cseq, None, &extra, body);
            c.local_sdp = sdp;
            c.offer_in_flight = true;
            let txn =
                ClientInvite::start(now, &self.t, h, branch.clone(), cseq, dest, payload.clone());
            self.invite_clients.insert(id, txn);
            self.client_index.insert(branch, id);
            self.send(dest, payload);
        }
        if let Some(s) = c.session.as_mut() {
            s.in_flight = true;
        }
        self.arm(Owner::Client(id));
    }

    /// ACK (or a later in-dialog INVITE) for our 2xx to the initial INVITE.
    pub(super) fn confirm(&mut self, now: Instant, h: CallHandle, c: &mut Call) {
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
    pub(super) fn take_in_dialog(
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
                // re-INVITE and UPDATE are target refresh requests (RFC 3261 §12.2.2, RFC 3311
                // §5.2): their Contact is where our next request goes.
                if matches!(req.method, Method::Invite | Method::Update) {
                    if let Some(contact) = &req.contact {
                        c.dialog.remote_target = Some(contact.uri.raw.to_owned());
                    }
                }
                return Some((h, c));
            }
        };
        self.answer_error(now, from, key.take(), false, headers, &error);
        None
    }

    pub(super) fn take_dialog(&mut self, req: &Request<'_>) -> Option<(CallHandle, Call)> {
        let h = *self.calls_by_id.get(req.call_id)?;
        let c = self.calls.remove(&h)?;
        if c.dialog.matches(req.call_id, req.from.tag(), req.to.tag()) {
            Some((h, c))
        } else {
            self.calls.insert(h, c);
            None
        }
    }

    pub(super) fn end(&mut self, h: CallHandle, c: Call, reason: EndReason) {
        if self.calls_by_id.get(&c.dialog.call_id) == Some(&h) {
            self.calls_by_id.remove(&c.dialog.call_id);
        }
        self.events.push_back(Event::CallEnded { call: h, reason });
    }
}
