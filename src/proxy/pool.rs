//! Idle slots: the structure the request path takes workers from, built so a request never waits
//! on the master task. A request takes an idle slot if there is one; otherwise it queues (FIFO, up
//! to `queue` waiters, then 503). A returned slot goes straight to the oldest waiter. There is no
//! round robin: a sync worker has exactly one slot, so a slow request never has a fast one queued
//! behind it on the same worker while another worker sits idle.
//!
//! Pipelining (`[workers] pipeline` > 1): a single-threaded worker then has more than one slot.
//! A slot of a worker that is already busy is handed out only when no worker is idle and that
//! worker has been fast ([`WorkerInfo::is_fast`]); the request then waits in the worker's socket
//! instead of in this queue, which saves the worker a wake-up between requests.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::worker::{Slot, WorkerId, WorkerInfo};

/// Why no slot could be had.
#[derive(Debug, PartialEq, Eq)]
pub enum AcquireError {
    /// `queue` requests are already waiting.
    QueueFull,
    /// The pool is shut down.
    Closed,
}

/// Why a queued request stopped waiting without a slot ([`IdlePool::acquire_watched`]).
#[derive(Debug, PartialEq, Eq)]
pub enum QueueExit {
    Pool(AcquireError),
    /// Its client closed the connection.
    ClientGone,
    /// No slot within the request's timeout.
    TimedOut,
}

/// How often a request waiting in the queue checks on its client and its time limit.
pub const QUEUE_CHECK: Duration = Duration::from_millis(500);

struct Inner {
    /// Idle slots, most recently returned last (taken first: its worker is warm).
    idle: Vec<Slot>,
    waiters: VecDeque<oneshot::Sender<Slot>>,
    queue_limit: usize,
    closed: bool,
}

/// The pool of idle slots.
pub struct IdlePool {
    inner: Mutex<Inner>,
}

impl IdlePool {
    pub fn new(queue_limit: usize) -> Self {
        IdlePool {
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                waiters: VecDeque::new(),
                queue_limit,
                closed: false,
            }),
        }
    }

    /// Whether a slot of `w` may be handed out now: its worker is idle, or busy but fast (or its
    /// slots are threads, not pipelining).
    fn eligible(w: &WorkerInfo) -> bool {
        !w.is_pipelined() || w.busy() == 0 || w.is_fast()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (plain pushes and pops).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an idle slot, waiting in the queue if none is idle.
    pub async fn acquire(&self) -> Result<Slot, AcquireError> {
        self.acquire_timed().await.map(|(slot, _)| slot)
    }

    /// Like [`acquire`](Self::acquire); also says how long the request waited in the queue (None:
    /// a slot was free at once, and no clock was read).
    pub async fn acquire_timed(&self) -> Result<(Slot, Option<Duration>), AcquireError> {
        let rx = {
            let mut retired = Vec::new();
            let mut g = self.lock();
            // Most recently returned first (its worker is warm): an idle worker's slot if there is
            // one, else a slot of a busy worker that is fast.
            let mut pick = None;
            let mut i = g.idle.len();
            while i > 0 {
                i -= 1;
                let w = &g.idle[i].worker;
                if w.is_retiring() {
                    retired.push(g.idle.remove(i));
                    pick = pick.map(|p: usize| p - 1);
                    continue;
                }
                if w.busy() == 0 || !w.is_pipelined() {
                    // (threads and command connections: any idle slot, most recent first)
                    pick = Some(i);
                    break;
                }
                if pick.is_none() && w.is_fast() {
                    pick = Some(i);
                }
            }
            if let Some(i) = pick {
                let mut slot = g.idle.remove(i);
                slot.mark_taken();
                drop(g);
                drop(retired);
                return Ok((slot, None));
            }
            if g.closed {
                return Err(AcquireError::Closed);
            }
            if g.waiters.len() >= g.queue_limit {
                g.waiters.retain(|w| !w.is_closed());
                if g.waiters.len() >= g.queue_limit {
                    return Err(AcquireError::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            g.waiters.push_back(tx);
            rx
        };
        let since = Instant::now();
        Waiting { rx, pool: self }
            .await
            .map(|slot| (slot, Some(since.elapsed())))
    }

    /// [`acquire_timed`](Self::acquire_timed), watched while the request waits in the queue:
    /// every [`QUEUE_CHECK`] the client is checked (`client_gone`: a client that left does not
    /// keep its place, and with it a place other clients could have, until a worker frees up),
    /// and the wait ends after `limit()` (the request's timeout: a queue that does not move, say
    /// with no worker left, answers instead of holding the client for ever). A slot that is free
    /// at once is taken without a timer.
    pub async fn acquire_watched(
        &self,
        limit: impl FnOnce() -> Duration,
        client_gone: impl Fn() -> bool,
    ) -> Result<(Slot, Option<Duration>), QueueExit> {
        let mut wait = std::pin::pin!(self.acquire_timed());
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match wait.as_mut().poll(cx) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        if let Some(r) = first {
            return r.map_err(QueueExit::Pool);
        }
        let until = tokio::time::Instant::now() + limit();
        loop {
            let tick = (tokio::time::Instant::now() + QUEUE_CHECK).min(until);
            if let Ok(r) = tokio::time::timeout_at(tick, wait.as_mut()).await {
                return r.map_err(QueueExit::Pool);
            }
            if client_gone() {
                return Err(QueueExit::ClientGone);
            }
            if tokio::time::Instant::now() >= until {
                return Err(QueueExit::TimedOut);
            }
        }
    }

    /// Gives a slot back: to the oldest waiter, or to the idle set. Slots of retiring workers are dropped.
    pub fn release(&self, slot: Slot) {
        if slot.worker.is_retiring() {
            return;
        }
        let mut slot = slot;
        slot.mark_idle();
        let mut g = self.lock();
        if Self::eligible(&slot.worker) {
            while let Some(w) = g.waiters.pop_front() {
                slot.mark_taken();
                match w.send(slot) {
                    Ok(()) => return,
                    Err(mut back) => {
                        back.mark_idle();
                        slot = back;
                    }
                }
            }
        }
        g.idle.push(slot);
    }

    /// Adds the slots of a worker that became ready.
    pub fn add(&self, slots: Vec<Slot>) {
        for s in slots {
            self.release(s);
        }
    }

    /// Removes the idle slots of one worker (it is retiring or gone).
    pub fn purge(&self, id: WorkerId) {
        let removed: Vec<Slot> = {
            let mut g = self.lock();
            let (gone, keep): (Vec<Slot>, Vec<Slot>) =
                g.idle.drain(..).partition(|s| s.worker.id == id);
            g.idle = keep;
            gone
        };
        drop(removed);
    }

    /// Takes one idle slot of worker `id` if the worker is entirely idle (for a health probe: a
    /// worker busy with a request is never probed, even through a spare pipelining slot).
    pub fn take_idle_of(&self, id: WorkerId) -> Option<Slot> {
        let mut g = self.lock();
        let pos = g.idle.iter().position(|s| {
            s.worker.id == id && (s.worker.busy() == 0 || !s.worker.is_pipelined())
        })?;
        let mut slot = g.idle.swap_remove(pos);
        slot.mark_taken();
        Some(slot)
    }

    pub fn set_queue_limit(&self, n: usize) {
        self.lock().queue_limit = n;
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Refuses new waiters and fails the queued ones; drops idle slots.
    pub fn close(&self) {
        let (idle, waiters) = {
            let mut g = self.lock();
            g.closed = true;
            (std::mem::take(&mut g.idle), std::mem::take(&mut g.waiters))
        };
        drop(idle);
        drop(waiters);
    }
}

/// A queued request's receiver. If the request is cancelled (client gone) after a slot was already
/// handed to it, the slot goes back to the pool instead of being lost.
struct Waiting<'a> {
    rx: oneshot::Receiver<Slot>,
    pool: &'a IdlePool,
}

impl std::future::Future for Waiting<'_> {
    type Output = Result<Slot, AcquireError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| AcquireError::Closed))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(slot) = self.rx.try_recv() {
            self.pool.release(slot);
        }
    }
}

/// Holds a slot across awaits: if the request is cancelled, the slot goes back to the pool
/// (without its connection, whose state is then unknown).
pub struct SlotHold<'a> {
    pool: &'a IdlePool,
    slot: Option<Slot>,
}

impl<'a> SlotHold<'a> {
    pub fn new(pool: &'a IdlePool, slot: Slot) -> Self {
        SlotHold {
            pool,
            slot: Some(slot),
        }
    }
    pub fn get(&mut self) -> &mut Slot {
        self.slot.as_mut().expect("slot present until taken")
    }
    /// Disarms the guard.
    pub fn take(mut self) -> Slot {
        self.slot.take().expect("slot present until taken")
    }
}

impl Drop for SlotHold<'_> {
    fn drop(&mut self) {
        if let Some(mut s) = self.slot.take() {
            s.conn = None;
            self.pool.release(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{WorkerAddr, WorkerInfo};
    use std::sync::Arc;
    use std::time::Duration;

    fn worker(
        id: u64,
    ) -> (
        Arc<WorkerInfo>,
        tokio::sync::mpsc::UnboundedReceiver<crate::event::Event>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new(WorkerInfo::new(
                id,
                1,
                WorkerAddr::Unix("/nonexistent".into()),
                Duration::from_secs(1),
                0,
                tx,
            )),
            rx,
        )
    }

    #[tokio::test]
    async fn waiter_gets_released_slot_fifo_and_queue_bound() {
        let pool = Arc::new(IdlePool::new(1));
        let (w, _rx) = worker(1);
        pool.add(w.make_slots(1));
        let s = pool.acquire().await.unwrap();
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.acquire().await.map(|s| s.worker.id) });
        while pool.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.acquire().await.err(), Some(AcquireError::QueueFull));
        pool.release(s);
        assert_eq!(waiter.await.unwrap(), Ok(1));
    }

    #[tokio::test]
    async fn retiring_worker_slots_are_skipped_and_drained_event_sent() {
        let pool = IdlePool::new(4);
        let (w1, mut rx1) = worker(1);
        let (w2, _rx2) = worker(2);
        pool.add(w1.make_slots(1));
        pool.add(w2.make_slots(1));
        assert!(!w1.retire());
        let s = pool.acquire().await.unwrap();
        assert_eq!(s.worker.id, 2);
        pool.purge(1);
        assert!(matches!(
            rx1.try_recv(),
            Ok(crate::event::Event::WorkerDrained { id: 1 })
        ));
    }

    #[tokio::test]
    async fn busy_worker_slot_only_when_no_worker_is_idle_and_it_is_fast() {
        let pool = Arc::new(IdlePool::new(8));
        let (a, _ra) = worker(1);
        let (b, _rb) = worker(2);
        let a = Arc::new(Arc::into_inner(a).unwrap().with_pipelining(true));
        let b = Arc::new(Arc::into_inner(b).unwrap().with_pipelining(true));
        pool.add(a.make_slots(2));
        pool.add(b.make_slots(2));
        // No service time known yet: not fast.
        let s1 = pool.acquire().await.unwrap();
        let s2 = pool.acquire().await.unwrap();
        assert_ne!(s1.worker.id, s2.worker.id, "an idle worker first");
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.acquire().await.map(|s| s.worker.id) });
        while pool.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // Both busy and of unknown speed: the third request waits in the queue.
        assert!(!waiter.is_finished());
        // Worker of s1 is fast now; its spare slot may be used (the waiter gets it on release
        // of that worker's busy slot, or a new request takes the spare one).
        s1.worker.record_service(Duration::from_micros(100));
        s2.worker.record_service(Duration::from_millis(50));
        let fast_id = s1.worker.id;
        pool.release(s1);
        assert_eq!(waiter.await.unwrap(), Ok(fast_id));
        let s3 = pool.acquire().await.unwrap();
        assert_eq!(
            s3.worker.id, fast_id,
            "the slow worker's spare slot is never used"
        );
        // A health probe never takes a spare slot of a busy worker.
        assert!(pool.take_idle_of(s2.worker.id).is_none());
    }
}
