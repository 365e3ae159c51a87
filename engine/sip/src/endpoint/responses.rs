//! Responses to our BYE and refresh client transactions, and the timers of calls and
//! transactions.

use std::time::{Duration, Instant};

use crate::call::CallState;
use crate::config::IdGen;
use crate::error::DropReason;
use crate::event::{CallHandle, EndReason, Event};
use crate::message::{self};
use crate::session_timer::{self, Refresher, SessionTimer};
use crate::transaction::client_invite::InviteResponse;
use crate::transaction::client_non_invite::ResponseEffect;
use crate::transaction::{Purpose, TimerEffect, TxnId};
use crate::wire::{self, HeaderLine};

use super::*;

impl<G: IdGen> Endpoint<G> {
    // ----- responses to our BYEs and refreshes -----

    pub(super) fn on_response(
        &mut self,
        now: Instant,
        code: u16,
        headers: &[HeaderLine<'_>],
        rest: &[u8],
    ) {
        let Some(resp) = message::parse_response(code, headers) else {
            return self.dropped(DropReason::MalformedResponse);
        };
        let Some(&id) = self.client_index.get(resp.branch) else {
            return self.dropped(DropReason::UnmatchedResponse);
        };
        if self.invite_clients.contains_key(&id) {
            return self.on_invite_response(now, id, &resp, headers, rest);
        }
        let Some(txn) = self.clients.get_mut(&id) else { return };
        let method = match txn.purpose {
            Purpose::Bye { .. } => "BYE",
            Purpose::Refresh => "UPDATE",
        };
        if resp.cseq_method != method {
            return self.dropped(DropReason::UnmatchedResponse);
        }
        match txn.on_response(now, &self.t, resp.code) {
            ResponseEffect::Final(code) => {
                let (call, purpose) = (txn.call, txn.purpose);
                self.arm(Owner::Client(id));
                match purpose {
                    Purpose::Bye { ends_call: true } => {
                        if let Some(c) = self.calls.remove(&call) {
                            self.end(call, c, EndReason::LocalBye);
                        }
                    }
                    Purpose::Bye { ends_call: false } => {}
                    Purpose::Refresh => self.refresh_answered(now, call, code, headers, None),
                }
            }
            ResponseEffect::Provisional => self.arm(Owner::Client(id)),
            ResponseEffect::Absorbed => {}
        }
    }

    /// A response to our refreshing re-INVITE: every final one is ACKed (§17.1.1.3 for a
    /// non-2xx, same branch; §13.2.2.4 for a 2xx, a new one), its repeats get the ACK again.
    fn on_invite_response(
        &mut self,
        now: Instant,
        id: TxnId,
        resp: &message::Response<'_>,
        headers: &[HeaderLine<'_>],
        rest: &[u8],
    ) {
        if resp.cseq_method != "INVITE" {
            return self.dropped(DropReason::UnmatchedResponse);
        }
        let Some(txn) = self.invite_clients.get_mut(&id) else { return };
        match txn.on_response(now, &self.t, resp.code) {
            InviteResponse::Provisional => self.arm(Owner::Client(id)),
            InviteResponse::Absorbed => {}
            InviteResponse::ResendAck => {
                let (dest, ack) = (txn.dest, txn.ack().to_vec());
                if !ack.is_empty() {
                    self.send(dest, ack);
                }
            }
            InviteResponse::Final(code) => {
                let (call, cseq) = (txn.call, txn.cseq);
                let Some(mut c) = self.calls.remove(&call) else {
                    return self.arm(Owner::Client(id));
                };
                c.offer_in_flight = false;
                if (200..300).contains(&code) {
                    refresh_target(&mut c, headers);
                }
                let branch = (code >= 300).then(|| resp.branch.to_owned());
                let (_, dest, ack) = self.dialog_request(&mut c, "ACK", cseq, branch, "", None);
                self.calls.insert(call, c);
                if let Some(txn) = self.invite_clients.get_mut(&id) {
                    txn.acked(ack.clone());
                }
                self.send(dest, ack);
                self.arm(Owner::Client(id));
                let body = wire::frame_body(headers, rest).ok();
                self.refresh_answered(now, call, code, headers, body);
            }
        }
    }

    /// The final answer to our session refresh (RFC 4028 §7.2, §10). `body`: the 2xx of a
    /// re-INVITE carries the answer to our SDP.
    fn refresh_answered(
        &mut self,
        now: Instant,
        h: CallHandle,
        code: u16,
        headers: &[HeaderLine<'_>],
        body: Option<&[u8]>,
    ) {
        let Some(mut c) = self.calls.remove(&h) else { return };
        let Some(mut s) = c.session.take().filter(|_| c.state == CallState::Confirmed) else {
            self.calls.insert(h, c);
            return;
        };
        s.in_flight = false;
        let mut retry_now = false;
        match code {
            200..=299 => {
                refresh_target(&mut c, headers);
                let se = message::single(headers, "Session-Expires", Some("x"))
                    .ok()
                    .flatten()
                    .and_then(session_timer::parse_header);
                let (interval, who) = session_timer::from_our_refresh_answer(se, s.interval);
                s = SessionTimer::start(now, interval, who);
                let ct = message::single(headers, "Content-Type", Some("c")).ok().flatten();
                let media = body
                    .filter(|b| !b.is_empty())
                    .and_then(|b| crate::body::sdp_of(ct, b))
                    .and_then(|b| crate::sdp::SessionDescription::parse(b).ok())
                    .and_then(|sd| crate::sdp::read_answer(&sd).ok());
                if let Some(media) = media.filter(|m| c.media != Some(*m)) {
                    c.media = Some(media);
                    self.events.push_back(Event::MediaChanged { call: h, media });
                }
            }
            // §10: the refresh timed out or the dialog is gone: the session is over.
            408 | 481 => {
                self.send_bye(now, h, &mut c, false);
                return self.end(h, c, EndReason::SessionExpired);
            }
            422 => {
                // §7.4: retry at once with the interval the answer's Min-SE asks for.
                let min_se = message::single(headers, "Min-SE", None)
                    .ok()
                    .flatten()
                    .and_then(session_timer::parse_header)
                    .map_or(0, |(d, _)| d);
                if min_se > s.interval {
                    c.min_se = c.min_se.max(min_se);
                    s.interval = min_se;
                    retry_now = true;
                } else {
                    s.act_at = retry_at(now, s.expires_at);
                }
            }
            // The caller does not take UPDATE after all: refresh with re-INVITE, now.
            405 | 501 if c.allows_update => {
                c.allows_update = false;
                retry_now = true;
            }
            // RFC 3261 §14.1: our offer crossed the caller's; we do not own the Call-ID, so we
            // retry after 0 to 2 s.
            491 => s.act_at = now + pause_491(&mut self.ids),
            // Refused, yet the session stands as it was (RFC 3261 §14.1): try again while
            // there is time; at expiry the call ends.
            _ => s.act_at = retry_at(now, s.expires_at),
        }
        c.session = Some(s);
        if retry_now {
            self.send_refresh(now, h, &mut c);
        }
        self.calls.insert(h, c);
        self.arm(Owner::Call(h));
    }

    /// Our refresh never got an answer (Timer F or B): the session is over (RFC 4028 §10).
    fn refresh_timed_out(&mut self, now: Instant, h: CallHandle) {
        let Some(mut c) = self.calls.remove(&h) else { return };
        if c.state != CallState::Confirmed {
            self.calls.insert(h, c);
            return;
        }
        self.send_bye(now, h, &mut c, false);
        self.end(h, c, EndReason::SessionExpired);
    }

    // ----- timers -----

    pub(super) fn call_timer(&mut self, now: Instant, h: CallHandle) {
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
        if c.state == CallState::Confirmed {
            if let Some(s) = c.session.as_ref() {
                let overdue = s.refresher == Refresher::Peer && s.act_at <= now;
                if overdue || s.expires_at <= now {
                    // RFC 4028 §10: no refresh came (or none of ours succeeded) in time.
                    self.send_bye(now, h, &mut c, false);
                    self.end(h, c, EndReason::SessionExpired);
                    return;
                }
                if s.refresher == Refresher::Us && !s.in_flight && s.act_at <= now {
                    self.send_refresh(now, h, &mut c);
                    fired = true;
                }
            }
        }
        self.calls.insert(h, c);
        if fired {
            self.arm(Owner::Call(h));
        }
    }

    pub(super) fn server_timer(&mut self, now: Instant, id: TxnId) {
        let mut fired = false;
        let mut done = false;
        loop {
            let Some(entry) = self.servers.get_mut(&id) else { return };
            let effect = entry.txn.poll_timer(now, &self.t);
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

    pub(super) fn client_timer(&mut self, now: Instant, id: TxnId) {
        if self.invite_clients.contains_key(&id) {
            return self.invite_client_timer(now, id);
        }
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
                    let (call, purpose) = (txn.call, txn.purpose);
                    if let Some(txn) = self.clients.remove(&id) {
                        self.client_index.remove(&txn.branch);
                    }
                    if effect == TimerEffect::TimedOut {
                        match purpose {
                            Purpose::Bye { ends_call: true } => {
                                if let Some(c) = self.calls.remove(&call) {
                                    self.end(call, c, EndReason::LocalBye);
                                }
                            }
                            Purpose::Bye { ends_call: false } => {}
                            Purpose::Refresh => self.refresh_timed_out(now, call),
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

    fn invite_client_timer(&mut self, now: Instant, id: TxnId) {
        let mut fired = false;
        loop {
            let Some(txn) = self.invite_clients.get_mut(&id) else { return };
            match txn.poll_timer(now) {
                None => break,
                Some(TimerEffect::Retransmit) => {
                    fired = true;
                    let (dest, req) = (txn.dest, txn.request().to_vec());
                    self.send(dest, req);
                }
                Some(effect) => {
                    let call = txn.call;
                    if let Some(txn) = self.invite_clients.remove(&id) {
                        self.client_index.remove(&txn.branch);
                    }
                    if effect == TimerEffect::TimedOut {
                        if let Some(c) = self.calls.get_mut(&call) {
                            c.offer_in_flight = false;
                        }
                        self.refresh_timed_out(now, call);
                    }
                    return;
                }
            }
        }
        if fired {
            self.arm(Owner::Client(id));
        }
    }
}

/// The 2xx to our re-INVITE or UPDATE names the caller's new target (RFC 3261 §12.2.1.2).
fn refresh_target(c: &mut crate::call::Call, headers: &[HeaderLine<'_>]) {
    let contact = message::list(headers, "Contact", Some("m")).first().copied();
    if let Some(na) = contact.and_then(|v| crate::uri::parse_name_addr(v).ok()) {
        c.dialog.remote_target = Some(na.uri.raw.to_owned());
    }
}

/// When to try a refused refresh again: halfway to the expiry, at least a second on.
fn retry_at(now: Instant, expires_at: Instant) -> Instant {
    let half = expires_at.saturating_duration_since(now) / 2;
    (now + half.max(Duration::from_secs(1))).min(expires_at)
}

/// RFC 3261 §14.1's pause after a `491` for the side that does not own the Call-ID: random in
/// 0–2 s (from the injected id source, so tests stay deterministic).
fn pause_491<G: IdGen>(ids: &mut G) -> Duration {
    let seed = ids.tag().bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    Duration::from_millis(u64::from(seed % 2000))
}
