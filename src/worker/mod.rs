//! Worker records shared between the master and the proxy, and the request slots the proxy
//! borrows. The master owns the table of workers (see `master`); what the proxy may see of a
//! worker is the [`WorkerInfo`] behind an `Arc`: immutable facts plus a few atomics.
//!
//! A worker offers `slots` (a sync worker one, `threads = N` gives N, a `command` worker
//! `connections`). Each [`Slot`] carries its own connection to the worker, so the proxy never
//! waits on the master: it takes an idle slot, uses its connection, and gives it back.

pub mod protocol;
pub mod spawn;
pub mod warm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::UnixStream;
use tokio::sync::mpsc::UnboundedSender;

use crate::event::Event;

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
    /// Slots of this worker that still exist (idle or in use).
    live_slots: AtomicUsize,
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
            live_slots: AtomicUsize::new(0),
            events,
        }
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
            })
            .collect()
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

    /// Tells the master something went wrong with this worker.
    pub fn report(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

/// A connection to the bundled worker, with its read buffer and any request bytes not yet written.
#[derive(Debug)]
pub struct WireConn {
    pub stream: UnixStream,
    pub buf: BytesMut,
    pub out: std::collections::VecDeque<Bytes>,
}

impl WireConn {
    pub fn new(stream: UnixStream) -> Self {
        WireConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            out: std::collections::VecDeque::new(),
        }
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

/// The right to send one request to one worker.
#[derive(Debug)]
pub struct Slot {
    pub worker: Arc<WorkerInfo>,
    pub conn: Option<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let left = self.worker.live_slots.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.worker.retiring.load(Ordering::SeqCst) {
            self.worker
                .report(Event::WorkerDrained { id: self.worker.id });
        }
    }
}
