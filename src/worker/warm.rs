//! Preload (`[app] preload = true`): the *warm process* and the workers forked from it.
//!
//! The warm process is the bundled worker script started with `GTE_MODE=warm`: it imports the app
//! once, reports `READY` on its status channel like any worker, then waits on a control socket
//! (SOCK_SEQPACKET, one message per request) for fork requests. Each request names the worker id
//! and its socket path and carries three descriptors (SCM_RIGHTS): the worker's status channel
//! and the write ends of its stdout and stderr pipes. The warm process forks twice so that the
//! worker's parent becomes the master (a child subreaper, see `main`): the master then reaps it
//! through a pidfd, times it and kills it exactly like a spawned worker, and the worker keeps
//! serving when the warm process dies. Read-only memory of the import (a model's weights) is
//! shared copy-on-write by every worker. The wire details are in `src/python/PROTOCOL.md`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio::io::BufReader;
use tokio::process::Child;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{AppKind, Config};
use crate::event::Event;
use crate::worker::spawn::{self, SpawnContext, Spawned};
use crate::worker::{WorkerAddr, WorkerId};

/// The worker id the warm process's output is logged under.
pub const WARM_LOG_ID: WorkerId = 0;

/// A running warm process, as the master holds it. Dropping it closes the control socket, which
/// tells the warm process to exit; workers already forked are not affected.
#[derive(Debug)]
pub struct Warm {
    pub pid: u32,
    control: OwnedFd,
}

/// Starts the warm process for the current configuration; its watcher task reports
/// [`Event::WarmLoaded`] and [`Event::WarmExited`].
pub fn spawn_warm(cfg: &Config, ctx: &SpawnContext<'_>) -> io::Result<Warm> {
    let AppKind::Wsgi { module, callable } = &cfg.app.kind else {
        return Err(io::Error::other("preload needs a wsgi app"));
    };
    let (status_parent, status_child) = std::os::unix::net::UnixStream::pair()?;
    let (control, control_child) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut cmd = spawn::bundled_worker_command(cfg, ctx.runtime_dir, module, callable);
    cmd.env("GTE_MODE", "warm")
        .env("GTE_CONTROL_FD", "4")
        .env("GTE_WORKER_ID", "warm");
    let status_fd = OwnedFd::from(status_child);
    spawn::prepare_command(
        &mut cmd,
        cfg,
        ctx.master_pid,
        Some((status_fd.as_raw_fd(), 3)),
        Some((control_child.as_raw_fd(), 4)),
    );
    let mut child = cmd.spawn()?;
    drop(status_fd);
    drop(control_child);
    let pid = child.id().unwrap_or(0);
    spawn::capture_child_output(&mut child, WARM_LOG_ID, pid);
    status_parent.set_nonblocking(true)?;
    let status = tokio::net::UnixStream::from_std(status_parent)?;
    tokio::spawn(watch_warm(
        child,
        pid,
        status,
        cfg.app.ready_timeout,
        ctx.events.clone(),
    ));
    Ok(Warm { pid, control })
}

async fn watch_warm(
    mut child: Child,
    pid: u32,
    mut status: tokio::net::UnixStream,
    ready_timeout: Duration,
    events: UnboundedSender<Event>,
) {
    let result = spawn::read_status(&mut status, ready_timeout, |_| {}).await;
    drop(status);
    let _ = events.send(Event::WarmLoaded { pid, result });
    if let Ok(status) = child.wait().await {
        let _ = events.send(Event::WarmExited { pid, status });
    }
}

impl Warm {
    /// Asks the warm process to fork worker `id`. Returns at once (the pid arrives later as
    /// [`Event::WorkerForked`]); fails only when the request cannot be handed over (the warm
    /// process is gone or its queue is full).
    pub fn fork_worker(
        &self,
        cfg: &Config,
        id: WorkerId,
        ctx: &SpawnContext<'_>,
    ) -> io::Result<Spawned> {
        let sock = ctx.runtime_dir.join(format!("w{id}.sock"));
        let _ = std::fs::remove_file(&sock);
        let (status_parent, status_child) = std::os::unix::net::UnixStream::pair()?;
        let capture = cfg.log.capture_output;
        let (out_read, out_write) = output_pipe(capture, std::io::stdout().as_fd())?;
        let (err_read, err_write) = output_pipe(capture, std::io::stderr().as_fd())?;
        let msg = format!("F\0{id}\0{}", sock.display());
        let fds = [
            status_child.as_raw_fd(),
            out_write.as_raw_fd(),
            err_write.as_raw_fd(),
        ];
        let iov = [io::IoSlice::new(msg.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            self.control.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| {
            io::Error::other(format!(
                "cannot hand a fork request to the warm process {}: {e}",
                self.pid
            ))
        })?;
        drop((status_child, out_write, err_write));
        let pid = Arc::new(AtomicU32::new(0)); // set by watch_forked when the worker reports it
        for (read, stream) in [(out_read, "stdout"), (err_read, "stderr")] {
            if let Some(r) = read {
                let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(r)?;
                tokio::spawn(spawn::copy_output(
                    BufReader::new(rx),
                    id,
                    pid.clone(),
                    stream,
                    None,
                ));
            }
        }
        status_parent.set_nonblocking(true)?;
        let status = tokio::net::UnixStream::from_std(status_parent)?;
        tokio::spawn(watch_forked(
            id,
            status,
            cfg.app.ready_timeout,
            ctx.events.clone(),
            pid,
        ));
        Ok(Spawned {
            pid: 0,
            addr: WorkerAddr::Unix(sock),
        })
    }

    /// Asks the warm process to exit (SIGTERM; it also exits when the control socket closes).
    pub fn terminate(self) {
        if self.pid > 1 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// A forked worker's stdout or stderr: a pipe whose read end the master copies into the error log
/// (`capture_output`), or else a duplicate of the master's own stream.
fn output_pipe(
    capture: bool,
    own: std::os::fd::BorrowedFd<'_>,
) -> io::Result<(Option<OwnedFd>, OwnedFd)> {
    if capture {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok((Some(r), w))
    } else {
        Ok((None, own.try_clone_to_owned()?))
    }
}

/// Watches a forked worker: its pid, READY (or the failure), then its exit through a pidfd.
async fn watch_forked(
    id: WorkerId,
    mut status: tokio::net::UnixStream,
    ready_timeout: Duration,
    events: UnboundedSender<Event>,
    shared_pid: Arc<AtomicU32>,
) {
    let mut pidfd: Option<(u32, io::Result<OwnedFd>)> = None;
    let result = spawn::read_status(&mut status, ready_timeout, |pid| {
        if pidfd.is_none() {
            shared_pid.store(pid, Ordering::Relaxed);
            pidfd = Some((pid, pidfd_open(pid)));
            let _ = events.send(Event::WorkerForked { id, pid });
        }
    })
    .await;
    drop(status);
    let _ = events.send(Event::WorkerLoaded { id, result });
    let status = match pidfd {
        None => None,
        Some((pid, Ok(fd))) => match wait_pidfd(fd).await {
            Ok(st) => Some(st),
            Err(e) => {
                tracing::error!(worker = id, pid, error = %e, "cannot wait for a forked worker");
                None
            }
        },
        Some((pid, Err(e))) => {
            tracing::error!(worker = id, pid, error = %e, "pidfd_open failed for a forked worker");
            None
        }
    };
    let _ = events.send(Event::WorkerExited { id, status });
}

/// `pidfd_open(2)`: a descriptor that becomes readable when the process exits.
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the returned descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // pidfds are not CLOEXEC by default on older kernels' glibc wrappers: make sure.
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(fd)
}

/// Waits until the process behind `fd` (a child of ours) exits, and reaps it.
async fn wait_pidfd(fd: OwnedFd) -> io::Result<ExitStatus> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which deregisters it before closing it.
    let afd = unsafe {
        AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            .map_err(|e| io::Error::other(e.to_string()))?
    };
    loop {
        let mut guard = afd.readable().await?;
        // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                afd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled the SIGCHLD fields of info (or left it zeroed with WNOHANG).
        let (pid, code) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            guard.clear_ready();
            continue;
        }
        let raw = match info.si_code {
            libc::CLD_EXITED => (code & 0xff) << 8,
            libc::CLD_DUMPED => (code & 0x7f) | 0x80,
            _ => code & 0x7f,
        };
        return Ok(ExitStatus::from_raw(raw));
    }
}
