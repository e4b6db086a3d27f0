//! Starting one `[[process]]` and watching it: the program runs in its own process group with
//! `PR_SET_PDEATHSIG=SIGKILL` (it never outlives the master), its output goes line by line to the
//! error log (tagged `process = name`) or to its own log file, and one watcher task reports its
//! exit (and, for `ready = { notify = true }`, its `READY=1` datagrams) as events.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{ProcessConfig, ReadyCheck};
use crate::event::{Event, ProcessEvent};
use crate::logging::writer::LineWriter;

/// Where a process's output goes.
#[derive(Clone)]
pub enum Output {
    /// The master's error log (tracing, target `gte_supervisor::process_output`).
    ErrorLog,
    /// Its own log file.
    File(LineWriter),
    /// Inherited stdout/stderr (`[log] capture_output = false` and no `log`).
    Inherit,
}

/// Starts `cfg` (run number `run`); returns its pid.
pub fn spawn(
    cfg: &ProcessConfig,
    run: u64,
    runtime_dir: &Path,
    output: Output,
    events: UnboundedSender<Event>,
) -> io::Result<u32> {
    let prog = Path::new(&cfg.command[0]);
    let prog = if prog.components().count() > 1 && !prog.is_absolute() {
        cfg.chdir.join(prog)
    } else {
        prog.to_path_buf()
    };
    let mut cmd = Command::new(prog);
    cmd.args(&cfg.command[1..])
        .current_dir(&cfg.chdir)
        .env("PYTHONUNBUFFERED", "1")
        .env("GTE_PROCESS", &cfg.name)
        // The master's own systemd and socket-activation variables are not for its children.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .envs(&cfg.env)
        .stdin(Stdio::null())
        .kill_on_drop(false);
    if let Some((name, uid, gid)) = &cfg.user {
        cmd.uid(*uid)
            .gid(*gid)
            .env("USER", name)
            .env("LOGNAME", name);
    }
    let notify = if cfg.ready == ReadyCheck::Notify {
        let path = notify_path(runtime_dir, &cfg.name);
        let _ = std::fs::remove_file(&path);
        let sock = tokio::net::UnixDatagram::bind(&path)?;
        if let Some((_, uid, gid)) = &cfg.user {
            use std::os::unix::fs::PermissionsExt;
            // The process runs as another user: the socket becomes its own (mode 0600), and the
            // private directory lets it pass (0711: no listing, every other file stays 0600).
            std::os::unix::fs::chown(&path, Some(*uid), Some(*gid))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o711))?;
        }
        cmd.env("NOTIFY_SOCKET", &path);
        Some((sock, path))
    } else {
        None
    };
    match output {
        Output::Inherit => {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        }
        _ => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    crate::worker::spawn::guard_child(&mut cmd, std::process::id(), [None, None]);
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_output(
            BufReader::new(out),
            cfg.name.clone(),
            pid,
            "stdout",
            output.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(copy_output(
            BufReader::new(err),
            cfg.name.clone(),
            pid,
            "stderr",
            output,
        ));
    }
    let name = cfg.name.clone();
    tokio::spawn(async move {
        let status = match notify {
            None => child.wait().await,
            Some((sock, path)) => {
                let mut buf = vec![0u8; 4096];
                let st = loop {
                    tokio::select! {
                        st = child.wait() => break st,
                        r = sock.recv(&mut buf) => {
                            if let Ok(n) = r {
                                let msg = String::from_utf8_lossy(&buf[..n]);
                                if msg.lines().any(|l| l.trim() == "READY=1") {
                                    let _ = events.send(Event::Process(ProcessEvent::Notified { name: name.clone(), run }));
                                }
                            }
                        }
                    }
                };
                drop(sock);
                let _ = std::fs::remove_file(path);
                st
            }
        };
        if let Ok(status) = status {
            let _ = events.send(Event::Process(ProcessEvent::Exited { name, run, status }));
        }
    });
    Ok(pid)
}

fn notify_path(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir.join(format!("notify-{name}.sock"))
}

async fn copy_output<R: tokio::io::AsyncBufRead + Unpin>(
    mut r: R,
    name: String,
    pid: u32,
    stream: &'static str,
    output: Output,
) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => match &output {
                Output::File(w) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    w.write_line(&line);
                }
                _ => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    tracing::info!(target: "gte_supervisor::process_output", process = %name, pid, stream, "{text}");
                }
            },
        }
    }
}

/// One readiness / health check; Err says what failed.
pub async fn check(ready: &ReadyCheck, timeout: Duration) -> Result<(), String> {
    match ready {
        ReadyCheck::Started | ReadyCheck::Notify | ReadyCheck::Exit => Ok(()),
        ReadyCheck::Tcp(addr) => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
                Err(_) => Err(format!("connect {addr}: no answer within {timeout:?}")),
            }
        }
        ReadyCheck::Http { addr, host, path } => {
            match tokio::time::timeout(timeout, http_get(*addr, host, path)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "GET http://{host}{path}: no answer within {timeout:?}"
                )),
            }
        }
    }
}

/// GET with `Connection: close`; 2xx and 3xx are healthy.
async fn http_get(addr: std::net::SocketAddr, host: &str, path: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let what = format!("GET http://{host}{path}");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gte-supervisor\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(c) if (200..400).contains(&c) => Ok(()),
        Some(c) => Err(format!("{what}: status {c}")),
        None => Err(format!("{what}: no HTTP answer")),
    }
}
