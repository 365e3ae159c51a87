//! A shard's inbox: two crossbeam queues plus a doorbell (an `AtomicWaker`) that wakes the
//! shard's task from any thread. glommio's own channels panic when used from a thread that is
//! not a glommio executor, so the control plane reaches shards through this.
//!
//! Two lanes, so that a SIP flood can never push out the control plane's answers:
//! * **control** (plans, releases, rechecks, drain, stop): unbounded, read first. Every message
//!   on it answers a request the shard itself made (a plan or status check per call at a time,
//!   a release per stream) or is a rare command, so its length is bounded by the shard's calls
//!   (`SHARD_MAX_CALLS`), not by anything a peer sends; a reply is never dropped.
//! * **sip** (datagrams other shards received for a Call-ID this shard owns): bounded; a full
//!   lane is [`SendError::Overloaded`] and the datagram is dropped (the sender retransmits).
//!
//! The sender never blocks. The receiving side is a future that registers the shard task's
//! waker, marks itself as possibly parking, and then looks at the queues; a sender rings only
//! a receiver so marked (see `Doorbell::parked` for why that matters with glommio), and the
//! order of the two marks means a message sent around the look still rings the bell.

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

/// How many forwarded SIP datagrams may wait in one shard's inbox: a carrier trunk (or the
/// Kamailio in front) sends from one address, so one shard's socket receives everything and
/// forwards half of it; at 15,000 calls/s that is about 40,000 datagrams a second, and a
/// shard descheduled for 100 ms on a busy box (4 runnable threads on 2 cores) must find them
/// still queued, not dropped. 1,024 (the first value) overflowed in such stalls and the
/// retransmissions that followed collapsed the call rate (docs/PERFORMANCE.md, carrier scale).
pub(crate) const INBOX_CAPACITY: usize = 16_384;

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
    /// When the kernel received it (on the receiving shard's clock, which is the process's):
    /// the owner's admission reads how long it waited, socket and inbox together.
    pub(crate) arrived: std::time::Instant,
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
    /// Set by the receiver when it found both queues empty (it may park), cleared by the
    /// sender that rings for it: a sender rings only a receiver that may be asleep.
    ///
    /// Why not ring on every send: a glommio waker woken from another thread queues a clone
    /// of itself (an `i16` reference count) for the owning executor, which releases them only
    /// when its reactor runs. A shard busy with a backlog re-registered its waker on every
    /// poll and every forwarded datagram queued one more clone: at 36,000 calls/s asked the
    /// count passed 32,767 and glommio panicked the receiving shard ("Waker invariant broken",
    /// `glommio-0.9.0/src/task/raw.rs:270`), failing 71,699 calls. With this flag a receiver
    /// that has messages to read is never woken from outside, and one that found nothing is
    /// woken once; the shard's loop also clears it when another of its futures is ready, so
    /// that a ring always finds a task that returned `Pending` (whose executor then drops
    /// the queued clone before polling it again): at most one foreign wake is queued.
    parked: AtomicBool,
    /// Stop requested out of band, so that shutting down works even with a full queue.
    stop: AtomicBool,
}

impl Doorbell {
    /// After a message was queued: wakes the receiver if it may be parked.
    fn ring(&self) {
        // SeqCst pairs with the receiver's store of `parked` before it looks at the queues
        // (Dekker): either it sees this message, or this load sees `parked` and rings.
        if self.parked.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

/// The sending half, held by the engine (and later by anything that answers a shard).
#[derive(Debug, Clone)]
pub(crate) struct InboxSender {
    control: Sender<ShardMsg>,
    sip: Sender<ShardMsg>,
    doorbell: Arc<Doorbell>,
}

/// The receiving half, owned by the shard.
#[derive(Debug)]
pub(crate) struct Inbox {
    control: Receiver<ShardMsg>,
    sip: Receiver<ShardMsg>,
    doorbell: Arc<Doorbell>,
}

/// An inbox whose SIP lane holds `sip_capacity` datagrams.
pub(crate) fn inbox(sip_capacity: usize) -> (InboxSender, Inbox) {
    let (control_tx, control_rx) = crossbeam_channel::unbounded();
    let (sip_tx, sip_rx) = crossbeam_channel::bounded(sip_capacity);
    let doorbell = Arc::new(Doorbell::default());
    (
        InboxSender { control: control_tx, sip: sip_tx, doorbell: doorbell.clone() },
        Inbox { control: control_rx, sip: sip_rx, doorbell },
    )
}

impl InboxSender {
    /// Queues `msg` on its lane and rings the doorbell; never blocks. Only a forwarded
    /// datagram can be refused as [`SendError::Overloaded`].
    pub(crate) fn send(&self, msg: ShardMsg) -> Result<(), SendError> {
        let lane = if matches!(msg, ShardMsg::Sip(_)) { &self.sip } else { &self.control };
        match lane.try_send(msg) {
            Ok(()) => {
                self.doorbell.ring();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(SendError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(SendError::Stopped),
        }
    }

    /// Asks the shard to stop ahead of anything queued; works when the queue is full.
    pub(crate) fn request_stop(&self) {
        self.doorbell.stop.store(true, Ordering::SeqCst);
        self.doorbell.ring();
    }
}

impl Inbox {
    /// The next message. A stop request, or every sender gone, reads as [`ShardMsg::Stop`].
    #[cfg(test)]
    pub(crate) async fn next(&self) -> ShardMsg {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Datagrams waiting on the SIP lane (overload admission reads it).
    pub(crate) fn sip_depth(&self) -> usize {
        self.sip.len()
    }

    /// Polls for the next message, registering `cx`'s waker with the doorbell. Nothing is
    /// lost when the caller stops polling: the message stays queued.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<ShardMsg> {
        // Register, then say "may park", then look: a send racing with this poll either is
        // seen by the look or sees `parked` and rings (see `Doorbell::ring`).
        self.doorbell.waker.register(cx.waker());
        self.doorbell.parked.store(true, Ordering::SeqCst);
        let next = if self.doorbell.stop.load(Ordering::SeqCst) {
            Some(ShardMsg::Stop)
        } else {
            self.try_next()
        };
        match next {
            Some(msg) => {
                // Not parking: senders need not ring (a ring already taken is harmless: the
                // loop polls once more and finds the queues as they are).
                self.doorbell.parked.store(false, Ordering::SeqCst);
                Poll::Ready(msg)
            }
            None => Poll::Pending,
        }
    }

    /// The receiver found its queues empty but will not park after all (another of its
    /// futures is ready): senders need not ring until it looks again.
    pub(crate) fn not_parking(&self) {
        self.doorbell.parked.store(false, Ordering::SeqCst);
    }

    /// The next queued message, control lane first; a lane whose senders are all gone reads
    /// as [`ShardMsg::Stop`].
    fn try_next(&self) -> Option<ShardMsg> {
        // The control plane's answers first: they move calls on; datagrams can wait.
        match self.control.try_recv() {
            Ok(msg) => return Some(msg),
            Err(TryRecvError::Disconnected) => return Some(ShardMsg::Stop),
            Err(TryRecvError::Empty) => {}
        }
        match self.sip.try_recv() {
            Ok(msg) => Some(msg),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(ShardMsg::Stop),
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

    fn datagram() -> ShardMsg {
        ShardMsg::Sip(ForwardedDatagram {
            from: "127.0.0.1:5060".parse().unwrap(),
            data: Box::new([]),
            arrived: std::time::Instant::now(),
        })
    }

    #[test]
    fn a_full_sip_lane_is_overloaded_and_the_control_lane_still_delivers_first() {
        let (tx, rx) = inbox(INBOX_CAPACITY);
        for _ in 0..INBOX_CAPACITY {
            tx.send(datagram()).unwrap();
        }
        assert_eq!(tx.send(datagram()), Err(SendError::Overloaded));
        // A flood of forwarded datagrams cannot push out the control plane's answers.
        tx.send(ShardMsg::Drain).unwrap();
        tx.send(ShardMsg::Drain).unwrap();
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Drain)));
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Drain)));
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Sip(_))));
    }

    /// Unparks the receiving thread, as an executor's waker wakes its task.
    struct Unpark(thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    #[test]
    fn a_parked_receiver_is_always_woken_for_the_next_message() {
        // Two senders push bursts, and after every few messages wait until the receiver has
        // parked again (or a deadline passes: the other sender may keep it busy), so that
        // sends race with parking. A lost wake-up would leave the receiver parked with
        // messages queued: the park's timeout catches that.
        const PER_SENDER: usize = 20_000;
        let (tx, rx) = inbox(64);
        let parks = Arc::new(AtomicUsize::new(0));
        let senders: Vec<_> = (0..2)
            .map(|s| {
                let tx = tx.clone();
                let parks = parks.clone();
                thread::spawn(move || {
                    let mut sent = 0;
                    while sent < PER_SENDER {
                        let burst = 1 + (sent * 7 + s) % 13;
                        for _ in 0..burst.min(PER_SENDER - sent) {
                            while tx.send(datagram()).is_err() {
                                thread::yield_now();
                            }
                            sent += 1;
                        }
                        if sent % 5 == 0 {
                            let seen = parks.load(Ordering::SeqCst);
                            let deadline =
                                std::time::Instant::now() + std::time::Duration::from_millis(20);
                            while parks.load(Ordering::SeqCst) == seen
                                && std::time::Instant::now() < deadline
                            {
                                thread::yield_now();
                            }
                        }
                    }
                })
            })
            .collect();
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut got = 0;
        while got < 2 * PER_SENDER {
            match poll_once(&rx, &waker) {
                Poll::Ready(ShardMsg::Sip(_)) => got += 1,
                Poll::Ready(other) => panic!("unexpected {other:?}"),
                Poll::Pending => {
                    parks.fetch_add(1, Ordering::SeqCst);
                    let parked = std::time::Instant::now();
                    thread::park_timeout(std::time::Duration::from_secs(5));
                    assert!(
                        parked.elapsed() < std::time::Duration::from_secs(5) || rx.sip_depth() == 0,
                        "parked with {} messages queued after {got}: a lost wake-up",
                        rx.sip_depth()
                    );
                }
            }
        }
        for s in senders {
            s.join().unwrap();
        }
        drop(tx);
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
    fn only_a_receiver_that_found_nothing_is_woken_and_only_once() {
        let (tx, rx) = inbox(INBOX_CAPACITY);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        // Found nothing: may park. A burst of sends wakes it once (a glommio waker woken
        // from another thread queues a reference each time: they must not pile up).
        assert!(poll_once(&rx, &waker).is_pending());
        for _ in 0..1000 {
            tx.send(datagram()).unwrap();
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        // Busy with a backlog: every poll finds a message, and no send wakes it.
        for _ in 0..500 {
            assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Sip(_))));
            tx.send(datagram()).unwrap();
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "no wake while it has work");
        // Drained, it may park again: the next send wakes it, once more.
        while poll_once(&rx, &waker).is_ready() {}
        tx.send(ShardMsg::Drain).unwrap();
        tx.send(ShardMsg::Drain).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Drain)));
        // Found nothing, but went on with other work instead of parking: no ring either; the
        // message is there at the next look.
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Drain)));
        assert!(poll_once(&rx, &waker).is_pending());
        rx.not_parking();
        tx.send(ShardMsg::Drain).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(matches!(poll_once(&rx, &waker), Poll::Ready(ShardMsg::Drain)));
    }

    #[test]
    fn stop_request_overtakes_a_full_queue() {
        let (tx, rx) = inbox(1);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        assert!(poll_once(&rx, &waker).is_pending());
        tx.send(datagram()).unwrap();
        assert_eq!(tx.send(datagram()), Err(SendError::Overloaded));
        tx.request_stop();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "one registration, one wake");
        // The stop is read before the queued datagram.
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
