//! Entry point: arguments → config → pidfile and listener → logging → the master task. Maps every
//! failure to a documented exit code (see `master::exit`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use gte_supervisor::cli::{Cli, Command};
use gte_supervisor::master::{self, exit, Master, MasterParts};
use gte_supervisor::{check, config, daemon, logging, migrate, pidfile, proxy, worker};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_some() {
        // Short-lived commands that print: end quietly when their output is cut off
        // (`check | head`). The master keeps SIGPIPE ignored: its sockets report EPIPE instead.
        // SAFETY: resetting a signal disposition before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = match cli.command {
        None => run(&cli.config),
        Some(Command::Check) => check::run(&cli.config),
        Some(Command::Migrate {
            gunicorn_conf,
            python,
        }) => match migrate::migrate(&gunicorn_conf, &python) {
            Ok(text) => {
                print!("{text}");
                exit::OK
            }
            Err(e) => {
                eprintln!("gte-supervisor: {e}");
                exit::CONFIG
            }
        },
        Some(Command::Reload) => control(&cli.config, nix::sys::signal::Signal::SIGHUP),
        Some(Command::Stop) => control(&cli.config, nix::sys::signal::Signal::SIGTERM),
        Some(Command::Status) => status(&cli.config),
        Some(Command::Restart { name }) => restart(&cli.config, &name),
    };
    ExitCode::from(code as u8)
}

fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("gte-supervisor: {msg}");
    daemon::report_failure(code, &format!("gte-supervisor: {msg}"));
    gte_supervisor::upgrade::report_failure(&msg.to_string());
    code
}

/// Creates the private directory for worker sockets and the worker script.
fn make_runtime_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("gte-supervisor.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn run(config_path: &Path) -> i32 {
    gte_supervisor::upgrade::take_ready_pipe();
    let cfg = match config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(exit::CONFIG, e),
    };
    for (target, what) in [(&cfg.log.error, "error"), (&cfg.log.access, "access")] {
        if let Err(e) = logging::check_writable(target, what) {
            return fail(exit::CONFIG, e);
        }
    }
    if let Some(p) = &cfg.pidfile {
        if pidfile::is_locked(p) {
            let held = pidfile::PidfileError::Held {
                path: p.clone(),
                pid: pidfile::read_pid(p),
            };
            return fail(exit::IN_USE, held);
        }
    }
    // The installed binary's path, read now: after a package upgrade replaces the file,
    // /proc/self/exe names a deleted inode, but this path names the new binary (SIGUSR2).
    let exe = std::env::current_exe().ok();
    // A socket inherited from the old master (upgrade) or handed over by systemd socket
    // activation replaces our own bind.
    let inherited = gte_supervisor::upgrade::inherited_listener()
        .or_else(gte_supervisor::systemd::activated_listener);
    let std_listener = match inherited {
        Some(l) => l,
        None => match bind_std(&cfg) {
            Ok(l) => l,
            Err(e) => return fail(exit::IN_USE, format!("cannot listen on {}: {e}", cfg.bind)),
        },
    };
    // Metrics (issue 6): their own listener, bound up front like the public one.
    let metrics_listener = match cfg.metrics {
        Some(addr) => match gte_supervisor::metrics::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(
                    exit::IN_USE,
                    format!("cannot listen on {addr} (metrics): {e}"),
                )
            }
        },
        None => None,
    };
    if cfg.daemon {
        if let Err(e) = daemon::daemonize() {
            return fail(exit::RUNTIME, format!("cannot detach: {e}"));
        }
    }
    let listen_fd = std::os::fd::AsFd::as_fd(&std_listener)
        .try_clone_to_owned()
        .ok();
    let pidfile = match &cfg.pidfile {
        Some(p) => match pidfile::Pidfile::acquire(p, std::process::id()) {
            Ok(pf) => Some(pf),
            Err(e @ pidfile::PidfileError::Held { .. }) => return fail(exit::IN_USE, e),
            Err(e) => return fail(exit::RUNTIME, e),
        },
        None => None,
    };
    let control_listener = match &cfg.pidfile {
        Some(p) => match master::control::bind(&master::control::control_path(p)) {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(
                    exit::RUNTIME,
                    format!(
                        "cannot create the control socket beside {}: {e}",
                        p.display()
                    ),
                )
            }
        },
        None => None,
    };
    // One or two descriptors per client connection: take the hard open-file limit (children get
    // the original back).
    let nofile = gte_supervisor::fdlimit::raise();
    // Workers forked by the warm process (preload) are handed to the master when their
    // intermediate parent exits: the master is their subreaper, so it reaps them like the others.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return fail(
            exit::RUNTIME,
            format!(
                "cannot become a child subreaper: {}",
                std::io::Error::last_os_error()
            ),
        );
    }
    let control_path = cfg.pidfile.as_deref().map(master::control::control_path);
    let pidfile_path = cfg.pidfile.clone();
    let runtime_dir = match make_runtime_dir() {
        Ok(d) => d,
        Err(e) => {
            return fail(
                exit::RUNTIME,
                format!("cannot create the runtime directory: {e}"),
            )
        }
    };
    if let Err(e) = worker::spawn::install_worker_script(&runtime_dir) {
        return fail(
            exit::RUNTIME,
            format!("cannot write the worker script: {e}"),
        );
    }
    let rt = if cfg.master_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.master_threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return fail(exit::RUNTIME, format!("cannot start the runtime: {e}")),
    };
    let runtime_dir2 = runtime_dir.clone();
    let code = rt.block_on(async move {
        let logs = match logging::init(&cfg.log) {
            Ok(l) => l,
            Err(e) => return fail(exit::CONFIG, e),
        };
        if let Some((old, new)) = nofile {
            tracing::debug!(old, new, "open-file limit raised to the hard limit");
        }
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|_| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(e) => return fail(exit::RUNTIME, format!("listener: {e}")),
        };
        let shared = Arc::new(proxy::Shared::new(&cfg, logs.access.clone()));
        // Metrics (issue 6): serve /metrics, sampling the proxy's queue and ready workers.
        if let (Some(l), Some(m)) = (metrics_listener, shared.metrics.clone()) {
            let s = shared.clone();
            let dropped = logs.dropped_lines();
            let sampler = Box::new(move || gte_supervisor::metrics::Sample {
                queued: s.pool.queued(),
                ready_workers: s.ready_workers.load(std::sync::atomic::Ordering::Relaxed),
                dropped_log_lines: dropped(),
            });
            tokio::spawn(gte_supervisor::metrics::serve(l, m, sampler));
        }
        let master = Master::new(MasterParts {
            cfg,
            config_path: config_path.to_path_buf(),
            shared,
            listener,
            runtime_dir: runtime_dir2,
            logs,
            pidfile,
            listen_fd,
            exe,
        });
        if let Err(e) = master::forward_signals(master.sender()) {
            return fail(
                exit::RUNTIME,
                format!("cannot install signal handlers: {e}"),
            );
        }
        if let Some(l) = control_listener {
            if let Err(e) = master::control::spawn_serve(l, master.sender()) {
                return fail(exit::RUNTIME, format!("control socket: {e}"));
            }
        }
        let code = master.run().await;
        if code != exit::OK {
            daemon::report_failure(
                code,
                "gte-supervisor: the service failed to start; see the error log",
            );
        }
        code
    });
    // Workers are gone; the runtime may still hold detached tasks: do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    let _ = std::fs::remove_dir_all(&runtime_dir);
    // After an upgrade the control socket's name belongs to the new master: leave it.
    if let (Some(c), Some(p)) = (control_path, &pidfile_path) {
        if pidfile::read_pid(p).is_none_or(|pid| pid == std::process::id()) {
            let _ = std::fs::remove_file(c);
        }
    }
    code
}

fn bind_std(cfg: &config::Config) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn, SockaddrIn6,
    };
    let family = if cfg.bind.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match cfg.bind {
        std::net::SocketAddr::V4(a) => bind(raw, &SockaddrIn::from(a))?,
        std::net::SocketAddr::V6(a) => bind(raw, &SockaddrIn6::from(a))?,
    }
    listen(
        &fd,
        Backlog::new(cfg.backlog as i32).unwrap_or(Backlog::MAXCONN),
    )?;
    Ok(std::net::TcpListener::from(fd))
}

fn master_pid(config_path: &Path) -> Result<(PathBuf, u32), (i32, String)> {
    let cfg = config::load(config_path).map_err(|e| (exit::CONFIG, e.to_string()))?;
    let Some(p) = cfg.pidfile else {
        return Err((
            exit::CONFIG,
            format!(
                "{}: no pidfile is configured, so the running master cannot be found",
                config_path.display()
            ),
        ));
    };
    if let Err(e) = std::fs::File::open(&p) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return Err((
                exit::RUNTIME,
                format!(
                    "cannot read pidfile {}: {e} (run as the service user or root)",
                    p.display()
                ),
            ));
        }
    }
    match pidfile::read_pid(&p) {
        Some(pid) if pidfile::is_locked(&p) => Ok((p, pid)),
        Some(pid) => Err((
            exit::RUNTIME,
            format!(
                "no master is running: pidfile {} is stale (pid {pid} does not hold it)",
                p.display()
            ),
        )),
        None => Err((
            exit::RUNTIME,
            format!("no master is running (no pidfile at {})", p.display()),
        )),
    }
}

fn control(config_path: &Path, sig: nix::sys::signal::Signal) -> i32 {
    let (path, pid) = match master_pid(config_path) {
        Ok(x) => x,
        Err((code, msg)) => return fail(code, msg),
    };
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
        return fail(
            exit::RUNTIME,
            format!("cannot signal master pid {pid}: {e}"),
        );
    }
    if sig == nix::sys::signal::Signal::SIGTERM {
        // Wait for it to let go of the pidfile (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while pidfile::is_locked(&path) {
            if std::time::Instant::now() > deadline {
                return fail(
                    exit::RUNTIME,
                    format!("master pid {pid} is still running after 120 s"),
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        println!("stopped master pid {pid}");
    } else {
        println!("sent {sig} to master pid {pid}");
    }
    exit::OK
}

/// `restart NAME`: asks the master, over its control socket, to restart one `[[process]]`.
fn restart(config_path: &Path, name: &str) -> i32 {
    let (path, pid) = match master_pid(config_path) {
        Ok(x) => x,
        Err((code, msg)) => return fail(code, msg),
    };
    let socket = master::control::control_path(&path);
    match master::control::request(&socket, &format!("restart {name}")) {
        Ok(text) if text.starts_with("restarting") => {
            print!("{text}");
            exit::OK
        }
        Ok(text) => fail(exit::RUNTIME, text.trim_end()),
        Err(e) => fail(
            exit::RUNTIME,
            format!("master pid {pid}: its control socket did not answer: {e}"),
        ),
    }
}

fn status(config_path: &Path) -> i32 {
    match master_pid(config_path) {
        Ok((path, pid)) => {
            match master::control::request(&master::control::control_path(&path), "status") {
                Ok(text) => print!("{text}"),
                Err(e) => println!(
                    "running: master pid {pid} (pidfile {}); its control socket did not answer: {e}",
                    path.display()
                ),
            }
            exit::OK
        }
        Err((code, msg)) => {
            println!("{msg}");
            if code == exit::RUNTIME {
                3
            } else {
                code
            }
        }
    }
}
