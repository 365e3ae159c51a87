//! Clip preparation end to end: decode (symphonia) -> resample (rubato) -> G.711.

use precall_media::{
    Codec, DecodeError, EncodedClip, FRAME_SAMPLES, decode_audio, encode_clip, g711, resample_to_8k,
};

const HOLD_WAV: &[u8] = include_bytes!("../../../control/assets/audio/hold.wav");
const GREETING_WAV: &[u8] = include_bytes!("../../../control/assets/audio/greeting.wav");
const ERROR_WAV: &[u8] = include_bytes!("../../../control/assets/audio/error.wav");
const SINE_MP3: &[u8] = include_bytes!("data/sine440_22k_mono.mp3");

const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_MULAW: u16 = 7;

/// A canonical WAV file: 16-byte `fmt ` chunk for PCM, 18 bytes (with a zero `cbSize`) for
/// other formats, as the WAVEFORMATEX rules ask (symphonia rejects a 16-byte mu-law `fmt `).
fn wav(format: u16, rate: u32, channels: u16, bits: u16, data: &[u8]) -> Vec<u8> {
    let block_align = channels * bits / 8;
    let fmt_len: u32 = if format == WAVE_FORMAT_PCM { 16 } else { 18 };
    let mut w = Vec::with_capacity(46 + data.len());
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(20 + fmt_len + data.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&fmt_len.to_le_bytes());
    w.extend_from_slice(&format.to_le_bytes());
    w.extend_from_slice(&channels.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * u32::from(block_align)).to_le_bytes());
    w.extend_from_slice(&block_align.to_le_bytes());
    w.extend_from_slice(&bits.to_le_bytes());
    if fmt_len == 18 {
        w.extend_from_slice(&0u16.to_le_bytes());
    }
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(data.len() as u32).to_le_bytes());
    w.extend_from_slice(data);
    w
}

fn sine(rate: u32, seconds: f32, freq: f32, amplitude: f32) -> Vec<i16> {
    let n = (rate as f32 * seconds) as usize;
    (0..n)
        .map(|i| {
            let t = i as f32 / rate as f32;
            (amplitude * 32767.0 * (2.0 * std::f32::consts::PI * freq * t).sin()) as i16
        })
        .collect()
}

fn pcm16_wav(rate: u32, samples: &[i16]) -> Vec<u8> {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    wav(WAVE_FORMAT_PCM, rate, 1, 16, &data)
}

/// Sign changes in the middle 80 % (skipping filter edges); 2 per cycle.
fn zero_crossings(x: &[i16]) -> usize {
    let edge = x.len() / 10;
    x[edge..x.len() - edge].windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count()
}

fn rms(x: &[i16]) -> f64 {
    (x.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

/// Checks an 8 kHz result of a 440 Hz sine at amplitude 0.5, `seconds` long.
fn assert_is_440_hz(out: &[i16], seconds: f64) {
    let crossings = zero_crossings(out) as f64;
    let measured_hz = crossings / 2.0 / (seconds * 0.8);
    assert!((measured_hz - 440.0).abs() < 5.0, "measured {measured_hz} Hz");
    // A half-scale sine has RMS 0.5 * 32767 / sqrt(2) ≈ 11585.
    let level = rms(&out[out.len() / 10..out.len() * 9 / 10]);
    assert!((10_000.0..13_000.0).contains(&level), "rms {level}");
}

#[test]
fn sixteen_khz_wav_sine_resamples_to_8000_samples_at_440_hz() {
    let bytes = pcm16_wav(16_000, &sine(16_000, 1.0, 440.0, 0.5));
    let pcm = decode_audio(&bytes, Some("wav")).unwrap();
    assert_eq!(pcm.rate, 16_000);
    assert_eq!(pcm.samples.len(), 16_000);
    let out = resample_to_8k(&pcm).unwrap();
    assert!(out.len().abs_diff(8000) <= 1, "{} samples", out.len());
    assert_is_440_hz(&out, 1.0);
}

#[test]
fn cd_rate_wav_sine_resamples_to_8000_samples_at_440_hz() {
    let bytes = pcm16_wav(44_100, &sine(44_100, 1.0, 440.0, 0.5));
    let pcm = decode_audio(&bytes, None).unwrap();
    assert_eq!(pcm.rate, 44_100);
    let out = resample_to_8k(&pcm).unwrap();
    assert!(out.len().abs_diff(8000) <= 1, "{} samples", out.len());
    assert_is_440_hz(&out, 1.0);
}

#[test]
fn encode_clip_of_a_wav_gives_whole_frames() {
    let bytes = pcm16_wav(16_000, &sine(16_000, 1.0, 440.0, 0.5));
    let clip = encode_clip(&bytes, Some("wav")).unwrap();
    assert_eq!(clip.frames(), 50);
    assert_eq!(clip.duration().as_millis(), 1000);
    let decoded: Vec<i16> = clip.bytes(Codec::Pcmu).iter().map(|&b| g711::ulaw_decode(b)).collect();
    assert_is_440_hz(&decoded, 1.0);
}

#[test]
fn eight_bit_and_stereo_wavs() {
    // 8-bit WAV is unsigned, 128 = silence.
    let data: Vec<u8> =
        sine(8000, 0.5, 440.0, 0.5).iter().map(|&s| ((s >> 8) + 128) as u8).collect();
    let pcm = decode_audio(&wav(WAVE_FORMAT_PCM, 8000, 1, 8, &data), Some("wav")).unwrap();
    assert_eq!((pcm.rate, pcm.samples.len()), (8000, 4000));
    assert_is_440_hz(&resample_to_8k(&pcm).unwrap(), 0.5);

    // Stereo: the sine on the left, silence on the right -> half the level after downmix.
    let left = sine(16_000, 1.0, 440.0, 1.0);
    let data: Vec<u8> =
        left.iter().flat_map(|s| [s.to_le_bytes(), 0i16.to_le_bytes()]).flatten().collect();
    let pcm = decode_audio(&wav(WAVE_FORMAT_PCM, 16_000, 2, 16, &data), Some("wav")).unwrap();
    assert_eq!(pcm.samples.len(), 16_000);
    assert_is_440_hz(&resample_to_8k(&pcm).unwrap(), 1.0);
}

#[test]
fn mu_law_wav_decodes_to_the_g711_levels() {
    let codes: Vec<u8> =
        sine(8000, 1.0, 440.0, 0.5).iter().map(|&s| g711::ulaw_encode(s)).collect();
    let bytes = wav(WAVE_FORMAT_MULAW, 8000, 1, 8, &codes);
    let pcm = decode_audio(&bytes, Some("wav")).unwrap();
    assert_eq!(pcm.samples.len(), 8000);
    let out = resample_to_8k(&pcm).unwrap();
    for (i, (&code, &s)) in codes.iter().zip(&out).enumerate() {
        assert_eq!(s, g711::ulaw_decode(code), "sample {i}");
    }
    // Re-encoding gives the same bytes: a mu-law WAV passes through untouched.
    let clip = EncodedClip::from_pcm(&out);
    assert_eq!(&clip.bytes(Codec::Pcmu)[..8000], &codes[..]);
}

#[test]
fn shipped_clips_decode_to_their_length() {
    // (file, samples in its data chunk): 8 kHz 16-bit mono, so no resampling happens.
    for (name, bytes, samples) in [
        ("hold", HOLD_WAV, 36_000),
        ("greeting", GREETING_WAV, 46_082),
        ("error", ERROR_WAV, 39_062),
    ] {
        let pcm = decode_audio(bytes, Some("wav")).unwrap();
        assert_eq!((pcm.rate, pcm.samples.len()), (8000, samples), "{name}");
        let clip = encode_clip(bytes, Some("wav")).unwrap();
        assert_eq!(clip.samples(), samples, "{name}");
        assert_eq!(clip.frames(), samples.div_ceil(FRAME_SAMPLES), "{name}");
        assert!(rms(&resample_to_8k(&pcm).unwrap()) > 100.0, "{name} is not silent");
    }
}

#[test]
fn mp3_sine_decodes_and_resamples() {
    let pcm = decode_audio(SINE_MP3, Some("mp3")).unwrap();
    assert_eq!(pcm.rate, 22_050);
    // 1 s plus the encoder's delay and padding (no gapless info in this file).
    let seconds = pcm.samples.len() as f64 / 22_050.0;
    assert!((1.0..1.1).contains(&seconds), "{seconds} s");
    let out = resample_to_8k(&pcm).unwrap();
    assert!(out.len().abs_diff((pcm.samples.len() * 8000).div_ceil(22_050)) <= 1);
    // The encoder's leading and trailing silence sits in the 10 % edges that are skipped.
    assert_is_440_hz(&out, out.len() as f64 / 8000.0);
    // Without the hint, the content is still recognised.
    assert_eq!(decode_audio(SINE_MP3, None).unwrap().samples.len(), pcm.samples.len());
}

#[test]
fn garbage_is_an_error() {
    let cases: [&[u8]; 5] =
        [b"", b"RIFF", b"hello, this is not audio at all", &[0u8; 4096], &[0xFFu8; 4096]];
    for bytes in cases {
        for hint in [None, Some("wav"), Some("mp3")] {
            let e = decode_audio(bytes, hint).unwrap_err();
            assert!(!matches!(e, DecodeError::DecoderPanicked), "{bytes:?} {hint:?}: {e}");
        }
    }
    let mut x: u32 = 0x1234_5678;
    let noise: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let e = decode_audio(&noise, None).unwrap_err();
    assert!(!matches!(e, DecodeError::DecoderPanicked), "{e}");
}

#[test]
fn wav_header_without_samples_is_empty() {
    let e = decode_audio(&pcm16_wav(8000, &[]), Some("wav")).unwrap_err();
    assert!(matches!(e, DecodeError::Empty), "{e:?}");
}

#[test]
fn truncated_wav_is_an_error() {
    let bytes = pcm16_wav(16_000, &sine(16_000, 0.5, 440.0, 0.5));
    for cut in [bytes.len() - 1, bytes.len() - 100, bytes.len() / 2, 45, 44] {
        let e = decode_audio(&bytes[..cut], Some("wav")).unwrap_err();
        assert!(matches!(e, DecodeError::Truncated | DecodeError::Empty), "cut at {cut}: {e:?}");
    }
}

#[test]
fn every_prefix_and_bit_flip_fails_cleanly_or_decodes() {
    let wav = pcm16_wav(8000, &sine(8000, 0.1, 440.0, 0.5));
    for input in [&wav[..], SINE_MP3] {
        for cut in 0..input.len().min(600) {
            if let Err(e) = decode_audio(&input[..cut], None) {
                assert!(!matches!(e, DecodeError::DecoderPanicked), "cut {cut}: {e}");
            }
        }
        for step in (0..input.len()).step_by(7) {
            let mut damaged = input.to_vec();
            damaged[step] ^= 0x5A;
            if let Err(e) = decode_audio(&damaged, None) {
                assert!(!matches!(e, DecodeError::DecoderPanicked), "flip at {step}: {e}");
            }
        }
    }
}

#[test]
fn open_ended_wav_from_a_pipe_is_read_to_the_end() {
    // Streaming writers leave 0xFFFFFFFF ("unknown") in the RIFF and data lengths.
    let mut bytes = HOLD_WAV.to_vec();
    bytes[4..8].copy_from_slice(&[0xFF; 4]);
    bytes[40..44].copy_from_slice(&[0xFF; 4]);
    let pcm = decode_audio(&bytes, Some("wav")).unwrap();
    assert_eq!(pcm.samples.len(), 36_000);
}

#[test]
fn mp3_with_an_id3v2_tag_decodes() {
    // ID3v2.3 header (syncsafe size) + one TIT2 frame, in front of the MP3 frames.
    let frame: Vec<u8> = [b"TIT2".as_slice(), &[0, 0, 0, 5, 0, 0, 0], b"hold"].concat();
    let size = frame.len() as u8; // < 128: one syncsafe byte
    let tagged: Vec<u8> = [b"ID3".as_slice(), &[3, 0, 0, 0, 0, 0, size], &frame, SINE_MP3].concat();
    let plain = decode_audio(SINE_MP3, None).unwrap();
    assert_eq!(decode_audio(&tagged, None).unwrap(), plain);
}

#[test]
fn out_of_range_sample_rate_is_refused() {
    let e = decode_audio(&pcm16_wav(1000, &[0; 1000]), Some("wav")).unwrap_err();
    assert!(matches!(e, DecodeError::BadSampleRate(1000)), "{e:?}");
}
