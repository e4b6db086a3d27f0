//! The supervisor of `[[process]]` entries: sidecar programs (a model server, a chat UI) that the
//! master starts beside the worker pool, in dependency order, restarts by policy, checks for
//! readiness and health, and stops in reverse order — the job the hand-written systemd units did.
//!
//! Like the worker table, the [`Supervisor`] is owned by the master task and changed only there:
//! exits and check results arrive as [`ProcessEvent`]s, deadlines (start timeout, backoff, next
//! check, stop timeout) through [`Supervisor::next_deadline`] / [`Supervisor::on_timer`], and after
//! each event [`Supervisor::reconcile`] starts what may start and stops what must stop.
//!
//! Life of one process: `waiting` (for its `after` dependencies to be ready) → `starting` (spawned;
//! polled with its ready check until `start_timeout`) → `running` (ready; health-checked every
//! `interval`, restarted after `failures` failures) → on exit, by `restart` policy, `backoff`
//! (exponential from `restart_delay`) and again `waiting`, or `exited`; more than
//! `start_limit_burst` starts within `start_limit_interval` makes it `failed` (no more restarts until
//! `gte-supervisor restart NAME` or a reload that changes it).

pub mod spawn;
pub mod state;

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::config::{Config, ReadyCheck, RestartPolicy};
use crate::event::{Event, ProcessEvent};
use crate::logging::rotate::{LogFile, Rotate};
use crate::logging::writer::LineWriter;
pub use state::{backoff, ProcState};
use state::{start_poll, ProcRec, ProcessLog, Then, KILL_WAIT, STABLE_AFTER};

/// Log settings the processes' own log files follow.
#[derive(Debug, Clone, Copy)]
struct LogRules {
    capture: bool,
    rotate: Rotate,
    keep: usize,
}

/// The table of supervised processes.
pub struct Supervisor {
    procs: Vec<ProcRec>,
    events: UnboundedSender<Event>,
    runtime_dir: PathBuf,
    rules: LogRules,
    stopping: bool,
    fast: bool,
    /// The pool's dependencies have been ready once: it may start (and stays started).
    pool_open: bool,
    /// Prometheus metrics (`gte_process_up`, `gte_process_restarts`), when enabled.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

fn describe(st: &ExitStatus) -> String {
    if let Some(sig) = st.signal() {
        let name = Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?");
        format!("killed by signal {sig} ({name})")
    } else {
        format!("exit code {}", st.code().unwrap_or(-1))
    }
}

fn signal_group(pid: u32, sig: Signal) {
    if pid > 1 {
        let _ = killpg(Pid::from_raw(pid as i32), sig);
    }
}

impl Supervisor {
    pub fn new(
        cfg: &Config,
        events: UnboundedSender<Event>,
        runtime_dir: PathBuf,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        if let Some(m) = &metrics {
            for p in &cfg.processes {
                m.process_up(&p.name, false);
            }
        }
        Supervisor {
            procs: cfg.processes.iter().cloned().map(ProcRec::new).collect(),
            events,
            runtime_dir,
            rules: LogRules {
                capture: cfg.log.capture_output,
                rotate: cfg.log.rotate,
                keep: cfg.log.keep,
            },
            stopping: false,
            fast: false,
            pool_open: false,
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.procs.iter().position(|p| p.cfg.name == name)
    }

    /// True when every named process is running (ready).
    pub fn deps_ready(&self, names: &[String]) -> bool {
        names.iter().all(|n| {
            self.find(n)
                .is_some_and(|i| self.procs[i].satisfies_dependents())
        })
    }

    /// May the worker pool start? Latches: once its dependencies were ready, it stays open (a
    /// dependency restarting later does not stop the pool, as with systemd's `After=`).
    pub fn pool_may_start(&mut self, after: &[String]) -> bool {
        if !self.pool_open && self.deps_ready(after) {
            self.pool_open = true;
        }
        self.pool_open
    }

    /// Every process has been ready once (or exited by its policy): the service is up.
    pub fn all_ready_once(&self) -> bool {
        self.procs
            .iter()
            .all(|p| p.ever_ready || p.satisfies_dependents())
    }

    /// Every process is ready now (for the readiness endpoint when there is no pool).
    pub fn all_running(&self) -> bool {
        self.procs.iter().all(|p| p.satisfies_dependents())
    }

    /// Names of processes that hit their start limit, or exited for good (not restarted by their
    /// policy) with a failure before they were ever ready.
    pub fn failed(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| {
                p.state == ProcState::Failed
                    || (p.state == ProcState::Exited && !p.exit_ok && !p.ever_ready)
            })
            .map(|p| p.cfg.name.clone())
            .collect()
    }

    /// No process is left running (after [`Supervisor::begin_stop`]).
    pub fn all_stopped(&self) -> bool {
        self.procs.iter().all(|p| !p.alive())
    }

    /// The earliest deadline of any process.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.procs
            .iter()
            .flat_map(|p| [p.deadline, if p.checking { None } else { p.next_check }])
            .flatten()
            .min()
    }

    /// SIGUSR1: the processes' own log files are reopened at their next write.
    pub fn reopen_logs(&self) {
        for p in &self.procs {
            if let Some(l) = &p.log {
                l.reopen.store(true, Ordering::Release);
            }
        }
    }

    /// Starts stopping every process: in reverse dependency order (a process stops once nothing
    /// that depends on it runs), or all at once when `fast`.
    pub fn begin_stop(&mut self, fast: bool) {
        if self.stopping && (!fast || self.fast) {
            return;
        }
        self.stopping = true;
        self.fast = fast;
        if fast {
            for i in 0..self.procs.len() {
                self.stop(i, "stop", Then::Stay);
            }
        }
    }

    /// Handles one event about a process.
    pub fn handle(&mut self, ev: ProcessEvent) {
        match ev {
            ProcessEvent::Exited { name, run, status } => self.on_exit(&name, run, status),
            ProcessEvent::Checked {
                name,
                run,
                ok,
                detail,
            } => self.on_check(&name, run, ok, detail),
            ProcessEvent::Notified { name, run } => {
                if let Some(i) = self.find(&name) {
                    let p = &self.procs[i];
                    if p.run == run && p.state == ProcState::Starting {
                        self.became_ready(i);
                    }
                }
            }
        }
    }

    /// Deadlines: start timeouts, checks due, backoff over, stop timeouts.
    pub fn on_timer(&mut self, now: Instant) {
        for i in 0..self.procs.len() {
            let p = &mut self.procs[i];
            if p.deadline.is_some_and(|d| d <= now) {
                p.deadline = None;
                match p.state {
                    ProcState::Starting => {
                        tracing::error!(
                            process = %p.cfg.name,
                            pid = p.pid,
                            reason = "start-timeout",
                            start_timeout_s = p.cfg.start_timeout.as_secs_f64(),
                            "process did not become ready within start_timeout; stopping it"
                        );
                        self.stop(i, "start-timeout", Then::Policy);
                        continue;
                    }
                    // Bounded shutdown: PR_SET_PDEATHSIG still kills it with the master.
                    ProcState::Stopping if p.sigkilled && self.stopping => {
                        tracing::error!(
                            process = %p.cfg.name,
                            pid = p.pid,
                            wait_s = KILL_WAIT.as_secs(),
                            "process did not exit after SIGKILL; no longer waiting for it"
                        );
                        p.pid = None;
                        p.state = ProcState::Stopped;
                    }
                    ProcState::Stopping if p.sigkilled => {}
                    ProcState::Stopping => {
                        if let Some(pid) = p.pid {
                            tracing::warn!(
                                process = %p.cfg.name,
                                pid,
                                stop_timeout_s = p.cfg.stop_timeout.as_secs_f64(),
                                "process still running after stop_timeout: SIGKILL to its process group"
                            );
                            signal_group(pid, Signal::SIGKILL);
                            p.sigkilled = true;
                            p.deadline = Some(now + KILL_WAIT);
                        }
                    }
                    ProcState::Backoff => p.state = ProcState::Waiting,
                    _ => {}
                }
            }
            let p = &mut self.procs[i];
            let checkable = matches!(p.state, ProcState::Starting | ProcState::Running)
                && matches!(p.cfg.ready, ReadyCheck::Http { .. } | ReadyCheck::Tcp(_));
            if !checkable {
                // Not checked in this state: a leftover time must not wake the loop again.
                p.next_check = None;
            } else if !p.checking && p.next_check.is_some_and(|t| t <= now) {
                p.next_check = None;
                p.checking = true;
                let events = self.events.clone();
                let (name, run) = (p.cfg.name.clone(), p.run);
                let (ready, timeout) = (p.cfg.ready.clone(), p.cfg.check_timeout);
                tokio::spawn(async move {
                    let r = spawn::check(&ready, timeout).await;
                    let (ok, detail) = match r {
                        Ok(()) => (true, String::new()),
                        Err(e) => (false, e),
                    };
                    let _ = events.send(Event::Process(ProcessEvent::Checked {
                        name,
                        run,
                        ok,
                        detail,
                    }));
                });
            }
        }
    }

    /// Starts what may start; when stopping, stops what nothing running depends on any more.
    pub fn reconcile(&mut self) {
        self.reconcile_states();
        self.publish_metrics();
    }

    fn publish_metrics(&mut self) {
        let Some(m) = &self.metrics else { return };
        for p in &mut self.procs {
            m.process_up(&p.cfg.name, p.state == ProcState::Running);
            if p.restarts > p.restarts_published {
                m.process_restarted(&p.cfg.name, u64::from(p.restarts - p.restarts_published));
                p.restarts_published = p.restarts;
            }
        }
    }

    fn reconcile_states(&mut self) {
        if self.stopping {
            for i in 0..self.procs.len() {
                let name = self.procs[i].cfg.name.clone();
                let needed = self
                    .procs
                    .iter()
                    .any(|q| q.alive() && q.cfg.after.contains(&name));
                let p = &mut self.procs[i];
                match p.state {
                    ProcState::Waiting | ProcState::Backoff => {
                        p.state = ProcState::Stopped;
                        p.deadline = None;
                    }
                    ProcState::Starting | ProcState::Running if !needed => {
                        self.stop(i, "stop", Then::Stay);
                    }
                    _ => {}
                }
            }
            self.procs.retain(|p| p.then != Then::Remove || p.alive());
            return;
        }
        // Removed processes go once they are stopped.
        self.procs.retain(|p| p.then != Then::Remove || p.alive());
        for i in 0..self.procs.len() {
            if self.procs[i].state != ProcState::Waiting {
                continue;
            }
            let after = self.procs[i].cfg.after.clone();
            if self.deps_ready(&after) {
                self.start(i);
            } else if !self.procs[i].waiting_logged {
                let pending: Vec<&str> = after
                    .iter()
                    .filter(|d| !self.deps_ready(std::slice::from_ref(d)))
                    .map(String::as_str)
                    .collect();
                let p = &mut self.procs[i];
                p.waiting_logged = true;
                tracing::info!(process = %p.cfg.name, waiting_for = ?pending, "process waits for its dependencies to be ready");
            }
        }
    }

    fn start(&mut self, i: usize) {
        let now = Instant::now();
        let rules = self.rules;
        let p = &mut self.procs[i];
        p.waiting_logged = false;
        while p
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) > p.cfg.start_limit_interval)
        {
            p.starts.pop_front();
        }
        p.starts.push_back(now);
        p.run += 1;
        p.check_failures = 0;
        p.checking = false;
        p.stop_reason = None;
        p.then = Then::Policy;
        // Its own log file, opened once and kept while the path stays the same.
        if p.log.as_ref().map(|l| &l.path) != p.cfg.log.as_ref() {
            p.log = None;
            if let Some(path) = &p.cfg.log {
                let flag = Arc::new(AtomicBool::new(false));
                let file = LogFile::new(path.clone(), rules.rotate, rules.keep, flag.clone());
                match LineWriter::spawn(file, "gte-process-log") {
                    Ok((writer, guard)) => {
                        p.log = Some(ProcessLog {
                            writer,
                            _guard: guard,
                            reopen: flag,
                            path: path.clone(),
                        })
                    }
                    Err(e) => {
                        tracing::error!(process = %p.cfg.name, error = %e, path = %path.display(), "cannot start the process log writer; its output goes to the error log")
                    }
                }
            }
        }
        let output = match (&p.log, rules.capture) {
            (Some(l), _) => spawn::Output::File(l.writer.clone()),
            (None, true) => spawn::Output::ErrorLog,
            (None, false) => spawn::Output::Inherit,
        };
        match spawn::spawn(
            &p.cfg,
            p.run,
            &self.runtime_dir,
            output,
            self.events.clone(),
        ) {
            Ok(pid) => {
                p.pid = Some(pid);
                p.started_at = Some(now);
                p.ready_at = None;
                tracing::info!(process = %p.cfg.name, pid, run = p.run, command = ?p.cfg.command, "process started");
                match p.cfg.ready {
                    ReadyCheck::Started => self.became_ready(i),
                    ReadyCheck::Notify | ReadyCheck::Exit => {
                        p.state = ProcState::Starting;
                        p.deadline = Some(now + p.cfg.start_timeout);
                    }
                    ReadyCheck::Http { .. } | ReadyCheck::Tcp(_) => {
                        p.state = ProcState::Starting;
                        p.deadline = Some(now + p.cfg.start_timeout);
                        p.next_check = Some(now + start_poll(&p.cfg));
                    }
                }
            }
            Err(e) => {
                tracing::error!(process = %p.cfg.name, error = %e, command = ?p.cfg.command, chdir = %p.cfg.chdir.display(), "cannot start process");
                p.last_exit = Some(format!("cannot start: {e}"));
                self.after_exit(i, true);
            }
        }
    }

    fn became_ready(&mut self, i: usize) {
        let p = &mut self.procs[i];
        let now = Instant::now();
        p.state = ProcState::Running;
        p.ever_ready = true;
        p.ready_at = Some(now);
        p.deadline = None;
        p.check_failures = 0;
        p.next_check = match p.cfg.ready {
            ReadyCheck::Http { .. } | ReadyCheck::Tcp(_) => Some(now + p.cfg.check_interval),
            _ => None,
        };
        let boot_ms = p
            .started_at
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        tracing::info!(process = %p.cfg.name, pid = p.pid, boot_ms, "process ready");
    }

    fn on_check(&mut self, name: &str, run: u64, ok: bool, detail: String) {
        let Some(i) = self.find(name) else { return };
        let p = &mut self.procs[i];
        if p.run != run {
            return;
        }
        p.checking = false;
        let now = Instant::now();
        match p.state {
            ProcState::Starting => {
                if ok {
                    self.became_ready(i);
                } else {
                    p.next_check = Some(now + start_poll(&p.cfg));
                }
            }
            ProcState::Running => {
                p.next_check = Some(now + p.cfg.check_interval);
                if ok {
                    if p.check_failures > 0 {
                        tracing::info!(process = %p.cfg.name, pid = p.pid, "health check passes again");
                    }
                    p.check_failures = 0;
                    return;
                }
                p.check_failures += 1;
                tracing::warn!(process = %p.cfg.name, pid = p.pid, failures = p.check_failures, of = p.cfg.check_failures, error = %detail, "health check failed");
                if p.check_failures >= p.cfg.check_failures {
                    tracing::error!(process = %p.cfg.name, pid = p.pid, reason = "health", failures = p.check_failures, "process failed its health check too often; restarting it");
                    self.stop(i, "health", Then::Policy);
                }
            }
            _ => {}
        }
    }

    /// Sends the stop signal to the process group; SIGKILL follows at `stop_timeout`.
    fn stop(&mut self, i: usize, reason: &'static str, then: Then) {
        let fast = self.fast;
        let p = &mut self.procs[i];
        let Some(pid) = p.pid else {
            // Not running: apply `then` now.
            match then {
                Then::Replace(cfg) => {
                    p.cfg = *cfg;
                    p.state = ProcState::Waiting;
                    p.starts.clear();
                    p.streak = 0;
                }
                Then::Restart => {
                    p.state = ProcState::Waiting;
                    p.starts.clear();
                    p.streak = 0;
                }
                Then::Remove => p.then = Then::Remove,
                Then::Stay => {
                    p.state = ProcState::Stopped;
                    p.deadline = None;
                }
                Then::Policy => {}
            }
            return;
        };
        if p.state == ProcState::Stopping {
            // Already on its way out: a later instruction wins (e.g. reload during a restart).
            if p.then != Then::Remove && then != Then::Policy {
                p.then = then;
            }
            if fast && !p.sigkilled {
                let soon = Instant::now() + Duration::from_secs(2);
                p.deadline = Some(p.deadline.map_or(soon, |d| d.min(soon)));
            }
            return;
        }
        p.state = ProcState::Stopping;
        p.sigkilled = false;
        p.stop_reason = Some(reason);
        p.then = then;
        p.checking = false;
        p.next_check = None;
        let timeout = if fast {
            p.cfg.stop_timeout.min(Duration::from_secs(2))
        } else {
            p.cfg.stop_timeout
        };
        p.deadline = Some(Instant::now() + timeout);
        tracing::info!(process = %p.cfg.name, pid, reason, signal = p.cfg.stop_signal.as_str(), "stopping process");
        signal_group(pid, p.cfg.stop_signal);
    }

    fn on_exit(&mut self, name: &str, run: u64, status: ExitStatus) {
        let Some(i) = self.find(name) else { return };
        let p = &mut self.procs[i];
        if p.run != run || p.pid.is_none() {
            return;
        }
        let pid = p.pid.take().unwrap_or(0);
        // KillMode=control-group, as far as a process group reaches: helpers it forked go too.
        signal_group(pid, Signal::SIGKILL);
        let how = describe(&status);
        let lived = p.started_at.map(|t| t.elapsed()).unwrap_or_default();
        let reason = p
            .stop_reason
            .unwrap_or(if status.success() { "exit" } else { "crash" });
        p.last_exit = Some(format!("{how} ({reason}) after {}s", lived.as_secs()));
        p.deadline = None;
        p.next_check = None;
        p.checking = false;
        let then = std::mem::replace(&mut p.then, Then::Policy);
        let expected = p.stop_reason.is_some();
        p.exit_ok = !expected && status.success();
        if expected {
            tracing::info!(process = %p.cfg.name, pid, reason, status = %how, "process exited");
        } else {
            tracing::warn!(process = %p.cfg.name, pid, reason, status = %how, age_s = lived.as_secs(), "process exited unexpectedly");
        }
        match then {
            Then::Stay => p.state = ProcState::Stopped,
            Then::Remove => {
                p.state = ProcState::Stopped;
                p.then = Then::Remove;
            }
            Then::Restart => {
                p.state = ProcState::Waiting;
                p.restarts += 1;
            }
            Then::Replace(cfg) => {
                p.cfg = *cfg;
                p.state = ProcState::Waiting;
                p.restarts += 1;
                p.starts.clear();
                p.streak = 0;
            }
            Then::Policy if p.cfg.ready == ReadyCheck::Exit && p.exit_ok => {
                // A one-shot step that finished: done for good, whatever `restart` says.
                p.state = ProcState::Exited;
                p.ever_ready = true;
                tracing::info!(process = %p.cfg.name, "one-shot process done");
            }
            Then::Policy => {
                let failure = matches!(reason, "health" | "start-timeout") || !status.success();
                self.after_exit(i, failure);
            }
        }
    }

    /// Restart policy, start limit and backoff after an exit (or a failed start).
    fn after_exit(&mut self, i: usize, failure: bool) {
        let stopping = self.stopping;
        let p = &mut self.procs[i];
        p.pid = None;
        if stopping {
            p.state = ProcState::Stopped;
            return;
        }
        let want = match p.cfg.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failure,
            RestartPolicy::Never => false,
        };
        if !want {
            p.state = ProcState::Exited;
            tracing::info!(process = %p.cfg.name, restart = p.cfg.restart.as_str(), "process not restarted (restart policy)");
            return;
        }
        let now = Instant::now();
        while p
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) > p.cfg.start_limit_interval)
        {
            p.starts.pop_front();
        }
        if p.starts.len() >= p.cfg.start_limit_burst as usize {
            p.state = ProcState::Failed;
            tracing::error!(
                process = %p.cfg.name,
                reason = "start-limit",
                starts = p.starts.len(),
                interval_s = p.cfg.start_limit_interval.as_secs_f64(),
                last_exit = p.last_exit.as_deref().unwrap_or(""),
                "process FAILED: it was started start_limit_burst times within start_limit_interval; not restarting it again (gte-supervisor restart NAME to try again)"
            );
            crate::systemd::status(&format!("process {} failed (start limit)", p.cfg.name));
            return;
        }
        let stable = p.ready_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        p.streak = if stable { 0 } else { p.streak + 1 };
        let delay = backoff(p.cfg.restart_delay, p.streak);
        p.restarts += 1;
        p.state = ProcState::Backoff;
        p.deadline = Some(now + delay);
        tracing::info!(process = %p.cfg.name, delay_ms = delay.as_millis() as u64, restarts = p.restarts, "restarting process after a pause");
    }

    /// `gte-supervisor restart NAME`: stop (if running) and start again now; clears a failed
    /// state and the start-limit count, like `systemctl reset-failed` + `restart`.
    pub fn restart(&mut self, name: &str) -> String {
        if self.stopping {
            return "the master is stopping\n".into();
        }
        let Some(i) = self.find(name) else {
            let known: Vec<&str> = self.procs.iter().map(|p| p.cfg.name.as_str()).collect();
            return format!(
                "no process named {name:?} (processes: {})\n",
                known.join(", ")
            );
        };
        tracing::info!(process = %name, reason = "restart", "restart requested");
        let p = &mut self.procs[i];
        p.starts.clear();
        p.streak = 0;
        if p.alive() {
            self.stop(i, "restart", Then::Restart);
        } else {
            p.state = ProcState::Waiting;
            p.deadline = None;
            p.restarts += 1;
        }
        format!("restarting process {name}\n")
    }

    /// SIGHUP: adopt a new list of processes. Unchanged ones keep running; changed ones are
    /// restarted with the new definition; new ones start; removed ones stop.
    pub fn apply(&mut self, cfg: &Config) {
        if self.stopping {
            return;
        }
        self.rules = LogRules {
            capture: cfg.log.capture_output,
            rotate: self.rules.rotate,
            keep: self.rules.keep,
        };
        let mut changed = Vec::new();
        for i in 0..self.procs.len() {
            let name = self.procs[i].cfg.name.clone();
            match cfg.processes.iter().find(|n| n.name == name) {
                None => {
                    changed.push(format!("-{name}"));
                    self.stop(i, "removed", Then::Remove);
                }
                Some(n) if *n != self.procs[i].cfg => {
                    changed.push(format!("~{name}"));
                    if matches!(
                        self.procs[i].state,
                        ProcState::Failed | ProcState::Exited | ProcState::Backoff
                    ) {
                        let p = &mut self.procs[i];
                        p.cfg = n.clone();
                        p.state = ProcState::Waiting;
                        p.deadline = None;
                        p.starts.clear();
                        p.streak = 0;
                    } else {
                        self.stop(i, "reload", Then::Replace(Box::new(n.clone())));
                    }
                }
                Some(_) => {}
            }
        }
        for n in &cfg.processes {
            if self.find(&n.name).is_none() {
                changed.push(format!("+{}", n.name));
                self.procs.push(ProcRec::new(n.clone()));
            }
        }
        // Keep the file's order (it is the start order among independent processes).
        self.procs.sort_by_key(|p| {
            cfg.processes
                .iter()
                .position(|n| n.name == p.cfg.name)
                .unwrap_or(usize::MAX)
        });
        tracing::info!(changes = ?changed, "SIGHUP: [[process]] entries applied (- removed, ~ changed and restarted, + added)");
    }

    /// The `status` lines of the processes.
    pub fn status_text(&self) -> String {
        let mut out = String::new();
        if self.procs.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "{:<16} {:<9} {:>8} {:>8} {:>7}  last exit",
            "process", "state", "pid", "restarts", "up_s"
        );
        for p in &self.procs {
            let pid = p.pid.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
            let up = match (p.alive(), p.started_at) {
                (true, Some(t)) => t.elapsed().as_secs().to_string(),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "{:<16} {:<9} {:>8} {:>8} {:>7}  {}",
                p.cfg.name,
                p.state.as_str(),
                pid,
                p.restarts,
                up,
                p.last_exit.as_deref().unwrap_or("-")
            );
        }
        out
    }
}
