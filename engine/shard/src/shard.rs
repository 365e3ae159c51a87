//! One shard: what it owns and its run loop. Everything here lives on the shard's executor
//! thread; only [`ShardStats`] and the inbox cross threads.

use std::{
    net::SocketAddr,
    ops::{ControlFlow, RangeInclusive},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use crossbeam_channel::Sender;
use glommio::{Task, net::UdpSocket};

use crate::{EngineError, ShardMsg, health::ShardStats, inbox::Inbox, socket};

/// Largest UDP payload (65,535 minus the 8-byte UDP header, rounded up): a SIP datagram never
/// needs more, so one buffer of this size, allocated once per shard, is never truncating.
const MAX_DATAGRAM: usize = 64 * 1024;

/// Pause after a failed receive, so a socket that keeps failing cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// How long a stopping shard parks so that glommio submits the cancellation of its pending
/// receive (see [`Shard::serve`]); any non-zero pause makes the executor enter the kernel.
const CANCEL_SUBMIT_PAUSE: Duration = Duration::from_micros(100);

/// What a shard says once, right after it starts (or fails to).
#[derive(Debug)]
pub(crate) enum StartReport {
    /// Running; the SIP socket's local address when it has one.
    Started(Option<SocketAddr>),
    /// Could not start; the shard's thread is ending.
    Failed(EngineError),
    /// The shard's future was dropped without running or panicked before reporting (glommio
    /// could not create the executor, for one): join the thread to learn why.
    Vanished,
}

/// Sends the shard's [`StartReport`] exactly once: [`StartReport::Vanished`] if dropped unsent.
#[derive(Debug)]
pub(crate) struct Reporter {
    shard: usize,
    tx: Option<Sender<(usize, StartReport)>>,
}

impl Reporter {
    pub(crate) fn new(shard: usize, tx: Sender<(usize, StartReport)>) -> Self {
        Self { shard, tx: Some(tx) }
    }

    fn report(&mut self, report: StartReport) {
        if let Some(tx) = self.tx.take() {
            // The engine waits for every report; if it is gone, nobody needs this one.
            let _ = tx.send((self.shard, report));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.report(StartReport::Vanished);
    }
}

/// Everything a shard needs, moved onto its thread.
#[derive(Debug)]
pub(crate) struct ShardParams {
    pub(crate) index: usize,
    pub(crate) sip: Option<SocketAddr>,
    pub(crate) recv_buffer_bytes: usize,
    pub(crate) rtp_ports: RangeInclusive<u16>,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) inbox: Inbox,
    pub(crate) reporter: Reporter,
}

/// Marks the shard dead when its loop ends, however it ends (return or panic).
struct AliveGuard(Arc<ShardStats>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.set_alive(false);
    }
}

/// A running shard. It will own its calls, RTP sockets and timers; today it owns the SIP socket.
#[derive(Debug)]
struct Shard {
    index: usize,
    stats: Arc<ShardStats>,
    /// Shared with the receive task; the shard will send replies through it.
    sip: Option<Rc<UdpSocket>>,
    /// The RTP ports this shard allocates from (see [`crate::rtp_port_slice`]).
    rtp_ports: RangeInclusive<u16>,
}

/// The shard's whole life: bind, report, serve until stopped. Runs as the executor's main future.
pub(crate) async fn run(params: ShardParams) {
    let ShardParams { index, sip, recv_buffer_bytes, rtp_ports, stats, inbox, mut reporter } =
        params;
    // Declared first so it drops last: by the time `alive` reads false, the inbox and the
    // socket are gone.
    let _alive = AliveGuard(stats.clone());

    let sip = match sip.map(|addr| bind_sip(index, addr, recv_buffer_bytes)).transpose() {
        Ok(bound) => bound,
        Err(err) => {
            reporter.report(StartReport::Failed(err));
            return;
        }
    };
    let (sip, local) = match sip {
        Some((socket, local)) => (Some(Rc::new(socket)), Some(local)),
        None => (None, None),
    };
    let shard = Shard { index, stats, sip, rtp_ports };
    shard.stats.set_alive(true);
    reporter.report(StartReport::Started(local));
    tracing::debug!(shard = index, rtp_ports = ?shard.rtp_ports, "shard started");

    shard.serve(inbox).await;
    tracing::debug!(shard = index, "shard stopped");
}

fn bind_sip(
    shard: usize,
    addr: SocketAddr,
    recv_buffer_bytes: usize,
) -> Result<(UdpSocket, SocketAddr), EngineError> {
    let bind_error = |source| EngineError::Bind { shard, addr, source };
    let socket = socket::bind_udp(addr, recv_buffer_bytes).map_err(bind_error)?;
    let local = socket.local_addr().map_err(|e| bind_error(e.into()))?;
    Ok((socket, local))
}

impl Shard {
    /// The run loop. Two tasks: this one waits on the inbox doorbell, a second one waits on the
    /// SIP socket. They are separate tasks rather than one `select` because dropping glommio's
    /// in-flight `recv_from` cancels an io_uring request whose datagram may already be taken:
    /// racing it against the inbox would lose datagrams whenever a message arrived.
    async fn serve(self, inbox: Inbox) {
        let receiver: Option<Task<()>> = self.sip.clone().map(|socket| {
            glommio::spawn_local(receive_sip(self.index, socket, self.stats.clone()))
        });
        while self.handle(inbox.next().await).is_continue() {}
        if let Some(task) = receiver {
            // Dropping the task's future cancels its pending io_uring receive, but glommio only
            // queues that cancellation: one trip through the reactor submits it, so the kernel
            // drops the ring's reference to the socket now rather than asynchronously after the
            // ring closes (which left the port busy for a moment after `shutdown` in about 1 run
            // in 6). Our own handle goes with `self`, closing the socket.
            task.cancel().await;
            glommio::timer::sleep(CANCEL_SUBMIT_PAUSE).await;
        }
        drop(inbox);
    }

    /// Acts on one inbox message; `Break` ends the shard.
    fn handle(&self, msg: ShardMsg) -> ControlFlow<()> {
        match msg {
            ShardMsg::Stop => ControlFlow::Break(()),
            #[cfg(test)]
            ShardMsg::PanicForTest => panic!("shard {} panics as asked", self.index),
        }
    }
}

/// Receives SIP datagrams until cancelled. Handling comes with the SIP layer: for now each
/// datagram is counted and discarded.
async fn receive_sip(shard: usize, socket: Rc<UdpSocket>, stats: Arc<ShardStats>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut failures: u64 = 0;
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((_len, _peer)) => {
                failures = 0;
                stats.datagram_in();
                stats.datagram_dropped();
            }
            Err(err) => {
                failures += 1;
                if failures.is_power_of_two() {
                    let err = std::io::Error::from(err);
                    tracing::warn!(shard, failures, error = %err, "SIP socket receive failed");
                }
                glommio::timer::sleep(RECV_ERROR_BACKOFF).await;
            }
        }
    }
}
