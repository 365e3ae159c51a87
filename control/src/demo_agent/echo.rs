//! The demo agent's behaviour, sans-IO: it greets with a short chime, listens, and about a
//! second after the caller stops talking plays their words back, sent faster than real time
//! in `audio` events with increasing ids, as ElevenLabs agents send speech. When the caller
//! talks over the playback it stops and says `interruption` with the last id it sent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use precall_media::g711;

/// One 20 ms µ-law frame.
const FRAME: usize = 160;
/// Mean magnitude above which a frame is speech (about -36 dBFS).
const VOICE_LEVEL: i32 = 500;
/// Voiced frames in a row that count as the caller starting to speak.
const ONSET_FRAMES: u32 = 3;
/// Silence that ends an utterance.
const END_SILENCE_FRAMES: u32 = 25;
/// From the end of the utterance to the echo (plus the 500 ms of silence that ended it:
/// about a second in all).
const ECHO_DELAY: Duration = Duration::from_millis(500);
/// Longest utterance kept (10 s).
const MAX_UTTERANCE: usize = 10 * 8000;
/// Audio per `audio` event.
const CHUNK: usize = 800;

/// What the demo agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// µ-law audio with its event id.
    Audio(u64, Vec<u8>),
    /// Stop: audio up to this id is void.
    Interruption(u64),
}

/// The echo behaviour of one conversation.
#[derive(Debug)]
pub struct Echo {
    pending: Vec<u8>,
    utterance: Vec<u8>,
    in_utterance: bool,
    /// The last frames before the current one: an utterance starts with the frames that
    /// made its onset.
    recent: VecDeque<[u8; FRAME]>,
    voiced_run: u32,
    silent_run: u32,
    echo_due: Option<(Instant, Vec<u8>)>,
    speaking_until: Option<Instant>,
    next_id: u64,
    out: VecDeque<Say>,
}

impl Echo {
    /// A conversation that starts at `now` with the chime.
    pub fn new(now: Instant) -> Self {
        let mut e = Self {
            pending: Vec::new(),
            utterance: Vec::new(),
            in_utterance: false,
            recent: VecDeque::new(),
            voiced_run: 0,
            silent_run: 0,
            echo_due: None,
            speaking_until: None,
            next_id: 1,
            out: VecDeque::new(),
        };
        e.speak(now, &chime());
        e
    }

    /// Caller audio (µ-law, any length).
    pub fn hear(&mut self, now: Instant, ulaw: &[u8]) {
        self.pending.extend_from_slice(ulaw);
        let frames = self.pending.len() / FRAME;
        for i in 0..frames {
            let frame: [u8; FRAME] =
                self.pending[i * FRAME..(i + 1) * FRAME].try_into().unwrap_or([0xFF; FRAME]);
            self.frame(now, &frame);
        }
        self.pending.drain(..frames * FRAME);
    }

    fn frame(&mut self, now: Instant, frame: &[u8; FRAME]) {
        let level = frame.iter().map(|&b| i32::from(g711::ulaw_decode(b)).abs()).sum::<i32>()
            / FRAME as i32;
        let voiced = level > VOICE_LEVEL;
        if voiced {
            self.voiced_run += 1;
            self.silent_run = 0;
        } else {
            self.voiced_run = 0;
            self.silent_run += 1;
        }
        if self.voiced_run == ONSET_FRAMES {
            if self.speaking_until.is_some_and(|t| now < t) || self.echo_due.is_some() {
                // Barge-in: stop talking.
                self.speaking_until = None;
                self.echo_due = None;
                self.out.push_back(Say::Interruption(self.next_id - 1));
            }
            if !self.in_utterance {
                self.in_utterance = true;
                self.utterance.clear();
                for f in &self.recent {
                    self.utterance.extend_from_slice(f);
                }
            }
        }
        if self.recent.len() == ONSET_FRAMES as usize - 1 {
            self.recent.pop_front();
        }
        self.recent.push_back(*frame);
        if self.in_utterance {
            if self.utterance.len() < MAX_UTTERANCE {
                self.utterance.extend_from_slice(frame);
            }
            if self.silent_run >= END_SILENCE_FRAMES {
                self.in_utterance = false;
                let keep = self.utterance.len().saturating_sub(FRAME * END_SILENCE_FRAMES as usize);
                let mut words = std::mem::take(&mut self.utterance);
                words.truncate(keep);
                self.echo_due = Some((now + ECHO_DELAY, words));
            }
        }
    }

    /// What to send now.
    pub fn poll(&mut self, now: Instant) -> Option<Say> {
        if self.echo_due.as_ref().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, words)) = self.echo_due.take() {
                self.speak(now, &words);
            }
        }
        self.out.pop_front()
    }

    fn speak(&mut self, now: Instant, audio: &[u8]) {
        for piece in audio.chunks(CHUNK) {
            self.out.push_back(Say::Audio(self.next_id, piece.to_vec()));
            self.next_id += 1;
        }
        let seconds = audio.len() as f64 / 8000.0;
        self.speaking_until = Some(now + Duration::from_secs_f64(seconds));
    }
}

/// Two short tones (660 Hz then 880 Hz, 150 ms each): "you are connected".
fn chime() -> Vec<u8> {
    let tone = |hz: f32, ms: usize| -> Vec<u8> {
        (0..ms * 8)
            .map(|i| {
                let fade = (i.min(ms * 8 - i) as f32 / 80.0).min(1.0);
                let s = (i as f32 * hz * std::f32::consts::TAU / 8000.0).sin() * 6000.0 * fade;
                g711::ulaw_encode(s as i16)
            })
            .collect()
    };
    let mut out = tone(660.0, 150);
    out.extend(std::iter::repeat_n(0xFF, 400));
    out.extend(tone(880.0, 150));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(e: &mut Echo, now: Instant) -> Vec<Say> {
        std::iter::from_fn(|| e.poll(now)).collect()
    }

    fn speech(frames: usize) -> Vec<u8> {
        (0..frames * FRAME)
            .map(|i| g711::ulaw_encode(((i as f32 * 0.3).sin() * 8000.0) as i16))
            .collect()
    }

    #[test]
    fn greets_then_echoes_the_utterance_about_a_second_later() {
        let t0 = Instant::now();
        let mut e = Echo::new(t0);
        let greeting = drain(&mut e, t0);
        assert!(greeting.iter().all(|s| matches!(s, Say::Audio(..))));
        assert_eq!(greeting.len(), 4);
        // After the chime, the caller says something for 1 s, then is silent.
        let mut now = t0 + Duration::from_secs(2);
        let words = speech(50);
        for f in words.chunks(FRAME) {
            e.hear(now, f);
            now += Duration::from_millis(20);
        }
        let mut echoed = Vec::new();
        let mut first_at = None;
        for _ in 0..100 {
            e.hear(now, &[0xFF; FRAME]);
            for s in drain(&mut e, now) {
                if let Say::Audio(_, a) = s {
                    first_at.get_or_insert(now);
                    echoed.extend(a);
                }
            }
            now += Duration::from_millis(20);
        }
        let delay = first_at.unwrap() - (t0 + Duration::from_secs(3));
        assert!(
            (Duration::from_millis(900)..Duration::from_millis(1100)).contains(&delay),
            "{delay:?}"
        );
        assert_eq!(&echoed[..words.len()], &words[..]);
    }

    #[test]
    fn talking_over_the_agent_interrupts_it() {
        let t0 = Instant::now();
        let mut e = Echo::new(t0);
        let sent = drain(&mut e, t0);
        let Some(Say::Audio(last, _)) = sent.last().cloned() else { panic!() };
        e.hear(t0 + Duration::from_millis(100), &speech(3));
        assert_eq!(drain(&mut e, t0 + Duration::from_millis(100)), vec![Say::Interruption(last)]);
    }
}
