//! Starting worker processes and watching them: one watcher task per worker reports "loaded"
//! (or the load failure) and then the exit status to the master as events; two more tasks
//! copy the worker's stdout and stderr into the error log, tagged with the worker id.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{AppKind, Config};
use crate::event::Event;
use crate::worker::{WorkerAddr, WorkerId};

/// The bundled WSGI worker, carried inside the binary.
pub const WORKER_PY: &str = include_str!("../python/worker.py");

/// Variables that size native thread pools (BLAS, OpenMP, torch). Set per worker unless the
/// operator set them, so W workers do not each start one thread per CPU.
pub const THREAD_VARS: &[&str] = &[
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "TORCH_NUM_THREADS",
];

/// A freshly started worker process.
pub struct Spawned {
    pub pid: u32,
    pub addr: WorkerAddr,
}

/// The last lines a worker wrote to stderr, kept to explain a failure to start.
pub type RecentOutput = Arc<Mutex<VecDeque<String>>>;

/// Everything the spawner needs that is not in the config.
pub struct SpawnContext<'a> {
    /// Private directory (0700) holding worker sockets and the worker script.
    pub runtime_dir: &'a Path,
    pub events: UnboundedSender<Event>,
    pub master_pid: u32,
}

/// Writes the embedded worker script into the private runtime directory.
pub fn install_worker_script(runtime_dir: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = runtime_dir.join("gte_worker.py");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut f, WORKER_PY.as_bytes())?;
    Ok(path)
}

/// Picks a free loopback port for a `command` worker (bound and released: the program binds it
/// next). Chosen below the kernel's ephemeral range when possible, so an outgoing connection's
/// source port cannot take it in the moment between our check and the program's bind.
fn free_loopback_port() -> io::Result<u16> {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    if low > 11000 {
        let mut rng = rand::thread_rng();
        for _ in 0..64 {
            let port = rng.gen_range(10000..low);
            if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let l = StdTcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Starts worker `id` and the tasks that watch it.
pub fn spawn_worker(cfg: &Config, id: WorkerId, ctx: &SpawnContext<'_>) -> io::Result<Spawned> {
    let (mut cmd, addr, status_child) = match &cfg.app.kind {
        AppKind::Wsgi { module, callable } => {
            let sock = ctx.runtime_dir.join(format!("w{id}.sock"));
            let _ = std::fs::remove_file(&sock);
            let mut c = bundled_worker_command(cfg, ctx.runtime_dir, module, callable);
            let (parent_end, child_end) = std::os::unix::net::UnixStream::pair()?;
            c.env("GTE_SOCKET", &sock)
                .env("GTE_WORKER_ID", id.to_string());
            (
                c,
                WorkerAddr::Unix(sock),
                Some((parent_end, OwnedFd::from(child_end))),
            )
        }
        AppKind::Command(argv) => {
            let port = free_loopback_port()?;
            let args: Vec<String> = argv
                .iter()
                .map(|a| a.replace("{port}", &port.to_string()))
                .collect();
            let prog = Path::new(&args[0]);
            let prog = if prog.components().count() > 1 && !prog.is_absolute() {
                cfg.app.chdir.join(prog)
            } else {
                prog.to_path_buf()
            };
            let mut c = Command::new(prog);
            c.args(&args[1..]);
            c.env("PORT", port.to_string())
                .env("GTE_WORKER_ID", id.to_string());
            (
                c,
                WorkerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))),
                None,
            )
        }
    };
    let status_fd = status_child.as_ref().map(|(_, fd)| fd.as_raw_fd());
    prepare_command(
        &mut cmd,
        cfg,
        ctx.master_pid,
        status_fd.map(|fd| (fd, 3)),
        None,
    );
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let recent = capture_child_output(&mut child, id, pid);
    let events = ctx.events.clone();
    let ready_timeout = cfg.app.ready_timeout;
    match status_child {
        Some((parent_end, child_end)) => {
            drop(child_end);
            parent_end.set_nonblocking(true)?;
            let status = tokio::net::UnixStream::from_std(parent_end)?;
            tokio::spawn(watch_wsgi(child, id, status, ready_timeout, events));
        }
        None => {
            let WorkerAddr::Tcp(sa) = addr else {
                unreachable!("command workers listen on TCP")
            };
            tokio::spawn(watch_command(child, id, sa, ready_timeout, recent, events));
        }
    }
    Ok(Spawned { pid, addr })
}

/// The bundled worker script with the start-up contract every bundled process shares (PROTOCOL.md):
/// the app, the status channel on fd 3, threads, connections, the app directory.
pub(crate) fn bundled_worker_command(
    cfg: &Config,
    runtime_dir: &Path,
    module: &str,
    callable: &str,
) -> Command {
    let mut c = Command::new(cfg.python_path());
    c.arg(runtime_dir.join("gte_worker.py"))
        .env("GTE_APP", format!("{module}:{callable}"))
        .env("GTE_STATUS_FD", "3")
        .env("GTE_THREADS", cfg.workers.threads.to_string())
        .env("GTE_CHDIR", &cfg.app.chdir);
    c
}

/// What every Python or command process the master starts gets: the app directory, the app's
/// environment, per-worker thread-pool sizes, stdio, death with the master, its own process group,
/// and the inherited descriptors `(fd, number in the child)` (at most two: status, control).
pub(crate) fn prepare_command(
    cmd: &mut Command,
    cfg: &Config,
    master_pid: u32,
    fd_a: Option<(i32, i32)>,
    fd_b: Option<(i32, i32)>,
) {
    cmd.current_dir(&cfg.app.chdir)
        .env("PYTHONUNBUFFERED", "1")
        .envs(&cfg.app.env)
        .stdin(Stdio::null())
        .kill_on_drop(false);
    let per_worker = (crate::config::usable_cpus() / cfg.workers.count.max(1)).max(1);
    for var in THREAD_VARS {
        if !cfg.app.env.contains_key(*var) && std::env::var_os(var).is_none() {
            cmd.env(var, per_worker.to_string());
        }
    }
    if cfg.log.capture_output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    }
    guard_child(cmd, master_pid, [fd_a, fd_b]);
    if cfg.workers.sched_batch {
        batch_scheduling(cmd);
    }
}

/// In the child, between fork and exec: SCHED_BATCH (no privilege needed). A worker woken by the
/// master's write then waits for the master to block or for a free CPU instead of preempting it
/// in the middle of a batch of ready connections: on a small box this halves the context
/// switches per request (BENCHMARKS.md). Forked workers inherit it from the warm process. A
/// failure is ignored: the policy is an optimisation, not a requirement.
fn batch_scheduling(cmd: &mut Command) {
    // SAFETY: sched_setscheduler is a plain syscall, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
            Ok(())
        });
    }
}

/// In the child, between fork and exec: die with the master (PDEATHSIG, also when it is
/// SIGKILLed; set after any setuid, which clears it), exit if the master is already gone, take a
/// process group of its own (a terminal's Ctrl-C reaches the master only, which stops children in
/// order; a program's helpers are signalled as a group), get the open-file limit the master
/// started with ([`crate::fdlimit`]), and inherit `fds` as `(fd, number in the child)`.
pub(crate) fn guard_child(cmd: &mut Command, master_pid: u32, fds: [Option<(i32, i32)>; 2]) {
    let master_pid = master_pid as i32;
    // SAFETY: only async-signal-safe calls (prctl, getppid, setpgid, setrlimit, dup2, fcntl, _exit) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != master_pid {
                libc::_exit(1);
            }
            libc::setpgid(0, 0);
            crate::fdlimit::restore_in_child();
            // The targets (3, 4) are above stdio and the sources are CLOEXEC descriptors the
            // master made, so a dup2 never clobbers the other source unless it is the target.
            for (fd, target) in fds.into_iter().flatten() {
                if fd == target {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Starts the tasks copying a spawned child's stdout and stderr (when captured) into the error
/// log; returns the buffer of its last stderr lines.
pub(crate) fn capture_child_output(child: &mut Child, id: WorkerId, pid: u32) -> RecentOutput {
    let recent: RecentOutput = Arc::new(Mutex::new(VecDeque::new()));
    let pid = Arc::new(AtomicU32::new(pid));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_output(
            BufReader::new(out),
            id,
            pid.clone(),
            "stdout",
            None,
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(copy_output(
            BufReader::new(err),
            id,
            pid,
            "stderr",
            Some(recent.clone()),
        ));
    }
    recent
}

/// Copies a worker's output into the error log, line by line. `pid` is shared because a forked
/// worker's pid is known only once it reports it.
pub(crate) async fn copy_output<R: tokio::io::AsyncBufRead + Unpin>(
    mut r: R,
    id: WorkerId,
    pid: Arc<AtomicU32>,
    stream: &'static str,
    recent: Option<RecentOutput>,
) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                let pid = pid.load(Ordering::Relaxed);
                tracing::info!(target: "gte_supervisor::worker_output", worker = id, pid, stream, "{text}");
                if let Some(recent) = &recent {
                    if let Ok(mut q) = recent.lock() {
                        if q.len() >= 40 {
                            q.pop_front();
                        }
                        q.push_back(text.to_string());
                    }
                }
            }
        }
    }
}

/// Reads a bundled worker's status channel: an optional `PID n\n` line (workers forked by the
/// warm process), then `READY\n`, or `FAILED\n` and a traceback, or EOF, bounded by
/// `ready_timeout`. `on_pid` is called as soon as the pid line arrives.
pub(crate) async fn read_status(
    status: &mut tokio::net::UnixStream,
    ready_timeout: Duration,
    mut on_pid: impl FnMut(u32),
) -> Result<(), String> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(ready_timeout, async {
        let mut chunk = [0u8; 4096];
        loop {
            match status.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.starts_with(b"PID ") {
                        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                            let pid = std::str::from_utf8(&buf[4..end])
                                .ok()
                                .and_then(|t| t.trim().parse::<u32>().ok());
                            buf.drain(..=end);
                            match pid {
                                Some(pid) if pid > 1 => on_pid(pid),
                                _ => break,
                            }
                        }
                    }
                    if buf.starts_with(b"READY\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    if buf.starts_with(b"READY\n") {
        Ok(())
    } else if read.is_err() {
        Err(format!(
            "the worker did not become ready within {:?} (ready_timeout)",
            ready_timeout
        ))
    } else if let Some(tb) = buf.strip_prefix(b"FAILED\n") {
        Err(String::from_utf8_lossy(tb).trim_end().to_string())
    } else {
        Err("the process exited or was killed before it was ready, without a traceback (its exit status is logged when it is reaped)".to_string())
    }
}

/// Reads the bundled worker's status channel ("READY\n" or "FAILED\n" + traceback), then waits for exit.
async fn watch_wsgi(
    mut child: Child,
    id: WorkerId,
    mut status: tokio::net::UnixStream,
    ready_timeout: Duration,
    events: UnboundedSender<Event>,
) {
    let result = read_status(&mut status, ready_timeout, |_| {}).await;
    drop(status);
    let _ = events.send(Event::WorkerLoaded { id, result });
    if let Ok(status) = child.wait().await {
        let _ = events.send(Event::WorkerExited {
            id,
            status: Some(status),
        });
    }
}

/// A `command` worker is loaded when its port accepts connections. No event exists for that, so
/// this polls connect() with a short, growing interval, bounded by `ready_timeout`.
async fn watch_command(
    mut child: Child,
    id: WorkerId,
    addr: SocketAddr,
    ready_timeout: Duration,
    recent: RecentOutput,
    events: UnboundedSender<Event>,
) {
    let deadline = tokio::time::Instant::now() + ready_timeout;
    let mut interval = Duration::from_millis(20);
    let result = loop {
        tokio::select! {
            st = child.wait() => {
                let tail = recent.lock().map(|q| q.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default();
                let how = match &st { Ok(s) => s.to_string(), Err(e) => e.to_string() };
                let msg = format!("the command exited ({how}) before listening on {addr}\n{tail}");
                let _ = events.send(Event::WorkerLoaded { id, result: Err(msg.trim_end().to_string()) });
                if let Ok(status) = st {
                    let _ = events.send(Event::WorkerExited { id, status: Some(status) });
                }
                return;
            }
            r = tokio::net::TcpStream::connect(addr) => {
                if r.is_ok() { break Ok(()); }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(format!(
                "the command did not listen on {addr} within {ready_timeout:?} (ready_timeout)"
            ));
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(250));
    };
    let _ = events.send(Event::WorkerLoaded { id, result });
    if let Ok(status) = child.wait().await {
        let _ = events.send(Event::WorkerExited {
            id,
            status: Some(status),
        });
    }
}
