//! The default clips that ship with precall, served at `/audio/<name>.wav`.
//!
//! They are compiled into the binary so the embedded default works from any directory and
//! offline. `control/assets/audio/README.md` says how they were made.

/// (file name, bytes) of every shipped clip.
pub const CLIPS: &[(&str, &[u8])] = &[
    ("greeting.wav", include_bytes!("../assets/audio/greeting.wav")),
    ("hold.wav", include_bytes!("../assets/audio/hold.wav")),
    ("error.wav", include_bytes!("../assets/audio/error.wav")),
];

/// The shipped clip called `name`, if there is one.
pub fn clip(name: &str) -> Option<&'static [u8]> {
    CLIPS.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_are_8khz_mono_pcm_wav() {
        for (name, bytes) in CLIPS {
            assert_eq!(&bytes[0..4], b"RIFF", "{name}");
            assert_eq!(&bytes[8..12], b"WAVE", "{name}");
            let channels = u16::from_le_bytes([bytes[22], bytes[23]]);
            let rate = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
            assert_eq!((channels, rate), (1, 8000), "{name}");
            // Not silent: some sample far from zero.
            let loud = bytes[44..]
                .chunks_exact(2)
                .any(|s| i16::from_le_bytes([s[0], s[1]]).unsigned_abs() > 3000);
            assert!(loud, "{name} is silent");
        }
        assert!(clip("hold.wav").is_some());
        assert!(clip("../etc/passwd").is_none());
    }
}
