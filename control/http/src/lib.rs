//! precall's small HTTP/1.1 server for the control plane, on `may` coroutines and `httparse`.
//!
//! # Why this crate exists
//!
//! The obvious choice in the `may` world, `may_minihttp` 0.1.11, was measured (see
//! `/work/shared/STACK.md`, section "may_minihttp") and is not fit to face the internet:
//!
//! - more than 16 request headers: the connection is closed with no response;
//! - `Content-Length: abc` or `-5` panics inside the crate;
//! - a handler that answers early (400, 413) loses its response, because the unread rest of the
//!   body is then parsed as the next request;
//! - no limit on the size of a header (a 64 MiB header was held in memory), no timeouts (a
//!   slowloris client holds a coroutine forever), no 400 for garbage or chunked bodies;
//! - `Connection: close` and HTTP/1.0 are ignored.
//!
//! So precall's control plane uses this crate instead: the same coroutine model (one `may`
//! coroutine per connection, blocking-style code that parks the coroutine, not the thread), with
//! hard limits ([`Limits`]) and a precise 4xx answer for every way a request can be wrong.
//!
//! # The run loop
//!
//! [`Server::bind`] binds a `may::net::TcpListener` and spawns one *accept coroutine*. It loops on
//! `accept()`; each accepted connection gets its own *connection coroutine*, which runs:
//!
//! 1. **Wait for the first byte of a request.** Nothing arrives within the idle timeout
//!    ([`Limits::idle_timeout`]; for a fresh connection [`Limits::read_timeout`]), or the peer
//!    closes, or the server is shutting down: close silently.
//! 2. **Read the head** (request line + headers) into a fixed-size per-connection buffer
//!    (heap-allocated, never on the coroutine stack) and parse it with `httparse`. More than
//!    [`Limits::max_headers`] headers, or a head longer than [`Limits::max_head_bytes`]: `431`.
//!    Anything `httparse` rejects: `400`.
//! 3. **Frame the body by `Content-Length` only.** Invalid, negative, overflowing or conflicting
//!    values: `400`. Any `Transfer-Encoding` (chunked bodies are not used by Twilio or by precall):
//!    `400` with a text body saying so. A length above [`Limits::max_body_bytes`]: `413`, answered
//!    at once without reading the body. `Expect: 100-continue` gets `100 Continue` first. The body
//!    is read into its own exactly-sized `Vec`, so bytes after it stay in the buffer for the next
//!    (pipelined) request.
//! 4. The whole request (from its first byte to the end of its body) must arrive within
//!    [`Limits::read_timeout`]: each read uses `may`'s `TcpStream::set_read_timeout` with the time
//!    left until that deadline, so trickling one byte a second does not help. Past it: `408`.
//! 5. **Answer.** While draining ([`ServerHandle::set_draining`]) every request gets `503` with
//!    `Retry-After: 5` and `Connection: close`. Otherwise the [`Handler`] runs inside
//!    `catch_unwind`: a panic becomes a `500` (logged once with `tracing::error!`) and the server
//!    keeps going. `HEAD` responses carry the handler's headers but no body. Every response carries
//!    `Content-Length` (except 1xx/204, where HTTP forbids it, and 304).
//! 6. **Keep-alive or close.** HTTP/1.1 keeps the connection unless the request (or the handler's
//!    response) says `Connection: close`; HTTP/1.0 closes unless the request says
//!    `Connection: keep-alive`. After every 4xx error above the connection is closed, because the
//!    framing can no longer be trusted. Closing after a response is a "lingering close": shut down
//!    our sending side, then read and discard what the peer still sends for a short, bounded time,
//!    so that unread request bytes do not turn into a TCP reset that would destroy the response
//!    before the client reads it.
//!
//! [`ServerHandle::shutdown`] sets a flag, wakes the accept coroutine with one loopback connection
//! to itself, and waits for it to drop the listener. Open connections notice the flag at their next
//! request boundary: a request already received is still answered, with `Connection: close`;
//! otherwise they close (an idle connection blocked in its read notices when it times out).
//!
//! # Coroutine stacks
//!
//! The binary chooses the coroutine stack size (`may::config().set_stack_size`); this crate
//! assumes 64 KiB and keeps every buffer on the heap. Handlers run on the connection coroutine's
//! stack and must keep their own frames modest.
#![deny(unsafe_code)]

mod request;
mod response;
mod server;

use std::time::Duration;

pub use request::Request;
pub use response::{Response, reason_phrase};
pub use server::{Server, ServerHandle};

/// Parses a request head exactly as the server does, for fuzzing and tools: `Ok(Some((head
/// bytes, body bytes)))` once the head is complete and within `limits`, `Ok(None)` while it
/// may still become valid, `Err(status)` with the status it is answered with (400, 413, 431).
pub fn parse_request_head(buf: &[u8], limits: &Limits) -> Result<Option<(usize, usize)>, u16> {
    match request::parse_head(buf, limits) {
        Ok(Some(head)) => Ok(Some((head.len, head.content_length))),
        Ok(None) => Ok(None),
        Err(e) => Err(e.status()),
    }
}

/// Hard limits applied to every connection. All of them have safe defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most request headers accepted; one more gets `431`. Default 100.
    pub max_headers: usize,
    /// Most bytes in the request line plus headers (including the blank line); more gets `431`.
    /// Default 16 KiB.
    pub max_head_bytes: usize,
    /// Largest `Content-Length` accepted; more gets `413` without the body being read.
    /// Default 64 KiB.
    pub max_body_bytes: usize,
    /// A request must arrive completely (head and body) within this time from its first byte,
    /// else `408` and close. A fresh connection must send its first byte within it too (else it is
    /// closed silently). Also used as the write timeout for responses. Default 10 s.
    pub read_timeout: Duration,
    /// How long a keep-alive connection may sit idle between requests before it is closed
    /// silently. Default 60 s.
    pub idle_timeout: Duration,
    /// Most connections open at once; one more is answered `503` with `Retry-After: 1` and
    /// `Connection: close` and closed, without reading it (each open connection holds a
    /// coroutine and its buffers). Default 10,000.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_headers: 100,
            max_head_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
            read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// Answers requests. Called on the connection's coroutine; it may block the coroutine (for
/// example on a `may::sync::mpsc` channel) but must not block the thread.
///
/// Implemented for every `Fn(&Request) -> Response + Send + Sync + 'static`.
pub trait Handler: Send + Sync + 'static {
    /// Produces the response for one request. A panic here becomes a `500`.
    fn handle(&self, req: &Request) -> Response;
}

impl<F> Handler for F
where
    F: Fn(&Request) -> Response + Send + Sync + 'static,
{
    fn handle(&self, req: &Request) -> Response {
        self(req)
    }
}
