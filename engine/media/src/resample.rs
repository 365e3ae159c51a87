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
