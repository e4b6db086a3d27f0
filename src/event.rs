//! Events that change worker state. They flow one way, into the master task's channel: the proxy,
//! the per-worker watcher tasks and the signal handlers send them; only the master acts on them.
//! Defined below both the master and the proxy so the proxy never depends on the master.

use std::process::ExitStatus;

use crate::worker::WorkerId;

/// Why a worker should be replaced while it still serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceReason {
    MaxRequests,
    Reload,
    Misbehaved,
    Health,
    Memory,
}

impl ReplaceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplaceReason::MaxRequests => "max_requests",
            ReplaceReason::Reload => "reload",
            ReplaceReason::Misbehaved => "misbehaved",
            ReplaceReason::Health => "health",
            ReplaceReason::Memory => "memory",
        }
    }
}

/// Signals the master reacts to, as a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    /// SIGTERM: graceful stop.
    Terminate,
    /// SIGINT / SIGQUIT: fast stop.
    Quick,
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGTTIN: one worker more.
    Increment,
    /// SIGTTOU: one worker less.
    Decrement,
    /// SIGUSR1: reopen log files.
    ReopenLogs,
    /// SIGUSR2: upgrade the binary in place.
    Upgrade,
    /// SIGWINCH: retire every worker (only when daemonized, as gunicorn).
    Winch,
}

/// One thing that happened.
#[derive(Debug)]
pub enum Event {
    Signal(SignalKind),
    /// The worker finished loading (Ok) or reported that it could not load the app (Err: the traceback).
    WorkerLoaded {
        id: WorkerId,
        result: Result<(), String>,
    },
    /// The worker process exited (reaped). `None`: it never existed (the warm process could not
    /// fork it).
    WorkerExited {
        id: WorkerId,
        status: Option<ExitStatus>,
    },
    /// A worker forked by the warm process reported its pid (it is now the master's child).
    WorkerForked {
        id: WorkerId,
        pid: u32,
    },
    /// The warm process (preload) imported the app (Ok) or failed to (Err: the traceback).
    WarmLoaded {
        pid: u32,
        result: Result<(), String>,
    },
    /// The warm process exited (reaped).
    WarmExited {
        pid: u32,
        status: ExitStatus,
    },
    /// The proxy saw a worker reach its request budget.
    BudgetSpent {
        id: WorkerId,
    },
    /// A request on this worker ran past its timeout; the worker must be aborted.
    RequestTimedOut {
        id: WorkerId,
    },
    /// The worker broke the protocol or dropped a connection mid-request.
    WorkerMisbehaved {
        id: WorkerId,
        what: String,
    },
    /// A health probe's verdict.
    HealthResult {
        id: WorkerId,
        ok: bool,
        detail: String,
    },
    /// A probe gave its slot back (or gave up on it).
    ProbeFinished {
        id: WorkerId,
    },
    /// A request on the control socket; the answer (text) goes back on `reply`.
    Control {
        command: String,
        reply: tokio::sync::oneshot::Sender<String>,
    },
    /// The new master of an upgrade serves: hand over and drain.
    UpgradeReady {
        pid: u32,
    },
    /// The new master of an upgrade failed: keep serving.
    UpgradeFailed {
        pid: u32,
        why: String,
    },
    /// Every slot of a retiring worker has been released: it is idle and can be stopped.
    WorkerDrained {
        id: WorkerId,
    },
    /// Something happened to a supervised `[[process]]`.
    Process(ProcessEvent),
}

/// Events of the `[[process]]` supervisor (see `process`). `run` numbers each start of a
/// process, so a late event about an earlier run is recognised and ignored.
#[derive(Debug)]
pub enum ProcessEvent {
    /// The process (its leader) exited and was reaped.
    Exited {
        name: String,
        run: u64,
        status: ExitStatus,
    },
    /// A readiness / health check finished.
    Checked {
        name: String,
        run: u64,
        ok: bool,
        detail: String,
    },
    /// The process sent `READY=1` on its `NOTIFY_SOCKET`.
    Notified { name: String, run: u64 },
}
