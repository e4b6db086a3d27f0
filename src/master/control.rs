//! The control socket: a unix socket beside the pidfile (mode 0600) on which `gte-supervisor
//! status|reload|stop` talk to the running master. One line in (the command), text out. Each
//! command is an event for the master task, answered through a oneshot channel, so the answer is
//! read from the master's own table — not guessed from `ps`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc::UnboundedSender;

use crate::event::Event;

/// `/run/x/gte-supervisor.pid` → `/run/x/gte-supervisor.ctl`.
pub fn control_path(pidfile: &Path) -> PathBuf {
    pidfile.with_extension("ctl")
}

/// Binds the control socket with mode 0600 (created under a restrictive umask: no window in
/// which another user could connect).
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    l
}

/// Serves control requests on a bound listener ([`bind`]) in a task of the current runtime.
pub fn spawn_serve(
    listener: std::os::unix::net::UnixListener,
    events: UnboundedSender<Event>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    tokio::spawn(serve(UnixListener::from_std(listener)?, events));
    Ok(())
}

/// Serves control requests until the runtime ends.
async fn serve(listener: UnixListener, events: UnboundedSender<Event>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r.take(1024));
            let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            if events
                .send(Event::Control {
                    command: line.trim().to_string(),
                    reply: tx,
                })
                .is_err()
            {
                return;
            }
            let answer = match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(a)) => a,
                _ => "the master did not answer\n".to_string(),
            };
            let _ = w.write_all(answer.as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Client side (blocking): sends `command`, returns the answer.
pub fn request(path: &Path, command: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
