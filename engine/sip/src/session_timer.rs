//! RFC 4028 session timers of one call, seen from precall (the UAS of the initial INVITE).
//!
//! Every re-INVITE and UPDATE that carries `Session-Expires` (ours or the caller's) is a
//! session refresh and negotiates the interval and who refreshes anew (§9, §10):
//!
//! * the caller refreshes (`refresher=uac` in our 2xx): if no refresh arrives, we send BYE
//!   before the session expires, `min(32 s, interval / 3)` before it (§10), and the call ends
//!   as `SessionExpired`;
//! * we refresh (`refresher=uas`, asked for by the caller or forced because the caller does
//!   not support timers and a proxy asked for one): an `UPDATE` at half the interval, or a
//!   re-INVITE with our unchanged SDP when the caller does not allow UPDATE (§7.4); a refresh
//!   that times out or is answered `408`/`481` ends the call the same way.

use std::time::{Duration, Instant};

use crate::message::MIN_SE;

/// Which side sends the refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refresher {
    /// precall.
    Us,
    /// The caller.
    Peer,
}

/// What a refresh request asks for, as the UAS answers it (§9): the interval and who
/// refreshes. `None`: the request carries no `Session-Expires`, so no timer runs.
pub(crate) fn negotiate(
    session_expires: Option<(u32, Option<&str>)>,
    supports_timer: bool,
) -> Option<(u32, Refresher)> {
    let (delta, param) = session_expires?;
    let refresher = match param {
        // The caller may only be the refresher if it supports the extension; a proxy that
        // inserted the header for a caller that does not leaves the work to us (§9).
        Some(p) if p.eq_ignore_ascii_case("uac") && supports_timer => Refresher::Peer,
        Some(p) if p.eq_ignore_ascii_case("uas") => Refresher::Us,
        None if supports_timer => Refresher::Peer,
        _ => Refresher::Us,
    };
    // A caller without the extension cannot take a 422 into account (errata 1687): raise the
    // interval to our minimum instead of refusing.
    Some((delta.max(MIN_SE), refresher))
}

/// The running timer of a confirmed (or answered) call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionTimer {
    /// Session interval, seconds.
    pub interval: u32,
    pub refresher: Refresher,
    /// The session is over if no refresh succeeds before this.
    pub expires_at: Instant,
    /// When we act: send our refresh (we refresh) or send BYE (the caller does).
    pub act_at: Instant,
    /// Our refresh is in flight; no second one until it is answered.
    pub in_flight: bool,
}

impl SessionTimer {
    /// A timer negotiated at `now` by a refresh (or the initial INVITE's 2xx).
    pub fn start(now: Instant, interval: u32, refresher: Refresher) -> Self {
        let full = Duration::from_secs(u64::from(interval));
        let act_at = match refresher {
            // §10: "It is RECOMMENDED that the refresh be sent once half the session interval
            // has elapsed."
            Refresher::Us => now + full / 2,
            // §10: the BYE goes "before the session expiration ... the minimum of 32 seconds
            // and one third of the session interval is RECOMMENDED."
            Refresher::Peer => now + full - (full / 3).min(Duration::from_secs(32)),
        };
        Self { interval, refresher, expires_at: now + full, act_at, in_flight: false }
    }

    /// `Session-Expires` (and `Require: timer`) of our 2xx to the request that negotiated it
    /// (§9: `Require` whenever the caller is the refresher).
    pub fn response_headers(&self) -> String {
        match self.refresher {
            Refresher::Peer => {
                format!("Session-Expires: {};refresher=uac\r\nRequire: timer\r\n", self.interval)
            }
            Refresher::Us => format!("Session-Expires: {};refresher=uas\r\n", self.interval),
        }
    }
}

/// `Session-Expires` and `Min-SE` of a refresh we send: in our own request we are the UAC,
/// so `refresher=uac` names us (§7.4).
pub(crate) fn request_headers(interval: u32, min_se: u32) -> String {
    let mut out = format!("Session-Expires: {interval};refresher=uac\r\nSupported: timer\r\n");
    if min_se > MIN_SE {
        out.push_str(&format!("Min-SE: {min_se}\r\n"));
    }
    out
}

/// What the 2xx to our refresh says (§7.2, read from the UAC side): `Session-Expires` with
/// `refresher=uac` keeps us refreshing, `uas` hands it to the caller; no header: the caller
/// does not run the timer and we keep refreshing at the interval we asked for.
pub(crate) fn from_our_refresh_answer(
    session_expires: Option<(u32, Option<&str>)>,
    asked: u32,
) -> (u32, Refresher) {
    match session_expires {
        Some((delta, Some(p))) if p.eq_ignore_ascii_case("uas") => {
            (delta.max(MIN_SE), Refresher::Peer)
        }
        Some((delta, _)) => (delta.max(MIN_SE), Refresher::Us),
        None => (asked, Refresher::Us),
    }
}

/// `Session-Expires: delta;params` parsed leniently (responses are not validated like
/// requests): delta and refresher.
pub(crate) fn parse_header(value: &str) -> Option<(u32, Option<&str>)> {
    let (delta, params) = value.split_once(';').unwrap_or((value, ""));
    let delta = delta.trim().parse().ok()?;
    Some((delta, crate::uri::param(params, "refresher").flatten()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uas_keeps_the_callers_choice_and_refreshes_for_callers_without_the_extension() {
        assert_eq!(negotiate(Some((1800, Some("uac"))), true), Some((1800, Refresher::Peer)));
        assert_eq!(negotiate(Some((1800, Some("UAS"))), true), Some((1800, Refresher::Us)));
        assert_eq!(negotiate(Some((1800, None)), true), Some((1800, Refresher::Peer)));
        // A proxy asked for a timer the caller does not support: we refresh, at least Min-SE.
        assert_eq!(negotiate(Some((60, Some("uac"))), false), Some((90, Refresher::Us)));
        assert_eq!(negotiate(Some((600, None)), false), Some((600, Refresher::Us)));
        assert_eq!(negotiate(None, true), None);
    }

    #[test]
    fn the_refresher_acts_at_half_the_interval_the_other_side_before_expiry() {
        let t0 = Instant::now();
        let us = SessionTimer::start(t0, 1800, Refresher::Us);
        assert_eq!(us.act_at - t0, Duration::from_secs(900));
        assert_eq!(us.expires_at - t0, Duration::from_secs(1800));
        let peer = SessionTimer::start(t0, 1800, Refresher::Peer);
        assert_eq!(peer.act_at - t0, Duration::from_secs(1800 - 32));
        let short = SessionTimer::start(t0, 90, Refresher::Peer);
        assert_eq!(short.act_at - t0, Duration::from_secs(60));
        assert_eq!(
            us.response_headers(),
            "Session-Expires: 1800;refresher=uas\r\n",
            "no Require: the caller may not support the extension"
        );
        assert_eq!(
            peer.response_headers(),
            "Session-Expires: 1800;refresher=uac\r\nRequire: timer\r\n"
        );
    }

    #[test]
    fn answers_to_our_refresh() {
        assert_eq!(from_our_refresh_answer(Some((900, Some("uac"))), 1800), (900, Refresher::Us));
        assert_eq!(from_our_refresh_answer(Some((900, Some("uas"))), 1800), (900, Refresher::Peer));
        assert_eq!(from_our_refresh_answer(None, 1800), (1800, Refresher::Us));
        assert_eq!(parse_header(" 600 ;refresher=uas"), Some((600, Some("uas"))));
        assert_eq!(parse_header("x"), None);
        assert_eq!(
            request_headers(1800, 90),
            "Session-Expires: 1800;refresher=uac\r\nSupported: timer\r\n"
        );
        assert!(request_headers(1800, 300).ends_with("Min-SE: 300\r\n"));
    }
}
