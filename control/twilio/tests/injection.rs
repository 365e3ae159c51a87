//! Caller-controlled text must never change the shape of the TwiML: whatever goes in, the
//! output parses as XML and holds exactly the elements the instructions ask for.

use std::time::Duration;

use precall_api::{
    AudioInstruction, CallInstructions, CloneStatus, SpeechInstruction, StatusPollInstruction,
    WebSocketInstruction,
};
use precall_twilio::{TwimlUrls, twiml};

const NASTY: &str =
    "</Say><Dial>+15555550100</Dial><Say>\"'&amp;<!-- ]]> <![CDATA[\u{1}\u{0}\u{b}\r\u{7f}\u{fffe}";

/// One parsed element: name, attributes in order, first text child.
type Element = (String, Vec<(String, String)>, Option<String>);

/// Every element in document order.
fn shape(xml: &str) -> Vec<Element> {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    doc.descendants()
        .filter(|n| n.is_element())
        .map(|n| {
            let attrs =
                n.attributes().map(|a| (a.name().to_owned(), a.value().to_owned())).collect();
            let text = n.children().find(|c| c.is_text()).and_then(|t| t.text()).map(str::to_owned);
            (n.tag_name().name().to_owned(), attrs, text)
        })
        .collect()
}

fn names(xml: &str) -> Vec<String> {
    shape(xml).into_iter().map(|(n, _, _)| n).collect()
}

/// What survives rendering: the text minus the characters XML cannot carry.
fn cleaned(s: &str) -> String {
    s.chars().filter(|&c| !(c.is_control() && c != '\t' && c != '\n') && c != '\u{fffe}').collect()
}

fn urls() -> TwimlUrls {
    TwimlUrls {
        poll_url: format!("https://x/twilio/poll?call_id=\"{NASTY}"),
        media_stream_url: format!("wss://x/twilio/media?\"'{NASTY}"),
        stream_params: vec![("caller".into(), format!("+1\"{NASTY}"))],
    }
}

fn base() -> CallInstructions {
    CallInstructions {
        call_id: NASTY.into(),
        clone_status: CloneStatus::Processing,
        greeting_audio: Some(AudioInstruction { url: format!("https://x/g\"{NASTY}"), loops: 1 }),
        hold_audio: Some(AudioInstruction { url: format!("https://x/h'{NASTY}"), loops: 0 }),
        status_poll: Some(StatusPollInstruction {
            call_id: NASTY.into(),
            interval: Duration::from_secs(2),
            hold_remaining: Duration::from_secs(60),
        }),
        websocket: None,
        error_message: None,
        should_hangup: false,
    }
}

#[test]
fn error_text_cannot_add_verbs() {
    let mut ins = base();
    ins.should_hangup = true;
    ins.error_message = Some(SpeechInstruction { text: NASTY.into(), audio_url: None });
    let xml = twiml::render(&ins, &urls());
    assert_eq!(names(&xml), ["Response", "Say", "Hangup"]);
    assert_eq!(shape(&xml)[1].2.as_deref(), Some(cleaned(NASTY).as_str()));
    assert!(!xml.contains('\u{1}') && !xml.contains('\u{0}') && !xml.contains('\r'));

    let xml = twiml::hangup(Some(NASTY));
    assert_eq!(names(&xml), ["Response", "Say", "Hangup"]);
}

#[test]
fn urls_cannot_break_out_of_their_element_or_attribute() {
    let xml = twiml::render(&base(), &urls());
    let shape = shape(&xml);
    let names: Vec<_> = shape.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["Response", "Play", "Play", "Redirect"]);
    assert_eq!(shape[1].2.as_deref(), Some(cleaned(&format!("https://x/g\"{NASTY}")).as_str()));
    assert_eq!(shape[2].1, [("loop".to_owned(), "1".to_owned())]);
    assert_eq!(shape[2].2.as_deref(), Some(cleaned(&format!("https://x/h'{NASTY}")).as_str()));
    assert_eq!(shape[3].1, [("method".to_owned(), "POST".to_owned())]);
    assert_eq!(shape[3].2.as_deref(), Some(cleaned(&urls().poll_url).as_str()));
}

#[test]
fn stream_parameters_round_trip_through_a_parser() {
    let mut ins = base();
    let first = format!("Hello\n\tthere {NASTY}");
    ins.websocket = Some(WebSocketInstruction {
        url: format!("wss://agent/{NASTY}"),
        agent_id: format!("agent\"{NASTY}"),
        voice_id: format!("voice'{NASTY}").into(),
        first_message: Some(first.clone()),
    });
    let xml = twiml::render(&ins, &urls());
    let shape = shape(&xml);
    let names: Vec<_> = shape.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Response",
            "Play",
            "Connect",
            "Stream",
            "Parameter",
            "Parameter",
            "Parameter",
            "Parameter",
            "Parameter",
            "Redirect"
        ]
    );
    assert_eq!(shape[3].1, [("url".to_owned(), cleaned(&urls().media_stream_url))]);
    let params: Vec<_> = shape[4..shape.len() - 1]
        .iter()
        .map(|(_, attrs, _)| {
            assert_eq!(attrs.len(), 2);
            assert_eq!(attrs[0].0, "name");
            assert_eq!(attrs[1].0, "value");
            (attrs[0].1.clone(), attrs[1].1.clone())
        })
        .collect();
    assert_eq!(
        params,
        [
            ("call_id".to_owned(), cleaned(NASTY)),
            ("agent_id".to_owned(), cleaned(&format!("agent\"{NASTY}"))),
            ("voice_id".to_owned(), cleaned(&format!("voice'{NASTY}"))),
            // Tab and newline survive attribute-value normalisation because they are escaped.
            ("first_message".to_owned(), cleaned(&first)),
            ("caller".to_owned(), cleaned(&format!("+1\"{NASTY}"))),
        ]
    );
    // The agent's own URL is bridged by the engine and never reaches Twilio.
    assert!(!xml.contains("wss://agent/"));
}
