//! The agent leg's I/O: one WebSocket client per bridged call, a task on the owning shard.
//!
//! The task connects (TCP to the address the control plane resolved, TLS for `wss://` with
//! rustls, then the WebSocket handshake), reports `Open`, and then runs two halves on the one
//! task: the reader hands every text frame to the call flow at once (through the `deliver`
//! callback, which borrows the shard's core between awaits only) and yields after each, so a
//! flooding agent cannot hold the executor; the writer sends what the flow queued in the
//! call's [`Outbox`]. The outbox is bounded: a stalled agent (TCP window closed) fills it and
//! its frames are dropped and counted, never buffered without limit and never blocking the
//! shard. Closing the outbox makes the writer send a close frame (1000) within a bounded time
//! and end the task.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use futures_rustls::rustls;
use futures_util::StreamExt;
use futures_util::io::{AsyncRead, AsyncWrite};
use precall_call::AgentTarget;

/// Frames waiting for the agent at most (about 3 s of 40 ms audio chunks).
pub(crate) const OUTBOX_LIMIT: usize = 80;

/// tungstenite's read chunk for the agent socket (see [`run`]).
const AGENT_READ_BUFFER: usize = 16 * 1024;

/// Longest a close takes before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the agent leg reports to the call flow.
#[derive(Debug)]
pub(crate) enum AgentInput<'a> {
    /// The WebSocket is open.
    Open,
    /// One text frame.
    Text(&'a str),
    /// The agent closed (its close code, if it sent a close frame).
    Closed(Option<u16>, &'a str),
    /// Connecting failed, or the socket broke.
    Failed(&'a str),
}

/// Frames the flow queued for the agent, and the writer's waker.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: RefCell<VecDeque<String>>,
    waker: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

impl Outbox {
    /// Queues `msg`; `false` (and the message dropped) when the queue is full.
    pub(crate) fn push(&self, msg: String) -> bool {
        let mut q = self.queue.borrow_mut();
        if q.len() >= OUTBOX_LIMIT {
            return false;
        }
        q.push_back(msg);
        drop(q);
        self.wake();
        true
    }

    /// No more frames: the writer sends the close frame.
    pub(crate) fn close(&self) {
        self.closed.set(true);
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<String>> {
        if let Some(msg) = self.queue.borrow_mut().pop_front() {
            return Poll::Ready(Some(msg));
        }
        if self.closed.get() {
            return Poll::Ready(None);
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

async fn open(
    target: &AgentTarget,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Io>, String> {
    let tcp = glommio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return Ok(Box::new(tcp));
    }
    let Some(cfg) = tls else {
        return Err("wss:// without a TLS configuration".to_owned());
    };
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| format!("TLS server name {:?}: {e}", target.host))?;
    let stream = futures_rustls::TlsConnector::from(Arc::clone(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}: {e}", target.host))?;
    Ok(Box::new(stream))
}

/// The whole life of one agent leg. `deliver` is called with each happening; it must not
/// block (it runs the call flow and returns).
pub(crate) async fn run(
    target: AgentTarget,
    tls: Option<Arc<rustls::ClientConfig>>,
    outbox: Rc<Outbox>,
    mut deliver: impl FnMut(Instant, AgentInput<'_>),
) {
    let stream = match open(&target, tls.as_ref()).await {
        Ok(s) => s,
        Err(e) => return deliver(Instant::now(), AgentInput::Failed(&e)),
    };
    // tungstenite zeroes `read_buffer_size` bytes before every read (128 KiB by default, also
    // for a read that finds nothing): 16 KiB holds a typical agent message and costs an eighth.
    let cfg = WebSocketConfig::default().read_buffer_size(AGENT_READ_BUFFER);
    let ws =
        match async_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(cfg))
            .await
        {
            Ok((ws, _response)) => ws,
            Err(e) => {
                let e = format!("WebSocket handshake: {e}");
                return deliver(Instant::now(), AgentInput::Failed(&e));
            }
        };
    deliver(Instant::now(), AgentInput::Open);
    let (mut sink, mut stream) = ws.split();
    let deliver = RefCell::new(deliver);
    let reader = async {
        loop {
            let msg = stream.next().await;
            let now = Instant::now();
            let done = {
                let mut deliver = deliver.borrow_mut();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        deliver(now, AgentInput::Text(text.as_str()));
                        false
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, why) = frame.map_or((None, String::new()), |f| {
                            (Some(u16::from(f.code)), f.reason.as_str().to_owned())
                        });
                        deliver(now, AgentInput::Closed(code, &why));
                        true
                    }
                    // Pings are answered by tungstenite itself; binary frames are not part of
                    // the protocol and are ignored.
                    Some(Ok(_)) => false,
                    Some(Err(e)) => {
                        let e = format!("agent socket: {e}");
                        deliver(now, AgentInput::Failed(&e));
                        true
                    }
                    None => {
                        deliver(now, AgentInput::Closed(None, "connection closed"));
                        true
                    }
                }
            };
            if done {
                return;
            }
            // Let the shard's other tasks (the media clock) run before the next frame.
            futures_lite::future::yield_now().await;
        }
    };
    let writer = async {
        if let Err(e) = write_outbox(&mut sink, &outbox).await {
            let e = format!("sending to the agent: {e}");
            (deliver.borrow_mut())(Instant::now(), AgentInput::Failed(&e));
        }
    };
    futures_util::future::select(pin!(reader), pin!(writer)).await;
}

/// Sends what `outbox` holds, in order, until it is closed (then a close frame, 1000, within
/// [`CLOSE_TIMEOUT`]) or a send fails. The writer half of every WebSocket the shard runs.
pub(crate) async fn write_outbox<S>(sink: &mut S, outbox: &Outbox) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    use futures_util::SinkExt;
    loop {
        match poll_fn(|cx| outbox.poll_next(cx)).await {
            Some(msg) => sink.send(Message::text(msg)).await?,
            None => {
                let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                let close = pin!(sink.send(Message::Close(Some(frame))));
                let timer = pin!(glommio::timer::sleep(CLOSE_TIMEOUT));
                let _ = futures_util::future::select(close, timer).await;
                return Ok(());
            }
        }
    }
}

/// The TLS client configuration for `wss://` agents: the system's roots plus, when given, the
/// CAs in `extra_ca_pem` (`AGENT_TLS_CA_FILE`, for self-hosted agents and tests).
pub(crate) fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(pem) = extra_ca_pem {
        use rustls::pki_types::pem::PemObject;
        let mut n = 0;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("AGENT_TLS_CA_FILE: {e}"))?;
            roots.add(cert).map_err(|e| format!("AGENT_TLS_CA_FILE: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err("AGENT_TLS_CA_FILE holds no PEM certificate".to_owned());
        }
    } else if added == 0 {
        tracing::warn!("no system CA certificates found: wss:// agents will fail TLS");
    }
    // The provider is named: with more than one rustls provider in the process (reqwest's),
    // the process default is ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
