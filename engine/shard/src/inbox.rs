//! A shard's inbox: a bounded crossbeam queue plus a doorbell (an `AtomicWaker`) that wakes the
//! shard's task from any thread. glommio's own channels panic when used from a thread that is
//! not a glommio executor, so the control plane reaches shards through this.
//!
//! The sender never blocks: a full queue is [`SendError::Overloaded`]. The receiving side is a
//! future that registers the shard task's waker and then looks at the queue; registering first
//! means a message sent between the look and the registration still rings the bell.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use precall_api::{CallId, ControlError};

use crate::call::CallKey;

use crate::control::ShardPlan;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::SendError;

/// How many messages may wait in one shard's inbox.
pub(crate) const INBOX_CAPACITY: usize = 1024;

/// A message for one shard.
#[derive(Debug)]
#[non_exhaustive]
pub enum ShardMsg {
    /// Close the shard's sockets and end its loop.
    Stop,
    /// A SIP datagram that another shard received for a Call-ID this shard owns.
    Sip(ForwardedDatagram),
    /// The control plane's answer about one of this shard's calls (boxed: a plan is large and
    /// rare, the queue's slots stay small).
    Plan(Box<PlanDelivery>),
    /// A media stream's outcome is recorded: the stream may close now.
    Release(StreamRelease),
    /// Stop taking new calls (`503` to INVITE and OPTIONS); the calls already up go on.
    Drain,
    /// These calls' clone job finished: the shard holding any of them checks it at once.
    Recheck(std::sync::Arc<[CallId]>),
    /// Make the shard's loop panic, to test how panics are reported.
    #[cfg(test)]
    PanicForTest,
}

/// A datagram handed from the shard that received it to the shard that owns its Call-ID.
#[derive(Debug)]
pub struct ForwardedDatagram {
    pub(crate) from: SocketAddr,
    pub(crate) data: Box<[u8]>,
}

/// Which question a [`PlanDelivery`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlanKind {
    Inbound,
    Status,
}

/// A plan (or the control plane's error) for one call of the receiving shard.
#[derive(Debug)]
pub struct PlanDelivery {
    pub(crate) call: CallKey,
    pub(crate) call_id: CallId,
    pub(crate) kind: PlanKind,
    pub(crate) result: Result<ShardPlan, ControlError>,
}

/// "The outcome of this stream call is stored" (see `ShardControl::stream_closed`).
#[derive(Debug)]
pub struct StreamRelease {
    pub(crate) call: CallKey,
}

#[derive(Debug, Default)]
struct Doorbell {
    waker: AtomicWaker,
    /// Stop requested out of band, so that shutting down works even with a full queue.
    stop: AtomicBool,
}

/// The sending half, held by the engine (and later by anything that answers a shard).
#[derive(Debug, Clone)]
pub(crate) struct InboxSender {
    tx: Sender<ShardMsg>,
    doorbell: Arc<Doorbell>,
}

/// The receiving half, owned by the shard.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: Receiver<ShardMsg>,
    doorbell: Arc<Doorbell>,
}

pub(crate) fn inbox(capacity: usize) -> (InboxSender, Inbox) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let doorbell = Arc::new(Doorbell::default());
    (InboxSender { tx, doorbell: doorbell.clone() }, Inbox { rx, doorbell })
}

impl InboxSender {
    /// Queues `msg` and rings the doorbell; never blocks.
    pub(crate) fn send(&self, msg: ShardMsg) -> Result<(), SendError> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.doorbell.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(SendError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(SendError::Stopped),
        }
    }

    /// Asks the shard to stop ahead of anything queued; works when the queue is full.
    pub(crate) fn request_stop(&self) {
        self.doorbell.stop.store(true, Ordering::Release);
        self.doorbell.waker.wake();
    }
}

impl Inbox {
    /// The next message. A stop request, or every sender gone, reads as [`ShardMsg::Stop`].
    #[cfg(test)]
    pub(crate) async fn next(&self) -> ShardMsg {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next message, registering `cx`'s waker with the doorbell. Nothing is
    /// lost when the caller stops polling: the message stays queued.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<ShardMsg> {
        // Register before looking, so a send racing with this poll cannot be lost.
        self.doorbell.waker.register(cx.waker());
        if self.doorbell.stop.load(Ordering::Acquire) {
            return Poll::Ready(ShardMsg::Stop);
        }
        match self.rx.try_recv() {
            Ok(msg) => Poll::Ready(msg),
            Err(TryRecvError::Empty) => Poll::Pending,
            Err(TryRecvError::Disconnected) => Poll::Ready(ShardMsg::Stop),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        pin::pin,
        sync::atomic::AtomicUsize,
        task::{Context, Wake, Waker},
        thread,
    };

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_once(inbox: &Inbox, waker: &Waker) -> Poll<ShardMsg> {
        let mut fut = pin!(inbox.next());
        fut.as_mut().poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn full_queue_is_overloaded_not_blocking() {
        let (tx, _rx) = inbox(INBOX_CAPACITY);
        for _ in 0..INBOX_CAPACITY {
            tx.send(ShardMsg::Stop).unwrap();
        }
        assert_eq!(tx.send(ShardMsg::Stop), Err(SendError::Overloaded));
    }

    #[test]
    fn send_after_receiver_dropped_is_stopped() {
        let (tx, rx) = inbox(4);
        drop(rx);
        assert_eq!(tx.send(ShardMsg::Stop), Err(SendError::Stopped));
    }

    #[test]
    fn send_from_another_thread_wakes_the_registered_task() {
        let (tx, rx) = inbox(4);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        assert!(poll_once(&rx, &waker).is_pending());
        thread::spawn(move || tx.send(ShardMsg::Stop).unwrap()).join().unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Stop)));
    }

    #[test]
    fn no_lost_wakeups_under_racing_senders() {
        // Each round: the receiver polls (registering) while another thread sends. Whatever the
        // interleaving, either the poll sees the message or the waker fires afterwards.
        for _ in 0..2_000 {
            let (tx, rx) = inbox(4);
            let counter = Arc::new(CountingWaker::default());
            let waker = Waker::from(counter.clone());
            let sender = thread::spawn(move || {
                tx.send(ShardMsg::Stop).unwrap();
                tx // keep the queue connected
            });
            let got = poll_once(&rx, &waker).is_ready();
            let tx = sender.join().unwrap();
            let woken = counter.0.load(Ordering::SeqCst) > 0;
            assert!(got || woken, "message neither seen nor signalled");
            if !got {
                assert!(poll_once(&rx, &waker).is_ready());
            }
            drop(tx);
        }
    }

    #[test]
    fn stop_request_overtakes_a_full_queue() {
        let (tx, rx) = inbox(1);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        assert!(poll_once(&rx, &waker).is_pending());
        tx.send(ShardMsg::PanicForTest).unwrap();
        assert_eq!(tx.send(ShardMsg::PanicForTest), Err(SendError::Overloaded));
        tx.request_stop();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "one registration, one wake");
        // The stop is read before the queued message.
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Stop)));
    }

    #[test]
    fn all_senders_gone_reads_as_stop() {
        let (tx, rx) = inbox(4);
        drop(tx);
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Stop)));
    }
}
