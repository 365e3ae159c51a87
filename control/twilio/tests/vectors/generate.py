#!/usr/bin/env python3
"""Regenerates signatures.json and twiml.json from Twilio's own Python library.

    python3 -m venv /tmp/twv && /tmp/twv/bin/pip install twilio==9.13.0
    cd control/twilio/tests/vectors && /tmp/twv/bin/python generate.py

The Rust tests (tests/vectors.rs) run every entry. Expected values come only from
twilio.request_validator.RequestValidator and twilio.twiml.voice_response.VoiceResponse.
"""

import json
from hashlib import sha256

import twilio
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse  # noqa: F401 (used by the snippets)


class Multi:
    """A multi-valued form like Flask's MultiDict: RequestValidator calls getall()."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter([k for k, _ in self.pairs])

    def __bool__(self):
        return bool(self.pairs)

    def getall(self, name):
        return [v for k, v in self.pairs if k == name]


DOCS_PARAMS = [
    ["CallSid", "CA1234567890ABCDE"],
    ["Caller", "+12349013030"],
    ["Digits", "1234"],
    ["From", "+12349013030"],
    ["To", "+18005551212"],
]
LIB_PARAMS = [
    ["CallSid", "CA1234567890ABCDE"],
    ["Digits", "1234"],
    ["From", "+14158675309"],
    ["To", "+18005551212"],
    ["Caller", "+14158675309"],
]
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


def signatures():
    compute = []

    def c(name, token, url, params):
        sig = RequestValidator(token).compute_signature(url, Multi(params))
        compute.append({"name": name, "token": token, "url": url, "params": params, "expected": sig})

    c("twilio docs vector", "12345", URL, DOCS_PARAMS)
    c("twilio-python unit test vector", "12345", URL, LIB_PARAMS)
    c("docs vector with :443", "12345", URL.replace(".com", ".com:443"), DOCS_PARAMS)
    c("docs vector over http with :80", "12345", URL.replace(".com", ".com:80").replace("https", "http"), DOCS_PARAMS)
    c("repeated names sorted by value (library duplicate test)", "12345", URL,
      [["Sid", "CA123"], ["SidAccount", "AC123"], ["Digits", "5678"], ["Digits", "1234"]])
    c("identical repeated pairs counted once", "12345", URL,
      [["Digits", "1"], ["Digits", "1"], ["Digits", "0"]])
    c("names sort by code point: upper before lower, non-ASCII last", "secret", "https://x.example/hook",
      [["a", "1"], ["B", "2"], ["\u00c4", "3"], ["_", "4"], ["Z", "5"]])
    c("empty values still signed", "secret", "https://x.example/hook",
      [["FromCity", ""], ["CallSid", "CA1"], ["FromState", ""]])
    c("no params: URL only", "12345", URL, [])
    c("utf-8 token, url and values", "t\u00f8ken", "https://x.example/h\u00e9?q=\u00fc",
      [["Body", "gr\u00fc\u00df dich \U0001F600"], ["To", "+4930123"]])

    validate = []

    def v(name, token, url, params, signature):
        ok = RequestValidator(token).validate(url, Multi(params), signature)
        validate.append({"name": name, "token": token, "url": url, "params": params,
                         "signature": signature, "valid": ok})

    docs_sig = RequestValidator("12345").compute_signature(URL, Multi(DOCS_PARAMS))
    lib_sig = RequestValidator("12345").compute_signature(URL, Multi(LIB_PARAMS))
    v("docs vector", "12345", URL, DOCS_PARAMS, docs_sig)
    v("docs vector, :443 added by a proxy", "12345", URL.replace(".com", ".com:443"), DOCS_PARAMS, docs_sig)
    v("library: removes any port on https", "12345", URL.replace(".com", ".com:1234"), LIB_PARAMS, lib_sig)
    v("library: removes port on http", "12345", URL.replace(".com", ".com:1234").replace("https", "http"),
      LIB_PARAMS, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")
    v("library: adds :443 on https", "12345", URL, LIB_PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=")
    v("library: adds :80 on http", "12345", URL.replace("https", "http"), LIB_PARAMS, "0ZXoZLH/DfblKGATFgpif+LLRf4=")
    v("signature over http does not validate https", "12345", URL, LIB_PARAMS, "0ZXoZLH/DfblKGATFgpif+LLRf4=")
    v("wrong signature", "12345", URL, DOCS_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgR=")
    v("empty signature", "12345", URL, DOCS_PARAMS, "")
    v("wrong token", "54321", URL, DOCS_PARAMS, docs_sig)
    v("tampered param", "12345", URL, [["CallSid", "CA1234567890ABCDE"], ["Caller", "+12349013030"],
      ["Digits", "1235"], ["From", "+12349013030"], ["To", "+18005551212"]], docs_sig)
    v("missing param", "12345", URL, DOCS_PARAMS[:-1], docs_sig)
    v("extra param", "12345", URL, DOCS_PARAMS + [["Extra", ""]], docs_sig)
    v("tampered url query", "12345", URL.replace("foo=1", "foo=2"), DOCS_PARAMS, docs_sig)
    v("uppercase scheme and empty query are normalised by urlparse", "12345",
      "HTTPS://mycompany.com/myapp.php?", [],
      RequestValidator("12345").compute_signature("https://mycompany.com/myapp.php", {}))
    v("empty fragment dropped by urlparse", "12345", "https://mycompany.com/myapp.php#", [],
      RequestValidator("12345").compute_signature("https://mycompany.com/myapp.php", {}))

    validate_json = []
    body = '{"property": "value", "boolean": true}'
    body_hash = sha256(body.encode("utf-8")).hexdigest()
    json_url = URL + "&bodySHA256=" + body_hash

    def j(name, token, url, body, signature):
        ok = RequestValidator(token).validate(url, body, signature)
        validate_json.append({"name": name, "token": token, "url": url, "body": body,
                              "signature": signature, "valid": ok})

    j("library: body hash vector", "12345", json_url, body, "a9nBmqA0ju/hNViExpshrM61xv4=")
    j("tampered body", "12345", json_url, body.replace("true", "false"), "a9nBmqA0ju/hNViExpshrM61xv4=")
    j("wrong signature", "12345", json_url, body, "a9nBmqA0ju/hNViExpshrM61xv5=")
    j("wrong token", "1234", json_url, body, "a9nBmqA0ju/hNViExpshrM61xv4=")
    j("body hash with :443", "12345", json_url.replace(".com", ".com:443"), body, "a9nBmqA0ju/hNViExpshrM61xv4=")
    other = '{"text": "gr\u00fc\u00df"}'
    other_url = "https://x.example/hook?bodySHA256=" + sha256(other.encode("utf-8")).hexdigest()
    j("utf-8 body, hash only query", "secret", other_url, other,
      RequestValidator("secret").compute_signature(other_url, {}))
    return {
        "comment": "Generated by generate.py with twilio " + twilio.__version__
        + ": compute = RequestValidator(token).compute_signature(url, multidict(params)); "
        "validate = RequestValidator(token).validate(url, multidict(params), signature); "
        "validate_json = RequestValidator(token).validate(url, body_str, signature).",
        "compute": compute,
        "validate": validate,
        "validate_json": validate_json,
    }


def twiml():
    cases = []

    def t(name, instructions, urls, snippet, mode="poll"):
        scope = {"VoiceResponse": VoiceResponse}
        exec(snippet, scope)
        cases.append({"name": name, "mode": mode, "python": snippet, "instructions": instructions,
                      "urls": urls, "expected": str(scope["r"])})

    urls = {"poll_url": "https://x/twilio/poll?call_id=CA1",
            "media_stream_url": "wss://x/twilio/media"}
    base = {"call_id": "CA1", "should_hangup": False, "error_text": None, "greeting": None,
            "hold": None, "poll_interval_ms": None, "websocket": None}

    def ins(**kw):
        d = dict(base)
        d.update(kw)
        return d

    t("inbound hold: greeting, endless hold rendered as one play, redirect",
      ins(greeting={"url": "https://x/greeting.mp3", "loops": 1},
          hold={"url": "https://x/hold.mp3", "loops": 0}, poll_interval_ms=2000), urls,
      "r = VoiceResponse()\n"
      "r.play('https://x/greeting.mp3')\n"
      "r.play('https://x/hold.mp3', loop=1)\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    t("status check hold: no greeting, hold three times",
      ins(hold={"url": "https://x/hold.wav", "loops": 3}, poll_interval_ms=2000), urls,
      "r = VoiceResponse()\n"
      "r.play('https://x/hold.wav', loop=3)\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    t("greeting played twice",
      ins(greeting={"url": "https://x/g.mp3", "loops": 2}, hold={"url": "https://x/h.mp3", "loops": 1}),
      urls,
      "r = VoiceResponse()\n"
      "r.play('https://x/g.mp3', loop=2)\n"
      "r.play('https://x/h.mp3', loop=1)\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    t("hold without audio pauses for the poll interval (rounded up)",
      ins(poll_interval_ms=2500), urls,
      "r = VoiceResponse()\n"
      "r.pause(length=3)\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    t("poll url with & and quotes is escaped",
      ins(hold={"url": "https://x/hold.mp3?a=1&b=\"2\"", "loops": 0}),
      {"poll_url": "https://x/twilio/poll?call_id=CA1&n=2", "media_stream_url": "wss://x/twilio/media"},
      "r = VoiceResponse()\n"
      "r.play('https://x/hold.mp3?a=1&b=\"2\"', loop=1)\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1&n=2', method='POST')\n")
    ws = {"url": "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=ag1", "agent_id": "ag1",
          "voice_id": "vo1", "first_message": None}
    t("connect after greeting, no first message",
      ins(greeting={"url": "https://x/greeting.mp3", "loops": 1},
          hold={"url": "https://x/hold.mp3", "loops": 0}, websocket=ws), urls,
      "r = VoiceResponse()\n"
      "r.play('https://x/greeting.mp3')\n"
      "c = r.connect()\n"
      "s = c.stream(url='wss://x/twilio/media')\n"
      "s.parameter(name='call_id', value='CA1')\n"
      "s.parameter(name='agent_id', value='ag1')\n"
      "s.parameter(name='voice_id', value='vo1')\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    ws2 = dict(ws, first_message="Hi! It's \"me\" & you\n\tok?")
    t("connect with first message needing attribute escapes",
      ins(websocket=ws2), urls,
      "r = VoiceResponse()\n"
      "c = r.connect()\n"
      "s = c.stream(url='wss://x/twilio/media')\n"
      "s.parameter(name='call_id', value='CA1')\n"
      "s.parameter(name='agent_id', value='ag1')\n"
      "s.parameter(name='voice_id', value='vo1')\n"
      "s.parameter(name='first_message', value='Hi! It\\'s \"me\" & you\\n\\tok?')\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    numbers = dict(urls, stream_params=[{"name": "caller", "value": "+15550001"},
                                        {"name": "dialed", "value": "+15550002"}])
    t("connect with the caller's and dialed numbers as parameters",
      ins(websocket=ws), numbers,
      "r = VoiceResponse()\n"
      "c = r.connect()\n"
      "s = c.stream(url='wss://x/twilio/media')\n"
      "s.parameter(name='call_id', value='CA1')\n"
      "s.parameter(name='agent_id', value='ag1')\n"
      "s.parameter(name='voice_id', value='vo1')\n"
      "s.parameter(name='caller', value='+15550001')\n"
      "s.parameter(name='dialed', value='+15550002')\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n")
    t("stream hold: the stream at once, greeting played by the engine, redirect after",
      ins(greeting={"url": "https://x/greeting.mp3", "loops": 1},
          hold={"url": "https://x/hold.mp3", "loops": 0}, poll_interval_ms=2000), numbers,
      "r = VoiceResponse()\n"
      "c = r.connect()\n"
      "s = c.stream(url='wss://x/twilio/media')\n"
      "s.parameter(name='call_id', value='CA1')\n"
      "s.parameter(name='greeting', value='1')\n"
      "s.parameter(name='caller', value='+15550001')\n"
      "s.parameter(name='dialed', value='+15550002')\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n", mode="stream")
    t("stream hold of a connect-ready call is the same stream",
      ins(greeting={"url": "https://x/greeting.mp3", "loops": 1}, websocket=ws), urls,
      "r = VoiceResponse()\n"
      "c = r.connect()\n"
      "s = c.stream(url='wss://x/twilio/media')\n"
      "s.parameter(name='call_id', value='CA1')\n"
      "s.parameter(name='greeting', value='1')\n"
      "r.redirect('https://x/twilio/poll?call_id=CA1', method='POST')\n", mode="stream")
    t("stream hold of a failed call says the error and hangs up",
      ins(should_hangup=True, error_text="Sorry."), urls,
      "r = VoiceResponse()\n"
      "r.say('Sorry.')\n"
      "r.hangup()\n", mode="stream")
    t("hangup with error message",
      ins(should_hangup=True, error_text="Sorry, we could not set up your call. Goodbye."), urls,
      "r = VoiceResponse()\n"
      "r.say('Sorry, we could not set up your call. Goodbye.')\n"
      "r.hangup()\n")
    t("hangup without message",
      ins(should_hangup=True), urls,
      "r = VoiceResponse()\n"
      "r.hangup()\n")
    t("hangup wins over everything else",
      ins(should_hangup=True, error_text="Bye", greeting={"url": "https://x/g.mp3", "loops": 1},
          websocket=ws), urls,
      "r = VoiceResponse()\n"
      "r.say('Bye')\n"
      "r.hangup()\n")
    t("error text with markup and non-ASCII",
      ins(should_hangup=True, error_text="a < b && c > d, \"quoted\" 'single' \u00e9\U0001F600"), urls,
      "r = VoiceResponse()\n"
      "r.say('a < b && c > d, \"quoted\" \\'single\\' \u00e9\U0001F600')\n"
      "r.hangup()\n")
    return {
        "comment": "Generated by generate.py with twilio " + twilio.__version__
        + ": each expected is str(r) after running the python snippet. instructions is the "
        "precall_api::CallInstructions the Rust renderer gets for the same case.",
        "cases": cases,
    }


if __name__ == "__main__":
    for name, data in (("signatures.json", signatures()), ("twiml.json", twiml())):
        with open(name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
