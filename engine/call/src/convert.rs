//! Audio between a caller's G.711 leg and an agent's format, one converter per call and
//! direction. µ-law callers and `ulaw_8000` agents pass bytes through untouched; A-law is
//! transcoded through linear PCM; PCM agents at any of their rates go through a streaming
//! rubato resampler ([`precall_media::StreamResampler`]) whose state runs across frames.

use std::collections::VecDeque;

use precall_media::{Codec, DecodeError, StreamResampler, g711};

use crate::agent::AgentFormat;

/// Caller frames (G.711 in the call's codec) to the agent's input format.
#[derive(Debug)]
pub struct ToAgent {
    codec: Codec,
    format: AgentFormat,
    resampler: Option<StreamResampler>,
    pcm: Vec<i16>,
    resampled: Vec<i16>,
}

impl ToAgent {
    /// A converter from `codec` to `format`.
    pub fn new(codec: Codec, format: AgentFormat) -> Result<Self, DecodeError> {
        let resampler = match format {
            AgentFormat::Pcm(rate) if rate != 8000 => Some(StreamResampler::new(8000, rate)?),
            _ => None,
        };
        Ok(Self { codec, format, resampler, pcm: Vec::new(), resampled: Vec::new() })
    }

    /// The caller's codec changed (a re-INVITE): convert from `codec` from now on.
    pub fn set_codec(&mut self, codec: Codec) {
        self.codec = codec;
    }

    /// Appends `g711` (in the caller's codec) to `out`, in the agent's format.
    pub fn push(&mut self, g711: &[u8], out: &mut Vec<u8>) {
        match (self.format, self.codec) {
            (AgentFormat::Ulaw8000, Codec::Pcmu) => out.extend_from_slice(g711),
            (AgentFormat::Ulaw8000, Codec::Pcma) => {
                out.extend(g711.iter().map(|&b| g711::ulaw_encode(g711::alaw_decode(b))));
            }
            (AgentFormat::Pcm(_), codec) => {
                self.pcm.clear();
                self.pcm.extend(g711.iter().map(|&b| codec.decode(b)));
                let samples = resample(&mut self.resampler, &self.pcm, &mut self.resampled);
                out.extend(samples.iter().flat_map(|s| s.to_le_bytes()));
            }
        }
    }
}

/// Agent audio (its output format) to G.711 in the caller's codec.
#[derive(Debug)]
pub struct FromAgent {
    codec: Codec,
    format: AgentFormat,
    resampler: Option<StreamResampler>,
    /// An odd byte of a 16-bit sample split across two messages.
    carry: Option<u8>,
    pcm: Vec<i16>,
    resampled: Vec<i16>,
}

impl FromAgent {
    /// A converter from `format` to `codec`.
    pub fn new(format: AgentFormat, codec: Codec) -> Result<Self, DecodeError> {
        let resampler = match format {
            AgentFormat::Pcm(rate) if rate != 8000 => Some(StreamResampler::new(rate, 8000)?),
            _ => None,
        };
        Ok(Self { codec, format, resampler, carry: None, pcm: Vec::new(), resampled: Vec::new() })
    }

    /// The caller's codec changed.
    pub fn set_codec(&mut self, codec: Codec) {
        self.codec = codec;
    }

    /// Appends `audio` converted to the caller's codec to `out`.
    pub fn push(&mut self, audio: &[u8], out: &mut VecDeque<u8>) {
        match (self.format, self.codec) {
            (AgentFormat::Ulaw8000, Codec::Pcmu) => out.extend(audio),
            (AgentFormat::Ulaw8000, Codec::Pcma) => {
                out.extend(audio.iter().map(|&b| g711::alaw_encode(g711::ulaw_decode(b))));
            }
            (AgentFormat::Pcm(_), codec) => {
                self.pcm.clear();
                let mut bytes = audio;
                if let (Some(lo), Some((&hi, rest))) = (self.carry, bytes.split_first()) {
                    self.pcm.push(i16::from_le_bytes([lo, hi]));
                    self.carry = None;
                    bytes = rest;
                }
                let pairs = bytes.chunks_exact(2);
                self.carry = pairs.remainder().first().copied().or(self.carry);
                self.pcm.extend(pairs.map(|p| i16::from_le_bytes([p[0], p[1]])));
                let samples = resample(&mut self.resampler, &self.pcm, &mut self.resampled);
                out.extend(samples.iter().map(|&s| codec.encode(s)));
            }
        }
    }
}

/// `pcm` through the resampler when there is one (into `out`), else `pcm` itself.
fn resample<'a>(
    resampler: &mut Option<StreamResampler>,
    pcm: &'a [i16],
    out: &'a mut Vec<i16>,
) -> &'a [i16] {
    match resampler {
        Some(r) => {
            out.clear();
            r.push(pcm, out);
            out
        }
        None => pcm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, rate: u32) -> Vec<i16> {
        (0..n)
            .map(|i| {
                ((i as f32 * 500.0 * std::f32::consts::TAU / rate as f32).sin() * 8000.0) as i16
            })
            .collect()
    }

    #[test]
    fn ulaw_passes_through_untouched_both_ways() {
        let frame: Vec<u8> = (0..160u8).collect();
        let mut to = ToAgent::new(Codec::Pcmu, AgentFormat::Ulaw8000).unwrap();
        let mut out = Vec::new();
        to.push(&frame, &mut out);
        assert_eq!(out, frame);
        let mut from = FromAgent::new(AgentFormat::Ulaw8000, Codec::Pcmu).unwrap();
        let mut q = VecDeque::new();
        from.push(&frame, &mut q);
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), frame);
    }

    #[test]
    fn alaw_transcodes_through_pcm() {
        let pcm = tone(160, 8000);
        let alaw: Vec<u8> = pcm.iter().map(|&s| g711::alaw_encode(s)).collect();
        let mut to = ToAgent::new(Codec::Pcma, AgentFormat::Ulaw8000).unwrap();
        let mut out = Vec::new();
        to.push(&alaw, &mut out);
        for (u, s) in out.iter().zip(&pcm) {
            assert!((i32::from(g711::ulaw_decode(*u)) - i32::from(*s)).abs() < 600);
        }
    }

    #[test]
    fn pcm_agents_are_resampled_and_odd_bytes_carried() {
        // 16 kHz agent audio, one second, split at odd byte offsets.
        let pcm = tone(16_000, 16_000);
        let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut from = FromAgent::new(AgentFormat::Pcm(16_000), Codec::Pcmu).unwrap();
        let mut q = VecDeque::new();
        for piece in bytes.chunks(1001) {
            from.push(piece, &mut q);
        }
        assert_eq!(q.len(), 8000);
        let decoded: Vec<i16> = q.iter().map(|&b| g711::ulaw_decode(b)).collect();
        let crossings = decoded[100..].windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        assert!((crossings as i32 - 990).abs() < 20, "{crossings} crossings (500 Hz)");
        // And back: 8 kHz caller audio to a 16 kHz agent doubles the samples.
        let mut to = ToAgent::new(Codec::Pcmu, AgentFormat::Pcm(16_000)).unwrap();
        let mut out = Vec::new();
        for frame in q.iter().copied().collect::<Vec<_>>().chunks(160) {
            to.push(frame, &mut out);
        }
        assert_eq!(out.len(), 16_000 * 2);
        let mut pcm8 = ToAgent::new(Codec::Pcma, AgentFormat::Pcm(8000)).unwrap();
        let mut out = Vec::new();
        pcm8.push(&[0xD5; 160], &mut out);
        assert_eq!(out.len(), 320);
        assert!(out.chunks(2).all(|p| i16::from_le_bytes([p[0], p[1]]).abs() <= 8));
    }
}
