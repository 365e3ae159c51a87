//! The accept loop and the per-connection loop (see the crate docs for the sequence).

use std::any::Any;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use may::coroutine::JoinHandle;
use may::net::{TcpListener, TcpStream};

use crate::request::{Head, RequestError, parse_head};
use crate::{Handler, Limits, Request, Response};

/// Smallest per-connection read buffer, even with a tiny `max_head_bytes`.
const MIN_READ_BUF: usize = 4096;
/// Lingering close: how long, and how many bytes, we keep reading and discarding after our last
/// response before closing, so that unread request bytes do not reset the connection.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// Pause after an accept error that is not about one connection (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// During shutdown, how long an idle connection waits for a request that is already on its way.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1);
/// How long `shutdown` tries to connect to the listener to wake the accept loop.
const WAKE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest the accept loop spends writing a refusal past the connection cap.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_millis(50);

/// State shared by the accept loop, every connection and the [`ServerHandle`].
struct Shared {
    limits: Limits,
    handler: Arc<dyn Handler>,
    shutdown: AtomicBool,
    draining: AtomicBool,
    /// Connections open now (served by a coroutine), for the cap and the gauge.
    open: Arc<AtomicUsize>,
}

/// The HTTP server; see [`Server::bind`].
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds `addr` and starts serving on `may` coroutines: one accept coroutine, then one
    /// coroutine per connection. Returns once the listener is bound.
    ///
    /// Note: `may`'s listener sets `SO_REUSEADDR` and `SO_REUSEPORT`.
    pub fn bind(
        addr: SocketAddr,
        limits: Limits,
        handler: Arc<dyn Handler>,
    ) -> io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            limits,
            handler,
            shutdown: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            open: Arc::new(AtomicUsize::new(0)),
        });
        let loop_shared = Arc::clone(&shared);
        let accept = spawn_coroutine(move || accept_loop(listener, loop_shared))?;
        tracing::debug!(%local_addr, "http server listening");
        Ok(ServerHandle { local_addr, shared, accept: Some(accept) })
    }
}

/// Controls a running server. Dropping it shuts the server down like [`ServerHandle::shutdown`].
#[must_use = "dropping the handle shuts the server down"]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .field("limits", &self.shared.limits)
            .field("draining", &self.shared.draining.load(Ordering::Relaxed))
            .field("running", &self.accept.is_some())
            .finish()
    }
}

impl ServerHandle {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and returns once the listener is closed (promptly: it wakes the accept
    /// loop with one loopback connection). Connections already open are closed at their next
    /// request boundary (a request already arriving is still answered, with
    /// `Connection: close`) or when they time out.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Connections open now, shared: read it for a gauge (`precall_http_connections`).
    pub fn open_connections(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.shared.open)
    }

    /// While draining, every new request is answered `503` with `Retry-After: 5` and
    /// `Connection: close`, without calling the handler.
    pub fn set_draining(&self, draining: bool) {
        self.shared.draining.store(draining, Ordering::Release);
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.shared.shutdown.store(true, Ordering::Release);
        let wake = match self.local_addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
            }
            a => a,
        };
        match std::net::TcpStream::connect_timeout(&wake, WAKE_CONNECT_TIMEOUT) {
            Ok(_wake_conn) => accept.wait(),
            // Not waiting then: the loop ends at its next accepted connection.
            Err(e) => tracing::warn!(%wake, "http shutdown could not wake the accept loop: {e}"),
        }
        tracing::debug!(local_addr = %self.local_addr, "http server stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns a `may` coroutine with the configured stack size.
#[allow(unsafe_code)]
fn spawn_coroutine<F>(f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    // SAFETY: `may` marks spawning unsafe for two reasons.
    // 1. Thread-local storage: a coroutine may resume on another worker thread after any
    //    blocking call, so a reference to a thread-local kept across such a call would dangle.
    //    The coroutines spawned here never keep one: `tracing` and the panic machinery touch
    //    thread-locals only within calls that do not block. (Handlers must follow the same
    //    rule, as all code running on `may` coroutines must.)
    // 2. Stack overflow: the stack size is chosen by the binary (assumed 64 KiB); this crate
    //    keeps every buffer on the heap and its frames small.
    unsafe { may::coroutine::Builder::new().spawn(f) }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.shutdown.load(Ordering::Acquire) {
            break;
        }
        match accepted {
            Ok((stream, peer)) => {
                if shared.open.load(Ordering::Acquire) >= shared.limits.max_connections {
                    refuse_connection(stream, peer, &shared);
                    continue;
                }
                // Counted before the coroutine starts, released when its Conn is dropped.
                shared.open.fetch_add(1, Ordering::AcqRel);
                let conn_shared = Arc::clone(&shared);
                if let Err(e) = spawn_coroutine(move || Conn::new(stream, peer, conn_shared).run())
                {
                    shared.open.fetch_sub(1, Ordering::AcqRel);
                    tracing::error!(%peer, "cannot spawn a coroutine for an http connection: {e}");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!("http accept failed: {e}");
                may::coroutine::sleep(ACCEPT_BACKOFF);
            }
        }
    }
    // `listener` is dropped here, closing the port.
}

/// Over the connection cap: a `503` written without waiting (it fits the socket's send buffer;
/// a peer that does not read loses it), then closed. Logged at the first refusal and then at
/// every power of two.
fn refuse_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    static REFUSED: AtomicUsize = AtomicUsize::new(0);
    if (REFUSED.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two() {
        tracing::warn!(%peer, limit = shared.limits.max_connections, "http connection limit reached: 503");
    }
    // It fits the socket's send buffer: the write does not wait (a peer that does not read
    // loses it at the timeout).
    let _ = stream.set_write_timeout(Some(REFUSE_WRITE_TIMEOUT));
    let body = "too many connections, retry\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
    // FIN after the answer, so a client that reads before it writes more sees the 503 (the
    // close that follows may still reset a connection whose request was never read).
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Why reading a request stopped without producing one.
enum ReadFailure {
    /// Close without answering: the peer closed, went idle, or the socket failed.
    Close,
    /// Answer with this error, then close.
    Refuse(RequestError),
}

impl From<RequestError> for ReadFailure {
    fn from(e: RequestError) -> Self {
        ReadFailure::Refuse(e)
    }
}

/// One connection: its socket, its bounded read buffer and the shared server state.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// Fixed-size read buffer; `buf[start..end]` holds bytes received and not yet consumed.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Reused for serializing responses.
    out: Vec<u8>,
}

impl Drop for Conn {
    /// However the connection ends (closed, timed out, a panic in the handler), its slot under
    /// the cap is freed.
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    fn new(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) -> Conn {
        let size = shared.limits.max_head_bytes.max(MIN_READ_BUF);
        Conn {
            stream,
            peer,
            shared,
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            out: Vec::new(),
        }
    }

    fn run(mut self) {
        let _ = self.stream.set_nodelay(true);
        if let Err(e) = self.stream.set_write_timeout(Some(self.shared.limits.read_timeout)) {
            tracing::debug!(peer = %self.peer, "http connection setup failed: {e}");
            return;
        }
        let mut first = true;
        loop {
            let limits = &self.shared.limits;
            // Shutting down: a request already received (buffered, or in the kernel) is still
            // answered, with `Connection: close`; otherwise close now.
            let wait = if self.shared.shutdown.load(Ordering::Acquire) {
                SHUTDOWN_GRACE
            } else if first {
                limits.read_timeout
            } else {
                limits.idle_timeout
            };
            first = false;
            match self.read_request(wait) {
                Ok((head, body)) => {
                    if !self.answer(head, body) {
                        return;
                    }
                }
                Err(ReadFailure::Close) => return,
                Err(ReadFailure::Refuse(e)) => {
                    tracing::debug!(peer = %self.peer, status = e.status(), "http request refused: {e}");
                    let resp = Response::text(e.status(), e.to_string());
                    if self.send(&resp, false, Some("close")) {
                        self.linger_close();
                    }
                    return;
                }
            }
        }
    }

    /// Reads one whole request: waits up to `wait` for its first byte, then gives the whole
    /// request `read_timeout` from that moment.
    fn read_request(&mut self, wait: Duration) -> Result<(Head, Vec<u8>), ReadFailure> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == 0 {
            let n = read_with_timeout(&mut self.stream, &mut self.buf, wait).map_err(|e| {
                if !is_timeout(&e) {
                    tracing::debug!(peer = %self.peer, "http read failed: {e}");
                }
                ReadFailure::Close
            })?;
            if n == 0 {
                return Err(ReadFailure::Close);
            }
            self.end = n;
        }
        let read_timeout = self.shared.limits.read_timeout;
        let deadline = Instant::now() + read_timeout;

        // The head. Parsing starts over on each attempt, so only attempt it when a read brought a
        // new line (a head can only complete, or a line go wrong, then), on the first bytes (to
        // refuse binary garbage at once) and once the buffer reaches the head limit.
        let max_head = self.shared.limits.max_head_bytes;
        let mut attempt = true;
        let head = loop {
            if attempt {
                if let Some(head) = parse_head(&self.buf[..self.end], &self.shared.limits)? {
                    break head;
                }
            }
            if self.end >= self.buf.len() {
                return Err(RequestError::HeadTooLarge(max_head).into());
            }
            let chunk = self.end..self.end + self.read_until(deadline, Target::Buf(self.end))?;
            self.end = chunk.end;
            attempt = self.buf[chunk].contains(&b'\n') || self.end >= max_head;
        };
        self.start = head.len;

        // The body: what is already buffered, then read straight into the body, never past it.
        let len = head.content_length;
        let buffered = (self.end - self.start).min(len);
        let mut body = Vec::with_capacity(len);
        body.extend_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        if body.len() < len {
            if head.expect_continue && !self.write_all(b"HTTP/1.1 100 Continue\r\n\r\n") {
                return Err(ReadFailure::Close);
            }
            let mut filled = body.len();
            body.resize(len, 0);
            while filled < len {
                filled += self.read_until(deadline, Target::Body(&mut body[filled..]))?;
            }
        }
        Ok((head, body))
    }

    /// One read before `deadline`; a timeout is a 408, end of stream or an error a silent close.
    fn read_until(&mut self, deadline: Instant, target: Target<'_>) -> Result<usize, ReadFailure> {
        let read_timeout = self.shared.limits.read_timeout;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Timeout(read_timeout).into());
        }
        let dst = match target {
            Target::Buf(from) => &mut self.buf[from..],
            Target::Body(b) => b,
        };
        match read_with_timeout(&mut self.stream, dst, left) {
            Ok(0) => Err(ReadFailure::Close),
            Ok(n) => Ok(n),
            Err(e) if is_timeout(&e) => Err(RequestError::Timeout(read_timeout).into()),
            Err(e) => {
                tracing::debug!(peer = %self.peer, "http read failed: {e}");
                Err(ReadFailure::Close)
            }
        }
    }

    /// Answers a complete request. Returns whether to keep the connection open.
    fn answer(&mut self, head: Head, body: Vec<u8>) -> bool {
        let head_only = head.method == "HEAD";
        let mut keep_alive = head.keep_alive;
        let version_minor = head.version_minor;
        let req = head.into_request(body, self.peer);

        let mut resp = if self.shared.draining.load(Ordering::Acquire) {
            keep_alive = false;
            Response::text(503, "server is draining, retry later").header("Retry-After", "5")
        } else {
            self.call_handler(&req)
        };
        if !(100..=999).contains(&resp.status) {
            tracing::error!(status = resp.status, target = %req.target(), "handler returned an invalid status");
            resp = Response::text(500, "internal server error: invalid status");
        }
        if resp.wants_close() || self.shared.shutdown.load(Ordering::Acquire) {
            keep_alive = false;
        }
        let connection = match (keep_alive, version_minor) {
            (false, _) => Some("close"),
            (true, 0) => Some("keep-alive"),
            (true, _) => None,
        };
        if !self.send(&resp, head_only, connection) {
            return false;
        }
        if !keep_alive {
            self.linger_close();
        }
        keep_alive
    }

    fn call_handler(&self, req: &Request) -> Response {
        let handler = &self.shared.handler;
        match catch_unwind(AssertUnwindSafe(|| handler.handle(req))) {
            Ok(resp) => resp,
            Err(payload) => {
                tracing::error!(
                    peer = %self.peer,
                    method = %req.method,
                    target = %req.target(),
                    "http handler panicked: {}",
                    panic_message(payload.as_ref())
                );
                Response::text(500, "internal server error")
            }
        }
    }

    /// Serializes and writes a response. Returns false if the connection is unusable.
    fn send(&mut self, resp: &Response, head_only: bool, connection: Option<&str>) -> bool {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        resp.write_to(&mut out, head_only, connection);
        let ok = self.write_all(&out);
        // Keep a modest buffer for the next response, not the largest one ever sent.
        if out.capacity() <= 64 * 1024 {
            self.out = out;
        }
        ok
    }

    fn write_all(&mut self, bytes: &[u8]) -> bool {
        match self.stream.write_all(bytes).and_then(|()| self.stream.flush()) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(peer = %self.peer, "http write failed: {e}");
                false
            }
        }
    }

    /// Closes after a final response: FIN first, then read and discard whatever the peer still
    /// sends (bounded in time and bytes) so that unread data does not make the kernel answer
    /// with a reset, which could destroy the response before the client has read it.
    fn linger_close(&mut self) {
        if self.stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        let deadline = Instant::now() + LINGER_TIME.min(self.shared.limits.read_timeout);
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match read_with_timeout(&mut self.stream, &mut self.buf, left) {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    }
}

/// Where `Conn::read_until` reads into.
enum Target<'a> {
    /// The connection buffer, from this offset.
    Buf(usize),
    /// The body being filled.
    Body(&'a mut [u8]),
}

fn read_with_timeout(
    stream: &mut TcpStream,
    dst: &mut [u8],
    timeout: Duration,
) -> io::Result<usize> {
    // `set_read_timeout` refuses a zero duration.
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    loop {
        match stream.read(dst) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}
