//! In-place binary upgrade (SIGUSR2). The running master starts the installed binary as a new
//! master that inherits the listening socket (fd 3, `GTE_UPGRADE_FD`), so no connection is ever
//! refused; the old master renames its pidfile to `<pidfile>.oldbin` so the new one can take the
//! name. The new master reports "READY" on a pipe (fd 4, `GTE_UPGRADE_READY_FD`) once its workers
//! are ready; only then does the old master drain and exit. If the new master fails, the old one
//! takes its pidfile back and keeps serving.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;

use crate::event::Event;

const FD_ENV: &str = "GTE_UPGRADE_FD";
const READY_ENV: &str = "GTE_UPGRADE_READY_FD";

static READY_PIPE: Mutex<Option<File>> = Mutex::new(None);

/// In a new master started by an upgrade: takes the pipe on which it reports to the old master
/// (first thing, so that even a configuration error can be reported on it). Must run before any
/// thread is started (it edits the environment).
pub fn take_ready_pipe() {
    let Some(r) = std::env::var(READY_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: single-threaded at this point (before the runtime and logging threads start).
    unsafe {
        std::env::remove_var(READY_ENV);
    }
    set_cloexec(r);
    // SAFETY: the old master passed this pipe's write end to us as fd `r`; we own it now.
    let f = unsafe { File::from_raw_fd(r) };
    if let Ok(mut g) = READY_PIPE.lock() {
        *g = Some(f);
    }
}

/// In a new master started by an upgrade: the inherited listener. Must run before any thread is
/// started (it edits the environment).
pub fn inherited_listener() -> Option<std::net::TcpListener> {
    let fd: i32 = std::env::var(FD_ENV).ok()?.parse().ok()?;
    // SAFETY: single-threaded at this point (before the runtime and logging threads start).
    unsafe {
        std::env::remove_var(FD_ENV);
    }
    set_cloexec(fd);
    let st = nix::sys::stat::fstat(fd).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: the old master handed this listening socket to us as fd `fd`; nothing else owns it.
    Some(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on an fd number; harmless if it is not open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Tells the old master (if this master was started by an upgrade) that we serve now.
pub fn report_ready() {
    if let Ok(mut g) = READY_PIPE.lock() {
        if let Some(mut f) = g.take() {
            let _ = f.write_all(b"READY\n");
        }
    }
}

/// Tells the old master (if this master was started by an upgrade) why we cannot start: it logs
/// the reason in its own error log, which an operator reads, instead of only our exit status.
pub fn report_failure(why: &str) {
    if let Ok(mut g) = READY_PIPE.lock() {
        if let Some(mut f) = g.take() {
            let _ = f.write_all(format!("FAILED {}\n", why.trim()).as_bytes());
        }
    }
}

/// Starts the new master from `exe` with the listener `listen_fd`; reports the outcome as an
/// `UpgradeReady` or `UpgradeFailed` event. Returns the new master's pid.
pub fn start_new_master(
    exe: &Path,
    config: &Path,
    listen_fd: &OwnedFd,
    events: UnboundedSender<Event>,
) -> std::io::Result<u32> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let listen_raw = listen_fd.as_raw_fd();
    let write_raw = write_end.as_raw_fd();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("-c")
        .arg(config)
        .env(FD_ENV, "3")
        .env(READY_ENV, "4")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    // SAFETY: only dup/dup2/setrlimit (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The new master raises the open-file limit itself, from the original.
            crate::fdlimit::restore_in_child();
            // Move both out of the way first so neither is clobbered by the other's target.
            let l = libc::dup(listen_raw);
            let w = libc::dup(write_raw);
            if l < 0 || w < 0 || libc::dup2(l, 3) < 0 || libc::dup2(w, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(l);
            libc::close(w);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(write_end);
    let pid = child.id().unwrap_or(0);
    let read = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    tokio::spawn(async move {
        let mut read = read;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64];
        // Until "READY" arrives, or every writer is gone (the new master died or gave up).
        while !buf.starts_with(b"READY") {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        if buf.starts_with(b"READY") {
            let _ = events.send(Event::UpgradeReady { pid });
            // The new master outlives us; it is reparented when we exit.
            drop(child);
        } else {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            let said = String::from_utf8_lossy(&buf);
            let why = match said.strip_prefix("FAILED ") {
                Some(reason) => format!(
                    "the new master exited before it was ready ({status}): {}",
                    reason.trim_end()
                ),
                None => format!("the new master exited before it was ready ({status})"),
            };
            let _ = events.send(Event::UpgradeFailed { pid, why });
        }
    });
    Ok(pid)
}
