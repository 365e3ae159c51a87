//! RTP on the wire: the packet view and header representation ([`packet`]), identifiers and
//! wrap-around arithmetic ([`seq`]), and RFC 4733 DTMF events ([`telephone_event`]).

pub mod packet;
pub mod seq;
pub mod telephone_event;

pub use packet::{RTP_HEADER_LEN, RtpError, RtpHeader, RtpPacket};
pub use seq::{ExtendedSeq, RtpTimestamp, SeqNo, SeqUpdate, Ssrc};
pub use telephone_event::{TelephoneEvent, TelephoneEventError};
