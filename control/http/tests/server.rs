//! End-to-end tests over real loopback sockets: raw bytes in, raw response bytes checked.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use precall_http::{Limits, Request, Response, Server, ServerHandle};

/// Generous client-side read timeout: a hung server fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn init_may() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        may::config().set_worker_pin(false);
        // 64 KiB (the setting is in machine words), as in the binary.
        may::config().set_stack_size(0x2000);
    });
}

fn echo(req: &Request) -> Response {
    match req.path.as_str() {
        "/panic" => panic!("handler panic on purpose"),
        "/close" => Response::text(200, "bye").header("Connection", "close"),
        "/nocontent" => Response::new(204),
        _ => Response::text(
            200,
            format!(
                "{} {} v1.{} headers={} body={} x-test={}",
                req.method,
                req.target(),
                req.version_minor,
                req.headers().count(),
                String::from_utf8_lossy(&req.body),
                req.header("X-TEST").unwrap_or("-"),
            ),
        )
        .header("X-Echo", "yes"),
    }
}

fn start(limits: Limits) -> ServerHandle {
    init_may();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Server::bind(addr, limits, Arc::new(echo)).unwrap()
}

fn connect(server: &ServerHandle) -> TcpStream {
    let s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses one response at the start of `bytes`: `Some((resp, bytes used))` if complete.
fn parse_response(bytes: &[u8], head_only: bool) -> Option<(Resp, usize)> {
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut slots);
    let head_len = match r.parse(bytes).expect("server sent an invalid response") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), String::from_utf8(h.value.to_vec()).unwrap()))
        .collect();
    let status = r.code.unwrap();
    let len = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().unwrap());
    let body_len = if head_only { 0 } else { len.unwrap_or(0) };
    if bytes.len() < head_len + body_len {
        return None;
    }
    let body = String::from_utf8(bytes[head_len..head_len + body_len].to_vec()).unwrap();
    Some((Resp { status, headers, body }, head_len + body_len))
}

/// Reads exactly one response (keep-alive), leaving extra bytes in `pending`.
fn read_one(s: &mut TcpStream, pending: &mut Vec<u8>, head_only: bool) -> Resp {
    loop {
        if let Some((resp, used)) = parse_response(pending, head_only) {
            pending.drain(..used);
            return resp;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read failed (timeout?)");
        assert!(n > 0, "connection closed before a full response: {pending:?}");
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the server closes; returns every response received. Panics on leftovers.
fn read_all(s: &mut TcpStream) -> Vec<Resp> {
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).expect("read_to_end failed (timeout?)");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let (resp, used) = parse_response(rest, false)
            .unwrap_or_else(|| panic!("incomplete response: {:?}", String::from_utf8_lossy(rest)));
        out.push(resp);
        rest = &rest[used..];
    }
    out
}

/// Sends `raw` on a fresh connection, expects exactly one response and then a close.
fn one_shot(server: &ServerHandle, raw: &[u8]) -> Resp {
    let mut s = connect(server);
    s.write_all(raw).unwrap();
    let mut all = read_all(&mut s);
    assert_eq!(all.len(), 1, "expected one response, got {all:?}");
    all.remove(0)
}

/// A request with exactly `n` headers (`n` >= 2), ending with `Connection: close`.
fn request_with_headers(n: usize) -> String {
    let mut raw = String::from("GET /h HTTP/1.1\r\nHost: x\r\n");
    for i in 2..n {
        raw.push_str(&format!("X-Header-{i}: value-{i}\r\n"));
    }
    raw.push_str("Connection: close\r\n\r\n");
    raw
}

fn short_timeouts() -> Limits {
    Limits {
        read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        ..Limits::default()
    }
}

#[test]
fn http11_keeps_the_connection_alive() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    for i in 0..3 {
        write!(s, "GET /k?i={i} HTTP/1.1\r\nHost: x\r\nX-Test: t{i}\r\n\r\n").unwrap();
        let resp = read_one(&mut s, &mut pending, false);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("Connection"), None);
        assert_eq!(resp.header("X-Echo"), Some("yes"));
        assert_eq!(resp.body, format!("GET /k?i={i} v1.1 headers=2 body= x-test=t{i}"));
    }
}

#[test]
fn connection_close_is_honoured() {
    let server = start(Limits::default());
    let resp = one_shot(&server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Connection"), Some("close"));
}

#[test]
fn handler_connection_close_is_honoured() {
    let server = start(Limits::default());
    let resp = one_shot(&server, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((resp.status, resp.body.as_str()), (200, "bye"));
    assert_eq!(resp.header("Connection"), Some("close"));
}

#[test]
fn http10_closes_by_default() {
    let server = start(Limits::default());
    let resp = one_shot(&server, b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Connection"), Some("close"));
    assert_eq!(resp.body, "GET /old v1.0 headers=0 body= x-test=-");
}

#[test]
fn http10_keep_alive_is_honoured() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        let resp = read_one(&mut s, &mut pending, false);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("Connection"), Some("keep-alive"));
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    s.write_all(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let all = read_all(&mut s);
    let bodies: Vec<&str> = all.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(
        bodies,
        [
            "GET /1 v1.1 headers=1 body= x-test=-",
            "POST /2 v1.1 headers=2 body=hello x-test=-",
            "GET /3 v1.1 headers=2 body= x-test=-",
        ]
    );
}

#[test]
fn accepts_64_headers() {
    let server = start(Limits::default());
    let resp = one_shot(&server, request_with_headers(64).as_bytes());
    assert_eq!(resp.status, 200);
    assert!(resp.body.contains("headers=64 "), "{}", resp.body);
}

#[test]
fn accepts_100_headers() {
    let server = start(Limits::default());
    let resp = one_shot(&server, request_with_headers(100).as_bytes());
    assert_eq!(resp.status, 200);
    assert!(resp.body.contains("headers=100 "), "{}", resp.body);
}

#[test]
fn too_many_headers_is_431_then_close() {
    let server = start(Limits::default());
    let resp = one_shot(&server, request_with_headers(101).as_bytes());
    assert_eq!(resp.status, 431);
    assert_eq!(resp.header("Connection"), Some("close"));
    assert_eq!(resp.header("Content-Type"), Some("text/plain; charset=utf-8"));
    assert_eq!(resp.body, "too many headers (limit 100)");
}

#[test]
fn oversized_head_is_431_then_close() {
    let server = start(Limits::default());
    let raw = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let resp = one_shot(&server, raw.as_bytes());
    assert_eq!(resp.status, 431);
    assert_eq!(resp.body, "request head too large (limit 16384 bytes)");
    // Also when the head never ends.
    let raw = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(17_000));
    assert_eq!(one_shot(&server, raw.as_bytes()).status, 431);
}

#[test]
fn invalid_content_length_is_400() {
    let server = start(Limits::default());
    for cl in [
        "Content-Length: abc",
        "Content-Length: -5",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 5, 6",
        "Content-Length: 99999999999999999999999",
    ] {
        let raw = format!("POST / HTTP/1.1\r\nHost: x\r\n{cl}\r\n\r\nhello");
        let resp = one_shot(&server, raw.as_bytes());
        assert_eq!(resp.status, 400, "{cl}");
        assert!(resp.body.starts_with("invalid Content-Length"), "{cl}: {}", resp.body);
        assert_eq!(resp.header("Connection"), Some("close"));
    }
    // Repeated identical values are fine.
    let raw = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\
               Connection: close\r\n\r\nhello";
    let resp = one_shot(&server, raw.as_bytes());
    assert_eq!(resp.status, 200);
    assert!(resp.body.contains("body=hello"));
}

#[test]
fn transfer_encoding_is_400() {
    let server = start(Limits::default());
    let raw =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let resp = one_shot(&server, raw);
    assert_eq!(resp.status, 400);
    assert!(resp.body.starts_with("Transfer-Encoding is not supported"), "{}", resp.body);
}

#[test]
fn too_large_body_is_413_and_the_body_is_never_parsed() {
    let server = start(Limits { max_body_bytes: 100, ..Limits::default() });
    let mut s = connect(&server);
    // The "body" is itself a valid request: it must not be answered.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".repeat(10);
    let raw = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{smuggled}");
    s.write_all(raw.as_bytes()).unwrap();
    let all = read_all(&mut s);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].status, 413);
    assert_eq!(all[0].header("Connection"), Some("close"));
    assert_eq!(all[0].body, "body too large: Content-Length 1000 exceeds the limit of 100 bytes");
}

#[test]
fn garbage_is_400_then_close() {
    let server = start(Limits::default());
    for raw in [&b"hello there\r\n\r\n"[..], b"GET\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00"] {
        let resp = one_shot(&server, raw);
        assert_eq!(resp.status, 400, "{raw:?}");
        assert!(resp.body.starts_with("malformed request"), "{}", resp.body);
        assert_eq!(resp.header("Connection"), Some("close"));
    }
}

#[test]
fn incomplete_head_is_408_then_close() {
    let server = start(short_timeouts());
    let t0 = Instant::now();
    let resp = one_shot(&server, b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(resp.status, 408);
    assert_eq!(resp.header("Connection"), Some("close"));
    assert!(resp.body.starts_with("request not received completely"), "{}", resp.body);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn short_body_is_408_then_close() {
    let server = start(short_timeouts());
    let resp = one_shot(&server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(resp.status, 408);
}

#[test]
fn trickled_head_cannot_outlive_the_read_timeout() {
    let server = start(Limits { read_timeout: Duration::from_millis(300), ..Limits::default() });
    let mut s = connect(&server);
    let mut writer = s.try_clone().unwrap();
    // One byte every 20 ms: each read succeeds, only the per-request deadline can stop it.
    let trickle = thread::spawn(move || {
        for b in b"GET / HTTP/1.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let t0 = Instant::now();
    let mut pending = Vec::new();
    let resp = read_one(&mut s, &mut pending, false);
    assert_eq!(resp.status, 408);
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    drop(s);
    trickle.join().unwrap();
}

#[test]
fn idle_keep_alive_connection_is_closed_silently() {
    let server = start(short_timeouts());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_one(&mut s, &mut pending, false).status, 200);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty() && pending.is_empty(), "{rest:?}");
}

#[test]
fn silent_fresh_connection_is_closed_silently() {
    let server = start(short_timeouts());
    let mut s = connect(&server);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn handler_panic_is_500_and_the_server_keeps_serving() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    s.write_all(b"GET /panic HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let resp = read_one(&mut s, &mut pending, false);
    assert_eq!((resp.status, resp.body.as_str()), (500, "internal server error"));
    // Same connection, then a fresh one.
    s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_one(&mut s, &mut pending, false).status, 200);
    let resp = one_shot(&server, b"GET /fresh HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
}

#[test]
fn head_request_gets_headers_but_no_body() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    s.write_all(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let resp = read_one(&mut s, &mut pending, true);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("X-Echo"), Some("yes"));
    let expected_len = "HEAD /x v1.1 headers=1 body= x-test=-".len().to_string();
    assert_eq!(resp.header("Content-Length"), Some(expected_len.as_str()));
    // Had a body been sent, it would now be in front of the next response.
    s.write_all(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let resp = read_one(&mut s, &mut pending, false);
    assert_eq!(resp.body, "GET /y v1.1 headers=1 body= x-test=-");
}

#[test]
fn no_content_has_no_content_length() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    s.write_all(b"GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let resp = read_one(&mut s, &mut pending, false);
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("Content-Length"), None);
}

#[test]
fn expect_100_continue_gets_an_interim_response() {
    let server = start(Limits::default());
    let mut s = connect(&server);
    let mut pending = Vec::new();
    s.write_all(
        b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_one(&mut s, &mut pending, false).status, 100);
    s.write_all(b"abc").unwrap();
    let resp = read_one(&mut s, &mut pending, false);
    assert_eq!(resp.status, 200);
    assert!(resp.body.contains("body=abc"), "{}", resp.body);
}

#[test]
fn draining_answers_503_with_retry_after() {
    let server = start(Limits::default());
    server.set_draining(true);
    let resp = one_shot(&server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("Retry-After"), Some("5"));
    assert_eq!(resp.header("Connection"), Some("close"));
    server.set_draining(false);
    let resp = one_shot(&server, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
}

#[test]
fn shutdown_stops_accepting_and_answers_the_request_in_flight_with_close() {
    init_may();
    // `/slow` blocks its coroutine (not its thread) until the test releases it.
    let (release, released) = may::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
    let handler = move |req: &Request| {
        if req.path == "/slow" {
            entered_tx.send(()).unwrap();
            released.lock().unwrap().recv_timeout(CLIENT_TIMEOUT).unwrap();
        }
        echo(req)
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(addr, Limits::default(), Arc::new(handler)).unwrap();
    let addr = server.local_addr();
    let mut s = connect(&server);
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    entered.recv_timeout(CLIENT_TIMEOUT).unwrap();

    let t0 = Instant::now();
    server.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(2), "shutdown took {:?}", t0.elapsed());
    let err = TcpStream::connect(addr).expect_err("listener still open after shutdown");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    // The request in flight is answered, marked close, then the connection ends.
    release.send(()).unwrap();
    let all = read_all(&mut s);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].status, 200);
    assert_eq!(all[0].header("Connection"), Some("close"));
}

#[test]
fn past_the_connection_cap_a_new_connection_gets_503_and_a_closed_one_frees_its_slot() {
    let server = start(Limits { max_connections: 2, ..Limits::default() });
    let open = server.open_connections();
    // Two keep-alive connections, each served once and left open.
    let mut held: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&server);
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut pending = Vec::new();
        assert_eq!(read_one(&mut s, &mut pending, false).status, 200);
        held.push((s, pending));
    }
    assert_eq!(open.load(std::sync::atomic::Ordering::Acquire), 2);
    // A third: 503 at once, without a request being read, and closed.
    let mut third = connect(&server);
    let answers = read_all(&mut third);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].status, 503);
    assert_eq!(answers[0].header("Retry-After"), Some("1"));
    // The held connections still work.
    let (s, pending) = &mut held[0];
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_one(s, pending, false).status, 200);
    // One closes: its slot is free again (the server sees the close at its next read).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while open.load(std::sync::atomic::Ordering::Acquire) != 1 {
        assert!(Instant::now() < deadline, "the closed connection's slot was not freed");
        thread::park_timeout(Duration::from_millis(10));
    }
    let resp = one_shot(&server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200);
}
