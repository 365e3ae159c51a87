//! `AudioService`: turns a clip URL into a shared, G.711-encoded clip, once.
//!
//! Runs on the side runtime. For each URL: the shipped clips (`PUBLIC_BASE_URL/audio/*.wav`)
//! come from the binary itself; anything else is fetched (`http(s)://`, `file://`) once and
//! kept in the disk cache (`AUDIO_CACHE_DIR`), then decoded, resampled to 8 kHz and encoded to
//! mu-law and A-law once, off the runtime thread. Every call on every shard then shares the
//! same `Arc<EncodedClip>`: playing a frame copies nothing.
//!
//! Concurrent requests for one URL wait for the same fetch. The disk cache is keyed by the
//! URL: a changed clip needs a new URL (as with voice samples).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use precall_media::{EncodedClip, encode_clip};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// Largest clip accepted (a 10-minute 44.1 kHz stereo WAV is about 100 MiB; hold music is
/// usually far smaller).
pub const MAX_CLIP_BYTES: u64 = 64 << 20;

/// A clip could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// Fetching failed.
    #[error("fetching {url}: {source}")]
    Fetch {
        /// The URL, without query or credentials.
        url: String,
        /// Why.
        #[source]
        source: precall_clone::SampleError,
    },
    /// The bytes are not audio precall can decode.
    #[error("decoding {url}: {source}")]
    Decode {
        /// The URL, without query or credentials.
        url: String,
        /// Why.
        #[source]
        source: precall_media::DecodeError,
    },
    /// The decoder thread died.
    #[error("decoding {url}: the decoder panicked")]
    DecoderPanicked {
        /// The URL.
        url: String,
    },
}

/// Fetches, caches and encodes clips (see the module docs).
#[derive(Debug)]
pub struct AudioService {
    client: reqwest::Client,
    cache_dir: PathBuf,
    shipped_prefix: String,
    clips: Mutex<HashMap<String, Arc<OnceCell<Arc<EncodedClip>>>>>,
}

fn cache_key(url: &str) -> String {
    let digest = Sha256::digest(url.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn extension(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').next()?;
    let ext = last.rsplit_once('.')?.1.to_ascii_lowercase();
    (!ext.is_empty() && ext.len() <= 5).then_some(ext)
}

/// The URL for logs: no query string or credentials.
fn shown(url: &str) -> String {
    let base = url.split(['?', '#']).next().unwrap_or(url);
    match base.split_once("://") {
        Some((scheme, rest)) => {
            let host_start = rest.find('@').filter(|at| rest[..*at].find('/').is_none());
            format!("{scheme}://{}", host_start.map_or(rest, |at| &rest[at + 1..]))
        }
        None => base.to_owned(),
    }
}

impl AudioService {
    /// A service caching under `cache_dir` (created when missing); URLs under
    /// `public_base_url/audio/` are served from the shipped clips.
    pub fn new(cache_dir: PathBuf, public_base_url: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cache_dir)?;
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            client,
            cache_dir,
            shipped_prefix: format!("{public_base_url}/audio/"),
            clips: Mutex::new(HashMap::new()),
        })
    }

    /// The encoded clip behind `url`, fetching and encoding it on first use.
    pub async fn clip(&self, url: &str) -> Result<Arc<EncodedClip>, AudioError> {
        let cell = {
            let mut clips = self.clips.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(clips.entry(url.to_owned()).or_default())
        };
        cell.get_or_try_init(|| self.load(url)).await.cloned()
    }

    async fn load(&self, url: &str) -> Result<Arc<EncodedClip>, AudioError> {
        let bytes = self.bytes(url).await?;
        let hint = extension(url);
        let shown_url = shown(url);
        let encoded = tokio::task::spawn_blocking(move || encode_clip(&bytes, hint.as_deref()))
            .await
            .map_err(|_| AudioError::DecoderPanicked { url: shown_url.clone() })?
            .map_err(|source| AudioError::Decode { url: shown_url.clone(), source })?;
        tracing::info!(url = %shown_url, seconds = encoded.duration().as_secs_f32(), "clip ready");
        Ok(Arc::new(encoded))
    }

    async fn bytes(&self, url: &str) -> Result<Vec<u8>, AudioError> {
        if let Some(name) = url.strip_prefix(&self.shipped_prefix) {
            if let Some(bytes) = crate::audio::clip(name) {
                return Ok(bytes.to_vec());
            }
        }
        let cached = self.cache_dir.join(cache_key(url));
        if let Ok(bytes) = tokio::fs::read(&cached).await {
            return Ok(bytes);
        }
        let sample = precall_clone::fetch_sample(url, MAX_CLIP_BYTES, &self.client)
            .await
            .map_err(|source| AudioError::Fetch { url: shown(url), source })?;
        if !url.starts_with("file://") {
            if let Err(e) = write_atomically(&cached, &sample.bytes).await {
                tracing::warn!(url = %shown(url), error = %e, "could not cache clip on disk");
            }
        }
        Ok(sample.bytes)
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        assert_eq!(extension("https://x/a/hold.MP3?sig=1"), Some("mp3".to_owned()));
        assert_eq!(extension("https://x/a/hold"), None);
        assert_eq!(shown("https://u:p@cdn/x.wav?sig=secret"), "https://cdn/x.wav");
        assert_eq!(cache_key("a").len(), 64);
        assert_ne!(cache_key("a"), cache_key("b"));
    }
}

#[cfg(test)]
mod service_tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("precall-audio-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn shipped_clips_are_encoded_once_and_shared() {
        let svc = AudioService::new(dir("shipped"), "http://127.0.0.1:1").unwrap();
        rt().block_on(async {
            let a = svc.clip("http://127.0.0.1:1/audio/hold.wav").await.unwrap();
            let b = svc.clip("http://127.0.0.1:1/audio/hold.wav").await.unwrap();
            assert!(Arc::ptr_eq(&a, &b), "one encoding, shared");
            // 4.5 s at 20 ms per frame.
            assert_eq!(a.frames(), 225);
        });
    }

    #[test]
    fn file_urls_are_read_and_bad_audio_is_an_error() {
        let d = dir("file");
        std::fs::create_dir_all(&d).unwrap();
        let wav = d.join("greeting copy.wav");
        std::fs::write(&wav, crate::audio::clip("greeting.wav").unwrap()).unwrap();
        let junk = d.join("junk.wav");
        std::fs::write(&junk, b"not audio at all").unwrap();
        let svc = AudioService::new(d.join("cache"), "http://127.0.0.1:1").unwrap();
        rt().block_on(async {
            let url = format!("file://{}", wav.display()).replace(' ', "%20");
            let clip = svc.clip(&url).await.unwrap();
            assert!(clip.frames() > 250, "{}", clip.frames());
            let err = svc.clip(&format!("file://{}", junk.display())).await.unwrap_err();
            assert!(matches!(err, AudioError::Decode { .. }), "{err}");
            let err = svc.clip("file:///nonexistent/x.wav").await.unwrap_err();
            assert!(matches!(err, AudioError::Fetch { .. }), "{err}");
        });
    }
}
