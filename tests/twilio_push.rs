//! The live-call push of the poll hold mode, end to end: the real `precall` binary against a
//! local fake of Twilio's REST API (`support/fake_twilio_rest.rs`, which checks auth, the form
//! and the TwiML's size and URLs). A held call is pushed on as soon as its clone is ready or its
//! hold limit passes; 429 and 5xx are retried, 20404 means the call already ended; two nodes on
//! one PostgreSQL push each call exactly once.

mod support;

#[path = "support/fake_twilio_rest.rs"]
mod fake_twilio_rest;

use std::time::Duration;

use fake_twilio_rest::FakeRest;
use support::pg::PgServer;
use support::precall::{Answer, Precall, signed_webhook};
use support::{free_tcp_port, wait_for};

const TOKEN: &str = "push-test-token-0123456789";
const ACCOUNT: &str = "AC00000000000000000000000000000000";

struct Node {
    p: Precall,
    base: String,
}

fn node(rest: &FakeRest, extra: &[(&str, String)]) -> Node {
    let port = free_tcp_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut env: Vec<(&str, String)> = vec![
        ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
        ("PUBLIC_BASE_URL", base.clone()),
        ("ENABLE_SIP_HANDLER", "false".to_owned()),
        ("TWILIO_HOLD_MODE", "poll".to_owned()),
        ("TWILIO_API_BASE", rest.base()),
        // Polls far apart: what the test sees comes from the push.
        ("STATUS_POLL_INTERVAL_MS", "30000".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    Node { p: Precall::start_on(port, &env), base }
}

impl Node {
    fn voice(&self, sid: &str) -> Answer {
        let params = [
            ("AccountSid", ACCOUNT),
            ("CallSid", sid),
            ("CallStatus", "ringing"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ];
        let a = signed_webhook(self.p.http_port, &self.base, TOKEN, "/twilio/voice", &params);
        assert_eq!(a.status, 200, "{a:?}");
        a
    }

    fn pushes(&self, result: &str) -> u64 {
        let (_, text) = self.p.get("/metrics");
        let line = format!("precall_twilio_pushes_total{{result=\"{result}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&line)).map_or(0, |v| v.trim().parse().unwrap())
    }
}

#[test]
fn a_held_call_is_pushed_on_as_soon_as_its_clone_is_ready() {
    let rest = FakeRest::start();
    let n = node(&rest, &[("SIMULATED_CLONE_DELAY_MS", "500".to_owned())]);
    let sid = "CA10000000000000000000000000000001";
    let a = n.voice(sid);
    assert!(a.body.contains("<Play") && a.body.contains("<Redirect"), "{}", a.body);
    let update = wait_for("the push", Duration::from_secs(10), || rest.updates_for(sid).pop());
    let log = rest.log.lock().unwrap();
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    drop(log);
    assert_eq!(update.account, ACCOUNT);
    assert_eq!(update.auth, format!("{ACCOUNT}:{TOKEN}"));
    let twiml = update.param("Twiml").expect("inline TwiML");
    let stream = format!("<Stream url=\"ws://127.0.0.1:{}/twilio/media\">", n.p.media_port);
    assert!(twiml.contains(&stream), "{twiml}");
    assert!(twiml.contains(&format!("<Parameter name=\"call_id\" value=\"{sid}\" />")), "{twiml}");
    assert!(twiml.contains("<Parameter name=\"caller\" value=\"+12349013030\" />"), "{twiml}");
    assert!(twiml.contains(&format!("{}/twilio/poll?call_id={sid}</Redirect>", n.base)), "{twiml}");
    wait_for("the push counted", Duration::from_secs(5), || {
        (n.pushes("updated") == 1).then_some(())
    });
    // Once only: nothing more for this call.
    assert_eq!(rest.updates_for(sid).len(), 1);
}

#[test]
fn twilio_rate_limits_and_errors_are_retried_and_an_ended_call_is_left_alone() {
    let rest = FakeRest::start();
    let busy = "CA20000000000000000000000000000002";
    let gone = "CA30000000000000000000000000000003";
    rest.script(busy, &[429, 503, 200]);
    rest.script(gone, &[404]);
    let n = node(
        &rest,
        &[
            ("SIMULATED_CLONE_DELAY_MS", "300".to_owned()),
            ("TWILIO_API_KEY", "SK00000000000000000000000000000000".to_owned()),
            ("TWILIO_API_SECRET", "key-secret".to_owned()),
        ],
    );
    n.voice(busy);
    n.voice(gone);
    wait_for("three tries for the busy call", Duration::from_secs(15), || {
        (rest.updates_for(busy).len() == 3).then_some(())
    });
    wait_for("the results counted", Duration::from_secs(5), || {
        (n.pushes("updated") == 1 && n.pushes("already_ended") == 1).then_some(())
    });
    let tries: Vec<u16> = rest.updates_for(busy).iter().map(|u| u.status).collect();
    assert_eq!(tries, [429, 503, 200]);
    assert_eq!(rest.updates_for(gone).len(), 1, "20404 is not retried");
    // The API key authenticates instead of the account's token.
    assert_eq!(rest.updates_for(busy)[0].auth, "SK00000000000000000000000000000000:key-secret");
    assert_eq!(n.pushes("failed"), 0);
    assert!(rest.log.lock().unwrap().violations.is_empty());
}

#[test]
fn two_nodes_on_one_database_push_each_call_exactly_once() {
    let rest = FakeRest::start();
    let pg = PgServer::start();
    let env = [
        ("DATABASE_URL", pg.url()),
        // The clone never finishes: the hold limit passes on both nodes at the same moment.
        ("SIMULATED_CLONE_DELAY_MS", "600000".to_owned()),
        ("MAX_HOLD_MS", "1500".to_owned()),
    ];
    let a = node(&rest, &env);
    let b = node(&rest, &env);
    let calls: Vec<String> =
        (0..4).map(|i| format!("CA4000000000000000000000000000000{i}")).collect();
    for sid in &calls {
        // Twilio retried the webhook on the other node: both know the call.
        a.voice(sid);
        b.voice(sid);
    }
    wait_for("every call pushed", Duration::from_secs(15), || {
        calls.iter().all(|sid| !rest.updates_for(sid).is_empty()).then_some(())
    });
    // Let any second push arrive (there must be none): both nodes' timers have fired by now.
    wait_for("both nodes' pushes counted", Duration::from_secs(10), || {
        (a.pushes("updated") + b.pushes("updated") == 4).then_some(())
    });
    for sid in &calls {
        let updates = rest.updates_for(sid);
        assert_eq!(updates.len(), 1, "{sid} pushed {} times", updates.len());
        let twiml = updates[0].param("Twiml").unwrap();
        assert!(twiml.contains("<Say>") && twiml.contains("<Hangup />"), "{twiml}");
    }
    assert!(rest.log.lock().unwrap().violations.is_empty());
}
