//! The master task: the one owner of the worker table. Every change arrives as an [`Event`] on one
//! channel (signals, worker loaded/exited, budget spent, timeouts, …); the task handles one event
//! at a time and then *reconciles* — compares the workers it wants (count, generation) with the
//! workers it has and spawns, retires or kills to close the gap. Recycling, reload, resize and
//! crash recovery are all "the wanted state changed" or "the actual state changed".
//!
//! Replacement is always start-first: a worker flagged for replacement (budget spent, reload)
//! keeps serving until enough fresh workers are ready, so capacity never dips.

pub mod control;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rand::Rng;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{self, Config};
use crate::event::{Event, ReplaceReason, SignalKind};
use crate::logging::Logs;
use crate::proxy::{Settings, Shared};
use crate::systemd;
use crate::worker::spawn::{self, SpawnContext};
use crate::worker::warm::{self, Warm};
use crate::worker::{WorkerId, WorkerInfo};

/// Exit codes of the master (documented in the man page and README).
pub mod exit {
    pub const OK: i32 = 0;
    pub const RUNTIME: i32 = 1;
    pub const CONFIG: i32 = 2;
    pub const APP_LOAD: i32 = 3;
    pub const IN_USE: i32 = 4;
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned; importing the app.
    Starting,
    /// Serving requests.
    Ready,
    /// Retiring: no new requests; waiting for in-flight ones to finish.
    Draining,
    /// Signalled to stop; SIGKILL at `kill_at`.
    Stopping,
}

#[derive(Debug)]
struct WorkerRec {
    info: Arc<WorkerInfo>,
    state: WorkerState,
    generation: u64,
    started: Instant,
    ready_at: Option<Instant>,
    /// Wants a replacement (keeps serving until one is ready).
    replace: Option<ReplaceReason>,
    /// Why it is going away, for the exit log line.
    reason: Option<&'static str>,
    kill_at: Option<Instant>,
    /// Consecutive failed health probes.
    health_failures: u32,
    /// A probe holds one of its slots.
    probing: bool,
    /// Consecutive memory samples over the ceiling, and the last RSS seen.
    memory_over: u32,
    rss: u64,
    /// Its slots (request threads or pipelined requests), from the configuration it was
    /// started with.
    slots: usize,
}

impl WorkerRec {
    fn serving(&self) -> bool {
        matches!(self.state, WorkerState::Starting | WorkerState::Ready)
    }

    /// Whether it may still be flagged for replacement on its own account (max_requests,
    /// memory): it is not flagged yet, or it is only of an older configuration and stands in for
    /// the new one while that one's import fails (`fallback_active`: see `Master::fallback`).
    fn may_be_flagged(&self, fallback_active: bool) -> bool {
        match self.replace {
            None => true,
            Some(ReplaceReason::Reload) => fallback_active,
            Some(_) => false,
        }
    }
}

/// The warm process of a generation (preload): imports the app once; workers fork from it.
#[derive(Debug)]
struct WarmRec {
    warm: Warm,
    /// The configuration it was started with: the workers forked from it are of that one.
    cfg: Arc<Config>,
    generation: u64,
    ready: bool,
    started: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Graceful stop: the listener is closed; in-flight requests are finishing.
    DrainingConnections,
    /// Workers are being stopped; exit when none is left.
    StoppingWorkers,
}

/// Everything the master task owns.
pub struct Master {
    cfg: Arc<Config>,
    config_path: PathBuf,
    shared: Arc<Shared>,
    events_tx: UnboundedSender<Event>,
    events_rx: UnboundedReceiver<Event>,
    workers: BTreeMap<WorkerId, WorkerRec>,
    next_id: WorkerId,
    generation: u64,
    desired: usize,
    phase: Phase,
    /// When a graceful stop must be over (TERM + graceful_timeout): draining the connections and
    /// stopping the workers share that one budget.
    stop_deadline: Option<Instant>,
    booted: bool,
    reloading: bool,
    crash_streak: u32,
    spawn_not_before: Option<Instant>,
    runtime_dir: PathBuf,
    stop_tx: watch::Sender<bool>,
    grace_tx: watch::Sender<Duration>,
    server: Option<JoinHandle<()>>,
    exit_code: i32,
    logs: Logs,
    next_probe: Option<Instant>,
    next_memory_check: Option<Instant>,
    sys: sysinfo::System,
    /// The most recent worker exits, newest last (for `status`).
    last_exits: std::collections::VecDeque<String>,
    started: Instant,
    watchdog: Option<(Duration, Instant)>,
    /// Hands a new public listener to the server task (bind changed on reload).
    listener_tx: UnboundedSender<tokio::net::TcpListener>,
    pidfile: Option<crate::pidfile::Pidfile>,
    listen_fd: Option<std::os::fd::OwnedFd>,
    exe: Option<PathBuf>,
    /// The new master's pid while an upgrade is under way.
    upgrading: Option<u32>,
    /// Where the pidfile lives when it is not moved aside for an upgrade.
    pidfile_home: Option<PathBuf>,
    /// The warm process workers are forked from (`preload = true`).
    warm: Option<WarmRec>,
    /// After a reload: the previous configuration's warm process (ready), kept until the new one
    /// has imported the app, to replace workers of the previous configuration that die meanwhile
    /// (a new import that fails would otherwise let the pool shrink to nothing).
    fallback: Option<WarmRec>,
    /// A warm process that failed to import is started again only after this (1 s, 2 s, 4 s …
    /// at most 30 s after consecutive failures, counted here). Kept apart from the workers'
    /// backoff, so that forks of the kept warm process are not held up by it.
    warm_retry_at: Option<Instant>,
    warm_failures: u32,
    /// Zombie children seen at the last sweep that nobody reaped (orphans handed to us as the
    /// child subreaper); reaped if still there at the next one.
    zombies_seen: Vec<u32>,
    next_orphan_sweep: Instant,
    /// The `[[process]]` supervisor (issue #8).
    processes: crate::process::Supervisor,
}

/// The pieces `main` hands over.
pub struct MasterParts {
    pub cfg: Config,
    pub config_path: PathBuf,
    pub shared: Arc<Shared>,
    pub listener: tokio::net::TcpListener,
    pub runtime_dir: PathBuf,
    pub logs: Logs,
    pub pidfile: Option<crate::pidfile::Pidfile>,
    /// A duplicate of the listening socket, handed to a new master on SIGUSR2.
    pub listen_fd: Option<std::os::fd::OwnedFd>,
    /// The binary to start on SIGUSR2 (the installed path, read at start-up).
    pub exe: Option<PathBuf>,
}

/// How often zombie orphans (descendants re-parented to the master) are looked for.
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(5);

fn describe_exit(st: Option<&ExitStatus>) -> String {
    match st {
        Some(st) => describe_status(st),
        None => "never started (the warm process did not fork it)".to_string(),
    }
}

fn describe_status(st: &ExitStatus) -> String {
    if let Some(sig) = st.signal() {
        let name = Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?");
        format!("killed by signal {sig} ({name})")
    } else {
        format!("exit code {}", st.code().unwrap_or(-1))
    }
}

impl Master {
    pub fn new(parts: MasterParts) -> Self {
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let parts_health_interval = parts.cfg.health.interval;
        let parts_memory_limit = parts.cfg.workers.max_worker_memory;
        let parts_memory_interval = parts.cfg.workers.memory_check_interval;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (grace_tx, grace_rx) = watch::channel(parts.cfg.workers.graceful_timeout);
        let (listener_tx, listener_rx) = tokio::sync::mpsc::unbounded_channel();
        let processes = crate::process::Supervisor::new(
            &parts.cfg,
            events_tx.clone(),
            parts.runtime_dir.clone(),
            parts.shared.metrics.clone(),
        );
        let server = tokio::spawn(crate::proxy::serve(
            parts.listener,
            parts.shared.clone(),
            stop_rx,
            grace_rx,
            listener_rx,
        ));
        Master {
            desired: parts.cfg.workers.count,
            cfg: Arc::new(parts.cfg),
            config_path: parts.config_path,
            shared: parts.shared,
            events_tx,
            events_rx,
            workers: BTreeMap::new(),
            next_id: 1,
            generation: 1,
            phase: Phase::Running,
            stop_deadline: None,
            booted: false,
            reloading: false,
            crash_streak: 0,
            spawn_not_before: None,
            runtime_dir: parts.runtime_dir,
            stop_tx,
            grace_tx,
            server: Some(server),
            exit_code: exit::OK,
            logs: parts.logs,
            next_probe: (!parts_health_interval.is_zero())
                .then(|| Instant::now() + parts_health_interval),
            next_memory_check: (parts_memory_limit > 0)
                .then(|| Instant::now() + parts_memory_interval),
            sys: sysinfo::System::new(),
            last_exits: std::collections::VecDeque::new(),
            started: Instant::now(),
            watchdog: systemd::watchdog_interval().map(|d| (d, Instant::now())),
            listener_tx,
            pidfile: parts.pidfile,
            listen_fd: parts.listen_fd,
            exe: parts.exe,
            upgrading: None,
            pidfile_home: None,
            warm: None,
            fallback: None,
            warm_retry_at: None,
            warm_failures: 0,
            zombies_seen: Vec::new(),
            next_orphan_sweep: Instant::now() + ORPHAN_SWEEP_EVERY,
            processes,
        }
    }

    /// A sender for events (signal forwarders use it).
    pub fn sender(&self) -> UnboundedSender<Event> {
        self.events_tx.clone()
    }

    /// Runs until the master has stopped; returns the exit code.
    pub async fn run(mut self) -> i32 {
        tracing::info!(bind = %self.cfg.bind, workers = self.desired, pid = std::process::id(), "starting");
        self.reconcile();
        self.processes.reconcile();
        self.after_process_events();
        loop {
            let wake = self.next_wakeup();
            let draining = self.phase == Phase::DrainingConnections;
            tokio::select! {
                ev = self.events_rx.recv() => {
                    if let Some(ev) = ev { self.handle(ev); }
                }
                _ = tokio::time::sleep_until(wake) => self.on_timer(),
                _ = async { self.server.as_mut().expect("server task present while draining").await }, if draining && self.server.is_some() => {
                    self.server = None;
                    match self.shared.open_connections() {
                        0 => tracing::info!("in-flight requests finished; stopping workers"),
                        open => tracing::warn!(open, "graceful_timeout reached: stopping workers with connections still open"),
                    }
                    self.stop_workers(false);
                }
            }
            self.reconcile();
            if self.phase == Phase::StoppingWorkers && self.workers.is_empty() {
                // [[process]] entries stop after the pool, in reverse dependency order; a fast
                // stop (no grace) stops them all at once.
                let fast = self.grace_tx.borrow().is_zero();
                self.processes.begin_stop(fast);
            }
            self.processes.reconcile();
            self.after_process_events();
            if self.phase == Phase::StoppingWorkers
                && self.workers.is_empty()
                && self.processes.all_stopped()
            {
                break;
            }
        }
        self.shared.pool.close();
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
        tracing::info!(code = self.exit_code, "stopped");
        self.exit_code
    }

    fn next_wakeup(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut t = far.min(self.next_orphan_sweep);
        for at in [self.spawn_not_before, self.warm_retry_at]
            .into_iter()
            .flatten()
        {
            t = t.min(at);
        }
        if let Some((_, at)) = self.watchdog {
            t = t.min(at);
        }
        if self.phase == Phase::Running {
            if let Some(p) = self.next_probe {
                t = t.min(p);
            }
            if let Some(m) = self.next_memory_check {
                t = t.min(m);
            }
        }
        for w in self.workers.values() {
            if let Some(k) = w.kill_at {
                t = t.min(k);
            }
        }
        if let Some(p) = self.processes.next_deadline() {
            t = t.min(p);
        }
        t
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        self.processes.on_timer(now);
        if self.spawn_not_before.is_some_and(|t| t <= now) {
            self.spawn_not_before = None;
        }
        if self.warm_retry_at.is_some_and(|t| t <= now) {
            self.warm_retry_at = None;
        }
        if self.next_orphan_sweep <= now {
            self.next_orphan_sweep = now + ORPHAN_SWEEP_EVERY;
            self.reap_orphans();
            release_free_memory();
        }
        if let Some((every, at)) = self.watchdog {
            if at <= now {
                systemd::notify("WATCHDOG=1");
                self.watchdog = Some((every, now + every));
            }
        }
        if self.phase == Phase::Running {
            if self.next_probe.is_some_and(|t| t <= now) {
                self.next_probe = None;
                self.probe_workers();
            }
            if self.next_memory_check.is_some_and(|t| t <= now) {
                self.next_memory_check = None;
                self.check_memory();
            }
        }
        if self.next_probe.is_none() && !self.cfg.health.interval.is_zero() {
            self.next_probe = Some(now + self.cfg.health.interval);
        }
        if self.next_memory_check.is_none() && self.cfg.workers.max_worker_memory > 0 {
            self.next_memory_check = Some(now + self.cfg.workers.memory_check_interval);
        }
        let overdue: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.kill_at.is_some_and(|k| k <= now))
            .map(|w| w.info.id)
            .collect();
        for id in overdue {
            if let Some(w) = self.workers.get_mut(&id) {
                if w.state == WorkerState::Draining {
                    tracing::warn!(
                        worker = id,
                        pid = w.info.pid(),
                        busy = w.info.busy(),
                        "retiring worker still serving after graceful_timeout (or the longest request timeout): SIGKILL (its open responses are cut)"
                    );
                    w.state = WorkerState::Stopping;
                } else {
                    tracing::warn!(
                        worker = id,
                        pid = w.info.pid(),
                        "worker did not stop in time: SIGKILL"
                    );
                }
                w.kill_at = None;
                w.info.cut_by_master.store(true, Ordering::SeqCst);
                signal_worker(w.info.pid(), Signal::SIGKILL);
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Signal(s) => self.on_signal(s),
            Event::WorkerLoaded { id, result } => self.on_loaded(id, result),
            Event::WorkerExited { id, status } => self.on_exited(id, status),
            Event::WorkerForked { id, pid } => self.on_forked(id, pid),
            Event::WarmLoaded { pid, result } => self.on_warm_loaded(pid, result),
            Event::WarmExited { pid, status } => self.on_warm_exited(pid, status),
            Event::BudgetSpent { id } => {
                let fallback_active = self.fallback_active();
                if let Some(w) = self.workers.get_mut(&id) {
                    if w.state == WorkerState::Ready && w.may_be_flagged(fallback_active) {
                        tracing::info!(
                            worker = id,
                            pid = w.info.pid(),
                            reason = "max_requests",
                            served = w.info.served.load(Ordering::Relaxed),
                            "worker reached its request budget; starting a replacement"
                        );
                        w.replace = Some(ReplaceReason::MaxRequests);
                    }
                }
            }
            Event::RequestTimedOut { id } => self.abort_worker(id),
            Event::WorkerMisbehaved { id, what } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    if w.serving() {
                        tracing::warn!(worker = id, pid = w.info.pid(), reason = "crash", error = %what, "worker failed a request; replacing it");
                        w.replace = Some(ReplaceReason::Misbehaved);
                        self.retire(id, "crash");
                    }
                }
            }
            Event::HealthResult { id, ok, detail } => self.on_health(id, ok, detail),
            Event::UpgradeReady { pid } => {
                tracing::info!(
                    new_master = pid,
                    "SIGUSR2: the new master serves; this master drains and exits"
                );
                systemd::notify(&format!(
                    "MAINPID={pid}\nREADY=1\nSTATUS=upgraded: new master {pid}"
                ));
                self.upgrading = None;
                self.begin_stop(true);
            }
            Event::UpgradeFailed { pid, why } => {
                tracing::error!(new_master = pid, error = %why, "SIGUSR2: upgrade failed; this master keeps serving");
                self.upgrading = None;
                self.restore_pidfile();
            }
            Event::Control { command, reply } => {
                let answer = self.control(command.trim());
                let _ = reply.send(answer);
            }
            Event::ProbeFinished { id } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.probing = false;
                }
            }
            Event::Process(e) => self.processes.handle(e),
            Event::WorkerDrained { id } => {
                if self
                    .workers
                    .get(&id)
                    .is_some_and(|w| w.state == WorkerState::Draining)
                {
                    self.stop_draining(id);
                }
            }
        }
    }

    fn on_signal(&mut self, s: SignalKind) {
        match s {
            SignalKind::Terminate => self.begin_stop(true),
            SignalKind::Quick => self.begin_stop(false),
            SignalKind::Reload => self.reload(),
            SignalKind::Increment if !self.cfg.pool => {
                tracing::info!("SIGTTIN ignored: no [app], so no worker pool");
            }
            SignalKind::Increment => {
                self.desired += 1;
                tracing::info!(workers = self.desired, "SIGTTIN: one worker more");
            }
            SignalKind::Decrement => {
                if self.desired > 1 {
                    self.desired -= 1;
                    tracing::info!(workers = self.desired, "SIGTTOU: one worker less");
                } else {
                    tracing::info!("SIGTTOU: already at one worker; unchanged");
                }
            }
            SignalKind::ReopenLogs => {
                self.logs.reopen();
                self.processes.reopen_logs();
                tracing::info!("SIGUSR1: log files reopened");
            }
            SignalKind::Upgrade => self.upgrade(),
            SignalKind::Winch => {
                if self.cfg.daemon {
                    self.desired = 0;
                    tracing::info!("SIGWINCH: retiring all workers (daemonized master); SIGHUP or SIGTTIN brings them back");
                } else {
                    tracing::info!("SIGWINCH ignored: the master is not daemonized");
                }
            }
        }
    }

    fn on_loaded(&mut self, id: WorkerId, result: Result<(), String>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match result {
            Ok(()) => {
                if w.state != WorkerState::Starting {
                    return;
                }
                w.state = WorkerState::Ready;
                w.ready_at = Some(Instant::now());
                let slots = w.slots;
                tracing::info!(
                    worker = id,
                    pid = w.info.pid(),
                    boot_ms = w.started.elapsed().as_millis() as u64,
                    "worker ready"
                );
                self.shared.pool.add(w.info.make_slots(slots));
                self.update_ready_count();
                self.boot_if_ready();
                if self.reloading && self.ready_fresh() >= self.desired {
                    self.reloading = false;
                    tracing::info!(
                        generation = self.generation,
                        "reload complete: all workers on the new configuration"
                    );
                    systemd::ready(&format!(
                        "reloaded: serving on {} with {} workers",
                        self.cfg.bind, self.desired
                    ));
                }
            }
            Err(traceback) => {
                if w.state != WorkerState::Starting {
                    return;
                }
                let pid = w.info.pid();
                if self.load_failure_is_fatal() {
                    tracing::error!(
                        worker = id,
                        pid,
                        "the application failed to load; stopping\n{traceback}"
                    );
                    self.fail_boot(&traceback);
                } else {
                    if self.crash_streak <= 1 {
                        tracing::error!(worker = id, pid, reason = "crash", "a new worker failed to load the application (the running workers keep serving)\n{traceback}");
                    } else {
                        tracing::error!(
                            worker = id,
                            pid,
                            reason = "crash",
                            streak = self.crash_streak,
                            "a new worker failed to load the application again"
                        );
                    }
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.reason = Some("crash");
                    }
                    // It may still be alive (stuck past ready_timeout): it will never serve.
                    self.stop_process(id, Signal::SIGKILL, Duration::from_secs(2));
                }
            }
        }
    }

    fn on_forked(&mut self, id: WorkerId, pid: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            // Already forgotten (its status channel failed first): make sure it does not linger.
            signal_worker(pid, Signal::SIGKILL);
            return;
        };
        w.info.set_pid(pid);
        tracing::info!(
            worker = id,
            pid,
            fork_ms = w.started.elapsed().as_millis() as u64,
            "worker forked from the warm process"
        );
        if let Some(m) = &self.shared.metrics {
            m.worker_spawned(id, pid); // metrics hook
        }
        if w.state == WorkerState::Stopping {
            // Asked to stop before its pid was known: do it now, with the usual grace.
            w.kill_at = Some(Instant::now() + Duration::from_secs(2));
            signal_worker(pid, Signal::SIGTERM);
        }
    }

    fn on_warm_loaded(&mut self, pid: u32, result: Result<(), String>) {
        let Some(rec) = self.warm.as_mut().filter(|r| r.warm.pid == pid) else {
            return;
        };
        match result {
            Ok(()) => {
                rec.ready = true;
                tracing::info!(
                    pid,
                    generation = rec.generation,
                    import_ms = rec.started.elapsed().as_millis() as u64,
                    "warm process ready: the app is imported; forking workers from it"
                );
                self.warm_failures = 0;
                self.retire_fallback("the new one is ready");
            }
            Err(traceback) => {
                self.warm = None;
                if self.load_failure_is_fatal() {
                    tracing::error!(
                        pid,
                        "the application failed to load (preload); stopping\n{traceback}"
                    );
                    self.fail_boot(&traceback);
                    return;
                }
                self.warm_failures += 1;
                let delay = backoff(self.warm_failures);
                self.warm_retry_at = Some(Instant::now() + delay);
                tracing::error!(pid, reason = "crash", backoff_ms = delay.as_millis() as u64, "the warm process failed to import the application (the running workers keep serving)\n{traceback}");
            }
        }
    }

    fn on_warm_exited(&mut self, pid: u32, status: ExitStatus) {
        let how = describe_status(&status);
        if self.fallback.as_ref().is_some_and(|r| r.warm.pid == pid) {
            self.fallback = None;
            if self.phase == Phase::Running {
                tracing::warn!(pid, status = %how, "the previous configuration's warm process exited; its workers keep serving, but those that die can no longer be replaced until the new configuration's app imports");
                return;
            }
        }
        if self.warm.as_ref().is_some_and(|r| r.warm.pid == pid) {
            self.warm = None;
            if self.phase == Phase::Running {
                tracing::warn!(pid, status = %how, "the warm process exited unexpectedly; the forked workers keep serving; starting a new one");
                return;
            }
        }
        tracing::info!(pid, status = %how, "warm process exited");
    }

    /// Keeps the warm process of the current generation running (preload), and no other.
    fn ensure_warm(&mut self) {
        let wanted =
            self.cfg.app.preload && matches!(self.cfg.app.kind, config::AppKind::Wsgi { .. });
        if let Some(rec) = self.warm.take() {
            if wanted && rec.generation == self.generation {
                self.warm = Some(rec);
                return;
            }
            if wanted && rec.ready {
                // Kept until the new one is ready (see `fallback`).
                tracing::info!(
                    pid = rec.warm.pid,
                    generation = rec.generation,
                    "keeping the warm process of the previous configuration until the new one has imported the app"
                );
                self.retire_fallback("an older one is kept instead");
                self.fallback = Some(rec);
            } else {
                tracing::info!(
                    pid = rec.warm.pid,
                    generation = rec.generation,
                    "retiring the warm process of an older configuration"
                );
                rec.warm.terminate();
            }
        }
        if !wanted {
            self.retire_fallback("preload is off");
        }
        if !wanted || self.spawn_not_before.is_some() || self.warm_retry_at.is_some() {
            return;
        }
        let ctx = SpawnContext {
            runtime_dir: &self.runtime_dir,
            events: self.events_tx.clone(),
            master_pid: std::process::id(),
        };
        match warm::spawn_warm(&self.cfg, &ctx) {
            Ok(w) => {
                tracing::info!(
                    pid = w.pid,
                    generation = self.generation,
                    "warm process started: importing the app once"
                );
                self.warm = Some(WarmRec {
                    warm: w,
                    cfg: self.cfg.clone(),
                    generation: self.generation,
                    ready: false,
                    started: Instant::now(),
                });
            }
            Err(e) => self.spawn_failed(0, e),
        }
    }

    /// Workers of the previous configuration are replaced from its kept warm process: there is
    /// one, and the current one has not imported the app (see `fallback`).
    fn fallback_active(&self) -> bool {
        self.fallback.is_some() && !self.warm.as_ref().is_some_and(|r| r.ready)
    }

    /// Ends the previous configuration's warm process, if one is kept (see `fallback`).
    fn retire_fallback(&mut self, why: &str) {
        if let Some(rec) = self.fallback.take() {
            tracing::info!(
                pid = rec.warm.pid,
                generation = rec.generation,
                "retiring the warm process of the previous configuration: {why}"
            );
            rec.warm.terminate();
        }
    }

    /// Reaps zombie children nobody else waits for: processes a worker started and left behind
    /// are re-parented to the master (a child subreaper, for preload). A zombie is reaped only
    /// when it was already one at the previous sweep, so children tokio waits for are never
    /// taken from it.
    fn reap_orphans(&mut self) {
        let mut zombies = Vec::new();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return;
        };
        for task in tasks.flatten() {
            let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for pid in list
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if self.workers.values().any(|w| w.info.pid() == pid)
                    || [&self.warm, &self.fallback]
                        .iter()
                        .any(|r| r.as_ref().is_some_and(|r| r.warm.pid == pid))
                {
                    continue;
                }
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().next());
                if state == Some("Z") {
                    zombies.push(pid);
                }
            }
        }
        for &pid in &zombies {
            if self.zombies_seen.contains(&pid) {
                let _ = nix::sys::wait::waitpid(
                    Pid::from_raw(pid as i32),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                tracing::debug!(pid, "reaped an orphaned process");
            }
        }
        self.zombies_seen = zombies;
    }

    fn on_exited(&mut self, id: WorkerId, status: Option<ExitStatus>) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.shared.pool.purge(id);
        w.info.retiring.store(true, Ordering::SeqCst);
        self.update_ready_count();
        let age = w.started.elapsed();
        // A worker retired because it broke a request and then died is still a crash.
        let expected = matches!(w.state, WorkerState::Stopping | WorkerState::Draining)
            && w.reason != Some("crash");
        let reason = w.reason.unwrap_or(if expected { "stop" } else { "crash" });
        if let Some(m) = &self.shared.metrics {
            m.worker_exited(id, reason); // metrics hook
        }
        let served = w.info.served.load(Ordering::Relaxed);
        let how = describe_exit(status.as_ref());
        if self.last_exits.len() >= 10 {
            self.last_exits.pop_front();
        }
        self.last_exits.push_back(format!(
            "worker {id} pid {} reason {reason} served {served} age {}s: {how}",
            w.info.pid(),
            age.as_secs()
        ));
        if expected {
            tracing::info!(worker = id, pid = w.info.pid(), reason, served, age_s = age.as_secs(), status = %how, "worker exited");
            return;
        }
        tracing::warn!(worker = id, pid = w.info.pid(), reason, served, age_s = age.as_secs(), status = %how, "worker exited unexpectedly");
        if self.phase != Phase::Running || !self.booted {
            return;
        }
        // Crash-loop control: a worker that dies soon after starting backs the next spawn off.
        let lived = w.ready_at.map(|t| t.elapsed()).unwrap_or_default();
        if lived < Duration::from_secs(10) {
            self.crash_streak += 1;
        } else {
            self.crash_streak = 0;
        }
        if self.crash_streak >= 2 {
            let delay = backoff(self.crash_streak - 2);
            self.spawn_not_before = Some(Instant::now() + delay);
            if self.crash_streak >= 3 {
                tracing::error!(streak = self.crash_streak, backoff_ms = delay.as_millis() as u64, "crash loop: workers keep dying soon after start; respawning with backoff (the remaining workers keep serving)");
            } else {
                tracing::warn!(
                    backoff_ms = delay.as_millis() as u64,
                    "worker died soon after start; backing off"
                );
            }
            systemd::status(&format!(
                "crash loop: {} workers ready of {}",
                self.ready_fresh(),
                self.desired
            ));
        }
    }

    fn on_health(&mut self, id: WorkerId, ok: bool, detail: String) {
        let failures = self.cfg.health.failures;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if ok {
            if w.health_failures > 0 {
                tracing::info!(worker = id, pid = w.info.pid(), "health probe passes again");
            }
            w.health_failures = 0;
            return;
        }
        self.health_failed(id, &detail, failures);
    }

    fn health_failed(&mut self, id: WorkerId, detail: &str, failures: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state != WorkerState::Ready {
            return;
        }
        w.health_failures += 1;
        tracing::warn!(
            worker = id,
            pid = w.info.pid(),
            failures = w.health_failures,
            of = failures,
            error = detail,
            "health probe failed"
        );
        if w.health_failures >= failures {
            tracing::error!(
                worker = id,
                pid = w.info.pid(),
                reason = "health",
                served = w.info.served.load(Ordering::Relaxed),
                age_s = w.started.elapsed().as_secs(),
                "worker failed its health probe {failures} times in a row; replacing it"
            );
            w.replace = Some(ReplaceReason::Health);
            w.reason = Some("health");
            // Out of rotation at once: a replacement starts in reconcile.
            self.retire(id, "health");
        }
    }

    /// Probes every ready worker that has an idle slot; a worker still holding an unanswered probe
    /// from the last round counts one more failure.
    fn probe_workers(&mut self) {
        let h = self.cfg.health.clone();
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Ready && !w.info.is_retiring())
            .map(|w| w.info.id)
            .collect();
        for id in ids {
            let probing = self.workers.get(&id).is_some_and(|w| w.probing);
            if probing {
                self.health_failed(id, "the previous probe is still unanswered", h.failures);
                continue;
            }
            let Some(slot) = self.shared.pool.take_idle_of(id) else {
                continue; // busy with requests: never probed, never killed by the probe
            };
            if let Some(w) = self.workers.get_mut(&id) {
                w.probing = true;
            }
            tokio::spawn(crate::proxy::probe::probe(
                self.shared.clone(),
                slot,
                h.path.clone(),
                h.timeout,
                self.cfg.workers.timeout,
                self.events_tx.clone(),
            ));
        }
    }

    /// Samples worker RSS; a worker over `max_worker_memory` for 3 samples in a row is recycled
    /// (start-first, like max_requests).
    fn check_memory(&mut self) {
        let limit = self.cfg.workers.max_worker_memory;
        let fallback_active = self.fallback_active();
        let pids: Vec<sysinfo::Pid> = self
            .workers
            .values()
            .map(|w| sysinfo::Pid::from_u32(w.info.pid()))
            .collect();
        self.sys.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&pids),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        for w in self.workers.values_mut() {
            let Some(p) = self.sys.process(sysinfo::Pid::from_u32(w.info.pid())) else {
                continue;
            };
            w.rss = p.memory();
            if limit == 0 || w.state != WorkerState::Ready || !w.may_be_flagged(fallback_active) {
                continue;
            }
            if w.rss > limit {
                w.memory_over += 1;
                if w.memory_over >= 3 {
                    tracing::warn!(
                        worker = w.info.id,
                        pid = w.info.pid(),
                        reason = "memory",
                        rss = w.rss,
                        limit,
                        served = w.info.served.load(Ordering::Relaxed),
                        age_s = w.started.elapsed().as_secs(),
                        "worker memory stayed over max_worker_memory; recycling it"
                    );
                    w.replace = Some(ReplaceReason::Memory);
                    w.reason = Some("memory");
                }
            } else {
                w.memory_over = 0;
            }
        }
    }

    /// SIGUSR2: start the installed binary as a new master on the same listening socket.
    fn upgrade(&mut self) {
        if self.phase != Phase::Running || self.upgrading.is_some() {
            tracing::warn!("SIGUSR2 ignored: an upgrade or a stop is already under way");
            return;
        }
        if !self.processes.is_empty() {
            tracing::error!("SIGUSR2 refused: with [[process]] entries a second master would start them twice (ports in use); restart the service instead");
            return;
        }
        let (Some(exe), Some(fd)) = (self.exe.clone(), self.listen_fd.as_ref()) else {
            tracing::error!("SIGUSR2: cannot upgrade: the binary path or the listener is unknown");
            return;
        };
        if let Some(p) = self.pidfile.as_mut() {
            let old = p.path().to_path_buf();
            let mut oldbin = old.clone().into_os_string();
            oldbin.push(".oldbin");
            if let Err(e) = p.rename_to(Path::new(&oldbin)) {
                tracing::error!(error = %e, "SIGUSR2: cannot move the pidfile aside; not upgrading");
                return;
            }
            self.pidfile_home = Some(old);
        }
        match crate::upgrade::start_new_master(&exe, &self.config_path, fd, self.events_tx.clone())
        {
            Ok(pid) => {
                tracing::info!(new_master = pid, exe = %exe.display(), "SIGUSR2: started the new master; waiting for it to be ready");
                self.upgrading = Some(pid);
            }
            Err(e) => {
                tracing::error!(error = %e, exe = %exe.display(), "SIGUSR2: cannot start the new master");
                self.restore_pidfile();
            }
        }
    }

    /// After a failed upgrade: the pidfile goes back to its place, and the control socket is
    /// bound again (the new master took over its name and removed it when it exited, which left
    /// `status` unable to reach this master).
    fn restore_pidfile(&mut self) {
        if let (Some(p), Some(home)) = (self.pidfile.as_mut(), self.pidfile_home.take()) {
            if let Err(e) = p.rename_to(&home) {
                tracing::error!(error = %e, "cannot move the pidfile back");
            }
            let path = control::control_path(&home);
            if let Err(e) =
                control::bind(&path).and_then(|l| control::spawn_serve(l, self.events_tx.clone()))
            {
                tracing::error!(error = %e, path = %path.display(), "cannot bind the control socket again");
            }
        }
    }

    /// Answers a control-socket command.
    fn control(&mut self, command: &str) -> String {
        match command {
            "status" => self.status_text(),
            "reload" => {
                self.reload();
                "reload requested\n".into()
            }
            "stop" => {
                self.begin_stop(true);
                "graceful stop requested\n".into()
            }
            other if other.starts_with("restart ") => {
                self.processes.restart(other["restart ".len()..].trim())
            }
            other => {
                format!("unknown command {other:?}: use status, reload, stop or restart NAME\n")
            }
        }
    }

    fn status_text(&mut self) -> String {
        use std::fmt::Write as _;
        let pids: Vec<sysinfo::Pid> = self
            .workers
            .values()
            .map(|w| sysinfo::Pid::from_u32(w.info.pid()))
            .collect();
        self.sys.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&pids),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        let mut out = String::new();
        let _ = writeln!(
            out,
            "master pid {} up {}s, generation {}, bind {}, workers wanted {}, ready {}, queued requests {}, phase {:?}",
            std::process::id(),
            self.started.elapsed().as_secs(),
            self.generation,
            self.cfg.bind,
            self.desired,
            self.shared.ready_workers.load(Ordering::Relaxed),
            self.shared.pool.queued(),
            self.phase,
        );
        if let Some(rec) = &self.warm {
            let _ = writeln!(
                out,
                "warm process pid {} generation {} {}, up {}s",
                rec.warm.pid,
                rec.generation,
                if rec.ready { "ready" } else { "importing" },
                rec.started.elapsed().as_secs()
            );
        }
        if let Some(rec) = &self.fallback {
            let _ = writeln!(
                out,
                "previous warm process pid {} generation {}, kept until the new one is ready",
                rec.warm.pid, rec.generation,
            );
        }
        let _ = writeln!(
            out,
            "{:>6} {:>8} {:<9} {:>9} {:>9} {:>7}  note",
            "worker", "pid", "state", "served", "rss_MiB", "age_s"
        );
        for w in self.workers.values() {
            let rss = self
                .sys
                .process(sysinfo::Pid::from_u32(w.info.pid()))
                .map(|p| p.memory())
                .unwrap_or(w.rss);
            let note = match (w.replace, w.reason) {
                (Some(r), _) => format!("replacing: {}", r.as_str()),
                (None, Some(r)) => format!("stopping: {r}"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{:>6} {:>8} {:<9} {:>9} {:>9.1} {:>7}  {}",
                w.info.id,
                w.info.pid(),
                format!("{:?}", w.state).to_lowercase(),
                w.info.served.load(Ordering::Relaxed),
                rss as f64 / (1024.0 * 1024.0),
                w.started.elapsed().as_secs(),
                note
            );
        }
        out.push_str(&self.processes.status_text());
        if !self.last_exits.is_empty() {
            let _ = writeln!(out, "last exits:");
            for e in &self.last_exits {
                let _ = writeln!(out, "  {e}");
            }
        }
        out
    }

    /// Boot is complete once the pool is ready and every `[[process]]` has been ready once:
    /// READY=1 to systemd, readiness to an upgrading old master or a waiting daemon parent.
    fn boot_if_ready(&mut self) {
        if self.booted
            || self.phase != Phase::Running
            || self.ready_fresh() < self.desired
            || !self.processes.all_ready_once()
        {
            return;
        }
        self.booted = true;
        let msg = format!("serving on {} with {} workers", self.cfg.bind, self.desired);
        tracing::info!(bind = %self.cfg.bind, workers = self.desired, "ready");
        systemd::ready(&msg);
        crate::upgrade::report_ready();
        crate::daemon::report_ready();
    }

    /// After every event: process readiness for `/-/ready`, boot, and a process that failed
    /// before the service ever came up (like an app that cannot load: stop, exit 3).
    fn after_process_events(&mut self) {
        if self.processes.is_empty() {
            return;
        }
        self.shared
            .processes_ready
            .store(self.processes.all_running(), Ordering::Relaxed);
        if !self.booted && self.phase == Phase::Running {
            let failed = self.processes.failed();
            if !failed.is_empty() {
                tracing::error!(processes = ?failed, "a process failed before the service was ready; stopping");
                if !matches!(self.cfg.log.error, config::LogTarget::Stderr) {
                    eprintln!("gte-supervisor: process {} failed before the service was ready; see the error log", failed.join(", "));
                }
                self.exit_code = exit::APP_LOAD;
                self.begin_stop(false);
                return;
            }
            self.boot_if_ready();
        }
    }

    /// The request ran past its timeout: abort the worker (faulthandler dumps its threads), kill after a grace.
    fn abort_worker(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state == WorkerState::Stopping {
            return;
        }
        tracing::error!(
            worker = id,
            pid = w.info.pid(),
            reason = "timeout",
            served = w.info.served.load(Ordering::Relaxed),
            age_s = w.started.elapsed().as_secs(),
            "request timeout: SIGABRT to the worker (its traceback follows in the log)"
        );
        w.info.retire();
        w.reason = Some("timeout");
        self.shared.pool.purge(id);
        self.stop_process(id, Signal::SIGABRT, Duration::from_secs(2));
        self.update_ready_count();
    }

    /// Stops giving requests to a worker; it is stopped once its in-flight requests finish.
    fn retire(&mut self, id: WorkerId, reason: &'static str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match w.state {
            WorkerState::Draining | WorkerState::Stopping => return,
            WorkerState::Starting | WorkerState::Ready => {}
        }
        w.state = WorkerState::Draining;
        w.reason.get_or_insert(reason);
        let drained = w.info.retire();
        tracing::info!(
            worker = id,
            pid = w.info.pid(),
            reason,
            served = w.info.served.load(Ordering::Relaxed),
            age_s = w.started.elapsed().as_secs(),
            "retiring worker"
        );
        self.shared.pool.purge(id);
        // What it has in flight must be over within graceful_timeout (gunicorn's documented
        // bound after a restart signal), or within the longest request timeout if that is longer
        // (a request within its own timeout is never cut by a reload or a recycle): else an
        // endless stream, which no request timeout bounds, would keep an old worker for good.
        let longest = self
            .cfg
            .workers
            .path_timeouts
            .iter()
            .map(|(_, d)| *d)
            .fold(self.cfg.workers.timeout, Duration::max);
        w.kill_at = Some(Instant::now() + self.cfg.workers.graceful_timeout.max(longest));
        if drained {
            self.stop_draining(id);
        }
        self.update_ready_count();
    }

    /// A retiring worker has nothing in flight any more: SIGTERM, with what is left of its
    /// graceful_timeout (at least a second to exit) before the SIGKILL.
    fn stop_draining(&mut self, id: WorkerId) {
        let now = Instant::now();
        let left = self
            .workers
            .get(&id)
            .and_then(|w| w.kill_at)
            .map_or(self.cfg.workers.graceful_timeout, |k| {
                k.saturating_duration_since(now)
            });
        self.stop_process(id, Signal::SIGTERM, left.max(Duration::from_secs(1)));
    }

    fn stop_process(&mut self, id: WorkerId, sig: Signal, grace: Duration) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.state = WorkerState::Stopping;
        w.kill_at = Some(Instant::now() + grace);
        signal_worker(w.info.pid(), sig);
    }

    fn ready_fresh(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.state == WorkerState::Ready && w.replace.is_none())
            .count()
    }

    fn update_ready_count(&self) {
        let n = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Ready)
            .count();
        self.shared.ready_workers.store(n, Ordering::Relaxed);
    }

    fn begin_stop(&mut self, graceful: bool) {
        if self.phase == Phase::StoppingWorkers {
            if !graceful {
                // A second, fast stop while stopping: hurry up.
                for w in self.workers.values() {
                    signal_worker(w.info.pid(), Signal::SIGKILL);
                }
            }
            return;
        }
        systemd::stopping();
        if graceful && self.phase == Phase::Running {
            tracing::info!(
                grace_s = self.cfg.workers.graceful_timeout.as_secs_f64(),
                "SIGTERM: graceful stop: no new connections, finishing in-flight requests"
            );
            let _ = self.grace_tx.send(self.cfg.workers.graceful_timeout);
            let _ = self.stop_tx.send(true);
            self.phase = Phase::DrainingConnections;
            self.stop_deadline = Some(Instant::now() + self.cfg.workers.graceful_timeout);
            return;
        }
        if self.exit_code == exit::OK {
            tracing::info!("fast stop");
        }
        let _ = self.grace_tx.send(Duration::ZERO);
        let _ = self.stop_tx.send(true);
        if let Some(s) = self.server.take() {
            s.abort();
        }
        self.stop_workers(true);
    }

    fn stop_workers(&mut self, fast: bool) {
        self.phase = Phase::StoppingWorkers;
        self.shared.pool.close();
        if let Some(rec) = self.warm.take() {
            rec.warm.terminate();
        }
        self.retire_fallback("stopping");
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            if let Some(w) = self.workers.get_mut(&id) {
                w.info.retire();
                w.info.cut_by_master.store(true, Ordering::SeqCst);
                w.reason.get_or_insert("stop");
            }
            if fast {
                self.stop_process(id, Signal::SIGQUIT, Duration::from_secs(2));
            } else {
                // What is left of graceful_timeout after draining the connections (at least a
                // second to exit on SIGTERM), so a stop takes graceful_timeout, not twice that.
                let left = match self.stop_deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => self.cfg.workers.graceful_timeout,
                };
                self.stop_process(id, Signal::SIGTERM, left.max(Duration::from_secs(1)));
            }
        }
        self.update_ready_count();
    }

    fn reload(&mut self) {
        if self.phase != Phase::Running {
            tracing::info!("reload requested while stopping: ignored");
            return;
        }
        // A new configuration (or fixed code) gets its import attempt at once.
        self.warm_retry_at = None;
        self.warm_failures = 0;
        systemd::notify("RELOADING=1\nSTATUS=reloading");
        let new = match config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
                systemd::ready(&format!(
                    "reload failed ({e}); serving with the previous configuration"
                ));
                return;
            }
        };
        let mut new = new;
        let old = &self.cfg;
        let mut fixed = Vec::new();
        if new.bind != old.bind {
            // The new listener opens before the old one closes: no connection is refused.
            match crate::proxy::bind(new.bind, new.backlog) {
                Ok(l) => {
                    tracing::info!(old = %old.bind, new = %new.bind, "SIGHUP: now listening on the new address; the old listener is closed");
                    // The copy kept for USR2 must follow, or it would keep the old port open.
                    self.listen_fd = std::os::fd::AsFd::as_fd(&l).try_clone_to_owned().ok();
                    let _ = self.listener_tx.send(l);
                }
                Err(e) => {
                    tracing::error!(new = %new.bind, error = %e, "SIGHUP: cannot listen on the new address; keeping the old one");
                    new.bind = old.bind;
                }
            }
        }
        if new.pidfile != old.pidfile {
            fixed.push("pidfile");
            new.pidfile = old.pidfile.clone();
        }
        if new.master_threads != old.master_threads {
            fixed.push("master_threads");
            new.master_threads = old.master_threads;
        }
        if new.daemon != old.daemon {
            fixed.push("daemon");
            new.daemon = old.daemon;
        }
        if new.log.access != old.log.access
            || new.log.error != old.log.error
            || new.log.level != old.log.level
            || new.log.access_format != old.log.access_format
            || new.log.rotate != old.log.rotate
            || new.log.keep != old.log.keep
        {
            fixed.push("[log]");
            new.log = old.log.clone();
        }
        if new.metrics != old.metrics {
            fixed.push("metrics");
            new.metrics = old.metrics;
        }
        if new.pool != old.pool {
            fixed.push("[app] (adding or removing the worker pool)");
            new.pool = old.pool;
            new.app = old.app.clone();
            new.workers.count = old.workers.count;
        }
        if std::mem::discriminant(&new.app.kind) != std::mem::discriminant(&old.app.kind) {
            fixed.push("[app] wsgi/command kind");
            new.app.kind = old.app.kind.clone();
        }
        if !fixed.is_empty() {
            tracing::warn!(settings = ?fixed, "SIGHUP: these settings cannot change without a restart; keeping their running values");
        }
        self.generation += 1;
        // metrics hook
        if let Some(m) = &self.shared.metrics {
            m.config_reloaded(self.generation, new.workers.concurrency(&new.app.kind));
        }
        self.processes.apply(&new);
        self.desired = new.workers.count;
        self.shared.pool.set_queue_limit(new.workers.queue);
        self.shared.set_settings(Settings::from_config(&new));
        self.cfg = Arc::new(new);
        for w in self.workers.values_mut() {
            if w.serving() {
                w.replace = Some(ReplaceReason::Reload);
            }
        }
        self.reloading = true;
        tracing::info!(
            generation = self.generation,
            workers = self.desired,
            "SIGHUP: configuration reloaded; starting new workers"
        );
        if self.desired == 0 {
            // No worker to wait for (only [[process]] entries): the reload is done now, and
            // systemd, told RELOADING=1, must hear READY=1 again.
            self.reloading = false;
            systemd::ready(&format!("reloaded: serving on {}", self.cfg.bind));
        }
    }

    fn spawn_one(&mut self) -> bool {
        self.spawn_worker(false)
    }

    /// Starts a worker of the current configuration, or (`from_fallback`) forks one of the
    /// previous configuration from its kept warm process.
    fn spawn_worker(&mut self, from_fallback: bool) -> bool {
        let preload = self.cfg.app.preload;
        // (A stand-in forked from the kept warm process runs the previous configuration's
        // code and `threads`: its timeout, budget and slots are that configuration's too.)
        let (warm, generation, cfg) = if from_fallback {
            match &self.fallback {
                Some(rec) => (Some(rec), rec.generation, rec.cfg.clone()),
                None => return false,
            }
        } else {
            if preload && !self.warm.as_ref().is_some_and(|r| r.ready) {
                return false; // the warm process is still importing: fork when it is ready
            }
            (
                self.warm.as_ref().filter(|_| preload),
                self.generation,
                self.cfg.clone(),
            )
        };
        let id = self.next_id;
        let ctx = SpawnContext {
            runtime_dir: &self.runtime_dir,
            events: self.events_tx.clone(),
            master_pid: std::process::id(),
        };
        let spawned = match warm {
            Some(rec) => rec.warm.fork_worker(&cfg, id, &ctx),
            None => spawn::spawn_worker(&cfg, id, &ctx),
        };
        self.next_id += 1;
        if spawned.is_err() && warm.is_some() {
            // The warm process cannot take requests: replace it (ensure_warm, next reconcile),
            // or stop forking from the previous one.
            let rec = if from_fallback {
                self.fallback.take()
            } else {
                self.warm.take()
            };
            if let Some(rec) = rec {
                rec.warm.terminate();
            }
        }
        match spawned {
            Ok(sp) => {
                let w = &cfg.workers;
                let budget = if w.max_requests == 0 {
                    0
                } else {
                    w.max_requests + rand::thread_rng().gen_range(0..=w.max_requests_jitter)
                };
                let info = Arc::new(
                    WorkerInfo::new(
                        id,
                        sp.pid,
                        sp.addr,
                        w.timeout,
                        budget,
                        self.events_tx.clone(),
                    )
                    .with_pipelining(w.pipelined(&cfg.app.kind)),
                );
                let slots = w.slots_per_worker(&cfg.app.kind);
                if sp.pid == 0 {
                    // Forked by the warm process: its pid comes with the fork ("worker forked").
                    tracing::info!(
                        worker = id,
                        generation,
                        budget,
                        "worker spawned (fork requested from the warm process)"
                    );
                } else {
                    tracing::info!(
                        worker = id,
                        pid = sp.pid,
                        generation,
                        budget,
                        "worker spawned"
                    );
                }
                if let (Some(m), true) = (&self.shared.metrics, sp.pid != 0) {
                    m.worker_spawned(id, sp.pid); // metrics hook
                }
                self.workers.insert(
                    id,
                    WorkerRec {
                        info,
                        state: WorkerState::Starting,
                        generation,
                        started: Instant::now(),
                        ready_at: None,
                        // A stand-in of the previous configuration is replaced like the others.
                        replace: from_fallback.then_some(ReplaceReason::Reload),
                        reason: None,
                        kill_at: None,
                        health_failures: 0,
                        probing: false,
                        memory_over: 0,
                        rss: 0,
                        slots,
                    },
                );
                true
            }
            Err(e) => {
                self.spawn_failed(id, e);
                false
            }
        }
    }

    /// Whether an app that fails to load (or a worker that cannot start) stops the master: yes
    /// while it is booting (an app that cannot load is not respawned for ever), unless a reload
    /// came during the boot and workers of the older configuration already serve — they keep
    /// serving, as after the boot (a HUP right after the first worker answered used to stop a
    /// master that was serving).
    fn load_failure_is_fatal(&self) -> bool {
        let older_ones_serve =
            self.generation > 1 && self.workers.values().any(|w| w.state == WorkerState::Ready);
        !self.booted && !older_ones_serve
    }

    /// A worker (or the warm process, id 0) could not be started: fatal before the first boot,
    /// else a crash with backoff.
    fn spawn_failed(&mut self, id: WorkerId, e: std::io::Error) {
        let python = self.cfg.python_path();
        tracing::error!(worker = id, error = %e, python = %python.display(), chdir = %self.cfg.app.chdir.display(), "cannot start a worker process");
        if self.load_failure_is_fatal() {
            if !matches!(self.cfg.log.error, config::LogTarget::Stderr) {
                eprintln!(
                    "gte-supervisor: cannot start a worker ({} in {}): {e}",
                    python.display(),
                    self.cfg.app.chdir.display()
                );
            }
            self.exit_code = exit::APP_LOAD;
            self.begin_stop(false);
        } else {
            self.back_off_spawns();
        }
    }

    /// The app cannot load before the service ever served: say so on stderr too (when the error
    /// log is a file) and stop with exit code 3 instead of respawning forever.
    fn fail_boot(&mut self, traceback: &str) {
        if !matches!(self.cfg.log.error, config::LogTarget::Stderr) {
            eprintln!("gte-supervisor: the application failed to load:\n{traceback}");
        }
        // (Its last line names the exception.)
        let last = traceback.trim_end().lines().last().unwrap_or_default();
        crate::upgrade::report_failure(&format!("the application failed to load: {last}"));
        self.exit_code = exit::APP_LOAD;
        self.begin_stop(false);
    }

    /// One more start failure: the next spawn waits 1 s, 2 s, 4 s … (at most 30 s).
    fn back_off_spawns(&mut self) -> Duration {
        self.crash_streak += 1;
        let delay = backoff(self.crash_streak);
        self.spawn_not_before = Some(Instant::now() + delay);
        delay
    }

    /// Closes the gap between the workers wanted and the workers there are.
    fn reconcile(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        // `[app] after`: the pool (and its warm process) waits until those processes are ready.
        if !self.processes.pool_may_start(&self.cfg.pool_after) {
            return;
        }
        self.ensure_warm();
        if self.phase != Phase::Running {
            return;
        }
        let desired = self.desired;
        let fresh: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.serving() && w.replace.is_none() && w.generation == self.generation)
            .map(|w| w.info.id)
            .collect();
        if fresh.len() < desired {
            if self.spawn_not_before.is_none() {
                for _ in fresh.len()..desired {
                    if !self.spawn_one() || self.phase != Phase::Running {
                        break;
                    }
                    if self.crash_streak >= 2 {
                        // In a crash loop: one at a time.
                        self.spawn_not_before = Some(Instant::now() + Duration::from_millis(500));
                        break;
                    }
                }
            }
        } else if fresh.len() > desired {
            // Too many (TTOU or a smaller count after reload): retire starting ones first, then the oldest.
            let mut surplus: Vec<WorkerId> = fresh.clone();
            surplus.sort_by_key(|id| {
                let w = &self.workers[id];
                (w.state == WorkerState::Ready, *id)
            });
            for id in surplus.into_iter().take(fresh.len() - desired) {
                self.retire(id, "resize");
            }
        }
        // Preload, after a reload whose warm process has not imported the app (yet, or at all):
        // workers of the previous configuration that die, or are to be recycled, are replaced by
        // forks of its kept warm process, so the pool keeps its size on the previous code.
        let fallback_gen = self
            .fallback
            .as_ref()
            .filter(|_| self.fallback_active())
            .map(|r| r.generation);
        if fallback_gen.is_some() && self.spawn_not_before.is_none() {
            // (Those flagged for themselves, e.g. max_requests, are to be replaced too.)
            let serving = self
                .workers
                .values()
                .filter(|w| w.serving() && matches!(w.replace, None | Some(ReplaceReason::Reload)))
                .count();
            for _ in serving..desired {
                if !self.spawn_worker(true) || self.phase != Phase::Running {
                    break;
                }
            }
        }
        // Old generation or flagged workers: retire once enough fresh ones are ready.
        let ready_fresh = self
            .workers
            .values()
            .filter(|w| {
                w.state == WorkerState::Ready
                    && w.replace.is_none()
                    && w.generation == self.generation
            })
            .count();
        let mut flagged: Vec<(WorkerId, &'static str, bool)> = self
            .workers
            .values()
            .filter(|w| w.serving() && (w.replace.is_some() || w.generation != self.generation))
            // (A fork of the kept warm process that is still starting is not retired for being
            // of the previous configuration: it was started to stand in for one.)
            .filter(|w| !(w.state == WorkerState::Starting && Some(w.generation) == fallback_gen))
            .map(|w| {
                let reason = w.replace.map(|r| r.as_str()).unwrap_or("reload");
                (w.info.id, reason, w.state == WorkerState::Ready)
            })
            .collect();
        // Starting ones first, then those flagged for themselves (max_requests, memory, health)
        // before those only of an older configuration, oldest first.
        flagged.sort_by_key(|(id, reason, ready)| (*ready, *reason == "reload", *id));
        let mut total_ready = ready_fresh + flagged.iter().filter(|f| f.2).count();
        for (id, reason, ready) in flagged {
            if !ready {
                self.retire(id, reason);
            } else if total_ready > desired || ready_fresh >= desired {
                self.retire(id, reason);
                total_ready -= 1;
            }
        }
    }
}

/// The wait before the next start after `step` failures in a row: 0.5 s doubled each step, at
/// most 30 s.
fn backoff(step: u32) -> Duration {
    Duration::from_millis(500u64 << step.min(6)).min(Duration::from_secs(30))
}

/// Signals a worker's whole process group (its pid is the group id: see `spawn`).
fn signal_worker(pid: u32, sig: Signal) {
    if pid == 0 {
        return;
    }
    let _ = killpg(Pid::from_raw(pid as i32), sig);
}

/// Forwards the master's signals into the event channel (handlers only enqueue).
pub fn forward_signals(tx: UnboundedSender<Event>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind as K};
    let table = [
        (K::terminate(), SignalKind::Terminate),
        (K::interrupt(), SignalKind::Quick),
        (K::quit(), SignalKind::Quick),
        (K::hangup(), SignalKind::Reload),
        (K::from_raw(libc::SIGTTIN), SignalKind::Increment),
        (K::from_raw(libc::SIGTTOU), SignalKind::Decrement),
        (K::user_defined1(), SignalKind::ReopenLogs),
        (K::window_change(), SignalKind::Winch),
        (K::user_defined2(), SignalKind::Upgrade),
    ];
    for (kind, ev) in table {
        let mut s = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(Event::Signal(ev)).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Gives memory freed since the last call back to the system. After a burst (thousands of
/// connections, big uploads) glibc keeps the freed pages, so the master's RSS would stay at its
/// high-water mark for good; `malloc_trim` returns them. Off the runtime thread: it walks the heap.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !RUNNING.swap(true, Ordering::Relaxed) {
            tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only walks and releases glibc's own free lists.
                unsafe { libc::malloc_trim(0) };
                RUNNING.store(false, Ordering::Relaxed);
            });
        }
    }
}
