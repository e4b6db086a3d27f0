//! systemd integration: the `sd_notify` datagram protocol (READY=1, RELOADING=1, STOPPING=1,
//! STATUS=…) written directly — it is one datagram to `$NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`, if set. Errors are
/// ignored: a missing or gone notify socket must never stop the service.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    // Never block the master: a receiver that does not read (a full queue) loses the message.
    if sock.set_nonblocking(true).is_err() {
        return;
    }
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
            let _ = sock.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = sock.send_to(state.as_bytes(), &path);
    }
}

/// Ready, with a status line for `systemctl status`.
pub fn ready(status: &str) {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}

pub fn status(status: &str) {
    notify(&format!("STATUS={status}"));
}

pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping");
}

/// Half of `$WATCHDOG_USEC` when the watchdog is enabled for this process.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

/// The first listening socket passed by socket activation (`LISTEN_FDS`/`LISTEN_PID`), if any.
/// The variables are removed so that workers do not see them.
pub fn activated_listener() -> Option<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    // SAFETY: single-threaded at this point (called before the runtime starts).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if pid != std::process::id() || n < 1 {
        return None;
    }
    const FIRST: i32 = 3;
    let st = nix::sys::stat::fstat(FIRST).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // Our fd from now on: keep it from leaking into workers.
    // SAFETY: fd 3 was handed to this process by systemd (LISTEN_PID matched) and is a socket;
    // nothing else in the process owns it.
    unsafe {
        let flags = libc::fcntl(FIRST, libc::F_GETFD);
        libc::fcntl(FIRST, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        Some(std::net::TcpListener::from_raw_fd(FIRST))
    }
}
