//! Responses to our BYE client transactions, and the timers of calls and transactions.

use std::time::Instant;

use crate::config::IdGen;
use crate::error::DropReason;
use crate::event::{CallHandle, EndReason};
use crate::message::{self};
use crate::transaction::client_non_invite::ResponseEffect;
use crate::transaction::{TimerEffect, TxnId};
use crate::wire::HeaderLine;

use super::*;

impl<G: IdGen> Endpoint<G> {
    // ----- responses to our BYEs -----

    pub(super) fn on_response(&mut self, now: Instant, code: u16, headers: &[HeaderLine<'_>]) {
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

    pub(super) fn client_timer(&mut self, now: Instant, id: TxnId) {
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
}
