//! Voice profiles from configuration: the default profile and `VOICE_PROFILES_FILE`.
//!
//! The file is a JSON array:
//! ```json
//! [{"id": "sales", "number": "+18005550100", "name": "Sales voice",
//!   "sample_urls": ["https://cdn.example.com/sales-1.mp3"],
//!   "agent_id": "agent_…", "greeting_url": null, "hold_url": null, "first_message": "Hi!"}]
//! ```
//! Every profile is upserted into the store at start, so the store is the one place the
//! controller reads profiles from (and several nodes agree).

use std::path::Path;

use precall_api::ProfileId;
use precall_controller::{VoiceProfile, normalize_number};
use serde::Deserialize;

use crate::config::{Config, ConfigError};

/// Id of the profile built from `VOICE_SAMPLE_URLS` and `ELEVENLABS_AGENT_ID`.
pub const DEFAULT_PROFILE: &str = "default";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileEntry {
    id: String,
    number: Option<String>,
    name: Option<String>,
    #[serde(default)]
    sample_urls: Vec<String>,
    agent_id: Option<String>,
    greeting_url: Option<String>,
    hold_url: Option<String>,
    first_message: Option<String>,
}

/// The default profile from configuration.
pub fn default_profile(cfg: &Config) -> VoiceProfile {
    VoiceProfile {
        id: ProfileId::new(DEFAULT_PROFILE),
        number: None,
        name: "precall default voice".into(),
        sample_urls: cfg.voice_sample_urls.clone(),
        agent_id: None,
        greeting_url: None,
        hold_url: None,
        first_message: None,
    }
}

/// Reads and checks a profiles file.
pub fn load_file(path: &Path) -> Result<Vec<VoiceProfile>, ConfigError> {
    let err = |reason: String| ConfigError::ProfilesFile { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse(&text).map_err(err)
}

fn parse(text: &str) -> Result<Vec<VoiceProfile>, String> {
    let entries: Vec<ProfileEntry> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut seen_ids = std::collections::HashSet::new();
    let mut seen_numbers = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if e.id.trim().is_empty() || e.id == DEFAULT_PROFILE {
            return Err(format!("profile id {:?} is empty or reserved", e.id));
        }
        if !seen_ids.insert(e.id.clone()) {
            return Err(format!("profile id {:?} appears twice", e.id));
        }
        let number = e.number.as_deref().map(normalize_number).filter(|n| !n.is_empty());
        if let Some(n) = &number {
            if !seen_numbers.insert(n.clone()) {
                return Err(format!("number {n} is given to two profiles"));
            }
        }
        for url in e.sample_urls.iter().chain(&e.greeting_url).chain(&e.hold_url) {
            if !["http://", "https://", "file://"].iter().any(|s| url.starts_with(s)) {
                return Err(format!(
                    "profile {:?}: {url:?} is not an http(s):// or file:// URL",
                    e.id
                ));
            }
        }
        out.push(VoiceProfile {
            name: e.name.unwrap_or_else(|| e.id.clone()),
            id: ProfileId::new(e.id),
            number,
            sample_urls: e.sample_urls,
            agent_id: e.agent_id,
            greeting_url: e.greeting_url,
            hold_url: e.hold_url,
            first_message: e.first_message,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_and_normalizes() {
        let p = parse(
            r#"[{"id":"sales","number":"+1 (800) 555-0100","sample_urls":["https://s/a.mp3"]}]"#,
        )
        .unwrap();
        assert_eq!(p[0].number.as_deref(), Some("+18005550100"));
        assert_eq!(p[0].name, "sales");
    }

    #[test]
    fn rejects_bad_files() {
        for bad in [
            "{}",
            r#"[{"id":"a"},{"id":"a"}]"#,
            r#"[{"id":"default"}]"#,
            r#"[{"id":"a","number":"+1"},{"id":"b","number":"+1"}]"#,
            r#"[{"id":"a","sample_urls":["ftp://x"]}]"#,
            r#"[{"id":"a","sample_url":"typo"}]"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
