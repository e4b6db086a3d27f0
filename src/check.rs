//! `gte-supervisor check -c FILE`, in the spirit of `nginx -t`: validate the file, print the
//! effective configuration, then check what the deployment guide used to make people check by
//! hand — chdir, the interpreter, the app module (found, not imported: no model is loaded), the
//! log and pidfile directories, the bind address.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::config::{self, AppKind, Config, LogTarget};
use crate::master::exit;
use crate::pidfile;

/// Finds `module` from `chdir` without importing it (no parent package `__init__` runs either).
const FIND_MODULE_PY: &str = r#"
import sys, importlib.machinery as m, importlib.util as u
name, chdir = sys.argv[1], sys.argv[2]
path = [chdir] + [p for p in sys.path if p not in ("", chdir)]
parts = name.split(".")
spec = m.PathFinder.find_spec(parts[0], path)
if spec is None and len(parts) == 1 and parts[0] in sys.builtin_module_names:
    print("builtin"); sys.exit(0)
for i, part in enumerate(parts[1:], 1):
    if spec is None or not spec.submodule_search_locations:
        break
    spec = m.PathFinder.find_spec(".".join(parts[:i + 1]), list(spec.submodule_search_locations))
if spec is None:
    print("module %r not found from %s (sys.path: %s)" % (name, chdir, path[:4])); sys.exit(1)
print(spec.origin or "namespace package")
"#;

struct Report {
    errors: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        println!("ok:    {what}");
    }
    fn error(&mut self, what: &str) {
        println!("error: {what}");
        self.errors += 1;
    }
    fn note(&mut self, what: &str) {
        println!("note:  {what}");
    }
}

fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<std::process::Output, String> {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = Vec::new();
                let mut err = Vec::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_end(&mut out);
                }
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_end(&mut err);
                }
                return Ok(std::process::Output {
                    status,
                    stdout: out,
                    stderr: err,
                });
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {limit:?}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn dir_writable(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("directory {} is not writable: {e}", dir.display()))
}

fn check_file_target(r: &mut Report, path: &Path, what: &str) {
    if path.exists() {
        match std::fs::OpenOptions::new().append(true).open(path) {
            Ok(_) => r.ok(&format!("{what} {} is writable", path.display())),
            Err(e) => r.error(&format!("{what} {}: {e}", path.display())),
        }
    } else {
        let dir = path.parent().unwrap_or(Path::new("/"));
        match dir_writable(dir) {
            Ok(()) => r.ok(&format!("{what} {} can be created", path.display())),
            Err(e) => r.error(&format!("{what} {}: {e}", path.display())),
        }
    }
}

/// Runs the checks; returns the exit code.
pub fn run(config_path: &Path) -> i32 {
    let cfg = match config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gte-supervisor: {e}");
            eprintln!(
                "gte-supervisor: configuration file {} test failed",
                config_path.display()
            );
            return exit::CONFIG;
        }
    };
    println!("# effective configuration of {}", cfg.source.display());
    print!("{}", cfg.describe());
    println!();
    let mut r = Report { errors: 0 };
    environment(&cfg, &mut r);
    if r.errors == 0 {
        println!(
            "gte-supervisor: configuration file {} test is successful",
            cfg.source.display()
        );
        exit::OK
    } else {
        eprintln!(
            "gte-supervisor: configuration file {} test failed ({} error{})",
            cfg.source.display(),
            r.errors,
            if r.errors == 1 { "" } else { "s" }
        );
        exit::CONFIG
    }
}

fn environment(cfg: &Config, r: &mut Report) {
    let chdir = &cfg.app.chdir;
    let chdir_ok = match std::fs::read_dir(chdir) {
        Ok(_) => {
            r.ok(&format!("chdir {} exists and is readable", chdir.display()));
            true
        }
        Err(e) => {
            r.error(&format!("chdir {}: {e}", chdir.display()));
            false
        }
    };
    match &cfg.app.kind {
        _ if !cfg.pool => r.note("no [app]: no worker pool, only [[process]] entries"),
        AppKind::Wsgi { module, callable } => {
            let python = cfg.python_path();
            let mut cmd = Command::new(&python);
            cmd.args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"]);
            if chdir_ok {
                cmd.current_dir(chdir);
            }
            let version = match run_bounded(&mut cmd, Duration::from_secs(20)) {
                Ok(o) if o.status.success() => {
                    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    r.ok(&format!(
                        "interpreter {} runs (Python {v})",
                        python.display()
                    ));
                    true
                }
                Ok(o) => {
                    r.error(&format!(
                        "interpreter {} failed: {}",
                        python.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                    false
                }
                Err(e) => {
                    r.error(&format!("interpreter {} cannot run: {e}", python.display()));
                    false
                }
            };
            if version && chdir_ok {
                let mut cmd = Command::new(&python);
                cmd.arg("-c")
                    .arg(FIND_MODULE_PY)
                    .arg(module)
                    .arg(chdir)
                    .current_dir(chdir)
                    .envs(&cfg.app.env);
                match run_bounded(&mut cmd, Duration::from_secs(20)) {
                    Ok(o) if o.status.success() => r.ok(&format!(
                        "app module {module} found at {} (not imported; callable {callable} is checked at start)",
                        String::from_utf8_lossy(&o.stdout).trim()
                    )),
                    Ok(o) => r.error(&format!(
                        "app {module}:{callable}: {}",
                        String::from_utf8_lossy(&o.stdout).trim()
                    )),
                    Err(e) => r.error(&format!("app module lookup failed: {e}")),
                }
            }
        }
        AppKind::Command(argv) => {
            let prog = Path::new(&argv[0]);
            let found = if prog.components().count() > 1 {
                let p = if prog.is_absolute() {
                    prog.to_path_buf()
                } else {
                    chdir.join(prog)
                };
                p.is_file().then_some(p)
            } else {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join(prog))
                        .find(|p| p.is_file())
                })
            };
            match found {
                Some(p) => r.ok(&format!("command {} found", p.display())),
                None => r.error(&format!("command {} not found", argv[0])),
            }
        }
    }
    processes(cfg, r);
    for (target, what) in [
        (&cfg.log.access, "access log"),
        (&cfg.log.error, "error log"),
    ] {
        if let LogTarget::File(p) = target {
            check_file_target(r, p, what);
        }
    }
    let mut running_master = None;
    if let Some(p) = &cfg.pidfile {
        if pidfile::is_locked(p) {
            let pid = pidfile::read_pid(p);
            r.note(&format!(
                "a master is running with this pidfile (pid {})",
                pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            ));
            running_master = pid;
        } else {
            let dir = p.parent().unwrap_or(Path::new("/"));
            match dir_writable(dir) {
                Ok(()) => r.ok(&format!("pidfile directory {} is writable", dir.display())),
                Err(e) => r.error(&format!("pidfile {}: {e}", p.display())),
            }
        }
    }
    match std::net::TcpListener::bind(cfg.bind) {
        Ok(_) => r.ok(&format!("bind address {} is free", cfg.bind)),
        Err(e) if running_master.is_some() && e.kind() == std::io::ErrorKind::AddrInUse => r.note(
            &format!("bind address {} is in use by the running master", cfg.bind),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match listener_owner(cfg.bind) {
            Some((pid, name)) if name == "gte-supervisor" => r.note(&format!(
                "bind address {} is in use by gte-supervisor (pid {pid}): a running master, \
                 fine for a reload (this config has no pidfile to tell whose)",
                cfg.bind
            )),
            Some((pid, name)) => r.error(&format!(
                "bind address {}: {e}: held by {name} (pid {pid}); stop it first",
                cfg.bind
            )),
            None => r.error(&format!("bind address {}: {e}", cfg.bind)),
        },
        Err(e) => r.error(&format!("bind address {}: {e}", cfg.bind)),
    }
    if cfg.pool && matches!(cfg.app.kind, AppKind::Wsgi { .. }) {
        let dir = cfg.body_temp_dir.display();
        match crate::proxy::spool_file(&cfg.body_temp_dir) {
            Ok(_) => r.ok(&format!(
                "body_temp_dir {dir} takes request bodies over body_buffer_size"
            )),
            Err(e) => r.error(&format!(
                "body_temp_dir {dir}: cannot create a file there: {e} (request bodies over body_buffer_size would get 500)"
            )),
        }
    }
    let w = &cfg.workers;
    if cfg.app.preload {
        r.note("preload = true: the app is imported once in a warm process and the workers are forked from it (imports that start threads: see workers.toml(5))");
    }
    if w.count_auto {
        r.note(&format!(
            "count = \"auto\" resolved to {} (2 x {} usable CPUs + 1)",
            w.count,
            config::usable_cpus()
        ));
    }
}

/// `[[process]]` entries: working directory, program, own log file.
fn processes(cfg: &Config, r: &mut Report) {
    for p in &cfg.processes {
        let name = &p.name;
        if let Err(e) = std::fs::read_dir(&p.chdir) {
            r.error(&format!("process {name}: chdir {}: {e}", p.chdir.display()));
        }
        let prog = Path::new(&p.command[0]);
        let found = if prog.components().count() > 1 {
            let path = if prog.is_absolute() {
                prog.to_path_buf()
            } else {
                p.chdir.join(prog)
            };
            path.is_file().then_some(path)
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(prog))
                    .find(|f| f.is_file())
            })
        };
        match found {
            Some(f) => r.ok(&format!("process {name}: command {} found", f.display())),
            None => r.error(&format!(
                "process {name}: command {} not found",
                p.command[0]
            )),
        }
        if let Some(log) = &p.log {
            check_file_target(r, log, &format!("process {name} log"));
        }
    }
}

/// The process listening on `addr`'s port (same address, or a wildcard one): its pid and
/// command name, from /proc/net/tcp{,6} and the sockets in /proc/PID/fd. None when it cannot
/// be seen (another user's process without root, or no /proc).
fn listener_owner(addr: std::net::SocketAddr) -> Option<(u32, String)> {
    let port = format!("{:04X}", addr.port());
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (10th field); st 0A = LISTEN
            if f.len() > 9 && f[3] == "0A" && f[1].rsplit(':').next() == Some(port.as_str()) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                let name = std::fs::read_to_string(proc_entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Some((pid, name));
            }
        }
    }
    None
}
