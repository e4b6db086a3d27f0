//! Worker records shared between the master and the proxy, and the request slots the proxy
//! borrows. The master owns the table of workers (see `master`); what the proxy may see of a
//! worker is the [`WorkerInfo`] behind an `Arc`: immutable facts plus a few atomics.
//!
//! A worker offers `slots` (a sync worker one, `threads = N` gives N, a `command` worker
//! `connections`). Each [`Slot`] carries a connection to the worker, so the proxy never waits on
//! the master: it takes an idle slot, uses its connection, and gives it back. The slots of a
//! pipelined worker share one connection, answered in order (see [`lane`]).

pub mod lane;
pub mod protocol;
pub mod spawn;
pub mod warm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::event::Event;
pub use lane::{Lane, WireConn};

/// Worker ids count up from 1 for the life of the master; they are never reused.
pub type WorkerId = u64;

/// Where a worker listens.
#[derive(Debug, Clone)]
pub enum WorkerAddr {
    /// The bundled WSGI worker: a unix socket in the master's private directory.
    Unix(PathBuf),
    /// A `command` worker: plain HTTP on a loopback port.
    Tcp(SocketAddr),
}

/// What the proxy knows of a worker.
#[derive(Debug)]
pub struct WorkerInfo {
    pub id: WorkerId,
    /// The process id; 0 until known (a worker forked by the warm process reports it once it
    /// runs). Set once.
    pid: AtomicU32,
    pub addr: WorkerAddr,
    /// Per-request timeout for this worker's generation.
    pub timeout: Duration,
    /// Requests after which the worker is recycled (0 = never).
    pub budget: u64,
    /// Requests this worker has served.
    pub served: AtomicU64,
    /// Set by the master: give no new requests to this worker; drop its slots as they come back.
    pub retiring: AtomicBool,
    /// Set by the master when it ends the worker whatever it is serving (a stop, or the
    /// SIGKILL past the grace period): a request cut then is not the worker's failure.
    pub cut_by_master: AtomicBool,
    /// Slots of this worker that still exist (idle or in use).
    live_slots: AtomicUsize,
    /// Slots of this worker taken by a request or a probe right now.
    busy: AtomicUsize,
    /// Moving average of its recent service times (request sent → response end), nanoseconds.
    service_ewma_ns: AtomicU64,
    /// When it last finished a request or, idle before, was given one ([`clock_ns`]): a busy
    /// worker that has not finished anything for long is serving a long request right now.
    progress_ns: AtomicU64,
    /// Single-threaded with more slots than threads: a busy worker gets a request ahead only
    /// when it is fast (see the pool).
    pipelined: bool,
    /// A pipelined worker's one connection, shared in order by its slots (see [`lane`]). Weak:
    /// the slots hold it, so it closes when the last slot is gone (a worker told to stop sees
    /// EOF, as with a connection per slot).
    lane: std::sync::Mutex<std::sync::Weak<Lane>>,
    /// Held while that connection is being opened, so a worker never gets two.
    connecting: tokio::sync::Mutex<()>,
    events: UnboundedSender<Event>,
}

impl WorkerInfo {
    pub fn new(
        id: WorkerId,
        pid: u32,
        addr: WorkerAddr,
        timeout: Duration,
        budget: u64,
        events: UnboundedSender<Event>,
    ) -> Self {
        WorkerInfo {
            id,
            pid: AtomicU32::new(pid),
            addr,
            timeout,
            budget,
            served: AtomicU64::new(0),
            retiring: AtomicBool::new(false),
            cut_by_master: AtomicBool::new(false),
            live_slots: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            service_ewma_ns: AtomicU64::new(u64::MAX),
            progress_ns: AtomicU64::new(0),
            pipelined: false,
            lane: std::sync::Mutex::new(std::sync::Weak::new()),
            connecting: tokio::sync::Mutex::new(()),
            events,
        }
    }

    /// Marks a worker whose extra slots are for pipelining, not for threads.
    pub fn with_pipelining(mut self, on: bool) -> Self {
        self.pipelined = on;
        self
    }

    pub fn is_pipelined(&self) -> bool {
        self.pipelined
    }

    /// The worker's process id (0 while a forked worker has not reported it yet).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Records the pid of a forked worker once it is known.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// Creates `n` fresh slots (no connection yet: the proxy connects on first use).
    pub fn make_slots(self: &Arc<Self>, n: usize) -> Vec<Slot> {
        self.live_slots.fetch_add(n, Ordering::SeqCst);
        (0..n)
            .map(|_| Slot {
                worker: Arc::clone(self),
                conn: None,
                taken: false,
                sent_at: None,
            })
            .collect()
    }

    /// A connection to this bundled worker given the one a slot held (see [`Slot::wire_conn`]).
    async fn wire_conn(&self, own: Option<WireConn>) -> std::io::Result<WireConn> {
        if let Some(c) = own {
            if !c.lane().is_broken() {
                return Ok(c);
            }
        }
        let WorkerAddr::Unix(path) = &self.addr else {
            return Err(std::io::Error::other("not a bundled worker"));
        };
        if !self.pipelined {
            return Ok(WireConn::new(Lane::new(
                tokio::net::UnixStream::connect(path).await?,
            )));
        }
        let shared = |w: &WorkerInfo| {
            w.lane
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .upgrade()
                .filter(|l| !l.is_broken())
        };
        if let Some(l) = shared(self) {
            return Ok(WireConn::new(l));
        }
        let _one = self.connecting.lock().await;
        if let Some(l) = shared(self) {
            return Ok(WireConn::new(l));
        }
        let lane = Lane::new(tokio::net::UnixStream::connect(path).await?);
        *self.lane.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&lane);
        Ok(WireConn::new(lane))
    }

    /// Marks the worker as retiring. Returns true when no slot is left (it is already drained).
    pub fn retire(&self) -> bool {
        self.retiring.store(true, Ordering::SeqCst);
        self.live_slots.load(Ordering::SeqCst) == 0
    }

    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Relaxed)
    }

    /// Counts one served request; true exactly once, when the budget has just been spent.
    pub fn count_request(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.budget != 0 && n == self.budget
    }

    /// Slots of this worker in use.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// Whether a request may wait behind the one this worker is serving: its recent requests
    /// were all quick (a moving average under [`PIPELINE_MAX_SERVICE`]), and it has finished one
    /// lately (within [`PIPELINE_STALE`]): a fast worker that is now in a long request (a stream,
    /// a slow client) gets nothing more to queue behind it.
    pub fn is_fast(&self) -> bool {
        self.service_ewma_ns.load(Ordering::Relaxed) < PIPELINE_MAX_SERVICE.as_nanos() as u64
            && clock_ns().saturating_sub(self.progress_ns.load(Ordering::Relaxed))
                < PIPELINE_STALE.as_nanos() as u64
    }

    /// Folds one service time into the moving average (weight 1/8; the first sample sets it).
    pub fn record_service(&self, took: Duration) {
        let ns = took.as_nanos().min(u64::MAX as u128 / 2) as u64;
        let old = self.service_ewma_ns.load(Ordering::Relaxed);
        let new = if old == u64::MAX {
            ns
        } else {
            old - old / 8 + ns / 8
        };
        self.service_ewma_ns.store(new, Ordering::Relaxed);
        self.progress_ns.store(clock_ns(), Ordering::Relaxed);
    }

    /// Tells the master something went wrong with this worker.
    pub fn report(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

/// A connection to a `command` worker.
pub type HttpConn = hyper::client::conn::http1::SendRequest<hyper::body::Incoming>;

/// A slot's connection.
#[derive(Debug)]
pub enum Conn {
    Wire(WireConn),
    Http(HttpConn),
}

/// Service time under which a busy single-threaded worker may be sent a request ahead (pipelining).
pub const PIPELINE_MAX_SERVICE: Duration = Duration::from_millis(2);

/// A busy worker that has finished nothing for this long is in a long request: nothing is sent
/// ahead to it, however fast its earlier requests were.
pub const PIPELINE_STALE: Duration = Duration::from_millis(20);

/// Nanoseconds on a monotonic clock private to this process.
fn clock_ns() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// The right to send one request to one worker.
#[derive(Debug)]
pub struct Slot {
    pub worker: Arc<WorkerInfo>,
    pub conn: Option<Conn>,
    /// Taken out of the idle pool (counted in the worker's `busy`).
    taken: bool,
    /// When the current request was sent (for the service-time average).
    pub sent_at: Option<std::time::Instant>,
}

impl Slot {
    /// A connection for a request or probe on this slot: the one it held, unless broken; for a
    /// pipelined worker, the one lane all its slots share, opened on first use (and again after
    /// it broke); otherwise a new one of its own.
    pub async fn wire_conn(&mut self) -> std::io::Result<WireConn> {
        let own = match self.conn.take() {
            Some(Conn::Wire(c)) => Some(c),
            _ => None,
        };
        self.worker.wire_conn(own).await
    }

    /// Marks the slot as in use (the pool calls this when it hands the slot out).
    pub fn mark_taken(&mut self) {
        if !self.taken {
            self.taken = true;
            if self.worker.busy.fetch_add(1, Ordering::Relaxed) == 0 && self.worker.pipelined {
                self.worker.progress_ns.store(clock_ns(), Ordering::Relaxed);
            }
        }
    }

    /// Marks the slot as idle again (the pool calls this when it takes the slot back).
    pub fn mark_idle(&mut self) {
        if self.taken {
            self.taken = false;
            self.worker.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.mark_idle();
        let left = self.worker.live_slots.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.worker.retiring.load(Ordering::SeqCst) {
            self.worker
                .report(Event::WorkerDrained { id: self.worker.id });
        }
    }
}
