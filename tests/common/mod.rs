//! Integration-test harness for gte-supervisor (std only).
//!
//! Every test gets its own directory under `target/test-tmp/<name>-<pid>-<n>` and its own free
//! loopback port, starts the real binary with a real Python app, and waits for the systemd-style
//! `READY=1` datagram on its own `NOTIFY_SOCKET`. Every process a test starts is killed by pid
//! (SIGKILL) when its `Server` is dropped, also on panic; the master additionally gets
//! `PR_SET_PDEATHSIG=SIGKILL` so that a killed test runner does not leak it. Nothing is ever
//! killed by name.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gte-supervisor");
pub const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// How long a master may take to report READY=1.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Socket read/write timeout of the test HTTP client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll interval for conditions that have no event.
pub const POLL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------
// Signals and /proc
// ---------------------------------------------------------------------------------------------

mod sys {
    extern "C" {
        pub fn kill(pid: i32, sig: i32) -> i32;
        pub fn prctl(option: i32, ...) -> i32;
    }
}

pub const SIGINT: i32 = 2;
pub const SIGQUIT: i32 = 3;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
const PR_SET_PDEATHSIG: i32 = 1;

/// Send `sig` to exactly one process. Refuses pids 0 and 1 (and the test process itself).
pub fn send_signal(pid: u32, sig: i32) -> bool {
    assert!(
        pid > 1 && pid != std::process::id(),
        "refusing to signal pid {pid}"
    );
    unsafe { sys::kill(pid as i32, sig) == 0 }
}

fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the comm field is in parentheses and may contain spaces: split after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Process state letter (R, S, D, Z, ...) or None when the process does not exist.
pub fn proc_state(pid: u32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// Start time (clock ticks since boot) — used to make sure a recorded pid was not reused.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    // field 22 of /proc/pid/stat; after the comm, index 0 is field 3 → field 22 is index 19
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

pub fn proc_ppid(pid: u32) -> Option<u32> {
    proc_stat_fields(pid)?.get(1)?.parse().ok()
}

/// True when the process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(c) if c != 'Z' && c != 'X')
}

pub fn proc_cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Direct children of `pid`, collected from every task's `children` file.
pub fn proc_children(pid: u32) -> Vec<u32> {
    let mut out = BTreeSet::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out.into_iter().collect()
}

/// All descendants of `pid` (children, grandchildren, ...).
pub fn proc_descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for c in proc_children(p) {
            if !out.contains(&c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// Live processes whose working directory is inside `dir` (every worker of a test app has its
/// cwd in the test's own temp dir, so this finds a test's processes even after re-parenting).
pub fn procs_with_cwd_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cwd) = fs::read_link(e.path().join("cwd")) {
                if cwd.starts_with(dir) && pid_alive(pid) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// A pid plus its start time, so that cleanup never kills a recycled pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    pub start: u64,
}

impl ProcId {
    pub fn of(pid: u32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start: proc_start_time(pid)?,
        })
    }
    pub fn is_same_live_process(&self) -> bool {
        pid_alive(self.pid) && proc_start_time(self.pid) == Some(self.start)
    }
    pub fn kill(&self) {
        if self.pid > 1 && self.pid != std::process::id() && self.is_same_live_process() {
            send_signal(self.pid, SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Poll `f` every `POLL` until it yields `Some`, or panic after `timeout` naming `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Wait for a child to exit (there is no exit event in std short of a blocking wait: poll).
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

pub fn describe_status(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Paths, temp dirs, interpreters
// ---------------------------------------------------------------------------------------------

/// The cargo target directory (parent of `CARGO_TARGET_TMPDIR`).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

pub fn apps_src_dir() -> PathBuf {
    Path::new(MANIFEST_DIR).join("tests").join("apps")
}

/// A per-test directory, removed when the test passes, kept for post-mortem when it fails.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let short: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        let path = target_dir()
            .join("test-tmp")
            .join(format!("{short}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        let path = fs::canonicalize(&path).expect("canonicalize test dir");
        TestDir { path }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Copy the fixture app(s) into `<dir>/app/` and return that directory.
    pub fn install_app(&self, files: &[&str]) -> PathBuf {
        let app = self.join("app");
        fs::create_dir_all(&app).unwrap();
        for f in files {
            fs::copy(apps_src_dir().join(f), app.join(f))
                .unwrap_or_else(|e| panic!("copy fixture {f}: {e}"));
        }
        app
    }

    pub fn read(&self, p: impl AsRef<Path>) -> String {
        fs::read_to_string(self.join(p)).unwrap_or_default()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A free loopback port (bind :0, read the port, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Absolute path of the system python3 (resolved once through any shim).
pub fn python3() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed to run these tests");
        assert!(
            out.status.success(),
            "python3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

fn run_bounded(cmd: &mut Command, timeout: Duration, what: &str) {
    let tag: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect();
    let out = target_dir().join(format!("gte-test-{}-{tag}.log", std::process::id()));
    let f = File::create(&out).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let st = wait_child(&mut child, timeout);
    let log = fs::read_to_string(&out).unwrap_or_default();
    let _ = fs::remove_file(&out);
    match st {
        Some(s) if s.success() => {}
        Some(s) => panic!("{what} failed ({}):\n{log}", describe_status(&s)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}:\n{log}");
        }
    }
}

/// A virtualenv at `target/test-venv/` with flask installed, built once (a file lock keeps
/// parallel test processes from building it twice). Returns its python.
pub fn flask_python() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let root = target_dir();
        fs::create_dir_all(&root).unwrap();
        let venv = root.join("test-venv");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("test-venv.lock"))
            .expect("open venv lock file");
        lock.lock().expect("lock venv lock file");
        let py = venv.join("bin").join("python");
        let marker = venv.join(".gte-test-ready");
        // the Flask example's own requirements (flask), so the venv follows the example
        let reqs = Path::new(MANIFEST_DIR).join("examples/gte/requirements.txt");
        let want = format!("flask\n{}", fs::read_to_string(&reqs).unwrap_or_default());
        if !(py.exists() && fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str())) {
            let _ = fs::remove_dir_all(&venv);
            run_bounded(
                Command::new(python3()).args(["-m", "venv"]).arg(&venv),
                Duration::from_secs(120),
                "python3 -m venv target/test-venv",
            );
            let mut pip = Command::new(&py);
            pip.args(["-m", "pip", "install", "--quiet", "flask"]);
            if reqs.exists() {
                pip.arg("-r").arg(&reqs);
            }
            run_bounded(
                &mut pip,
                Duration::from_secs(600),
                "pip install flask into target/test-venv (needs network access to PyPI)",
            );
            fs::write(&marker, &want).unwrap();
        }
        drop(lock);
        py
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// Quote a string as a TOML basic string.
pub fn q(s: impl AsRef<str>) -> String {
    let mut out = String::from("\"");
    for c in s.as_ref().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A workers.toml built from sections of `key = raw_toml_value` pairs ("" = top level).
#[derive(Clone, Debug, Default)]
pub struct Conf {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl Conf {
    pub fn empty() -> Conf {
        Conf {
            sections: vec![(String::new(), Vec::new())],
        }
    }

    /// The standard test config: the fixture app `testapp:app` installed in `<dir>/app`, the
    /// system python3, 2 workers, pidfile + logs in the test dir.
    pub fn standard(dir: &TestDir, port: u16) -> Conf {
        let app = dir.install_app(&["testapp.py"]);
        Conf::empty()
            .set("", "bind", &q(format!("127.0.0.1:{port}")))
            .set("", "pidfile", &q(dir.join("master.pid").to_str().unwrap()))
            .set("app", "wsgi", &q("testapp:app"))
            .set("app", "chdir", &q(app.to_str().unwrap()))
            .set("app", "python", &q(python3().to_str().unwrap()))
            .set("workers", "count", "2")
            .set("workers", "timeout", "30")
            .set("workers", "graceful_timeout", "10")
            .set("workers", "keepalive", "5")
            .set("workers", "max_requests", "0")
            .set("workers", "max_requests_jitter", "0")
            .set("log", "level", &q("info"))
            .set(
                "log",
                "access",
                &q(dir.join("access.log").to_str().unwrap()),
            )
            .set("log", "error", &q(dir.join("error.log").to_str().unwrap()))
    }

    pub fn set(mut self, section: &str, key: &str, raw: &str) -> Conf {
        let idx = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_owned(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let kv = &mut self.sections[idx].1;
        match kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = raw.to_owned(),
            None => kv.push((key.to_owned(), raw.to_owned())),
        }
        self
    }

    pub fn remove(mut self, section: &str, key: &str) -> Conf {
        if let Some((_, kv)) = self.sections.iter_mut().find(|(s, _)| s == section) {
            kv.retain(|(k, _)| k != key);
        }
        self
    }

    pub fn remove_section(mut self, section: &str) -> Conf {
        self.sections.retain(|(s, _)| s != section);
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::from("# written by the gte-supervisor integration tests\n");
        for (s, kv) in self.sections.iter().filter(|(s, _)| s.is_empty()) {
            let _ = s;
            for (k, v) in kv {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        for (s, kv) in self.sections.iter().filter(|(s, _)| !s.is_empty()) {
            let _ = writeln!(out, "\n[{s}]");
            for (k, v) in kv {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        out
    }

    /// Write to `<dir>/workers.toml` and return the path.
    pub fn write(&self, dir: &TestDir) -> PathBuf {
        let p = dir.join("workers.toml");
        fs::write(&p, self.render()).unwrap();
        p
    }
}

/// Write a raw config body to `<dir>/<name>`, replacing `{port}`, `{dir}`, `{python}`.
pub fn write_config(dir: &TestDir, name: &str, body: &str, port: u16) -> PathBuf {
    let text = body
        .replace("{port}", &port.to_string())
        .replace("{dir}", dir.path.to_str().unwrap())
        .replace("{python}", python3().to_str().unwrap());
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(&p, text).unwrap();
    p
}

/// 1-based line number of the first line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in config"))
        + 1
}

/// Minimal line-based TOML editor for flat configs: set `key = raw` in `[section]` ("" = top
/// level), replacing an existing assignment or inserting one at the end of the section.
pub fn toml_set(text: &str, section: &str, key: &str, raw: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut cur = String::new();
    let mut sec_end: Option<usize> = if section.is_empty() { Some(0) } else { None };
    let mut found = None;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if t.starts_with('[') && t.ends_with(']') && !t.starts_with("[[") {
            cur = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
            if cur == section {
                sec_end = Some(i + 1);
            }
            continue;
        }
        if cur == section {
            if !t.is_empty() && !t.starts_with('#') {
                sec_end = Some(i + 1);
            }
            let k = t.split('=').next().unwrap_or("").trim().trim_matches('"');
            if t.contains('=') && k == key {
                found = Some(i);
            }
        }
    }
    let line = format!("{key} = {raw}");
    match (found, sec_end) {
        (Some(i), _) => lines[i] = line,
        (None, Some(i)) => {
            // top-level keys must come before the first table header
            let i = if section.is_empty() {
                lines
                    .iter()
                    .position(|l| l.trim_start().starts_with('['))
                    .unwrap_or(lines.len())
            } else {
                i
            };
            lines.insert(i, line)
        }
        (None, None) => {
            lines.push(String::new());
            lines.push(format!("[{section}]"));
            lines.push(line);
        }
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Value (raw TOML text, comments stripped) of `key` in `[section]` of a flat TOML text.
pub fn toml_get(text: &str, section: &str, key: &str) -> Option<String> {
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('[') && t.ends_with(']') {
            cur = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
            continue;
        }
        if cur != section || t.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            if k.trim().trim_matches('"') == key {
                let v = v.trim();
                // strip a trailing comment outside of a string
                let v = if let Some(rest) = v.strip_prefix('"') {
                    match rest.find('"') {
                        Some(e) => &v[..e + 2],
                        None => v,
                    }
                } else {
                    v.split('#').next().unwrap().trim()
                };
                return Some(v.to_owned());
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

fn notify_socket_path(dir: &TestDir) -> PathBuf {
    let p = dir.join("notify.sock");
    // sun_path holds 108 bytes; fall back to /tmp for very long checkout paths
    if p.as_os_str().len() < 100 {
        p
    } else {
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "gte-notify-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ))
    }
}

/// A `Command` for the binary: stdin null, stdout/stderr to files, no RUST_LOG/NOTIFY_SOCKET
/// from the environment, PR_SET_PDEATHSIG=SIGKILL so that it never outlives the test.
pub fn bin_command(args: &[&str], cwd: &Path, stdout: &Path, stderr: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(File::create(stdout).unwrap())
        .stderr(File::create(stderr).unwrap());
    unsafe {
        cmd.pre_exec(|| {
            sys::prctl(PR_SET_PDEATHSIG, SIGKILL as std::os::raw::c_ulong);
            Ok(())
        });
    }
    cmd
}

/// Result of a run of the binary that is expected to exit by itself.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
    pub fn dump(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            describe_status(&self.status),
            self.stdout,
            self.stderr
        )
    }
}

/// Run the binary with `args` (cwd = the test dir) and wait for it to exit within `timeout`;
/// if it is still running then, kill it and panic.
pub fn run_bin(dir: &TestDir, args: &[&str], timeout: Duration) -> Output {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let out = dir.join(format!("run{n}.stdout"));
    let err = dir.join(format!("run{n}.stderr"));
    let mut child = bin_command(args, &dir.path, &out, &err)
        .spawn()
        .expect("spawn gte-supervisor");
    let pid = child.id();
    match wait_child(&mut child, timeout) {
        Some(status) => Output {
            status,
            stdout: fs::read_to_string(&out).unwrap_or_default(),
            stderr: fs::read_to_string(&err).unwrap_or_default(),
        },
        None => {
            let victims: Vec<ProcId> = proc_descendants(pid)
                .into_iter()
                .filter_map(ProcId::of)
                .collect();
            let _ = child.kill();
            let _ = child.wait();
            for v in victims {
                v.kill();
            }
            for p in procs_with_cwd_under(&dir.path) {
                send_signal(p, SIGKILL);
            }
            panic!(
                "`gte-supervisor {}` still running after {timeout:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                args.join(" "),
                fs::read_to_string(&out).unwrap_or_default(),
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
    }
}

/// Like `run_bin`, with the given config file: `gte-supervisor -c FILE`.
pub fn run_master_to_exit(dir: &TestDir, config: &Path, timeout: Duration) -> Output {
    run_bin(dir, &["-c", config.to_str().unwrap()], timeout)
}

/// A running master.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    notify: UnixDatagram,
    notify_path: PathBuf,
    /// Every datagram received on NOTIFY_SOCKET so far.
    pub notifications: Vec<String>,
    seen: Vec<ProcId>,
    exited: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Server {
    /// Write `conf` to `<dir>/workers.toml`, start the master, wait for READY=1.
    pub fn start(dir: &TestDir, conf: &Conf) -> Server {
        let port = conf_port(conf);
        let cfg = conf.write(dir);
        let mut s = Server::spawn(dir, &cfg, port, &dir.path);
        s.wait_ready(READY_TIMEOUT);
        s
    }

    /// Start the master on an existing config file without waiting; `cwd` is its working dir.
    pub fn spawn(dir: &TestDir, config: &Path, port: u16, cwd: &Path) -> Server {
        Server::spawn_with_stdio(dir, config, port, cwd, "master")
    }

    pub fn spawn_with_stdio(
        dir: &TestDir,
        config: &Path,
        port: u16,
        cwd: &Path,
        tag: &str,
    ) -> Server {
        Server::spawn_with(dir, config, port, cwd, tag, |_| {})
    }

    /// Like `spawn_with_stdio`, with a last say on the command (e.g. a `pre_exec`).
    pub fn spawn_with(
        dir: &TestDir,
        config: &Path,
        port: u16,
        cwd: &Path,
        tag: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> Server {
        let notify_path = notify_socket_path(dir);
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
        notify
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stdout_path = dir.join(format!("{tag}.stdout"));
        let stderr_path = dir.join(format!("{tag}.stderr"));
        let mut cmd = bin_command(
            &["-c", config.to_str().unwrap()],
            cwd,
            &stdout_path,
            &stderr_path,
        );
        cmd.env("NOTIFY_SOCKET", &notify_path);
        tweak(&mut cmd);
        let child = cmd.spawn().expect("spawn gte-supervisor");
        Server {
            pid: child.id(),
            child,
            port,
            dir: dir.path.clone(),
            config: config.to_path_buf(),
            notify,
            notify_path,
            notifications: Vec::new(),
            seen: Vec::new(),
            exited: None,
            stdout_path,
            stderr_path,
        }
    }

    /// Receive datagrams until one contains `needle` (returns it); panics with diagnostics if the
    /// master exits first or on timeout.
    pub fn wait_notification(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(n) = self.notifications.iter().find(|n| n.contains(needle)) {
            return n.clone();
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 8192];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.notifications.push(msg.clone());
                    if msg.contains(needle) {
                        return msg;
                    }
                    continue;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("NOTIFY_SOCKET recv: {e}"),
            }
            if self.exited.is_none() {
                if let Ok(Some(st)) = self.child.try_wait() {
                    self.exited = Some(st);
                }
            }
            if let Some(st) = self.exited {
                // drain anything sent just before exiting
                while let Ok(n) = self.notify.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.notifications.push(msg.clone());
                    if msg.contains(needle) {
                        return msg;
                    }
                }
                panic!(
                    "master exited ({}) before sending {needle:?}\n{}",
                    describe_status(&st),
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "no {needle:?} from the master within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
        }
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> String {
        let msg = self.wait_notification("READY=1", timeout);
        self.children();
        msg
    }

    /// Current direct children of the master (recorded for cleanup).
    pub fn children(&mut self) -> Vec<u32> {
        let kids = proc_children(self.pid);
        for &k in &kids {
            if let Some(p) = ProcId::of(k) {
                if !self.seen.contains(&p) {
                    self.seen.push(p);
                }
            }
        }
        kids
    }

    /// Live children (zombies excluded).
    pub fn live_children(&mut self) -> Vec<u32> {
        self.children()
            .into_iter()
            .filter(|&p| pid_alive(p))
            .collect()
    }

    /// Record an extra pid for cleanup.
    pub fn record(&mut self, pid: u32) {
        if let Some(p) = ProcId::of(pid) {
            self.seen.push(p);
        }
    }

    /// All pids ever recorded (children seen so far).
    pub fn seen_pids(&self) -> Vec<u32> {
        self.seen.iter().map(|p| p.pid).collect()
    }

    pub fn signal(&self, sig: i32) {
        assert!(self.exited.is_none(), "master already exited");
        assert!(
            send_signal(self.pid, sig),
            "kill({}, {sig}) failed",
            self.pid
        );
    }

    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exited = Some(st);
            }
        }
        self.exited
    }

    /// Wait for the master to exit; panics with diagnostics on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(st) = self.exited {
            return st;
        }
        match wait_child(&mut self.child, timeout) {
            Some(st) => {
                self.exited = Some(st);
                // collect what was sent before exiting
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = self.notify.recv(&mut buf) {
                    self.notifications
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                st
            }
            None => panic!(
                "master did not exit within {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop_term(&mut self) -> ExitStatus {
        self.children();
        self.signal(SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Master stderr + error log (tails), for failure messages.
    pub fn diagnostics(&self) -> String {
        fn tail(s: &str) -> &str {
            let n = s.len();
            if n > 6000 {
                let mut i = n - 6000;
                while !s.is_char_boundary(i) {
                    i += 1;
                }
                &s[i..]
            } else {
                s
            }
        }
        format!(
            "--- master stderr ({}) ---\n{}\n--- master stdout ---\n{}\n--- error.log ---\n{}\n--- notifications ---\n{:?}",
            self.stderr_path.display(),
            tail(&self.stderr()),
            tail(&self.stdout()),
            tail(&self.error_log()),
            self.notifications
        )
    }

    /// Wait until an error-log line satisfies `pred`; returns it.
    pub fn wait_error_log_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.error_log();
            if let Some(l) = log.lines().find(|l| pred(l)) {
                return l.to_owned();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no error-log line {what} within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn wait_access_log_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.access_log();
            if let Some(l) = log.lines().find(|l| pred(l)) {
                return l.to_owned();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no access-log line {what} within {timeout:?}\n--- access.log ---\n{log}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn connect(&self) -> Http {
        Http::connect(self.port)
    }

    /// One-shot GET on a fresh connection (Connection: close).
    pub fn get(&self, path: &str) -> Response {
        let mut c = self.connect();
        c.request("GET", path, &[("Connection", "close")], b"")
    }

    /// Wait until the pool has `n` live children; returns them.
    pub fn wait_children_count(&mut self, n: usize, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let kids = self.live_children();
            if kids.len() == n {
                return kids;
            }
            if Instant::now() >= deadline {
                panic!(
                    "master has {} live children {kids:?}, expected {n}, after {timeout:?}\n{}",
                    kids.len(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

/// A started server plus its directory; the server is dropped (processes killed) first.
pub struct Fx {
    pub srv: Server,
    pub dir: TestDir,
    pub port: u16,
}

/// Start the standard fixture app with `tweak` applied to the standard config.
pub fn start_standard(name: &str, tweak: impl FnOnce(Conf) -> Conf) -> Fx {
    let dir = TestDir::new(name);
    let port = free_port();
    let conf = tweak(Conf::standard(&dir, port));
    let srv = Server::start(&dir, &conf);
    Fx { srv, dir, port }
}

/// The standard config serving the lifecycle fixture app (`tests/apps/lifeapp.py`), with `env`
/// (variable, value) pairs in its `[app] env` when there are any.
pub fn life_conf(dir: &TestDir, port: u16, env: &[(&str, &str)]) -> Conf {
    let app = dir.install_app(&["lifeapp.py"]);
    let conf = Conf::standard(dir, port)
        .set("app", "wsgi", &q("lifeapp:app"))
        .set("app", "chdir", &q(app.to_str().unwrap()));
    if env.is_empty() {
        return conf;
    }
    let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k} = {}", q(v))).collect();
    conf.set("app", "env", &format!("{{ {} }}", pairs.join(", ")))
}

/// Start the lifecycle fixture app (`tests/apps/lifeapp.py`) with `tweak` applied.
pub fn start_life(name: &str, tweak: impl FnOnce(Conf) -> Conf) -> Fx {
    let dir = TestDir::new(name);
    let port = free_port();
    let conf = tweak(life_conf(&dir, port, &[]));
    let srv = Server::start(&dir, &conf);
    Fx { srv, dir, port }
}

fn conf_port(conf: &Conf) -> u16 {
    let bind = conf
        .sections
        .iter()
        .find(|(s, _)| s.is_empty())
        .and_then(|(_, kv)| kv.iter().find(|(k, _)| k == "bind"))
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .expect("config has no bind");
    bind.rsplit(':').next().unwrap().parse().expect("bind port")
}

impl Drop for Server {
    fn drop(&mut self) {
        // snapshot the tree before the master goes away
        let mut victims: Vec<ProcId> = Vec::new();
        if self.try_exit_status().is_none() {
            victims.extend(
                proc_descendants(self.pid)
                    .into_iter()
                    .filter_map(ProcId::of),
            );
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        victims.extend(self.seen.iter().copied());
        for v in &victims {
            v.kill();
        }
        for p in procs_with_cwd_under(&self.dir) {
            send_signal(p, SIGKILL);
        }
        if !self.notify_path.starts_with(&self.dir) {
            let _ = fs::remove_file(&self.notify_path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Json {
        Json::parse(&self.text()).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }
    /// Does the server intend to close the connection after this response?
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }
}

#[derive(Clone, Debug)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the body of a response is delimited, and how much is left.
#[derive(Debug)]
pub enum Body {
    Length(u64),
    Chunked,
    Close,
    Done,
}

pub struct Http {
    pub stream: TcpStream,
    pub port: u16,
    buf: Vec<u8>,
}

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Http {
    pub fn connect(port: u16) -> Http {
        Http::try_connect(port).unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"))
    }

    /// Wraps a connection made elsewhere (e.g. with socket options of its own) to `port`.
    pub fn from_stream(stream: TcpStream, port: u16) -> Http {
        Http {
            stream,
            port,
            buf: Vec::new(),
        }
    }

    pub fn try_connect(port: u16) -> io::Result<Http> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            port,
            buf: Vec::new(),
        })
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Build the request bytes: Host is added; Content-Length is added for a non-empty body or a
    /// POST/PUT unless the caller gave Content-Length or Transfer-Encoding.
    pub fn build(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Vec<u8> {
        let mut s = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            let _ = write!(s, "Host: 127.0.0.1:{}\r\n", self.port);
        }
        for (k, v) in headers {
            let _ = write!(s, "{k}: {v}\r\n");
        }
        let framed = headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
        });
        if !framed && (!body.is_empty() || method == "POST" || method == "PUT") {
            let _ = write!(s, "Content-Length: {}\r\n", body.len());
        }
        s.push_str("\r\n");
        let mut out = s.into_bytes();
        out.extend_from_slice(body);
        out
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let req = self.build(method, path, headers, body);
        self.send(&req);
        self.read_response(method == "HEAD")
            .unwrap_or_else(|e| panic!("{method} {path}: reading the response: {e}"))
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 65536];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > 1 << 20 {
                return Err(io_err("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed mid-line (buffered: {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {n} body bytes",
                        self.buf.len()
                    ),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Read a status line + headers (1xx interim responses are skipped).
    pub fn read_head(&mut self) -> io::Result<Head> {
        loop {
            let line = self.read_line()?;
            let line = String::from_utf8_lossy(&line).into_owned();
            let mut parts = line.splitn(3, ' ');
            let version = parts.next().unwrap_or("").to_owned();
            if !version.starts_with("HTTP/1.") {
                return Err(io_err(format!("bad status line {line:?}")));
            }
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io_err(format!("bad status line {line:?}")))?;
            let reason = parts.next().unwrap_or("").to_owned();
            let mut headers = Vec::new();
            loop {
                let h = self.read_line()?;
                if h.is_empty() {
                    break;
                }
                let h = String::from_utf8_lossy(&h).into_owned();
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| io_err(format!("bad header {h:?}")))?;
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            return Ok(Head {
                version,
                status,
                reason,
                headers,
            });
        }
    }

    /// How the body after `head` is framed (`head_request`: the request was HEAD).
    pub fn body_framing(head: &Head, head_request: bool) -> io::Result<Body> {
        if head_request || head.status == 204 || head.status == 304 {
            return Ok(Body::Done);
        }
        if let Some(te) = head.header("transfer-encoding") {
            if te.to_ascii_lowercase().contains("chunked") {
                return Ok(Body::Chunked);
            }
        }
        if let Some(cl) = head.header("content-length") {
            let n: u64 = cl
                .parse()
                .map_err(|_| io_err(format!("bad Content-Length {cl:?}")))?;
            return Ok(if n == 0 { Body::Done } else { Body::Length(n) });
        }
        Ok(Body::Close)
    }

    /// The next piece of decoded body data, or None at the end of the body.
    pub fn read_piece(&mut self, body: &mut Body) -> io::Result<Option<Vec<u8>>> {
        match body {
            Body::Done => Ok(None),
            Body::Length(left) => {
                if self.buf.is_empty() && self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed with {left} body bytes missing"),
                    ));
                }
                let n = (*left).min(self.buf.len() as u64) as usize;
                let data: Vec<u8> = self.buf.drain(..n).collect();
                *left -= n as u64;
                if *left == 0 {
                    *body = Body::Done;
                }
                Ok(Some(data))
            }
            Body::Chunked => {
                let line = self.read_line()?;
                let line = String::from_utf8_lossy(&line).into_owned();
                let hex = line.split(';').next().unwrap().trim();
                let n = usize::from_str_radix(hex, 16)
                    .map_err(|_| io_err(format!("bad chunk size {line:?}")))?;
                if n == 0 {
                    // trailers until the empty line
                    while !self.read_line()?.is_empty() {}
                    *body = Body::Done;
                    return Ok(None);
                }
                let data = self.read_n(n)?;
                if self.read_n(2)? != b"\r\n" {
                    return Err(io_err("chunk not followed by CRLF"));
                }
                Ok(Some(data))
            }
            Body::Close => {
                if self.buf.is_empty() && self.fill()? == 0 {
                    *body = Body::Done;
                    return Ok(None);
                }
                Ok(Some(std::mem::take(&mut self.buf)))
            }
        }
    }

    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let head = self.read_head()?;
        let mut framing = Http::body_framing(&head, head_request)?;
        let mut body = Vec::new();
        while let Some(piece) = self.read_piece(&mut framing)? {
            body.extend_from_slice(&piece);
        }
        Ok(Response {
            version: head.version,
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            body,
        })
    }

    /// Bytes already received but not consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// True if the peer closes the connection (EOF or reset) within `wait` with no further data.
    pub fn peer_closes_within(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let r = self.fill();
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
            Err(_) => false,
        }
    }
}

/// Chunked transfer encoding of `pieces`.
pub fn chunked(pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        out.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// The 1 MiB pattern served by the fixture app's /big.
pub fn big_pattern() -> Vec<u8> {
    (0..(1usize << 20))
        .map(|i| ((i * 31 + 7) % 251) as u8)
        .collect()
}

/// Percent-encode a path for a query parameter value.
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// An error response from the master must be short plain text that leaks nothing.
pub fn assert_short_error(resp: &Response, status: u16, dir: &Path) {
    assert_eq!(resp.status, status, "status; body {:?}", resp.text());
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain"),
        "{status} Content-Type should be text/plain, got {ct:?}"
    );
    let body = resp.text();
    assert!(
        body.len() <= 200,
        "{status} body should be short, got {} bytes: {body:?}",
        body.len()
    );
    for bad in [
        "Traceback",
        ".py",
        "gte-supervisor/",
        env!("CARGO_PKG_VERSION"),
        "fixture-secret",
    ] {
        assert!(!body.contains(bad), "{status} body leaks {bad:?}: {body:?}");
    }
    assert!(
        !body.contains(dir.to_str().unwrap()),
        "{status} body leaks a path: {body:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Minimal JSON reader
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static JSON_NULL: Json = Json::Null;

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }
    /// Object member (Null if absent or not an object).
    pub fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(kv) => kv
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or(&JSON_NULL),
            _ => &JSON_NULL,
        }
    }
    pub fn has(&self, key: &str) -> bool {
        matches!(self, Json::Obj(kv) if kv.iter().any(|(k, _)| k == key))
    }
    pub fn keys(&self) -> Vec<String> {
        match self {
            Json::Obj(kv) => kv.iter().map(|(k, _)| k.clone()).collect(),
            _ => Vec::new(),
        }
    }
    pub fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn i64(&self) -> Option<i64> {
        match self {
            Json::Num(n) if n.fract() == 0.0 => Some(*n as i64),
            _ => None,
        }
    }
    pub fn bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && b" \t\r\n".contains(&self.s[self.i]) {
            self.i += 1;
        }
    }
    fn eat(&mut self, lit: &str) -> Result<(), String> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(format!("expected {lit:?} at {}", self.i))
        }
    }
    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'n') => self.eat("null").map(|_| Json::Null),
            Some(b't') => self.eat("true").map(|_| Json::Bool(true)),
            Some(b'f') => self.eat("false").map(|_| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(v));
                        }
                        _ => return Err(format!("expected , or ] at {}", self.i)),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(v));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    self.eat(":")?;
                    let val = self.value()?;
                    v.push((k, val));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(v));
                        }
                        _ => return Err(format!("expected , or }} at {}", self.i)),
                    }
                }
            }
            Some(_) => {
                let st = self.i;
                while self.i < self.s.len() && b"+-0123456789.eE".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[st..self.i])
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .map(Json::Num)
                    .ok_or_else(|| format!("bad value at {st}"))
            }
        }
    }
    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
        self.i += 4;
        u32::from_str_radix(std::str::from_utf8(h).map_err(|e| e.to_string())?, 16)
            .map_err(|e| e.to_string())
    }
    fn string(&mut self) -> Result<String, String> {
        self.eat("\"")?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = *self.s.get(self.i).ok_or("unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("bad escape")?;
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp)
                                && self.s[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            }
                            char::from_u32(cp).unwrap_or('\u{FFFD}')
                        }
                        _ => return Err(format!("bad escape at {}", self.i)),
                    };
                    let mut b = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}
