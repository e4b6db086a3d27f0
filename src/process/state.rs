//! The record of one supervised process: its state, counters and deadlines, and the pure rules
//! (backoff, start polling) the [`super::Supervisor`] applies to it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ProcessConfig;
use crate::logging::writer::{LineWriter, WriterGuard};

/// The longest pause between two restarts of a crash-looping process.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// After SIGKILL, how long a shutdown waits for the exit before it stops waiting (a process in
/// uninterruptible sleep; the kernel delivers the kill when it wakes).
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// A process that ran (ready) at least this long before exiting is not crash-looping.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Where one process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Not started: its dependencies are not ready yet (or it is about to start).
    Waiting,
    /// Spawned; its ready check has not passed yet.
    Starting,
    /// Ready (and healthy, as far as its checks tell).
    Running,
    /// Signalled to stop; SIGKILL to its process group at the stop deadline.
    Stopping,
    /// Exited; restarting after a pause.
    Backoff,
    /// Exited and, by its restart policy, not restarted.
    Exited,
    /// Hit its start limit: not restarted until `restart NAME` or a changed definition.
    Failed,
    /// Stopped by the master (shutdown).
    Stopped,
}

impl ProcState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcState::Waiting => "waiting",
            ProcState::Starting => "starting",
            ProcState::Running => "running",
            ProcState::Stopping => "stopping",
            ProcState::Backoff => "backoff",
            ProcState::Exited => "exited",
            ProcState::Failed => "failed",
            ProcState::Stopped => "stopped",
        }
    }
}

/// What to do once a process we are stopping has exited.
#[derive(Debug, Clone, PartialEq)]
pub enum Then {
    /// Decide by the restart policy (health failure, start timeout: a failure).
    Policy,
    /// Start it again at once (`restart NAME`).
    Restart,
    /// Start it again with a new definition (reload).
    Replace(Box<ProcessConfig>),
    /// Forget it (removed from the config).
    Remove,
    /// Leave it stopped (shutdown).
    Stay,
}

pub struct ProcessLog {
    pub writer: LineWriter,
    pub _guard: WriterGuard,
    pub reopen: Arc<AtomicBool>,
    pub path: PathBuf,
}

pub struct ProcRec {
    pub cfg: ProcessConfig,
    pub state: ProcState,
    pub pid: Option<u32>,
    pub run: u64,
    pub started_at: Option<Instant>,
    pub ready_at: Option<Instant>,
    pub ever_ready: bool,
    pub restarts: u32,
    pub starts: VecDeque<Instant>,
    pub streak: u32,
    pub last_exit: Option<String>,
    /// Start timeout, next check, backoff end or stop deadline, by state.
    pub deadline: Option<Instant>,
    pub next_check: Option<Instant>,
    pub checking: bool,
    pub check_failures: u32,
    /// Why we are stopping it (for the log and `last exit`).
    pub stop_reason: Option<&'static str>,
    pub then: Then,
    pub waiting_logged: bool,
    pub log: Option<ProcessLog>,
    /// Restarts already counted in the metrics.
    pub restarts_published: u32,
    /// SIGKILL was sent to its group (the deadline is then the last wait for its exit).
    pub sigkilled: bool,
    /// Its last run ended by itself with exit status 0.
    pub exit_ok: bool,
}

impl ProcRec {
    pub fn new(cfg: ProcessConfig) -> Self {
        ProcRec {
            cfg,
            state: ProcState::Waiting,
            pid: None,
            run: 0,
            started_at: None,
            ready_at: None,
            ever_ready: false,
            restarts: 0,
            starts: VecDeque::new(),
            streak: 0,
            last_exit: None,
            deadline: None,
            next_check: None,
            checking: false,
            check_failures: 0,
            stop_reason: None,
            then: Then::Policy,
            waiting_logged: false,
            log: None,
            restarts_published: 0,
            sigkilled: false,
            exit_ok: false,
        }
    }

    pub fn alive(&self) -> bool {
        self.pid.is_some()
    }

    /// Ready for its dependents: running, or done — exited by itself with status 0 and not to be
    /// restarted (`restart = "never"` or `"on-failure"`).
    pub fn satisfies_dependents(&self) -> bool {
        self.state == ProcState::Running || (self.state == ProcState::Exited && self.exit_ok)
    }
}

/// The pause before restart number `streak` of a process that keeps failing (1 = the first):
/// `restart_delay`, then doubling, capped at [`MAX_BACKOFF`] (or `restart_delay`, if longer).
pub fn backoff(restart_delay: Duration, streak: u32) -> Duration {
    let factor = 1u32 << streak.saturating_sub(1).min(16);
    restart_delay
        .saturating_mul(factor)
        .min(MAX_BACKOFF.max(restart_delay))
}

/// How often a starting process is polled with its ready check.
pub fn start_poll(cfg: &ProcessConfig) -> Duration {
    cfg.check_interval.min(Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let d = Duration::from_secs(10);
        assert_eq!(backoff(d, 0), d);
        assert_eq!(backoff(d, 1), d);
        assert_eq!(backoff(d, 2), Duration::from_secs(20));
        assert_eq!(backoff(d, 4), Duration::from_secs(80));
        assert_eq!(backoff(d, 30), MAX_BACKOFF);
        // A restart_delay longer than the cap is kept as it is.
        let long = Duration::from_secs(600);
        assert_eq!(backoff(long, 5), long);
        assert_eq!(backoff(Duration::ZERO, 9), Duration::ZERO);
    }
}
