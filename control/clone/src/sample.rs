//! Fetching one voice sample (`file://` or `http(s)://`) into memory, size-capped.

use std::fmt;

use tokio::io::AsyncReadExt;

use crate::error::SampleError;

/// One fetched voice sample, ready to upload.
#[derive(Clone, PartialEq, Eq)]
pub struct Sample {
    /// Last path segment of the URL, percent-decoded (`sample` when the path has none).
    pub filename: String,
    /// Guessed from the file name's extension.
    pub content_type: &'static str,
    /// The audio.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sample")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Fetches the sample at `url`, refusing anything over `max_bytes`.
///
/// - `file:///absolute/path` (or `file://localhost/…`), percent-decoded, read with `tokio::fs`;
/// - `http://` and `https://` with a GET through `client` (its timeouts apply); a non-2xx status
///   is an error, and the size is checked against `Content-Length` and again while streaming;
/// - any other scheme is [`SampleError::UnsupportedScheme`].
pub async fn fetch_sample(
    url: &str,
    max_bytes: u64,
    client: &reqwest::Client,
) -> Result<Sample, SampleError> {
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    if scheme.eq_ignore_ascii_case("file") {
        fetch_file(url, max_bytes).await
    } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
        fetch_http(url, max_bytes, client).await
    } else {
        Err(SampleError::UnsupportedScheme { scheme: scheme.chars().take(32).collect() })
    }
}

async fn fetch_file(url: &str, max_bytes: u64) -> Result<Sample, SampleError> {
    let path = file_url_path(url)?;
    let filename = last_segment(&path);
    let file = tokio::fs::File::open(&path).await.map_err(SampleError::Io)?;
    let meta = file.metadata().await.map_err(SampleError::Io)?;
    if !meta.is_file() {
        return Err(SampleError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() > max_bytes {
        return Err(SampleError::TooLarge { limit: max_bytes });
    }
    let mut bytes = Vec::with_capacity(capacity_hint(meta.len(), max_bytes));
    // The file may grow between `metadata` and the read: read one byte past the cap to notice.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .map_err(SampleError::Io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(SampleError::TooLarge { limit: max_bytes });
    }
    Ok(Sample { content_type: content_type_for(&filename), filename, bytes })
}

/// The local path of a `file://` URL (RFC 8089): empty or `localhost` host, absolute path.
fn file_url_path(url: &str) -> Result<String, SampleError> {
    let invalid = |reason: &str| SampleError::InvalidUrl { reason: reason.to_owned() };
    let rest = url
        .get("file:".len()..)
        .and_then(|r| r.strip_prefix("//"))
        .ok_or_else(|| invalid("a file URL must look like file:///absolute/path"))?;
    let rest = strip_query(rest);
    let slash = rest.find('/').ok_or_else(|| invalid("a file URL needs an absolute path"))?;
    let (host, path) = rest.split_at(slash);
    if !(host.is_empty() || host.eq_ignore_ascii_case("localhost")) {
        return Err(invalid("a file URL must not name a remote host"));
    }
    let decoded = percent_decode(path)?;
    String::from_utf8(decoded).map_err(|_| invalid("the file path is not UTF-8"))
}

async fn fetch_http(
    url: &str,
    max_bytes: u64,
    client: &reqwest::Client,
) -> Result<Sample, SampleError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| SampleError::InvalidUrl { reason: e.to_string() })?;
    let filename = match parsed.path_segments().and_then(|mut s| s.next_back()) {
        Some(seg) => match percent_decode(seg).map(String::from_utf8) {
            Ok(Ok(name)) => name,
            _ => seg.to_owned(),
        },
        None => String::new(),
    };
    let filename = if filename.is_empty() { "sample".to_owned() } else { filename };

    let mut resp =
        client.get(parsed).send().await.map_err(|e| SampleError::Transport(e.without_url()))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(SampleError::HttpStatus { status: status.as_u16() });
    }
    let announced = resp.content_length();
    if announced.is_some_and(|len| len > max_bytes) {
        return Err(SampleError::TooLarge { limit: max_bytes });
    }
    let mut bytes = Vec::with_capacity(capacity_hint(announced.unwrap_or(0), max_bytes));
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| SampleError::Transport(e.without_url()))?
    {
        if (bytes.len() as u64).saturating_add(chunk.len() as u64) > max_bytes {
            return Err(SampleError::TooLarge { limit: max_bytes });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Sample { content_type: content_type_for(&filename), filename, bytes })
}

/// Preallocate what the source announces, but never more than the cap (nor 64 MiB).
fn capacity_hint(announced: u64, max_bytes: u64) -> usize {
    let hint = announced.min(max_bytes).min(64 << 20);
    usize::try_from(hint).unwrap_or(0)
}

/// Content type by extension, as the upload labels each `files` part.
pub(crate) fn content_type_for(filename: &str) -> &'static str {
    let ext = filename.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "m4a" => "audio/mp4",
        "ogg" => "audio/ogg",
        "flac" => "audio/flac",
        _ => "application/octet-stream",
    }
}

fn last_segment(path: &str) -> String {
    match path.rsplit('/').next() {
        Some(seg) if !seg.is_empty() => seg.to_owned(),
        _ => "sample".to_owned(),
    }
}

fn strip_query(s: &str) -> &str {
    let end = s.find(['?', '#']).unwrap_or(s.len());
    &s[..end]
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is an error.
fn percent_decode(s: &str) -> Result<Vec<u8>, SampleError> {
    precall_api::percent::decode(s.as_bytes(), false)
        .map_err(|_| SampleError::InvalidUrl { reason: "bad percent-encoding".to_owned() })
}

/// A URL as it may appear in errors and logs: no user info, query string or fragment (signed
/// URLs carry their signature there), at most 512 characters.
pub(crate) fn loggable_url(url: &str) -> String {
    let url = strip_query(url);
    let cleaned = match url.split_once("://") {
        Some((scheme, rest)) => {
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    };
    cleaned.chars().take(512).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(file_url_path("file:///tmp/a%20b.wav").unwrap(), "/tmp/a b.wav");
        assert_eq!(file_url_path("FILE://localhost/x.mp3?v=1").unwrap(), "/x.mp3");
        assert!(file_url_path("file://host/x.mp3").is_err());
        assert!(file_url_path("file:relative.mp3").is_err());
        assert!(file_url_path("file:///bad%2").is_err());
        assert!(file_url_path("file:///bad%zz").is_err());
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type_for("a.MP3"), "audio/mpeg");
        assert_eq!(content_type_for("a.wav"), "audio/wav");
        assert_eq!(content_type_for("a.m4a"), "audio/mp4");
        assert_eq!(content_type_for("a.ogg"), "audio/ogg");
        assert_eq!(content_type_for("a.flac"), "audio/flac");
        assert_eq!(content_type_for("a.aiff"), "application/octet-stream");
        assert_eq!(content_type_for("noext"), "application/octet-stream");
    }

    #[test]
    fn loggable_urls_hide_secrets() {
        assert_eq!(
            loggable_url("https://user:pw@cdn.example/v/a.wav?X-Amz-Signature=abc#f"),
            "https://cdn.example/v/a.wav"
        );
        assert_eq!(loggable_url("file:///tmp/a.wav"), "file:///tmp/a.wav");
    }
}
