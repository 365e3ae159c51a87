//! What a call plays, frame by frame: a queue of clips (greeting, hold loop, error message).

use std::collections::VecDeque;

use crate::clip::EncodedClip;

/// One entry of a [`Playout`]: a clip and how many times to play it.
#[derive(Debug, Clone)]
pub struct PlayItem {
    clip: EncodedClip,
    /// Passes left including the current one; `None` = until replaced.
    loops: Option<u32>,
}

impl PlayItem {
    /// `clip` played `loops` times; 0 means until replaced (as TwiML `<Play loop="0">`).
    #[must_use]
    pub fn new(clip: EncodedClip, loops: u32) -> Self {
        Self { clip, loops: (loops != 0).then_some(loops) }
    }

    /// `clip` played once.
    #[must_use]
    pub fn once(clip: EncodedClip) -> Self {
        Self::new(clip, 1)
    }

    /// `clip` looped until the playout is replaced (or [`Playout::end_loop`]).
    #[must_use]
    pub fn forever(clip: EncodedClip) -> Self {
        Self::new(clip, 0)
    }

    /// The clip.
    #[must_use]
    pub fn clip(&self) -> &EncodedClip {
        &self.clip
    }
}

/// Result of one [`Playout::tick`].
#[derive(Debug, Clone, Copy)]
pub enum PlayoutTick<'a> {
    /// Send frame `index` of `clip` now.
    Frame {
        /// The clip; borrow its bytes with [`EncodedClip::frame`].
        clip: &'a EncodedClip,
        /// Frame index, `< clip.frames()`.
        index: usize,
    },
    /// Nothing is left to play.
    Finished,
}

#[derive(Debug)]
struct Current {
    item: PlayItem,
    next_frame: usize,
}

/// The playout state machine of one call. On every frame the media clock says is due, call
/// [`Playout::tick`] and send the frame it names (or stop the stream on `Finished`). Clips
/// play back to back in queue order, without a gap, so one [`crate::RtpSender`] keeps the
/// sequence and timestamp continuous across switches. Frames the clock `skipped` are not
/// skipped here: a late greeting resumes where it was, it does not lose words.
#[derive(Debug, Default)]
pub struct Playout {
    current: Option<Current>,
    queue: VecDeque<PlayItem>,
}

impl Playout {
    /// An empty playout ([`PlayoutTick::Finished`] until something is queued).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A playout of `items` in order.
    #[must_use]
    pub fn with_items(items: impl IntoIterator<Item = PlayItem>) -> Self {
        Self { current: None, queue: items.into_iter().collect() }
    }

    /// Queues `item` after everything already queued.
    pub fn push(&mut self, item: PlayItem) {
        self.queue.push_back(item);
    }

    /// Drops what is playing and queued; the next tick plays `items` from their start (as a
    /// live TwiML update does). Use it to leave a loop that is played until replaced.
    pub fn replace(&mut self, items: impl IntoIterator<Item = PlayItem>) {
        self.current = None;
        self.queue.clear();
        self.queue.extend(items);
    }

    /// Lets the current clip finish its current pass, then moves on to the queue.
    pub fn end_loop(&mut self) {
        if let Some(current) = &mut self.current {
            current.item.loops = Some(1);
        }
    }

    /// Whether nothing is playing or queued.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.current.is_none() && self.queue.iter().all(|i| i.clip.is_empty())
    }

    /// The frame to send now; advances by one frame.
    pub fn tick(&mut self) -> PlayoutTick<'_> {
        let index = loop {
            match &mut self.current {
                None => {
                    let Some(item) = self.queue.pop_front() else {
                        return PlayoutTick::Finished;
                    };
                    // An empty clip has nothing to play, even "forever".
                    if !item.clip.is_empty() {
                        self.current = Some(Current { item, next_frame: 0 });
                    }
                }
                Some(current) => {
                    if current.next_frame < current.item.clip.frames() {
                        current.next_frame += 1;
                        break current.next_frame - 1;
                    }
                    // End of a pass.
                    current.next_frame = 0;
                    match &mut current.item.loops {
                        Some(left) if *left <= 1 => self.current = None,
                        Some(left) => *left -= 1,
                        None => {}
                    }
                }
            }
        };
        match &self.current {
            Some(current) => PlayoutTick::Frame { clip: &current.item.clip, index },
            None => PlayoutTick::Finished,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(frames: usize) -> EncodedClip {
        EncodedClip::from_pcm(&vec![100; frames * 160])
    }

    /// Ticks `n` times, naming each clip by its position in `clips`.
    fn run(p: &mut Playout, clips: &[&EncodedClip], n: usize) -> Vec<Option<(usize, usize)>> {
        (0..n)
            .map(|_| match p.tick() {
                PlayoutTick::Frame { clip, index } => {
                    Some((clips.iter().position(|c| c.ptr_eq(clip)).unwrap(), index))
                }
                PlayoutTick::Finished => None,
            })
            .collect()
    }

    #[test]
    fn greeting_then_hold_loop_then_error_then_finished() {
        let (greeting, hold, error) = (clip(3), clip(2), clip(2));
        let clips = [&greeting, &hold, &error];
        let mut p = Playout::with_items([
            PlayItem::once(greeting.clone()),
            PlayItem::forever(hold.clone()),
        ]);
        let got = run(&mut p, &clips, 8);
        let want = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 0), (1, 1), (1, 0)];
        assert_eq!(got, want.map(Some));
        // Clone failed: switch to the error clip at once.
        p.replace([PlayItem::once(error.clone())]);
        let got = run(&mut p, &clips, 4);
        assert_eq!(got, vec![Some((2, 0)), Some((2, 1)), None, None]);
        assert!(p.is_finished());
    }

    #[test]
    fn counted_loops() {
        let a = clip(2);
        let mut p = Playout::with_items([PlayItem::new(a.clone(), 3)]);
        let got = run(&mut p, &[&a], 7);
        assert_eq!(got.iter().filter(|x| x.is_some()).count(), 6);
        assert_eq!(got[6], None);
    }

    #[test]
    fn end_loop_finishes_the_pass_then_continues_with_the_queue() {
        let (hold, error) = (clip(3), clip(1));
        let mut p = Playout::with_items([PlayItem::forever(hold.clone())]);
        p.push(PlayItem::once(error.clone()));
        let clips = [&hold, &error];
        assert_eq!(run(&mut p, &clips, 4), [(0, 0), (0, 1), (0, 2), (0, 0)].map(Some));
        p.end_loop();
        let got = run(&mut p, &clips, 4);
        assert_eq!(got, vec![Some((0, 1)), Some((0, 2)), Some((1, 0)), None]);
    }

    #[test]
    fn empty_clips_are_skipped_even_forever() {
        let (empty, a) = (clip(0), clip(1));
        let mut p =
            Playout::with_items([PlayItem::forever(empty.clone()), PlayItem::once(a.clone())]);
        assert!(!p.is_finished());
        assert_eq!(run(&mut p, &[&empty, &a], 2), vec![Some((1, 0)), None]);
        let mut p = Playout::with_items([PlayItem::forever(empty)]);
        assert!(p.is_finished());
        assert!(matches!(p.tick(), PlayoutTick::Finished));
    }

    #[test]
    fn empty_playout_is_finished_until_something_is_pushed() {
        let a = clip(1);
        let mut p = Playout::new();
        assert!(p.is_finished());
        assert!(matches!(p.tick(), PlayoutTick::Finished));
        p.push(PlayItem::once(a.clone()));
        assert!(!p.is_finished());
        assert!(matches!(p.tick(), PlayoutTick::Frame { index: 0, .. }));
    }
}
