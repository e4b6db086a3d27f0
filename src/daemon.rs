//! `daemon = true`: detach like a classic Unix daemon (fork, setsid, fork again, stdio to
//! /dev/null), while the foreground process waits until the daemon is serving — or prints why it
//! could not start and exits with its code — so start-up errors still reach the operator.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Mutex;

use nix::unistd::{dup2, fork, pipe2, setsid, ForkResult};

static REPORT: Mutex<Option<File>> = Mutex::new(None);

/// Detaches. Returns in the daemon only; the original process exits with the daemon's verdict.
/// Must run before any thread is started.
pub fn daemonize() -> std::io::Result<()> {
    // CLOEXEC: workers the daemon spawns must not hold the write end open.
    let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: single-threaded at this point (no runtime, no logging threads yet).
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut msg = String::new();
            let mut f = File::from(read_end);
            let mut chunk = [0u8; 4096];
            // Until the daemon says READY, or reports a failure and closes the pipe.
            while !msg.starts_with("READY") {
                match f.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => msg.push_str(&String::from_utf8_lossy(&chunk[..n])),
                }
            }
            if msg.starts_with("READY") {
                std::process::exit(0);
            }
            let (code, text) = msg
                .split_once('\n')
                .unwrap_or(("1", "the daemon exited before it was ready"));
            eprint!("{text}");
            std::process::exit(code.trim().parse().unwrap_or(1));
        }
        ForkResult::Child => {}
    }
    drop(read_end);
    setsid()?;
    // SAFETY: still single-threaded.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        ForkResult::Child => {}
    }
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let fd = devnull.into_raw_fd();
    for target in 0..3 {
        dup2(fd, target)?;
    }
    if fd > 2 {
        // SAFETY: fd is ours (from into_raw_fd) and no longer used.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let _ = std::env::set_current_dir("/");
    if let Ok(mut g) = REPORT.lock() {
        *g = Some(File::from(write_end));
    }
    Ok(())
}

/// Tells the waiting foreground process that the daemon is serving.
pub fn report_ready() {
    if let Ok(mut g) = REPORT.lock() {
        if let Some(mut f) = g.take() {
            let _ = f.write_all(b"READY\n");
        }
    }
}

/// Tells the waiting foreground process why the daemon is exiting (no-op once ready was reported).
pub fn report_failure(code: i32, message: &str) {
    if let Ok(mut g) = REPORT.lock() {
        if let Some(mut f) = g.take() {
            let _ = write!(f, "{code}\n{message}\n");
        }
    }
}
