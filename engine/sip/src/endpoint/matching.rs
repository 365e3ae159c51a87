//! RFC 3261 §17.2.3 transaction keys and the small request helpers they share.

use std::net::SocketAddr;

use crate::body;
use crate::error::RequestError;
use crate::message::{self, MAGIC_COOKIE, Request};
use crate::sdp::SessionDescription;
use crate::sdp::{Codec, Direction, MediaParams, NegotiationError, SdpError};
use crate::transaction::{ServerKey, key_method};
use crate::uri;
use crate::wire::HeaderLine;

/// §17.2.3 matching key, built from the raw header fields before full validation so that
/// retransmissions are recognised cheaply.
pub(super) fn server_key(method: &str, headers: &[HeaderLine<'_>]) -> Option<ServerKey> {
    server_key_at(method, message::first(headers, "Via", Some("v"))?, headers)
}

/// [`server_key`] of a request whose top Via value the caller has already found.
pub(super) fn server_key_at(
    method: &str,
    top_via: &str,
    headers: &[HeaderLine<'_>],
) -> Option<ServerKey> {
    let via = message::parse_via(top_via)?;
    let method = if method == "ACK" { "INVITE" } else { method };
    let sent_by = via.sent_by.to_ascii_lowercase();
    match via.branch {
        Some(b) if b.starts_with(MAGIC_COOKIE) => (b.len() > MAGIC_COOKIE.len())
            .then(|| ServerKey { branch: b.to_owned(), sent_by, method: key_method(method) }),
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
                method: key_method(method),
            })
        }
    }
}

pub(super) fn read_offer(
    req: &Request<'_>,
    body: &[u8],
) -> Result<Option<SessionDescription>, RequestError> {
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

pub(super) fn negotiation_error(e: NegotiationError) -> RequestError {
    match e {
        NegotiationError::NoCommonCodec | NegotiationError::Sdp(SdpError::UnsupportedAddress) => {
            RequestError::NotAcceptableHere
        }
        NegotiationError::Sdp(e) => RequestError::Sdp(e),
    }
}

/// Media of an offerless call until the ACK brings the answer.
pub(super) fn placeholder_media() -> MediaParams {
    MediaParams {
        remote_rtp: SocketAddr::from(([0, 0, 0, 0], 0)),
        payload_type: 0,
        codec: Codec::Pcmu,
        telephone_event: Some(101),
        ptime_ms: 20,
        direction: Direction::SendRecv,
    }
}
