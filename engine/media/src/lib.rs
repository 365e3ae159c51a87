//! precall's media core: everything a shard needs to play greeting and hold audio to SIP
//! callers over RTP, with no I/O of its own (no sockets, no threads, no clock reads: the
//! shard passes `Instant`s in).
//!
//! # How a shard uses it
//!
//! * **Once per clip, off the hot path** (at start-up or when control sends a new clip URL's
//!   bytes): [`encode_clip`] decodes WAV or MP3 ([`decode`], symphonia), resamples to 8 kHz
//!   ([`resample`], rubato) and encodes both G.711 laws ([`g711`]) into an [`EncodedClip`]
//!   padded to whole 20 ms frames. That clip is shared (`Arc`) by every call of every shard.
//! * **Per shard**: one [`MediaClock`]. Each call that sends audio registers a stream with
//!   [`MediaClock::add_stream`]; the clock pins it to one of 20 phases of the 20 ms period so
//!   sends are spread evenly. The shard arms **one** timer at [`MediaClock::poll_timeout`] and
//!   on wake-up calls [`MediaClock::poll_due`], which lists the streams that owe a frame (each
//!   at most once per period; a late wake-up is reported as `skipped` frames, never a burst).
//! * **Per call**: an [`RtpSender`] (SSRC, sequence, timestamp, marker) and a [`Playout`]
//!   (greeting once, hold until replaced, error clip, then `Finished`). For each due stream
//!   the shard asks the playout which frame to send, asks the sender for the header, and the
//!   clip lends the 160 payload bytes.
//! * **Sending is the shard's job**: it writes the 12-byte header (from
//!   [`RtpHeader::emit`]/[`RtpHeader::to_bytes`], into a stack or per-call buffer) and the
//!   borrowed payload slice with **one vectored send** (`sendmsg`/`sendmmsg` with a two-entry
//!   iovec), so no payload is copied and nothing is allocated per packet.
//! * **Receiving**: [`RtpPacket::new_checked`] views a datagram without copying;
//!   [`ExtendedSeq`] tracks sequence rollover (RFC 3550 A.1); [`TelephoneEvent`] parses
//!   RFC 4733 DTMF.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use precall_media::*;
//!
//! let hold = EncodedClip::from_pcm(&[0i16; 800]); // normally encode_clip(bytes, Some("wav"))?
//! let start = Instant::now(); // the shard's time, passed in
//! let mut clock = MediaClock::new(FRAME_DURATION, start);
//! let stream = clock.add_stream(start);
//! let mut sender = RtpSender::new(Ssrc(0x1234), SeqNo(999), RtpTimestamp(42));
//! let mut playout = Playout::with_items([PlayItem::forever(hold.clone())]);
//! let codec = Codec::Pcmu;
//!
//! let mut due = Vec::with_capacity(1024); // reused across wake-ups
//! let now = clock.poll_timeout().unwrap(); // the shard's timer fires here
//! clock.poll_due(now, &mut due);
//! for d in due.drain(..) {
//!     assert_eq!(d.stream, stream); // the shard maps StreamSlot -> call
//!     sender.skip(d.skipped);
//!     match playout.tick() {
//!         PlayoutTick::Frame { clip, index } => {
//!             let header = sender.next_header(codec.payload_type()).to_bytes();
//!             let payload: &[u8] = clip.frame(codec, index);
//!             // shard: sendmsg(fd, [IoSlice::new(&header), IoSlice::new(payload)], peer)
//!             assert_eq!((header.len(), payload.len()), (12, 160));
//!         }
//!         PlayoutTick::Finished => { clock.remove_stream(d.stream); }
//!     }
//! }
//! ```
//!
//! Files, one concern each: [`g711`] (codec), [`rtp`] (wire view, header repr, sequence
//! wrap-around, DTMF), [`clip`] (shared encoded clips), [`decode`] and [`resample`] (clip
//! preparation), [`clock`] (when), [`sender`] (headers), [`playout`] (which frame).

#![forbid(unsafe_code)]

pub mod clip;
pub mod clock;
pub mod decode;
pub mod g711;
pub mod playout;
pub mod resample;
pub mod rtp;
pub mod sender;

pub use clip::{Codec, EncodedClip, FRAME_DURATION, FRAME_SAMPLES, SAMPLE_RATE};
pub use clock::{Due, MediaClock, StreamSlot};
pub use decode::{DecodeError, Pcm, decode_audio};
pub use playout::{PlayItem, Playout, PlayoutTick};
pub use resample::{StreamResampler, resample_to_8k};
pub use rtp::{
    ExtendedSeq, RTP_HEADER_LEN, RtpError, RtpHeader, RtpPacket, RtpTimestamp, SeqNo, SeqUpdate,
    Ssrc, TelephoneEvent, TelephoneEventError,
};
pub use sender::{RtpSender, TIMESTAMP_STEP};

/// Decodes, resamples to 8 kHz and G.711-encodes a clip file, once; share the result.
/// `hint_ext` is the file extension if known (`"wav"`, `"mp3"`).
pub fn encode_clip(bytes: &[u8], hint_ext: Option<&str>) -> Result<EncodedClip, DecodeError> {
    let pcm = decode_audio(bytes, hint_ext)?;
    let pcm_8k = resample_to_8k(&pcm)?;
    Ok(EncodedClip::from_pcm(&pcm_8k))
}
