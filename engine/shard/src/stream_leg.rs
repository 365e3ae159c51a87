//! The Twilio leg's I/O: the Media Streams WebSocket server of a shard.
//!
//! Every shard listens on the media port (SO_REUSEPORT: the kernel spreads connections). One
//! task per connection: it reads the HTTP upgrade request itself (bounded size and time),
//! answers `404`/`405`/`400`/`403`/`408`/`431` before any upgrade when the path, the method,
//! the upgrade headers or the `X-Twilio-Signature` (over the stream URL Twilio was given) are
//! wrong, then speaks WebSocket with async-tungstenite. Each Media Streams message is parsed
//! (`precall_call::twilio`) and handed to the shard at once through the `deliver` callback,
//! which borrows the shard's core between awaits only; the reader yields after each frame.
//! What the shard sends (media, marks, clears) goes through the connection's bounded
//! [`Outbox`]: a slow Twilio socket fills it and frames are dropped and counted, never
//! buffered without limit and never blocking the shard. Closing the outbox sends the queued
//! frames, then a close frame (1000), and ends the task; the task always ends by delivering
//! [`StreamInput::Gone`].

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use futures_util::StreamExt;
use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use precall_call::twilio::{self, StreamEvent, StreamStartInfo};
use precall_twilio::{RequestValidator, SIGNATURE_HEADER};

use crate::agent_leg::{Outbox, write_outbox};
use crate::health::ShardStats;

/// The path Twilio is given (`<Stream url="…/twilio/media">`).
pub(crate) const STREAM_PATH: &str = "/twilio/media";

/// Media stream connections one shard keeps open at most (upgraded or not); past it new ones
/// get `503`.
const MAX_CONNECTIONS: usize = 10_000;
/// The upgrade request, headers included, at most.
const MAX_HEAD: usize = 8 * 1024;
/// Headers of the upgrade request at most (Twilio sends about ten).
const MAX_HEADERS: usize = 32;
/// From the TCP accept to the upgrade, at most.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// From the upgrade to Twilio's `start`, at most.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A Media Streams message is about 250 bytes; this bounds what one frame may make us buffer.
const MAX_MESSAGE: usize = 64 * 1024;
/// tungstenite's read chunk for a stream (see [`connection`]).
const READ_BUFFER: usize = 4 * 1024;
/// Pause after a failed accept (out of descriptors), so the loop cannot spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What a stream tells the shard.
#[derive(Debug)]
pub(crate) enum StreamInput<'a> {
    /// Twilio's `start`.
    Start(StreamStartInfo),
    /// One frame of caller µ-law (`media.chunk`, the payload).
    Media(u64, &'a [u8]),
    /// A mark came back.
    Mark(&'a str),
    /// The caller pressed a key.
    Dtmf(char),
    /// Twilio's `stop`: the call is over on Twilio's side.
    Stop,
    /// The socket is gone (after `stop`, after our close, or broken). Always the last input.
    Gone,
}

/// One connection's way into the shard, made by the shard when the connection is accepted.
pub(crate) type Deliver = Box<dyn FnMut(Instant, StreamInput<'_>)>;

/// Makes the [`Deliver`] of each new connection, given its outbox.
pub(crate) type Open = Rc<dyn Fn(Rc<Outbox>, SocketAddr) -> Deliver>;

/// Who may open a stream.
pub(crate) struct StreamAuth {
    pub(crate) validator: Option<RequestValidator>,
    pub(crate) skip_signature: bool,
    /// The stream URL as Twilio was given it (what it signs).
    pub(crate) public_url: String,
}

/// Accepts connections until the task is dropped; one task per connection.
pub(crate) async fn accept(
    shard: usize,
    listener: TcpListener,
    auth: Rc<StreamAuth>,
    stats: std::sync::Arc<ShardStats>,
    open: Open,
) {
    let mut failures: u64 = 0;
    let open_connections = Rc::new(std::cell::Cell::new(0usize));
    loop {
        match listener.accept().await {
            Ok(mut tcp) => {
                failures = 0;
                let peer = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                if open_connections.get() >= MAX_CONNECTIONS {
                    // Bounded like every other resource of a shard: a flood of idle connections
                    // cannot take the descriptors the calls need.
                    stats.stream_refused();
                    glommio::spawn_local(async move {
                        let busy = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
                                    Content-Length: 0\r\nConnection: close\r\n\r\n";
                        let _ = tcp.write_all(busy.as_bytes()).await;
                        let _ = tcp.close().await;
                    })
                    .detach();
                    continue;
                }
                open_connections.set(open_connections.get() + 1);
                let count = open_connections.clone();
                let task = connection(tcp, peer, auth.clone(), stats.clone(), open.clone());
                glommio::spawn_local(async move {
                    task.await;
                    count.set(count.get() - 1);
                })
                .detach();
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(shard, failures, error = %e, "media stream accept failed");
                }
                glommio::timer::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Why an upgrade was refused, as the HTTP answer.
struct Refusal {
    status: u16,
    reason: &'static str,
    why: String,
}

impl Refusal {
    fn new(status: u16, reason: &'static str, why: impl Into<String>) -> Self {
        Self { status, reason, why: why.into() }
    }
}

async fn connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    auth: Rc<StreamAuth>,
    stats: std::sync::Arc<ShardStats>,
    open: Open,
) {
    let _ = tcp.set_nodelay(true);
    let upgraded = {
        let handshake = pin!(upgrade(&mut tcp, &auth));
        let timer = pin!(glommio::timer::sleep(HANDSHAKE_TIMEOUT));
        match futures_util::future::select(handshake, timer).await {
            futures_util::future::Either::Left((result, _)) => result,
            futures_util::future::Either::Right(_) => {
                Err(Refusal::new(408, "Request Timeout", "no upgrade request in time"))
            }
        }
    };
    let rest = match upgraded {
        Ok(rest) => rest,
        Err(refusal) => {
            stats.stream_refused();
            tracing::info!(%peer, status = refusal.status, why = %refusal.why, "media stream refused");
            if refusal.status != 0 {
                let body = format!("{}\n", refusal.why);
                let head = format!(
                    "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    refusal.status,
                    refusal.reason,
                    body.len()
                );
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(body.as_bytes()).await;
                let _ = tcp.close().await;
            }
            return;
        }
    };
    // tungstenite zeroes `read_buffer_size` bytes before every read (128 KiB by default, also
    // for a read that finds nothing): a Media Streams message is about 400 bytes, 4 KiB does.
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(READ_BUFFER);
    let ws = WebSocketStream::from_partially_read(tcp, rest, Role::Server, Some(cfg)).await;
    let outbox = Rc::new(Outbox::default());
    let deliver = RefCell::new(open(outbox.clone(), peer));
    serve(ws, &outbox, &deliver, &stats, peer).await;
    (deliver.borrow_mut())(Instant::now(), StreamInput::Gone);
}

/// Reads and checks the upgrade request and answers `101`; returns the bytes read past it.
async fn upgrade(tcp: &mut TcpStream, auth: &StreamAuth) -> Result<Vec<u8>, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = tcp
            .read(&mut chunk)
            .await
            .map_err(|e| Refusal::new(0, "", format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(Refusal::new(0, "", "closed before the request ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal::new(
                431,
                "Request Header Fields Too Large",
                "request head over 8 KiB",
            ));
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Refusal::new(400, "Bad Request", "incomplete request head"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, "Request Header Fields Too Large", "too many headers"));
        }
        Err(e) => return Err(Refusal::new(400, "Bad Request", format!("malformed request: {e}"))),
    }
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    if path != STREAM_PATH {
        return Err(Refusal::new(404, "Not Found", format!("no stream at {path}")));
    }
    if req.method != Some("GET") {
        return Err(Refusal::new(405, "Method Not Allowed", "use GET to open a stream"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade") {
        return Err(Refusal::new(400, "Bad Request", "not a WebSocket upgrade"));
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return Err(Refusal::new(400, "Bad Request", "Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = header("Sec-WebSocket-Key").filter(|k| !k.trim().is_empty()) else {
        return Err(Refusal::new(400, "Bad Request", "Sec-WebSocket-Key is missing"));
    };
    check_signature(auth, query, header(SIGNATURE_HEADER))
        .map_err(|why| Refusal::new(403, "Forbidden", why))?;
    let accept = derive_accept_key(key.trim().as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    tcp.write_all(response.as_bytes())
        .await
        .map_err(|e| Refusal::new(0, "", format!("writing the upgrade: {e}")))?;
    Ok(buf[end..].to_vec())
}

fn check_signature(
    auth: &StreamAuth,
    query: Option<&str>,
    signature: Option<&str>,
) -> Result<(), &'static str> {
    let Some(validator) = &auth.validator else {
        return if auth.skip_signature { Ok(()) } else { Err("TWILIO_AUTH_TOKEN is not set") };
    };
    let Some(signature) = signature else { return Err("missing X-Twilio-Signature") };
    let url = match query {
        Some(q) => format!("{}?{q}", auth.public_url),
        None => auth.public_url.clone(),
    };
    if validator.validate(&url, &[], signature) {
        Ok(())
    } else {
        Err("invalid X-Twilio-Signature")
    }
}

/// The stream after the upgrade: reader and writer on one task until either ends.
async fn serve(
    ws: WebSocketStream<TcpStream>,
    outbox: &Outbox,
    deliver: &RefCell<Deliver>,
    stats: &ShardStats,
    peer: SocketAddr,
) {
    let (mut sink, mut stream) = ws.split();
    let reader = async {
        let mut audio = Vec::with_capacity(512);
        let mut started = false;
        let mut complained = false;
        let opened = Instant::now();
        loop {
            let next = if started {
                stream.next().await
            } else {
                // Nothing but `connected` and `start` is expected before the start deadline.
                let left = START_TIMEOUT.saturating_sub(opened.elapsed());
                let next = pin!(stream.next());
                let timer = pin!(glommio::timer::sleep(left));
                match futures_util::future::select(next, timer).await {
                    futures_util::future::Either::Left((m, _)) => m,
                    futures_util::future::Either::Right(_) => {
                        tracing::info!(%peer, "media stream sent no start in time; closing");
                        outbox.close();
                        return;
                    }
                }
            };
            let text = match next {
                Some(Ok(Message::Text(text))) => text,
                // tungstenite answers pings itself; binary frames are not part of the protocol.
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "media stream broke");
                    return;
                }
            };
            let now = Instant::now();
            let input = match twilio::parse(text.as_str(), &mut audio) {
                Ok(StreamEvent::Start(info)) if !started => {
                    started = true;
                    Some(StreamInput::Start(info))
                }
                Ok(StreamEvent::Media { chunk }) if started => {
                    Some(StreamInput::Media(chunk, &audio))
                }
                Ok(StreamEvent::Mark(ref name)) if started => {
                    (deliver.borrow_mut())(now, StreamInput::Mark(name));
                    None
                }
                Ok(StreamEvent::Dtmf(d)) if started => Some(StreamInput::Dtmf(d)),
                Ok(StreamEvent::Stop) => Some(StreamInput::Stop),
                Ok(_) => None,
                Err(e) => {
                    stats.stream_malformed();
                    if !complained {
                        complained = true;
                        tracing::info!(%peer, error = %e, "malformed media stream message");
                    }
                    if !started {
                        // A stream that cannot say who it is cannot be served.
                        outbox.close();
                        return;
                    }
                    None
                }
            };
            if let Some(input) = input {
                let stop = matches!(input, StreamInput::Stop);
                (deliver.borrow_mut())(now, input);
                if stop {
                    return;
                }
            }
            // Let the shard's other tasks (the media clock) run before the next frame.
            futures_lite::future::yield_now().await;
        }
    };
    let writer = async {
        // A send that fails means the socket is gone: the reader sees it too.
        let _ = write_outbox(&mut sink, outbox).await;
    };
    // The reader ending (stop, a close, a broken socket) or the writer ending (our close sent)
    // ends the connection; dropping the other half drops the socket.
    futures_util::future::select(pin!(reader), pin!(writer)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: Option<&str>, skip: bool) -> StreamAuth {
        StreamAuth {
            validator: token.map(RequestValidator::new),
            skip_signature: skip,
            public_url: "wss://voice.example.com/twilio/media".into(),
        }
    }

    #[test]
    fn the_signature_is_over_the_stream_url_and_its_query() {
        let a = auth(Some("secret"), false);
        let v = RequestValidator::new("secret");
        let good = v.compute("wss://voice.example.com/twilio/media", &[]);
        assert_eq!(check_signature(&a, None, Some(&good)), Ok(()));
        assert!(check_signature(&a, Some("x=1"), Some(&good)).is_err(), "the query is signed");
        let with_query = v.compute("wss://voice.example.com/twilio/media?x=1", &[]);
        assert_eq!(check_signature(&a, Some("x=1"), Some(&with_query)), Ok(()));
        assert_eq!(check_signature(&a, None, None), Err("missing X-Twilio-Signature"));
        assert_eq!(check_signature(&a, None, Some("AAAA")), Err("invalid X-Twilio-Signature"));
        // A token wins over the skip flag; no token refuses unless skipping.
        assert!(check_signature(&auth(Some("secret"), true), None, None).is_err());
        assert!(check_signature(&auth(None, false), None, Some(&good)).is_err());
        assert_eq!(check_signature(&auth(None, true), None, None), Ok(()));
    }
}
