//! Group commit for the PostgreSQL store: requests of one kind that arrive while every
//! flusher is busy go to the database together, as one statement in one transaction.
//!
//! At most `flushers` batches of a kind are in flight at once. A request that finds a flusher
//! free is sent at once, alone (no added latency when the database keeps up); the ones that
//! arrive meanwhile queue, and the next free flusher takes all of them (up to `most`). So the
//! batches grow with the load, by themselves. Measured on this machine (docs/PERFORMANCE.md):
//! PostgreSQL records about 1.8 times as many inbound calls per second in batches of eight as
//! one per statement, because a statement's fixed costs (its round trip, the backend's wake-up,
//! the executor's start, the commit) are paid once per batch.
//!
//! A flusher is a task of its own, so a request whose caller gives up (a timeout drops its
//! future) never takes the other requests of its batch down with it.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use precall_controller::StoreError;
use tokio::sync::oneshot;

/// A queue of requests `Q` answered with `A`.
pub(crate) struct Batcher<Q, A> {
    state: Mutex<State<Q, A>>,
    flushers: usize,
    most: usize,
}

type Waiter<Q, A> = (Q, oneshot::Sender<Result<A, StoreError>>);

struct State<Q, A> {
    queue: Vec<Waiter<Q, A>>,
    flushing: usize,
}

/// Why a request got no answer: its batch's task ended without one (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("the batch carrying this request ended without an answer")]
struct Dropped;

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// At most `flushers` batches in flight, each of at most `most` requests.
    pub(crate) fn new(flushers: usize, most: usize) -> Self {
        Self {
            state: Mutex::new(State { queue: Vec::new(), flushing: 0 }),
            flushers: flushers.max(1),
            most: most.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<Q, A>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `request` with whatever else is waiting. `run` takes a batch (oldest first) and
    /// answers each of its requests, in order; it is called from a task of the batcher's own.
    pub(crate) async fn submit<R, F>(self: &Arc<Self>, request: Q, run: R) -> Result<A, StoreError>
    where
        R: Fn(Vec<Q>) -> F + Send + 'static,
        F: Future<Output = Vec<Result<A, StoreError>>> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.lock();
            st.queue.push((request, tx));
            let free = st.flushing < self.flushers;
            if free {
                st.flushing += 1;
            }
            free
        };
        if start {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.flush(run).await });
        }
        rx.await.unwrap_or_else(|_| Err(StoreError::Query(Box::new(Dropped))))
    }

    /// Sends batches until the queue is empty.
    async fn flush<R, F>(&self, run: R)
    where
        R: Fn(Vec<Q>) -> F,
        F: Future<Output = Vec<Result<A, StoreError>>>,
    {
        // Counts this flusher out however it ends (a panic in `run` included), so that the
        // next request starts another.
        struct Out<'a, Q, A>(&'a Batcher<Q, A>);
        impl<Q, A> Drop for Out<'_, Q, A> {
            fn drop(&mut self) {
                let mut st = self.0.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                st.flushing = st.flushing.saturating_sub(1);
                // No flusher left for what is queued (this one ended early): fail it now
                // rather than leave it to its caller's deadline.
                if st.flushing == 0 {
                    st.queue.clear();
                }
            }
        }
        let _out = Out(self);
        loop {
            let batch: Vec<Waiter<Q, A>> = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    // Counted out under the same lock that found the queue empty: a request
                    // queued after this sees a free flusher and starts one.
                    st.flushing = st.flushing.saturating_sub(1);
                    std::mem::forget(_out);
                    return;
                }
                // A request whose caller gave up (its deadline passed while it queued: the
                // database hangs) is not sent at all: its caller answered from the outage
                // paths, and the journal replays it.
                st.queue.retain(|(_, tx)| !tx.is_closed());
                let n = st.queue.len().min(self.most);
                st.queue.drain(..n).collect()
            };
            if batch.is_empty() {
                continue;
            }
            let (requests, waiters): (Vec<Q>, Vec<_>) = batch.into_iter().unzip();
            let answers = run(requests).await;
            // One answer per request; a short answer list leaves the rest `Dropped`.
            for (tx, answer) in waiters.into_iter().zip(answers) {
                let _ = tx.send(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn requests_that_queue_behind_a_busy_flusher_go_together() {
        rt().block_on(async {
            let b = Arc::new(Batcher::<u32, u32>::new(1, 64));
            let sizes = Arc::new(Mutex::new(Vec::new()));
            let (release_tx, release_rx) = tokio::sync::watch::channel(false);
            let run = {
                let sizes = Arc::clone(&sizes);
                move |batch: Vec<u32>| {
                    let sizes = Arc::clone(&sizes);
                    let mut release = release_rx.clone();
                    async move {
                        sizes.lock().unwrap().push(batch.len());
                        // The first batch waits until the others are queued.
                        while !*release.borrow() {
                            release.changed().await.unwrap();
                        }
                        batch.into_iter().map(|q| Ok(q * 10)).collect()
                    }
                }
            };
            let first = tokio::spawn({
                let (b, run) = (Arc::clone(&b), run.clone());
                async move { b.submit(1, run).await }
            });
            // Let the first batch start: it holds the only flusher.
            while sizes.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
            let rest: Vec<_> = (2..=5)
                .map(|q| {
                    let (b, run) = (Arc::clone(&b), run.clone());
                    tokio::spawn(async move { b.submit(q, run).await })
                })
                .collect();
            while b.lock().queue.len() < 4 {
                tokio::task::yield_now().await;
            }
            release_tx.send(true).unwrap();
            assert_eq!(first.await.unwrap().unwrap(), 10);
            for (q, h) in (2..=5).zip(rest) {
                assert_eq!(h.await.unwrap().unwrap(), q * 10, "each gets its own answer");
            }
            assert_eq!(*sizes.lock().unwrap(), [1, 4], "alone at first, then the four queued");
            assert_eq!(b.lock().flushing, 0);
        });
    }

    #[test]
    fn a_batch_is_at_most_most_and_a_lost_answer_is_an_error() {
        rt().block_on(async {
            let b = Arc::new(Batcher::<u32, u32>::new(1, 2));
            let calls = Arc::new(AtomicUsize::new(0));
            let run = {
                let calls = Arc::clone(&calls);
                move |batch: Vec<u32>| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Answers all but a request for 3.
                    let answers: Vec<_> = batch.iter().map(|q| Ok(*q)).collect();
                    let keep = if batch.contains(&3) { batch.len() - 1 } else { batch.len() };
                    async move { answers.into_iter().take(keep).collect() }
                }
            };
            let handles: Vec<_> = [1, 2, 4, 3]
                .into_iter()
                .map(|q| {
                    let (b, run) = (Arc::clone(&b), run.clone());
                    tokio::spawn(async move { b.submit(q, run).await })
                })
                .collect();
            let mut got = Vec::new();
            for h in handles {
                got.push(h.await.unwrap().ok());
            }
            assert_eq!(got, [Some(1), Some(2), Some(4), None]);
            assert!(calls.load(Ordering::SeqCst) >= 2, "four requests, batches of two at most");
            assert_eq!(b.lock().flushing, 0);
        });
    }
}
