//! Hold music that goes on where it stopped, in the poll hold mode.
//!
//! Twilio's `<Play>` always starts a file at its beginning, and the poll flow plays one hold
//! `<Play>` per poll: with the whole clip, every poll restarted the music. Instead the hold clip
//! is served in numbered segments of one poll interval each
//! (`/audio/hold/{clip}/{n}.wav`): segment `n` is the clip's audio from `n × interval`
//! (wrapping around its end), and each poll's `<Redirect>` names the next segment
//! (`&hold=n+1`), so consecutive polls play the clip continuously.
//!
//! Segments are cut from the clips the audio service already decoded (the configured and the
//! profiles' hold clips, loaded at start), as 16-bit PCM WAV at 8 kHz: a few kilobytes of work
//! per request, nothing stored per segment. A hold URL that is not loaded (yet) is played whole,
//! as before.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use precall_media::{Codec, EncodedClip, FRAME_SAMPLES};

/// The hold clips that can be served in segments, by URL.
#[derive(Debug)]
pub struct HoldSegments {
    /// Frames per segment (the poll interval).
    segment_frames: usize,
    clips: RwLock<HashMap<String, (String, Arc<EncodedClip>)>>,
    by_key: RwLock<HashMap<String, Arc<EncodedClip>>>,
}

impl HoldSegments {
    /// Segments of `interval` (rounded to whole 20 ms frames, at least one).
    pub fn new(interval: Duration) -> Self {
        let frames = usize::try_from(interval.as_millis() / 20).unwrap_or(usize::MAX).max(1);
        Self {
            segment_frames: frames,
            clips: RwLock::new(HashMap::new()),
            by_key: RwLock::new(HashMap::new()),
        }
    }

    /// Makes `url`'s decoded clip servable in segments.
    pub fn insert(&self, url: &str, clip: Arc<EncodedClip>) {
        if clip.frames() == 0 {
            return;
        }
        // The key changes with the audio, so a cached segment of an older clip is never
        // served for a new one.
        let key = format!("{:016x}", fingerprint(url, &clip));
        self.by_key.write().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), clip.clone());
        self.clips.write().unwrap_or_else(|p| p.into_inner()).insert(url.to_owned(), (key, clip));
    }

    /// The path of segment `n` of `url`'s clip, when it is loaded.
    pub fn path(&self, url: &str, n: u64) -> Option<String> {
        let clips = self.clips.read().unwrap_or_else(|p| p.into_inner());
        let (key, clip) = clips.get(url)?;
        // Segments repeat once the clip has wrapped: keep `n` small (cacheable, bounded).
        let period = clip.frames() / gcd(clip.frames(), self.segment_frames);
        Some(format!("/audio/hold/{key}/{}.wav", n % period as u64))
    }

    /// The WAV of `rest` = `{key}/{n}.wav`, or `None` when there is no such segment.
    pub fn wav(&self, rest: &str) -> Option<Vec<u8>> {
        let (key, file) = rest.split_once('/')?;
        let n: u64 = file.strip_suffix(".wav")?.parse().ok()?;
        let clip = self.by_key.read().unwrap_or_else(|p| p.into_inner()).get(key)?.clone();
        let frames = clip.frames();
        let start = usize::try_from(n).ok()?.checked_mul(self.segment_frames)? % frames;
        let mut pcm = Vec::with_capacity(self.segment_frames * FRAME_SAMPLES);
        for i in 0..self.segment_frames {
            let frame = clip.frame(Codec::Pcmu, (start + i) % frames);
            pcm.extend(frame.iter().map(|&b| Codec::Pcmu.decode(b)));
        }
        Some(wav_pcm16(&pcm))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a.max(1) } else { gcd(b, a % b) }
}

/// FNV-1a over the URL and the clip's µ-law bytes.
fn fingerprint(url: &str, clip: &EncodedClip) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes().chain(clip.bytes(Codec::Pcmu).iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A 16-bit mono 8 kHz PCM WAV of `pcm`.
pub fn wav_pcm16(pcm: &[i16]) -> Vec<u8> {
    let data = u32::try_from(pcm.len() * 2).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(44 + pcm.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&16000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data.to_le_bytes());
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clip whose frame `i` holds the value `100 * i` (so a segment tells where it starts).
    fn ramp(frames: usize) -> Arc<EncodedClip> {
        let pcm: Vec<i16> = (0..frames)
            .flat_map(|i| std::iter::repeat_n((i * 100) as i16, FRAME_SAMPLES))
            .collect();
        Arc::new(EncodedClip::from_pcm(&pcm))
    }

    fn first_sample_of_each_frame(wav: &[u8]) -> Vec<i16> {
        wav[44..].chunks(2 * FRAME_SAMPLES).map(|f| i16::from_le_bytes([f[0], f[1]])).collect()
    }

    #[test]
    fn consecutive_segments_continue_the_clip_and_wrap_around_its_end() {
        let segs = HoldSegments::new(Duration::from_millis(60)); // 3 frames each
        assert_eq!(segs.path("http://x/hold.wav", 0), None, "not loaded: played whole");
        let clip = ramp(5);
        segs.insert("http://x/hold.wav", clip.clone());
        let decoded = |i: usize| Codec::Pcmu.decode(clip.frame(Codec::Pcmu, i)[0]);
        let mut heard = Vec::new();
        for n in 0..4 {
            let path = segs.path("http://x/hold.wav", n).unwrap();
            let rest = path.strip_prefix("/audio/hold/").unwrap();
            let wav = segs.wav(rest).unwrap();
            assert_eq!(&wav[..4], b"RIFF");
            assert_eq!(wav.len(), 44 + 3 * FRAME_SAMPLES * 2);
            heard.extend(first_sample_of_each_frame(&wav));
        }
        // Twelve frames of a five-frame clip, without a restart: 0 1 2 3 4 0 1 2 3 4 0 1.
        let want: Vec<i16> = (0..12).map(|i| decoded(i % 5)).collect();
        assert_eq!(heard, want);
        // Segment numbers stay within one period (5 frames / gcd(5, 3) = 5 segments).
        assert!(segs.path("http://x/hold.wav", 7).unwrap().ends_with("/2.wav"));
        assert_eq!(segs.wav("nope/0.wav"), None);
        assert_eq!(segs.wav("x"), None);
    }
}
