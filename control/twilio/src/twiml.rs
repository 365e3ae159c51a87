//! TwiML rendering: the only place precall makes TwiML.
//!
//! [`render`] translates the controller's [`CallInstructions`] as a whole, following
//! [`CallInstructions::action`]:
//!
//! - **Hangup**: `<Say>` the error text (when there is one), then `<Hangup />`. Nothing else.
//! - **Connect**: the greeting `<Play>` (when there is one), then
//!   `<Connect><Stream url="{media_stream_url}">` with `<Parameter>`s `call_id`, `agent_id`,
//!   `voice_id`, `first_message` (when set) and the [`TwimlUrls::stream_params`], then
//!   `<Redirect method="POST">` to the poll URL: Twilio runs it when the engine closes the
//!   stream (the call's end or failure, which the poll answers with `<Hangup/>`, or a broken
//!   stream, which the poll carries on). The agent's own WebSocket URL never appears: the
//!   engine bridges Twilio's media stream to it, and Twilio does not pass a Stream URL's
//!   query reliably, so everything travels as parameters (`start.customParameters`).
//! - **Hold**: the greeting `<Play>`, the hold `<Play loop="N">` and `<Redirect method="POST">`
//!   to the poll URL. The hold is always finite: `loops == 0` ("until the next instruction")
//!   becomes `loop="1"`, because Twilio's `loop="0"` plays until hang-up (up to 1000 times) and
//!   the `<Redirect>` after it would never run. The hold clip's length is therefore the real
//!   poll interval. Without hold audio, a `<Pause>` of the poll interval stands in, so Twilio
//!   does not re-poll in a tight loop.
//!
//! The output is byte-for-byte what `twilio.twiml.voice_response.VoiceResponse` (twilio 9.13)
//! prints for the same verbs: attributes sorted by name, empty elements as `<Hangup />`, text
//! escaping `&`, `<`, `>`, attribute values additionally `"`, tab (`&#09;`) and newline
//! (`&#10;`). Quotes in text and `'` anywhere need no escape in that form and are left as the
//! library leaves them. Unlike the library, characters XML 1.0 forbids or that are control
//! characters (everything below U+0020 but tab and newline, DEL, C1 controls, U+FFFE, U+FFFF)
//! are removed, so caller-controlled text can never make the document ill-formed.

use std::time::Duration;

use precall_api::{AudioInstruction, CallAction, CallInstructions};

/// The content type to serve TwiML with.
pub const CONTENT_TYPE: &str = "text/xml; charset=utf-8";

const XML_DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// Where Twilio should come back to, as absolute URLs the control shell builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwimlUrls {
    /// The status poll endpoint, already carrying `?call_id=…`.
    pub poll_url: String,
    /// The engine's Media Streams endpoint (`wss://…/twilio/media`).
    pub media_stream_url: String,
    /// More `<Parameter>`s for every `<Stream>` (the caller's and the dialed number).
    pub stream_params: Vec<(String, String)>,
}

/// Renders `ins` as a TwiML document (see the module docs for the shapes).
pub fn render(ins: &CallInstructions, urls: &TwimlUrls) -> String {
    let mut doc = Doc::new();
    match ins.action() {
        CallAction::Hangup => {
            if let Some(speech) = &ins.error_message {
                doc.say(&speech.text);
            }
            doc.empty("Hangup", &[]);
        }
        CallAction::Connect => {
            if let Some(greeting) = &ins.greeting_audio {
                doc.play(greeting, false);
            }
            if let Some(ws) = &ins.websocket {
                doc.open("Connect", &[]);
                doc.open("Stream", &[("url", &urls.media_stream_url)]);
                doc.parameter("call_id", ins.call_id.as_str());
                doc.parameter("agent_id", &ws.agent_id);
                doc.parameter("voice_id", ws.voice_id.as_str());
                if let Some(first) = &ws.first_message {
                    doc.parameter("first_message", first);
                }
                for (name, value) in &urls.stream_params {
                    doc.parameter(name, value);
                }
                doc.close("Stream");
                doc.close("Connect");
                doc.text("Redirect", &[("method", "POST")], &urls.poll_url);
            }
        }
        CallAction::Hold => {
            if let Some(greeting) = &ins.greeting_audio {
                doc.play(greeting, false);
            }
            let held = ins.hold_audio.as_ref().is_some_and(|hold| doc.play(hold, true));
            if !held {
                if let Some(poll) = &ins.status_poll {
                    let length = pause_seconds(poll.interval).to_string();
                    doc.empty("Pause", &[("length", &length)]);
                }
            }
            doc.text("Redirect", &[("method", "POST")], &urls.poll_url);
        }
    }
    doc.finish()
}

/// The stream hold answer (`TWILIO_HOLD_MODE=stream`) to an inbound call that is not failed:
/// `<Connect><Stream>` straight away, with `<Parameter>`s `call_id`, `greeting` = `1` (the
/// engine plays the greeting, then hold, then the agent, over the stream) and the
/// [`TwimlUrls::stream_params`], then `<Redirect method="POST">` to the poll URL for when the
/// stream closes. A failed call renders as [`render`] does (`<Say>` + `<Hangup />`).
pub fn render_stream(ins: &CallInstructions, urls: &TwimlUrls) -> String {
    if ins.action() == CallAction::Hangup {
        return render(ins, urls);
    }
    let mut doc = Doc::new();
    doc.open("Connect", &[]);
    doc.open("Stream", &[("url", &urls.media_stream_url)]);
    doc.parameter("call_id", ins.call_id.as_str());
    doc.parameter("greeting", "1");
    for (name, value) in &urls.stream_params {
        doc.parameter(name, value);
    }
    doc.close("Stream");
    doc.close("Connect");
    doc.text("Redirect", &[("method", "POST")], &urls.poll_url);
    doc.finish()
}

/// A document that says `message` (when given and not blank) and hangs up: for unknown calls,
/// refused requests and other endings that do not come from the controller.
pub fn hangup(message: Option<&str>) -> String {
    let mut doc = Doc::new();
    if let Some(message) = message {
        doc.say(message);
    }
    doc.empty("Hangup", &[]);
    doc.finish()
}

/// Whole seconds for `<Pause length>`, rounded up, at least one.
fn pause_seconds(interval: Duration) -> u64 {
    let whole = interval.as_secs() + u64::from(interval.subsec_nanos() > 0);
    whole.max(1)
}

/// A `<Response>` being written.
struct Doc {
    out: String,
}

impl Doc {
    fn new() -> Self {
        let mut out = String::with_capacity(256);
        out.push_str(XML_DECLARATION);
        out.push_str("<Response>");
        Self { out }
    }

    fn finish(mut self) -> String {
        self.out.push_str("</Response>");
        self.out
    }

    /// `<Say>`, unless the text is blank once cleaned (Twilio rejects an empty `<Say>`).
    fn say(&mut self, text: &str) {
        if !is_blank(text) {
            self.text("Say", &[], text);
        }
    }

    /// `<Play>`; `hold` forces a finite `loop` attribute. Returns whether anything was written
    /// (a blank URL is skipped).
    fn play(&mut self, audio: &AudioInstruction, hold: bool) -> bool {
        if is_blank(&audio.url) {
            return false;
        }
        let loops = if hold {
            Some(audio.loops.max(1))
        } else {
            // Once is Twilio's default; 0 would never end and is played once too.
            (audio.loops > 1).then_some(audio.loops)
        };
        match loops {
            Some(n) => self.text("Play", &[("loop", &n.to_string())], &audio.url),
            None => self.text("Play", &[], &audio.url),
        }
        true
    }

    fn parameter(&mut self, name: &str, value: &str) {
        self.empty("Parameter", &[("name", name), ("value", value)]);
    }

    fn open(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start_tag(name, attrs);
        self.out.push('>');
    }

    fn close(&mut self, name: &str) {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
    }

    fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start_tag(name, attrs);
        self.out.push_str(" />");
    }

    fn text(&mut self, name: &str, attrs: &[(&str, &str)], text: &str) {
        self.open(name, attrs);
        escape_into(&mut self.out, text, false);
        self.close(name);
    }

    fn start_tag(&mut self, name: &str, attrs: &[(&str, &str)]) {
        // ElementTree (and so the Python library) writes attributes sorted by name.
        debug_assert!(attrs.windows(2).all(|w| w[0].0 < w[1].0), "attributes must be sorted");
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attrs {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("=\"");
            escape_into(&mut self.out, value, true);
            self.out.push('"');
        }
    }
}

/// Characters dropped from every text and attribute value: XML 1.0 (§2.2 `Char`) forbids
/// C0 controls but tab, newline and carriage return, and U+FFFE/U+FFFF; carriage return, DEL
/// and C1 controls are legal but never meant in words or URLs, so they go too.
fn dropped(c: char) -> bool {
    (c.is_control() && c != '\t' && c != '\n') || c == '\u{FFFE}' || c == '\u{FFFF}'
}

fn is_blank(s: &str) -> bool {
    s.chars().all(|c| dropped(c) || c.is_whitespace())
}

/// Appends `s` escaped for element text or, with `attribute`, for a double-quoted attribute.
fn escape_into(out: &mut String, s: &str, attribute: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            // Attribute-value normalisation would turn raw whitespace into spaces (XML §3.3.3).
            '\n' if attribute => out.push_str("&#10;"),
            '\t' if attribute => out.push_str("&#09;"),
            c if dropped(c) => {}
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use precall_api::{CloneStatus, SpeechInstruction, StatusPollInstruction};

    fn urls() -> TwimlUrls {
        TwimlUrls {
            poll_url: "https://x/twilio/poll?call_id=CA1".into(),
            media_stream_url: "wss://x/twilio/media".into(),
            stream_params: Vec::new(),
        }
    }

    fn hold(loops: u32) -> CallInstructions {
        CallInstructions {
            call_id: "CA1".into(),
            clone_status: CloneStatus::Processing,
            greeting_audio: None,
            hold_audio: Some(AudioInstruction { url: "https://x/h.mp3".into(), loops }),
            status_poll: Some(StatusPollInstruction {
                call_id: "CA1".into(),
                interval: Duration::from_secs(2),
                hold_remaining: Duration::from_secs(60),
            }),
            websocket: None,
            error_message: None,
            should_hangup: false,
        }
    }

    const HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#;

    #[test]
    fn hold_is_always_finite() {
        for (loops, attr) in [(0, "1"), (1, "1"), (4, "4")] {
            assert_eq!(
                render(&hold(loops), &urls()),
                format!(
                    r#"{HEAD}<Play loop="{attr}">https://x/h.mp3</Play><Redirect method="POST">https://x/twilio/poll?call_id=CA1</Redirect></Response>"#
                )
            );
        }
    }

    #[test]
    fn pause_stands_in_for_missing_hold_audio() {
        let mut ins = hold(0);
        ins.hold_audio = None;
        let expect = |n: u64| {
            format!(
                r#"{HEAD}<Pause length="{n}" /><Redirect method="POST">https://x/twilio/poll?call_id=CA1</Redirect></Response>"#
            )
        };
        assert_eq!(render(&ins, &urls()), expect(2));
        // A blank hold URL counts as none.
        ins.hold_audio = Some(AudioInstruction { url: " ".into(), loops: 0 });
        assert_eq!(render(&ins, &urls()), expect(2));
        ins.status_poll.as_mut().unwrap().interval = Duration::from_millis(100);
        assert_eq!(render(&ins, &urls()), expect(1));
        ins.status_poll = None;
        assert_eq!(
            render(&ins, &urls()),
            format!(
                r#"{HEAD}<Redirect method="POST">https://x/twilio/poll?call_id=CA1</Redirect></Response>"#
            )
        );
    }

    #[test]
    fn pause_rounding() {
        assert_eq!(pause_seconds(Duration::ZERO), 1);
        assert_eq!(pause_seconds(Duration::from_millis(999)), 1);
        assert_eq!(pause_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(pause_seconds(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn hangup_helper() {
        assert_eq!(hangup(None), format!("{HEAD}<Hangup /></Response>"));
        assert_eq!(hangup(Some(" \u{1}\t")), format!("{HEAD}<Hangup /></Response>"));
        assert_eq!(
            hangup(Some("Goodbye & thanks")),
            format!("{HEAD}<Say>Goodbye &amp; thanks</Say><Hangup /></Response>")
        );
        let mut ins = hold(0);
        ins.should_hangup = true;
        ins.error_message =
            Some(SpeechInstruction { text: "Goodbye & thanks".into(), audio_url: None });
        assert_eq!(render(&ins, &urls()), hangup(Some("Goodbye & thanks")));
    }

    #[test]
    fn escaping_and_dropping() {
        let mut s = String::new();
        escape_into(&mut s, "a&<>\"'\t\n\r\u{0}\u{1b}\u{7f}\u{85}\u{fffe}\u{ffff}é😀", false);
        assert_eq!(s, "a&amp;&lt;&gt;\"'\t\né😀");
        let mut s = String::new();
        escape_into(&mut s, "a&<>\"'\t\n\r\u{1}é", true);
        assert_eq!(s, "a&amp;&lt;&gt;&quot;'&#09;&#10;é");
    }
}
