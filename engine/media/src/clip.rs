//! Clips encoded once to both G.711 laws and shared by every call that plays them.

use std::sync::Arc;
use std::time::Duration;

use crate::g711;

/// Telephony sample rate (RFC 3551 §4.5.14: PCMU and PCMA are 8000 Hz).
pub const SAMPLE_RATE: u32 = 8000;
/// Samples, and G.711 bytes, in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 160;
/// Duration of one frame; also the RTP timestamp step is [`FRAME_SAMPLES`].
pub const FRAME_DURATION: Duration = Duration::from_millis(20);

/// The G.711 payload formats precall sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// G.711 mu-law, static payload type 0.
    Pcmu,
    /// G.711 A-law, static payload type 8.
    Pcma,
}

impl Codec {
    /// Static RTP payload type (RFC 3551 table 4).
    #[must_use]
    pub const fn payload_type(self) -> u8 {
        match self {
            Self::Pcmu => 0,
            Self::Pcma => 8,
        }
    }

    /// The codec of a static payload type, if it is 0 or 8.
    #[must_use]
    pub const fn from_payload_type(pt: u8) -> Option<Self> {
        match pt {
            0 => Some(Self::Pcmu),
            8 => Some(Self::Pcma),
            _ => None,
        }
    }

    /// Encoding name as in an SDP `a=rtpmap` line.
    #[must_use]
    pub const fn encoding_name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }

    /// The byte that encodes linear 0 (`0xFF` mu-law, `0xD5` A-law).
    #[must_use]
    pub const fn silence(self) -> u8 {
        match self {
            Self::Pcmu => g711::ULAW_SILENCE,
            Self::Pcma => g711::ALAW_SILENCE,
        }
    }

    /// Encodes one sample.
    #[must_use]
    pub fn encode(self, sample: i16) -> u8 {
        match self {
            Self::Pcmu => g711::ulaw_encode(sample),
            Self::Pcma => g711::alaw_encode(sample),
        }
    }

    /// Decodes one byte.
    #[must_use]
    pub fn decode(self, byte: u8) -> i16 {
        match self {
            Self::Pcmu => g711::ulaw_decode(byte),
            Self::Pcma => g711::alaw_decode(byte),
        }
    }
}

/// A clip in both G.711 laws, padded with silence to whole 20 ms frames. Cloning shares the
/// bytes (two `Arc` increments); [`EncodedClip::frame`] lends a frame without copying.
#[derive(Debug, Clone)]
pub struct EncodedClip {
    pcmu: Arc<[u8]>,
    pcma: Arc<[u8]>,
    samples: usize,
}

impl EncodedClip {
    /// Encodes mono 8 kHz PCM. An empty input gives a clip of zero frames.
    #[must_use]
    pub fn from_pcm(pcm: &[i16]) -> Self {
        let frames = pcm.len().div_ceil(FRAME_SAMPLES);
        let encode = |codec: Codec| -> Arc<[u8]> {
            let mut bytes = vec![codec.silence(); frames * FRAME_SAMPLES];
            bytes.iter_mut().zip(pcm).for_each(|(b, &s)| *b = codec.encode(s));
            bytes.into()
        };
        Self { pcmu: encode(Codec::Pcmu), pcma: encode(Codec::Pcma), samples: pcm.len() }
    }

    /// Number of 160-byte frames.
    #[must_use]
    pub fn frames(&self) -> usize {
        self.pcmu.len() / FRAME_SAMPLES
    }

    /// Whether the clip has no frames.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pcmu.is_empty()
    }

    /// Frame `index` in `codec`: 160 bytes borrowed from the shared buffer.
    ///
    /// # Panics
    /// If `index >= self.frames()`; [`crate::Playout`] only hands out valid indices.
    #[must_use]
    pub fn frame(&self, codec: Codec, index: usize) -> &[u8] {
        let start = index * FRAME_SAMPLES;
        &self.bytes(codec)[start..start + FRAME_SAMPLES]
    }

    /// All encoded bytes in `codec` (whole frames, silence-padded).
    #[must_use]
    pub fn bytes(&self, codec: Codec) -> &Arc<[u8]> {
        match codec {
            Codec::Pcmu => &self.pcmu,
            Codec::Pcma => &self.pcma,
        }
    }

    /// Samples in the source PCM, before padding.
    #[must_use]
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Playing time: frames × 20 ms (padding included).
    #[must_use]
    pub fn duration(&self) -> Duration {
        FRAME_DURATION * u32::try_from(self.frames()).unwrap_or(u32::MAX)
    }

    /// Whether both handles share the same encoded bytes (the same clip).
    #[must_use]
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.pcmu, &other.pcmu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_constants() {
        assert_eq!(Codec::Pcmu.payload_type(), 0);
        assert_eq!(Codec::Pcma.payload_type(), 8);
        assert_eq!(Codec::Pcmu.silence(), 0xFF);
        assert_eq!(Codec::Pcma.silence(), 0xD5);
        assert_eq!(Codec::from_payload_type(0), Some(Codec::Pcmu));
        assert_eq!(Codec::from_payload_type(8), Some(Codec::Pcma));
        assert_eq!(Codec::from_payload_type(101), None);
        assert_eq!(Codec::Pcmu.encode(0), Codec::Pcmu.silence());
        assert_eq!(Codec::Pcma.encode(0), Codec::Pcma.silence());
        assert_eq!(Codec::Pcma.decode(0xD5), 8);
    }

    #[test]
    fn pads_to_whole_frames_with_each_laws_silence() {
        let pcm: Vec<i16> = (0..161).map(|i| 1000 + i).collect();
        let clip = EncodedClip::from_pcm(&pcm);
        assert_eq!(clip.frames(), 2);
        assert_eq!(clip.samples(), 161);
        assert_eq!(clip.duration(), Duration::from_millis(40));
        for codec in [Codec::Pcmu, Codec::Pcma] {
            assert_eq!(clip.bytes(codec).len(), 320);
            let first = clip.frame(codec, 0);
            assert_eq!(first.len(), 160);
            assert_eq!(first[0], codec.encode(1000));
            let second = clip.frame(codec, 1);
            assert_eq!(second[0], codec.encode(1160));
            assert!(second[1..].iter().all(|&b| b == codec.silence()));
        }
    }

    #[test]
    fn exact_frames_get_no_padding_and_empty_is_empty() {
        assert_eq!(EncodedClip::from_pcm(&[0; 320]).frames(), 2);
        let empty = EncodedClip::from_pcm(&[]);
        assert!(empty.is_empty());
        assert_eq!(empty.frames(), 0);
        assert_eq!(empty.duration(), Duration::ZERO);
    }

    #[test]
    fn frames_are_borrowed_from_the_shared_buffer() {
        let clip = EncodedClip::from_pcm(&[500; 480]);
        let copy = clip.clone();
        assert!(clip.ptr_eq(&copy));
        assert_eq!(Arc::strong_count(clip.bytes(Codec::Pcmu)), 2);
        let frame = copy.frame(Codec::Pcmu, 2);
        let whole = clip.bytes(Codec::Pcmu);
        assert_eq!(frame.as_ptr(), whole[320..].as_ptr());
        assert!(!clip.ptr_eq(&EncodedClip::from_pcm(&[500; 480])));
    }
}
