//! Decoding a clip file (WAV PCM / mu-law / A-law, MP3) to mono floating-point PCM with
//! symphonia. Runs once per clip, off the hot path; the bytes are read from memory.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::well_known::FORMAT_ID_WAVE;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

/// Lowest input sample rate accepted.
pub const MIN_SAMPLE_RATE: u32 = 4_000;
/// Highest input sample rate accepted.
pub const MAX_SAMPLE_RATE: u32 = 384_000;
/// Longest clip accepted, in seconds: bounds the memory one upload can take.
pub const MAX_CLIP_SECONDS: u64 = 15 * 60;
/// Packets that fail to decode are skipped (a damaged MP3 frame); more than this many fail
/// the clip.
pub const MAX_BAD_PACKETS: usize = 16;

/// Mono PCM at the source's sample rate, in [-1.0, 1.0].
#[derive(Debug, Clone, PartialEq)]
pub struct Pcm {
    /// Samples per second.
    pub rate: u32,
    /// Mono samples (channels averaged).
    pub samples: Vec<f32>,
}

/// Why a clip could not be turned into telephony audio.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// No enabled container format (WAV, MP3) recognised the bytes.
    #[error("not a supported audio container")]
    UnsupportedFormat(#[source] SymphoniaError),
    /// The container has no audio track.
    #[error("no audio track in the container")]
    NoAudioTrack,
    /// The track's codec is not one of the enabled decoders (PCM, G.711, MP3).
    #[error("unsupported audio codec")]
    UnsupportedCodec(#[source] SymphoniaError),
    /// The sample rate is outside [`MIN_SAMPLE_RATE`]..=[`MAX_SAMPLE_RATE`].
    #[error("sample rate {0} Hz is out of range")]
    BadSampleRate(u32),
    /// The sample rate changed in the middle of the stream.
    #[error("sample rate changed from {from} to {to} mid-stream")]
    SampleRateChanged {
        /// Rate of the first decoded audio.
        from: u32,
        /// Rate found later.
        to: u32,
    },
    /// The stream ends before the length its header announced (a cut-off download).
    #[error("stream is truncated")]
    Truncated,
    /// Reading the container failed (malformed data).
    #[error("malformed container")]
    Demux(#[source] SymphoniaError),
    /// More than [`MAX_BAD_PACKETS`] packets failed to decode.
    #[error("too many undecodable packets")]
    Decode(#[source] SymphoniaError),
    /// The decoder panicked on this input (a bug in the decoder, contained here).
    #[error("the decoder panicked on this input")]
    DecoderPanicked,
    /// Longer than [`MAX_CLIP_SECONDS`].
    #[error("clip is longer than {MAX_CLIP_SECONDS} s")]
    TooLong,
    /// The stream decoded to no audio at all.
    #[error("clip contains no audio")]
    Empty,
    /// The resampler could not be built for this rate.
    #[error("cannot resample from {rate} Hz")]
    Resampler {
        /// Source rate.
        rate: u32,
        /// Rubato's reason.
        #[source]
        source: rubato::ResamplerConstructionError,
    },
    /// The resampler failed while processing.
    #[error("resampling failed")]
    Resample(#[source] rubato::ResampleError),
}

/// Decodes a whole audio file held in memory to mono PCM. `hint_ext` (`"wav"`, `"mp3"`) helps
/// the probe; the content decides. Never panics on bad input.
pub fn decode_audio(bytes: &[u8], hint_ext: Option<&str>) -> Result<Pcm, DecodeError> {
    // symphonia forbids unsafe code but can still hit an index or arithmetic panic on hostile
    // input; the bytes come from user-supplied URLs, so contain it.
    catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, hint_ext)))
        .unwrap_or(Err(DecodeError::DecoderPanicked))
}

fn decode_inner(bytes: &[u8], hint_ext: Option<&str>) -> Result<Pcm, DecodeError> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = hint_ext {
        hint.with_extension(ext);
    }
    let mut format = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(DecodeError::UnsupportedFormat)?;

    let track = format.default_track(TrackType::Audio).ok_or(DecodeError::NoAudioTrack)?;
    let track_id = track.id;
    // Only a WAV `data` chunk gives an exact length (the MP3 reader estimates one from the
    // bitrate when there is no Xing/VBRI header, and that must not fail a good file), unless
    // a streaming writer left "unknown" (0xFFFFFFFF) there: then the file ends at EOF.
    let open_ended = is_open_ended_wav(bytes);
    let exact_length = if format.format_info().format == FORMAT_ID_WAVE && !open_ended {
        track.num_frames
    } else {
        None
    };
    let params =
        track.codec_params.as_ref().and_then(|p| p.audio()).ok_or(DecodeError::NoAudioTrack)?;
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(params, &AudioDecoderOptions::default())
        .map_err(DecodeError::UnsupportedCodec)?;

    let mut rate: Option<u32> = None;
    let mut samples: Vec<f32> = Vec::new();
    let mut interleaved: Vec<f32> = Vec::new();
    let mut bad_packets = 0;
    let mut frames_decoded: u64 = 0;

    loop {
        let packet = match format.next_packet() {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                if open_ended {
                    break;
                }
                return Err(DecodeError::Truncated);
            }
            Err(e) => return Err(DecodeError::Demux(e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let audio = match decoder.decode(&packet) {
            Ok(audio) => audio,
            Err(e @ (SymphoniaError::DecodeError(_) | SymphoniaError::IoError(_))) => {
                bad_packets += 1;
                if bad_packets > MAX_BAD_PACKETS {
                    return Err(DecodeError::Decode(e));
                }
                continue;
            }
            Err(e) => return Err(DecodeError::Decode(e)),
        };
        if audio.frames() == 0 {
            continue;
        }
        let spec_rate = audio.spec().rate();
        match rate {
            None => {
                if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&spec_rate) {
                    return Err(DecodeError::BadSampleRate(spec_rate));
                }
                rate = Some(spec_rate);
            }
            Some(r) if r != spec_rate => {
                return Err(DecodeError::SampleRateChanged { from: r, to: spec_rate });
            }
            Some(_) => {}
        }
        let channels = audio.num_planes().max(1);
        frames_decoded += audio.frames() as u64;
        if frames_decoded > MAX_CLIP_SECONDS * u64::from(spec_rate) {
            return Err(DecodeError::TooLong);
        }
        audio.copy_to_vec_interleaved(&mut interleaved);
        downmix_into(&interleaved, channels, &mut samples);
    }

    let rate = rate.ok_or(DecodeError::Empty)?;
    if samples.is_empty() {
        return Err(DecodeError::Empty);
    }
    // A WAV whose data chunk announced more than it held was cut off. (A cut MP3 cannot be
    // told from a short one: the reader drops the partial last frame.)
    if exact_length.is_some_and(|n| frames_decoded < n) {
        return Err(DecodeError::Truncated);
    }
    Ok(Pcm { rate, samples })
}

/// Whether `bytes` is a RIFF/WAVE file whose RIFF length is the 0xFFFFFFFF "unknown length"
/// marker that tools writing to a pipe leave in place.
fn is_open_ended_wav(bytes: &[u8]) -> bool {
    bytes.len() >= 12
        && &bytes[0..4] == b"RIFF"
        && &bytes[8..12] == b"WAVE"
        && bytes[4..8] == [0xFF; 4]
}

/// Appends the average of each interleaved frame to `out`.
fn downmix_into(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(interleaved.chunks_exact(channels).map(|f| f.iter().sum::<f32>() * scale));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_averages_channels() {
        let mut out = vec![9.0];
        downmix_into(&[0.5, -0.5, 1.0, 0.0], 2, &mut out);
        assert_eq!(out, vec![9.0, 0.0, 0.5]);
        downmix_into(&[0.25], 1, &mut out);
        assert_eq!(out, vec![9.0, 0.0, 0.5, 0.25]);
    }
}
