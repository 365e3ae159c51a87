//! The ElevenLabs provider against a fake API on a real socket.

mod fake;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fake::{ADD_VOICE, Fake, Reply};
use precall_api::{JobId, ProfileId, VoiceId};
use precall_clone::{
    AnyProvider, CloneError, CloneProvider, ElevenLabsConfig, ElevenLabsProvider, SampleError,
    VoiceState,
};
use precall_controller::{CloneRequest, VoiceProfile};

const KEY: &str = "test-key-123";
const OK_BODY: &str =
    r#"{"voice_id":"vx1","requires_verification":false,"library_voice_match":null}"#;

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "precall-clone-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `bytes` to `name` and returns its `file://` URL (spaces as `%20`).
    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        file_url(&path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.to_str().unwrap().replace(' ', "%20"))
}

/// Binary audio-like bytes that include CR, LF and dashes (multipart's special bytes).
fn audio(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(match i % 97 {
            0 => b'\r',
            1 => b'\n',
            2 | 3 => b'-',
            _ => x.to_le_bytes()[0],
        });
    }
    out
}

fn config(fake: &Fake) -> ElevenLabsConfig {
    ElevenLabsConfig {
        api_base: fake.base(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        max_attempts: 4,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        remove_background_noise: true,
        max_sample_bytes: 1 << 20,
        ..ElevenLabsConfig::new(KEY)
    }
}

fn request(urls: Vec<String>) -> CloneRequest {
    CloneRequest {
        job_id: JobId(42),
        attempt: 1,
        profile: VoiceProfile {
            id: ProfileId::new("prof-1"),
            number: Some("+15550100".into()),
            name: "Ada Lovelace".into(),
            sample_urls: urls,
            agent_id: None,
            greeting_url: None,
            hold_url: None,
            first_message: None,
        },
    }
}

/// A request with one small on-disk sample.
fn one_sample(dir: &TempDir) -> CloneRequest {
    request(vec![dir.file("a.wav", &audio(9, 300))])
}

async fn clone_with(cfg: ElevenLabsConfig, req: &CloneRequest) -> Result<VoiceId, CloneError> {
    let provider = AnyProvider::from(ElevenLabsProvider::new(cfg).unwrap());
    assert_eq!(provider.name(), "elevenlabs");
    provider.clone_voice(req).await
}

#[tokio::test]
async fn sends_the_sdk_multipart_fields_and_parses_the_voice() {
    let dir = TempDir::new("fields");
    let (a, b, c) = (audio(1, 5000), audio(2, 7001), audio(3, 12_345));
    let fake = Fake::start(vec![Reply::json(200, OK_BODY)]).await;
    let req = request(vec![
        dir.file("voice one.wav", &a),
        dir.file("two.MP3", &b),
        format!("{}/samples/three.m4a?sig=secret", fake.base()),
    ]);
    // The fake matches the whole target, query included.
    fake.serve("/samples/three.m4a?sig=secret", &c);

    let voice = clone_with(config(&fake), &req).await.unwrap();
    assert_eq!(voice, VoiceId::new("vx1"));

    let gets: Vec<_> = fake.requests().into_iter().filter(|r| r.method == "GET").collect();
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].target, "/samples/three.m4a?sig=secret");

    let api = fake.api_requests();
    assert_eq!(api.len(), 1);
    let r = &api[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, ADD_VOICE);
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(r.header("xi-api-key"), Some(KEY));
    assert_eq!(r.header_count("xi-api-key"), 1);
    assert_eq!(r.header("expect"), None);
    assert_eq!(r.header("authorization"), None);
    assert!(r.header("user-agent").unwrap().starts_with("precall/"));
    assert!(r.header("content-type").unwrap().starts_with("multipart/form-data; boundary="));
    assert_eq!(r.header("content-length").map(|l| l.parse::<usize>().unwrap()), Some(r.body.len()));

    let parts = r.multipart();
    let names: Vec<_> = parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["name", "remove_background_noise", "description", "labels", "files", "files", "files"]
    );
    for text in &parts[..4] {
        assert_eq!(text.filename, None, "{} is a plain field", text.name);
        assert_eq!(text.content_type, None, "{} is a plain field", text.name);
    }
    assert_eq!(parts[0].text(), "Ada Lovelace");
    assert_eq!(parts[1].text(), "true");
    assert_eq!(parts[2].text(), "precall voice for profile prof-1");
    let labels: serde_json::Value = serde_json::from_str(parts[3].text()).unwrap();
    assert_eq!(labels, serde_json::json!({"precall_profile": "prof-1", "precall_job": "42"}));

    let files: Vec<_> = parts[4..]
        .iter()
        .map(|p| {
            (p.filename.as_deref().unwrap(), p.content_type.as_deref().unwrap(), p.data.as_slice())
        })
        .collect();
    assert_eq!(
        files,
        [
            ("voice one.wav", "audio/wav", a.as_slice()),
            ("two.MP3", "audio/mpeg", b.as_slice()),
            ("three.m4a", "audio/mp4", c.as_slice()),
        ]
    );
}

#[tokio::test]
async fn unauthorized_is_final_after_one_attempt() {
    let dir = TempDir::new("401");
    let fake = Fake::start(vec![Reply::json(
        401,
        r#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
    )])
    .await;
    let err = clone_with(config(&fake), &one_sample(&dir)).await.unwrap_err();
    assert!(matches!(err, CloneError::Unauthorized), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(fake.api_requests().len(), 1);
}

#[tokio::test]
async fn validation_error_carries_the_detail_after_one_attempt() {
    let dir = TempDir::new("422");
    let fake = Fake::start(vec![Reply::json(
        422,
        r#"{"detail":[{"loc":["body","name"],"msg":"field required","type":"value_error.missing"}]}"#,
    )])
    .await;
    let err = clone_with(config(&fake), &one_sample(&dir)).await.unwrap_err();
    match &err {
        CloneError::Validation { detail } => assert_eq!(detail, "body.name: field required"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("field required"));
    assert_eq!(fake.api_requests().len(), 1);
}

#[tokio::test]
async fn rate_limit_then_success_takes_two_attempts() {
    let dir = TempDir::new("429");
    let fake = Fake::start(vec![
        // Retry-After is honoured but capped by backoff_max (50 ms here).
        Reply::json(429, r#"{"detail":"too_many_concurrent_requests"}"#)
            .with_header("Retry-After", "30"),
        Reply::json(200, OK_BODY),
    ])
    .await;
    let cfg = ElevenLabsConfig { remove_background_noise: false, ..config(&fake) };
    let voice = clone_with(cfg, &one_sample(&dir)).await.unwrap();
    assert_eq!(voice, VoiceId::new("vx1"));
    let api = fake.api_requests();
    assert_eq!(api.len(), 2);
    // The retry resends the same form.
    let (first, second) = (api[0].multipart(), api[1].multipart());
    assert_eq!(first, second);
    assert_eq!(first[1].name, "remove_background_noise");
    assert_eq!(first[1].text(), "false");
}

#[tokio::test]
async fn server_errors_exhaust_exactly_max_attempts() {
    let dir = TempDir::new("503");
    let fake = Fake::start(vec![Reply::text(503, "upstream busy")]).await;
    let cfg = ElevenLabsConfig { max_attempts: 3, ..config(&fake) };
    let err = clone_with(cfg, &one_sample(&dir)).await.unwrap_err();
    assert!(matches!(err, CloneError::Server { status: 503 }), "{err:?}");
    assert_eq!(fake.api_requests().len(), 3);
}

#[tokio::test]
async fn requires_verification_is_a_failure() {
    let dir = TempDir::new("verify");
    let fake = Fake::start(vec![Reply::json(
        200,
        r#"{"voice_id":"vx2","requires_verification":true,"library_voice_match":{"voice_id":"lib"}}"#,
    )])
    .await;
    let err = clone_with(config(&fake), &one_sample(&dir)).await.unwrap_err();
    match err {
        CloneError::RequiresVerification { voice_id } => assert_eq!(voice_id, VoiceId::new("vx2")),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.api_requests().len(), 1);
}

#[tokio::test]
async fn garbage_or_voiceless_success_is_a_bad_response() {
    let dir = TempDir::new("garbage");
    let fake = Fake::start(vec![
        Reply::text(200, "<html>gateway says hi</html>"),
        Reply::json(200, r#"{"requires_verification":false}"#),
    ])
    .await;
    let req = one_sample(&dir);
    for _ in 0..2 {
        let err = clone_with(config(&fake), &req).await.unwrap_err();
        assert!(matches!(err, CloneError::BadResponse { .. }), "{err:?}");
    }
    assert_eq!(fake.api_requests().len(), 2);
}

#[tokio::test]
async fn voice_limit_reached_is_final_and_permanent() {
    let dir = TempDir::new("400");
    let fake = Fake::start(vec![Reply::json(
        400,
        r#"{"detail":{"status":"voice_limit_reached","message":"You have reached your maximum amount of custom voices"}}"#,
    )])
    .await;
    let err = clone_with(config(&fake), &one_sample(&dir)).await.unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    match err {
        CloneError::VoiceLimitReached { detail } => {
            assert!(detail.contains("maximum amount"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.api_requests().len(), 1, "not retried");
}

#[tokio::test]
async fn unexpected_status_is_final_with_detail() {
    let dir = TempDir::new("403");
    let fake = Fake::start(vec![Reply::json(
        403,
        r#"{"detail":{"status":"forbidden","message":"No access"}}"#,
    )])
    .await;
    let err = clone_with(config(&fake), &one_sample(&dir)).await.unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    match err {
        CloneError::UnexpectedStatus { status, detail } => {
            assert_eq!(status, 403);
            assert!(detail.contains("No access"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.api_requests().len(), 1);
}

#[tokio::test]
async fn a_redirect_is_not_followed_so_the_key_never_reaches_another_host() {
    let dir = TempDir::new("redirect");
    // The "other host": another fake that would take the key if the client followed.
    let other = Fake::start(vec![Reply::json(200, OK_BODY)]).await;
    let fake = Fake::start(vec![
        Reply::text(302, "").with_header("Location", &format!("{}{ADD_VOICE}", other.base())),
    ])
    .await;
    let err = clone_with(config(&fake), &one_sample(&dir)).await.unwrap_err();
    assert!(matches!(err, CloneError::UnexpectedStatus { status: 302, .. }), "{err:?}");
    assert_eq!(fake.api_requests().len(), 1);
    assert!(other.requests().is_empty(), "the redirect was followed: the key left the API host");
}

#[tokio::test]
async fn silent_server_is_a_timeout() {
    let dir = TempDir::new("timeout");
    let fake = Fake::start(vec![Reply::Hang]).await;
    let cfg = ElevenLabsConfig { request_timeout: Duration::from_millis(300), ..config(&fake) };
    let err = clone_with(cfg, &one_sample(&dir)).await.unwrap_err();
    assert!(matches!(err, CloneError::Timeout), "{err:?}");
    // A timed-out add may have created the voice: not retried.
    assert_eq!(fake.api_requests().len(), 1);
}

#[tokio::test]
async fn refused_connection_is_a_transport_error() {
    let dir = TempDir::new("refused");
    let fake = Fake::start(vec![]).await;
    // A port that was free a moment ago and has no listener now.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let cfg = ElevenLabsConfig { api_base: base, ..config(&fake) };
    let err = clone_with(cfg, &one_sample(&dir)).await.unwrap_err();
    assert!(matches!(err, CloneError::Transport(_)), "{err:?}");
}

fn assert_too_large(err: &CloneError, limit: u64) {
    match err {
        CloneError::Sample { reason: SampleError::TooLarge { limit: l }, .. } => {
            assert_eq!(*l, limit)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn oversized_samples_never_reach_the_api() {
    let dir = TempDir::new("big");
    let fake = Fake::start(vec![Reply::json(200, OK_BODY)]).await;
    let limit = 1000;
    let cfg = || ElevenLabsConfig { max_sample_bytes: limit, ..config(&fake) };
    let small = dir.file("small.wav", &audio(4, 1000));

    // On disk, one byte over.
    let big_file = dir.file("big.wav", &audio(5, 1001));
    let err = clone_with(cfg(), &request(vec![small.clone(), big_file])).await.unwrap_err();
    assert_too_large(&err, limit);

    // Over HTTP, refused on Content-Length.
    fake.serve("/big.mp3", &audio(6, 5000));
    let url = format!("{}/big.mp3", fake.base());
    let err = clone_with(cfg(), &request(vec![small.clone(), url])).await.unwrap_err();
    assert_too_large(&err, limit);

    // Over HTTP, chunked (no Content-Length): refused while streaming.
    fake.serve_chunked("/big.ogg", &audio(7, 9000));
    let url = format!("{}/big.ogg", fake.base());
    let err = clone_with(cfg(), &request(vec![url])).await.unwrap_err();
    assert_too_large(&err, limit);

    // Exactly at the limit is fine, chunked or not (and proves the fake's chunking works).
    fake.serve_chunked("/ok.ogg", &audio(8, 1000));
    let url = format!("{}/ok.ogg", fake.base());
    assert!(fake.api_requests().is_empty());
    clone_with(cfg(), &request(vec![small, url])).await.unwrap();
    let api = fake.api_requests();
    assert_eq!(api.len(), 1);
    let parts = api[0].multipart();
    assert_eq!(parts[5].filename.as_deref(), Some("ok.ogg"));
    assert_eq!(parts[5].content_type.as_deref(), Some("audio/ogg"));
    assert_eq!(parts[5].data, audio(8, 1000));
}

#[tokio::test]
async fn bad_sample_urls_are_sample_errors_without_api_calls() {
    let dir = TempDir::new("schemes");
    let fake = Fake::start(vec![Reply::json(200, OK_BODY)]).await;
    let good = dir.file("good.flac", &audio(1, 100));

    let err = clone_with(
        config(&fake),
        &request(vec![good.clone(), "ftp://example.invalid/a.wav".into()]),
    )
    .await
    .unwrap_err();
    match &err {
        CloneError::Sample { url, reason: SampleError::UnsupportedScheme { scheme } } => {
            assert_eq!(url, "ftp://example.invalid/a.wav");
            assert_eq!(scheme, "ftp");
        }
        other => panic!("{other:?}"),
    }

    let missing = format!("{}/nope.wav?token=hunter2", fake.base());
    let err = clone_with(config(&fake), &request(vec![missing])).await.unwrap_err();
    match &err {
        CloneError::Sample { url, reason: SampleError::HttpStatus { status: 404 } } => {
            assert!(!url.contains("hunter2"), "query hidden: {url}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.to_string().contains("hunter2"));

    let absent = file_url(&dir.0.join("absent.wav"));
    let err = clone_with(config(&fake), &request(vec![absent])).await.unwrap_err();
    assert!(matches!(err, CloneError::Sample { reason: SampleError::Io(_), .. }), "{err:?}");

    let err = clone_with(config(&fake), &request(vec![])).await.unwrap_err();
    assert!(matches!(err, CloneError::NoSamples), "{err:?}");

    assert!(fake.api_requests().is_empty());
}

#[tokio::test]
async fn a_full_library_frees_with_delete_and_voices_are_checked() {
    let dir = TempDir::new("library");
    let fake = Fake::library(1, &["old-voice"]).await;
    let provider = AnyProvider::from(ElevenLabsProvider::new(config(&fake)).unwrap());
    let req = one_sample(&dir);
    let full = provider.clone_voice(&req).await.unwrap_err();
    assert!(matches!(full, CloneError::VoiceLimitReached { .. }), "{full:?}");
    assert_eq!(provider.check_voice(&VoiceId::new("old-voice")).await.unwrap(), VoiceState::Usable);

    provider.delete_voice(&VoiceId::new("old-voice")).await.unwrap();
    assert_eq!(fake.deletions(), ["old-voice"]);
    let del = fake.requests().into_iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(del.header("xi-api-key"), Some(KEY), "deletes carry the key");
    assert_eq!(provider.check_voice(&VoiceId::new("old-voice")).await.unwrap(), VoiceState::Gone);
    // Deleting a voice already gone is no error (another node freed it first).
    provider.delete_voice(&VoiceId::new("old-voice")).await.unwrap();

    let voice = provider.clone_voice(&req).await.unwrap();
    assert_eq!(fake.voices(), [voice.as_str()]);
}

#[tokio::test]
async fn a_failed_delete_says_why() {
    let fake = Fake::start(Vec::new()).await;
    // No library: every voice request is answered 405; a bad key would be 401.
    let provider = AnyProvider::from(ElevenLabsProvider::new(config(&fake)).unwrap());
    let err = provider.delete_voice(&VoiceId::new("v")).await.unwrap_err();
    assert!(matches!(err, CloneError::UnexpectedStatus { status: 405, .. }), "{err:?}");
}
