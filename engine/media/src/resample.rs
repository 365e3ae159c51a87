//! Resampling decoded PCM to the 8 kHz telephony rate with rubato, once per clip.

use rubato::audioadapter_buffers::direct::SequentialSlice;
use rubato::{Fft, FixedSync, Resampler};

use crate::clip::SAMPLE_RATE;
use crate::decode::{DecodeError, Pcm};

/// Input chunk for rubato's FFT resampler. The whole clip goes through in one
/// [`Resampler::process_all`] call, which feeds it chunk by chunk and trims the filter delay.
const CHUNK_FRAMES: usize = 1024;

/// Resamples mono PCM to 8 kHz and converts it to 16-bit with clipping. The output has
/// `ceil(len * 8000 / rate)` samples, aligned with the input (rubato trims its delay).
pub fn resample_to_8k(pcm: &Pcm) -> Result<Vec<i16>, DecodeError> {
    if pcm.rate == SAMPLE_RATE || pcm.samples.is_empty() {
        return Ok(pcm.samples.iter().copied().map(to_i16).collect());
    }
    // A synchronous (fixed-ratio) FFT resampler: its band-limited anti-aliasing filter is
    // what a downsample to 8 kHz needs, and it is the fastest rubato offers for a fixed ratio.
    let mut resampler =
        Fft::<f32>::new(pcm.rate as usize, SAMPLE_RATE as usize, CHUNK_FRAMES, 1, FixedSync::Input)
            .map_err(|source| DecodeError::Resampler { rate: pcm.rate, source })?;
    let len = pcm.samples.len();
    let input = SequentialSlice::new(&pcm.samples[..], 1, len)
        .expect("a slice of `len` samples holds one channel of `len` frames");
    let output = resampler.process_all(&input, len, None).map_err(DecodeError::Resample)?;
    Ok(output.take_data().into_iter().map(to_i16).collect())
}

/// [-1.0, 1.0] float to 16-bit, rounding and clipping (resampling can overshoot full scale).
fn to_i16(x: f32) -> i16 {
    // `as` saturates, and maps NaN to 0.
    (x * 32768.0).round() as i16
}

/// A resampler for a live stream of 16-bit mono PCM, one per call and direction (agent audio
/// to 8 kHz, caller audio from 8 kHz). Input arrives in pieces of any size; each
/// [`StreamResampler::push`] converts whole 20 ms input chunks and keeps the rest for the next
/// call, so the filter state runs on across pieces (no clicks at chunk edges). The output lags
/// the input by the filter delay ([`StreamResampler::delay_samples`]), a few milliseconds.
pub struct StreamResampler {
    inner: Fft<f32>,
    from: u32,
    to: u32,
    chunk: usize,
    pending: Vec<f32>,
    out: Vec<f32>,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler").field("from", &self.from).field("to", &self.to).finish()
    }
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz (both at least 1,000 and a multiple of 50, so a
    /// 20 ms chunk is a whole number of samples: every rate ElevenLabs agents use is).
    pub fn new(from: u32, to: u32) -> Result<Self, DecodeError> {
        if from < 1000 || to < 1000 || !from.is_multiple_of(50) || !to.is_multiple_of(50) {
            return Err(DecodeError::BadSampleRate(if !from.is_multiple_of(50) || from < 1000 {
                from
            } else {
                to
            }));
        }
        let chunk = (from / 50) as usize;
        let inner = Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input)
            .map_err(|source| DecodeError::Resampler { rate: from, source })?;
        let out = vec![0.0; inner.output_frames_max()];
        Ok(Self { inner, from, to, chunk, pending: Vec::with_capacity(chunk), out })
    }

    /// Input rate in Hz.
    #[must_use]
    pub fn from_rate(&self) -> u32 {
        self.from
    }

    /// Output rate in Hz.
    #[must_use]
    pub fn to_rate(&self) -> u32 {
        self.to
    }

    /// The filter delay, in output samples.
    #[must_use]
    pub fn delay_samples(&self) -> usize {
        self.inner.output_delay()
    }

    /// Converts `input` and appends what is ready to `output`.
    pub fn push(&mut self, input: &[i16], output: &mut Vec<i16>) {
        let mut rest = input;
        while !rest.is_empty() {
            let take = (self.chunk - self.pending.len()).min(rest.len());
            self.pending.extend(rest[..take].iter().map(|&s| f32::from(s) / 32768.0));
            rest = &rest[take..];
            if self.pending.len() < self.chunk {
                break;
            }
            let frames = self.out.len();
            let Ok(inp) = SequentialSlice::new(&self.pending[..], 1, self.chunk) else { break };
            let Ok(mut outp) = SequentialSlice::new_mut(&mut self.out[..], 1, frames) else {
                break;
            };
            // The sizes are the resampler's own, so this cannot fail; if it did, the chunk is
            // dropped (a 20 ms gap) rather than the call.
            if let Ok((_, written)) = self.inner.process_into_buffer(&inp, &mut outp, None) {
                output.extend(self.out[..written].iter().copied().map(to_i16));
            }
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_i16_clips_and_rounds() {
        assert_eq!(to_i16(0.0), 0);
        assert_eq!(to_i16(1.0), i16::MAX);
        assert_eq!(to_i16(1.7), i16::MAX);
        assert_eq!(to_i16(-1.0), i16::MIN);
        assert_eq!(to_i16(-3.0), i16::MIN);
        assert_eq!(to_i16(f32::NAN), 0);
        assert_eq!(to_i16(1000.0 / 32768.0), 1000);
        assert_eq!(to_i16(-1000.0 / 32768.0), -1000);
    }

    /// A tone pushed in uneven pieces comes out at the new rate with its frequency kept: the
    /// zero crossings per second of the output match the input's.
    #[test]
    fn stream_resampler_keeps_a_tone_across_uneven_pieces() {
        for (from, to) in [(16_000, 8000), (8000, 16_000), (44_100, 8000), (8000, 24_000)] {
            let mut r = StreamResampler::new(from, to).unwrap();
            let tone: Vec<i16> = (0..from)
                .map(|i| {
                    ((i as f32 * 440.0 * std::f32::consts::TAU / from as f32).sin() * 10_000.0)
                        as i16
                })
                .collect();
            let mut out = Vec::new();
            let mut at = 0;
            for piece in [1usize, 7, 333, 1000, 17].iter().cycle() {
                if at >= tone.len() {
                    break;
                }
                let end = (at + piece).min(tone.len());
                r.push(&tone[at..end], &mut out);
                at = end;
            }
            // Whole 20 ms chunks only: one second in gives one second out, less nothing.
            assert_eq!(out.len(), to as usize, "{from} -> {to}");
            let settled = &out[r.delay_samples() + 10..];
            let crossings = settled.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
            let seconds = settled.len() as f32 / to as f32;
            let hz = crossings as f32 / 2.0 / seconds;
            assert!((hz - 440.0).abs() < 10.0, "{from} -> {to}: {hz} Hz");
            let peak = settled.iter().map(|s| s.unsigned_abs()).max().unwrap();
            assert!((9000..=11_000).contains(&peak), "{from} -> {to}: peak {peak}");
        }
    }

    #[test]
    fn stream_resampler_refuses_odd_rates() {
        assert!(StreamResampler::new(8000, 16_000).is_ok());
        assert!(StreamResampler::new(8001, 16_000).is_err());
        assert!(StreamResampler::new(0, 8000).is_err());
    }

    #[test]
    fn eight_khz_passes_through() {
        let pcm = Pcm { rate: 8000, samples: vec![0.5, -0.25] };
        assert_eq!(resample_to_8k(&pcm).unwrap(), vec![16384, -8192]);
    }

    #[test]
    fn lengths_follow_the_ratio() {
        for (rate, len, want) in
            [(16_000, 16_000, 8000), (44_100, 44_100, 8000), (48_000, 480, 80), (22_050, 100, 37)]
        {
            let pcm = Pcm { rate, samples: vec![0.1; len] };
            assert_eq!(resample_to_8k(&pcm).unwrap().len(), want, "{rate} Hz, {len} samples");
        }
    }
}
