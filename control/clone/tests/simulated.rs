//! The simulated provider: deterministic outcome after its delay, on tokio's clock.

use std::time::Duration;

use precall_api::{JobId, ProfileId, VoiceId};
use precall_clone::{
    AnyProvider, CloneError, CloneProvider, SimulatedConfig, SimulatedOutcome, SimulatedProvider,
};
use precall_controller::{CloneRequest, VoiceProfile};

fn request() -> CloneRequest {
    CloneRequest {
        job_id: JobId(7),
        attempt: 1,
        profile: VoiceProfile {
            id: ProfileId::new("default"),
            number: None,
            name: "Default".into(),
            // Never fetched by the simulated provider.
            sample_urls: vec!["ftp://nowhere.invalid/x.wav".into()],
            agent_id: None,
            greeting_url: None,
            hold_url: None,
            first_message: None,
        },
    }
}

fn provider(delay: Duration, outcome: SimulatedOutcome) -> AnyProvider {
    AnyProvider::from(SimulatedProvider::new(SimulatedConfig { delay, outcome }))
}

#[tokio::test]
async fn completed_answers_a_deterministic_voice() {
    let p = provider(Duration::ZERO, SimulatedOutcome::Completed);
    assert_eq!(p.name(), "simulated");
    let voice = p.clone_voice(&request()).await.unwrap();
    assert_eq!(voice, VoiceId::new("sim-default-7"));
    assert_eq!(p.clone_voice(&request()).await.unwrap(), voice);
}

#[tokio::test]
async fn failed_answers_the_simulated_error() {
    let p = provider(Duration::ZERO, SimulatedOutcome::Failed);
    let err = p.clone_voice(&request()).await.unwrap_err();
    assert!(matches!(err, CloneError::Simulated), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn the_delay_is_honoured_on_tokio_time() {
    let delay = Duration::from_secs(3600);
    let p = provider(delay, SimulatedOutcome::Completed);
    let real_start = std::time::Instant::now();
    let start = tokio::time::Instant::now();

    // Not done one millisecond before the delay...
    let early =
        tokio::time::timeout(delay - Duration::from_millis(1), p.clone_voice(&request())).await;
    assert!(early.is_err(), "finished before its delay");

    // ...done after it, in paused (virtual) time.
    let voice = p.clone_voice(&request()).await.unwrap();
    assert_eq!(voice, VoiceId::new("sim-default-7"));
    assert!(start.elapsed() >= delay + delay - Duration::from_millis(1));
    assert!(real_start.elapsed() < Duration::from_secs(5), "no real waiting");
}

#[tokio::test(start_paused = true)]
async fn manual_advance_completes_the_clone() {
    let delay = Duration::from_millis(3000);
    let p = provider(delay, SimulatedOutcome::Failed);
    let task = tokio::spawn(async move { p.clone_voice(&request()).await });
    tokio::task::yield_now().await;
    assert!(!task.is_finished());
    tokio::time::advance(delay).await;
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, CloneError::Simulated));
}

#[test]
fn outcome_parses_from_configuration_text() {
    assert_eq!("completed".parse::<SimulatedOutcome>().unwrap(), SimulatedOutcome::Completed);
    assert_eq!(" FAILED ".parse::<SimulatedOutcome>().unwrap(), SimulatedOutcome::Failed);
    assert!("maybe".parse::<SimulatedOutcome>().is_err());
    assert_eq!(SimulatedOutcome::Failed.to_string(), "failed");
    let d = SimulatedConfig::default();
    assert_eq!(d.delay, Duration::from_millis(3000));
    assert_eq!(d.outcome, SimulatedOutcome::Completed);
}
