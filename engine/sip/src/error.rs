//! Errors of each layer. A request error's `Display` text is the reason phrase of the answer
//! and [`RequestError::status_code`] is the one place that maps a protocol error to a status.

use thiserror::Error;

use crate::sdp::SdpError;

/// Framing of the body by Content-Length (RFC 3261 §18.3, §20.14).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramingError {
    /// More than one Content-Length header field (RFC 4475 §3.3.9, `mcl01`).
    #[error("Multiple Content-Length Values")]
    MultipleContentLength,
    /// Content-Length is not a non-negative decimal (RFC 4475 §3.1.2.3, `ncl`).
    #[error("Malformed Content-Length")]
    BadContentLength,
    /// The datagram ends before the declared body (RFC 4475 §3.1.2.2, `clerr`).
    #[error("Body Shorter Than Content-Length")]
    Truncated {
        /// Octets announced by Content-Length.
        declared: usize,
        /// Octets present after the header section.
        available: usize,
    },
}

/// Why a request is answered with an error status instead of being processed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The body could not be framed.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// A line of the header section is not `name: value`.
    #[error("Malformed Header Line")]
    BadHeaderLine,
    /// Not `Method SP Request-URI SP SIP-Version` with single spaces (RFC 3261 §7.1; RFC 4475
    /// §3.1.2.8–10 `lwsruri`, `lwsstart`, `trws`: we are strict).
    #[error("Malformed Request-Line")]
    BadRequestLine,
    /// The Request-URI is not a URI (`<>`-enclosed, escaped headers, bad host or port).
    #[error("Malformed Request-URI")]
    BadRequestUri,
    /// SIP version other than 2.0 (RFC 3261 §8.2.2.x, RFC 4475 §3.1.2.16 `badvers`).
    #[error("Version Not Supported")]
    VersionNotSupported,
    /// A mandatory header field is missing (RFC 3261 §8.1.1, RFC 4475 §3.3.1 `insuf`).
    #[error("Missing {0} Header")]
    MissingHeader(&'static str),
    /// A single-valued header field appears more than once (RFC 4475 §3.3.8 `multi01`).
    #[error("Multiple {0} Headers")]
    MultipleHeaders(&'static str),
    /// A header field we rely on does not follow its grammar.
    #[error("Malformed {0} Header")]
    MalformedHeader(&'static str),
    /// `branch=z9hG4bK` with nothing after the magic cookie (RFC 4475 §3.2.1 `badbranch`).
    #[error("Missing Transaction Identifier")]
    EmptyBranch,
    /// CSeq method differs from the Request-Line method (RFC 4475 §3.1.2.17 `mismatch01`).
    #[error("CSeq Method Does Not Match Request-Line")]
    CSeqMismatch,
    /// A method we do not recognise (RFC 3261 §8.2.1: `501` with Allow).
    #[error("Not Implemented")]
    UnknownMethod,
    /// A SIP method we recognise but do not serve here, e.g. REGISTER (RFC 3261 §8.2.1: `405`).
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    /// Request-URI scheme other than sip, sips or tel (RFC 3261 §8.2.2.1, RFC 4475 §3.3.2).
    #[error("Unsupported URI Scheme")]
    UnsupportedUriScheme,
    /// Max-Forwards reached zero (RFC 3261 §16.3 step 3, applied at our edge).
    #[error("Too Many Hops")]
    TooManyHops,
    /// Require lists extensions we do not support (RFC 3261 §8.2.2.3): `420` + Unsupported.
    #[error("Bad Extension")]
    BadExtension(Vec<String>),
    /// A body we cannot read (RFC 3261 §8.2.3): `415` + Accept.
    #[error("Unsupported Media Type")]
    UnsupportedMediaType,
    /// Accept excludes application/sdp, so no answer can be sent (RFC 4475 §3.3.15 `sdp01`).
    #[error("Not Acceptable")]
    NotAcceptable,
    /// The SDP offer does not parse (RFC 3264 needs a well-formed offer).
    #[error("Malformed SDP: {0}")]
    Sdp(SdpError),
    /// No common codec, or a media address we cannot use (RFC 3264 §6).
    #[error("Not Acceptable Here")]
    NotAcceptableHere,
    /// Session-Expires below our Min-SE (RFC 4028 §8.1): `422` + Min-SE.
    #[error("Session Interval Too Small")]
    SessionIntervalTooSmall,
    /// In-dialog request for a dialog we do not have, CANCEL without its INVITE, BYE for an
    /// ended call (RFC 3261 §12.2.2, §9.2).
    #[error("Call/Transaction Does Not Exist")]
    NoSuchCallOrTransaction,
    /// In-dialog CSeq lower than the last one seen (RFC 3261 §12.2.2): `500`.
    #[error("CSeq Out of Order")]
    CSeqOutOfOrder,
    /// Same Call-ID and From tag as a call we have, but another transaction (RFC 3261 §8.2.2.2).
    #[error("Loop Detected")]
    MergedRequest,
    /// A new INVITE with the Call-ID of a live call that is not a merged copy of its INVITE:
    /// `500` + `Retry-After` (calls are routed and recorded by Call-ID).
    #[error("Call-ID In Use")]
    CallIdInUse,
    /// An offer while one of ours is outstanding, or while ours in a 2xx awaits its answer
    /// (RFC 3261 §14.2, RFC 3311 §5.2): `491`.
    #[error("Request Pending")]
    RequestPending,
    /// The source is not in `SIP_TRUSTED_CIDRS`, or its digest credentials are wrong.
    #[error("Forbidden")]
    Forbidden,
    /// A digest challenge (RFC 8760): `401` with these `WWW-Authenticate` lines.
    #[error("Unauthorized")]
    Unauthorized(String),
    /// The endpoint is draining: no new calls, OPTIONS says so (`503` + `Retry-After`), so a
    /// dispatcher takes the node out and callers retry elsewhere.
    #[error("Service Unavailable")]
    Unavailable,
}

impl RequestError {
    /// The status code answering this error.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::VersionNotSupported => 505,
            Self::UnknownMethod => 501,
            Self::MethodNotAllowed => 405,
            Self::UnsupportedUriScheme => 416,
            Self::TooManyHops => 483,
            Self::BadExtension(_) => 420,
            Self::UnsupportedMediaType => 415,
            Self::NotAcceptable => 406,
            Self::NotAcceptableHere => 488,
            Self::SessionIntervalTooSmall => 422,
            Self::NoSuchCallOrTransaction => 481,
            Self::CSeqOutOfOrder => 500,
            Self::MergedRequest => 482,
            Self::CallIdInUse => 500,
            Self::RequestPending => 491,
            Self::Unavailable => 503,
            Self::Forbidden => 403,
            Self::Unauthorized(_) => 401,
            Self::Framing(_)
            | Self::BadHeaderLine
            | Self::BadRequestLine
            | Self::BadRequestUri
            | Self::MissingHeader(_)
            | Self::MultipleHeaders(_)
            | Self::MalformedHeader(_)
            | Self::EmptyBranch
            | Self::CSeqMismatch
            | Self::Sdp(_) => 400,
        }
    }
}

/// Why a datagram was dropped without an answer. The shard counts these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DropReason {
    /// Larger than `SipConfig::max_message_bytes`.
    #[error("datagram larger than the configured maximum")]
    TooLarge,
    /// A response from a source not in `SIP_TRUSTED_CIDRS`.
    #[error("response from an untrusted source")]
    Untrusted,
    /// An untrusted source over its request rate: ignored for a while.
    #[error("untrusted source over its request rate")]
    RateLimited,
    /// No SIP start line: not a SIP message at all.
    #[error("not a SIP message")]
    NotSip,
    /// A request without a usable Via: no answer can reach the sender (RFC 3261 §18.2.2).
    #[error("request without a usable Via header field")]
    Unanswerable,
    /// A response whose status line or CSeq/Via does not parse (RFC 4475 §3.1.2.19 `bigcode`).
    #[error("malformed response")]
    MalformedResponse,
    /// A well-formed response matching none of our client transactions (RFC 3261 §18.1.2).
    #[error("response matches no client transaction")]
    UnmatchedResponse,
    /// An ACK that is malformed or matches no transaction or dialog (never answered, §17.2.3).
    #[error("ACK matches no transaction or dialog")]
    UnmatchedAck,
}

/// Why [`crate::Endpoint::accept`] failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AcceptError {
    /// The handle names no live call.
    #[error("no such call")]
    UnknownCall,
    /// The call was already answered, rejected, cancelled or ended.
    #[error("call is not waiting for an answer")]
    NotRinging,
    /// No codec in common with the offer; `488 Not Acceptable Here` was sent.
    #[error("no codec in common with the offer (488 sent)")]
    NotAcceptable,
}
