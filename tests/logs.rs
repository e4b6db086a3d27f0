//! Issue 6 end to end: access-log format tokens, JSON lines, the forwarded client address,
//! built-in rotation, SIGUSR1 reopen, an unwritable log path at start-up, Prometheus metrics.
//!
//! Every test starts the real binary with the fixture app `tests/apps/logs_app.py` on its own
//! free loopback port and polls `GET /-/ready` (short interval, overall deadline) until a
//! worker is ready. Every wait is bounded. Every process a test starts is killed by pid when
//! its [`Master`] guard drops, also on panic: the master and each descendant found through
//! `/proc/<pid>/task/*/children` (and the master has PR_SET_PDEATHSIG, so a killed test runner
//! does not leak it).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gte-supervisor");
const READY_DEADLINE: Duration = Duration::from_secs(60);
const LINE_DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
const IO_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A per-test directory under target/, removed when the test passes (kept for post-mortem).
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("logs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join("app")).unwrap();
        fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/logs_app.py"),
            p.join("app/logs_app.py"),
        )
        .unwrap();
        Dir(p)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
    fn read(&self, p: &str) -> String {
        fs::read_to_string(self.join(p)).unwrap_or_default()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A workers.toml: sections of key = raw TOML value, later `set`s replace earlier ones.
struct Conf {
    sections: Vec<(String, Vec<(String, String)>)>,
}

fn q(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

impl Conf {
    fn new(dir: &Dir, port: u16) -> Conf {
        Conf {
            sections: vec![(String::new(), Vec::new())],
        }
        .set("", "bind", &q(format!("127.0.0.1:{port}")))
        .set("app", "wsgi", &q("logs_app:app"))
        .set("app", "chdir", &q(dir.join("app").to_str().unwrap()))
        .set("app", "python", &q("python3"))
        .set("workers", "count", "2")
        .set("workers", "timeout", "30")
        .set("workers", "graceful_timeout", "5")
        .set("log", "level", &q("info"))
        .set(
            "log",
            "access",
            &q(dir.join("access.log").to_str().unwrap()),
        )
        .set("log", "error", &q(dir.join("error.log").to_str().unwrap()))
    }

    fn set(mut self, section: &str, key: &str, raw: &str) -> Conf {
        let i = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let kv = &mut self.sections[i].1;
        match kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = raw.to_string(),
            None => kv.push((key.to_string(), raw.to_string())),
        }
        self
    }

    fn write(&self, dir: &Dir) -> PathBuf {
        let mut out = String::new();
        for (s, kv) in &self.sections {
            if !s.is_empty() {
                out.push_str(&format!("\n[{s}]\n"));
            }
            for (k, v) in kv {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        let p = dir.join("workers.toml");
        fs::write(&p, out).unwrap();
        p
    }
}

fn send_signal(pid: u32, sig: i32) {
    assert!(pid > 1 && pid != std::process::id());
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Children of `pid` (all its threads), then theirs, recursively.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids
                .split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok())
            {
                if !out.contains(&k) {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
    }
    out
}

fn command(config: &Path, dir: &Dir) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["-c", config.to_str().unwrap()])
        .current_dir(&dir.0)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("master.stdout")).unwrap())
        .stderr(fs::File::create(dir.join("master.stderr")).unwrap());
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// A running master; killed with all its descendants on drop.
struct Master {
    child: Child,
    pid: u32,
    port: u16,
    stderr: PathBuf,
    error_log: PathBuf,
    seen: Vec<u32>,
}

impl Master {
    fn start(dir: &Dir, conf: &Conf, port: u16) -> Master {
        let cfg = conf.write(dir);
        let child = command(&cfg, dir).spawn().expect("spawn gte-supervisor");
        let mut m = Master {
            pid: child.id(),
            child,
            port,
            stderr: dir.join("master.stderr"),
            error_log: dir.join("error.log"),
            seen: Vec::new(),
        };
        m.wait_ready();
        m
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- master stderr ---\n{}\n--- error.log ---\n{}",
            fs::read_to_string(&self.stderr).unwrap_or_default(),
            fs::read_to_string(&self.error_log).unwrap_or_default()
        )
    }

    /// Polls GET /-/ready until 200 (every 20 ms, at most READY_DEADLINE).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("master exited ({st}) before ready\n{}", self.diagnostics());
            }
            if let Ok(r) = try_request(self.port, "GET", "/-/ready", &[], None) {
                if r.status == 200 {
                    self.remember_children();
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {READY_DEADLINE:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(POLL);
        }
    }

    fn remember_children(&mut self) {
        for p in descendants(self.pid) {
            if !self.seen.contains(&p) {
                self.seen.push(p);
            }
        }
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let r = request(self.port, "GET", path, headers);
        self.remember_children();
        r
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.remember_children();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for &p in &self.seen {
            // Only processes still ours: their parent is gone or is the (dead) master's tree.
            if Path::new(&format!("/proc/{p}")).exists() {
                send_signal(p, libc::SIGKILL);
            }
        }
    }
}

/// Waits (bounded) for a child to exit; kills it (and its tree) on timeout.
fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() >= deadline {
            let kids = descendants(child.id());
            let _ = child.kill();
            let _ = child.wait();
            for k in kids {
                send_signal(k, libc::SIGKILL);
            }
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects to 127.0.0.1:port, from `source` (another loopback address) if given.
fn connect(port: u16, source: Option<[u8; 4]>) -> std::io::Result<TcpStream> {
    let s = match source {
        None => TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )?,
        Some(ip) => {
            use nix::sys::socket::{
                bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
            };
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            bind(
                fd.as_raw_fd(),
                &SockaddrIn::new(ip[0], ip[1], ip[2], ip[3], 0),
            )?;
            connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))?;
            TcpStream::from(fd)
        }
    };
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    source: Option<[u8; 4]>,
) -> std::io::Result<Resp> {
    let mut s = connect(port, source)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    try_request(port, method, path, headers, None)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"))
}

/// Waits (bounded) until a line of `file` satisfies `pred`; returns it.
fn wait_line(file: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + LINE_DEADLINE;
    loop {
        let text = fs::read_to_string(file).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| pred(l)) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line {what} in {} within {LINE_DEADLINE:?}:\n{text}",
            file.display()
        );
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_format_token_renders_as_gunicorn_would() {
    let dir = Dir::new("tokens");
    let port = free_port();
    let fmt = "%(h)s|%(l)s|%(u)s|%(t)s|%(r)s|%(s)s|%(b)s|%(B)s|%(f)s|%(a)s|%(T)s|%(M)s|%(D)s|%(L)s|%(p)s|%(P)s|%(m)s|%(U)s|%(q)s|%(H)s|%({x-req-id}i)s|%({x-absent}i)s|%({x-resp}o)s|%({content-type}o)s|100%%";
    let conf = Conf::new(&dir, port).set("log", "access_format", &q(fmt));
    let mut m = Master::start(&dir, &conf, port);
    let r = m.get(
        "/headers/a%20b?x=1&y=2",
        &[
            ("Authorization", "Basic YWxpY2U6c2VjcmV0"), // alice:secret
            ("Referer", "http://ref.example/page"),
            ("User-Agent", "logs-test/1.0"),
            ("X-Req-Id", "rid-42"),
        ],
    );
    assert_eq!(r.status, 200);
    let pid = r.header("x-pid").expect("X-Pid").to_string();
    let line = wait_line(&dir.join("access.log"), "for /headers", |l| {
        l.contains("/headers/")
    });
    let f: Vec<&str> = line.split('|').collect();
    assert_eq!(f.len(), 25, "{line}");
    let expect = [
        (0, "127.0.0.1"),
        (1, "-"),
        (2, "alice"),
        (4, "GET /headers/a%20b?x=1&y=2 HTTP/1.1"),
        (5, "200"),
        (6, "2"),
        (7, "2"),
        (8, "http://ref.example/page"),
        (9, "logs-test/1.0"),
        (10, "0"),
        (16, "GET"),
        (17, "/headers/a b"),
        (18, "x=1&y=2"),
        (19, "HTTP/1.1"),
        (20, "rid-42"),
        (21, "-"),
        (22, "out-7"),
        (23, "text/plain"),
        (24, "100%"),
    ];
    for (i, want) in expect {
        assert_eq!(f[i], want, "field {i} of {line}");
    }
    // %(t)s: [22/Nov/2026:13:15:11 +0800]
    let t = f[3];
    assert!(
        t.len() == 28
            && t.starts_with('[')
            && t.ends_with(']')
            && &t[3..4] == "/"
            && &t[21..22] == " ",
        "time {t:?}"
    );
    // Durations agree with each other.
    let micros: u64 = f[12].parse().expect("D is an integer");
    let millis: u64 = f[11].parse().expect("M is an integer");
    assert_eq!(millis, micros / 1000, "{line}");
    assert_eq!(
        f[13],
        format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
    );
    assert_eq!(f[14], format!("<{pid}>"));
    assert_eq!(f[15], pid);
}

#[test]
fn json_lines_parse_and_carry_the_fields() {
    let dir = Dir::new("json");
    let port = free_port();
    let conf = Conf::new(&dir, port).set("log", "access_format", &q("json"));
    let mut m = Master::start(&dir, &conf, port);
    let ok = m.get(
        "/hello?q=1",
        &[("User-Agent", "ua \"quoted\""), ("Referer", "http://r/")],
    );
    assert_eq!(ok.status, 200);
    let missing = request(m.port, "POST", "/missing", &[]);
    assert_eq!(missing.status, 404);
    let log = dir.join("access.log");
    wait_line(&log, "for /missing", |l| l.contains("/missing"));
    let lines: Vec<serde_json::Value> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let a = &lines[0];
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/hello");
    assert_eq!(a["query"], "q=1");
    assert_eq!(a["protocol"], "HTTP/1.1");
    assert_eq!(a["status"], 200);
    assert_eq!(a["bytes"], 5);
    assert_eq!(a["remote_addr"], "127.0.0.1");
    assert_eq!(a["user_agent"], "ua \"quoted\"");
    assert_eq!(a["referer"], "http://r/");
    assert_eq!(
        a["worker_pid"].as_u64().map(|p| p.to_string()).as_deref(),
        ok.header("x-pid")
    );
    assert!(a["duration_us"].as_u64().is_some(), "{a}");
    let time = a["time"].as_str().unwrap();
    assert!(
        time.len() == 29 && &time[10..11] == "T" && &time[19..20] == ".",
        "{time}"
    );
    let b = &lines[1];
    assert_eq!(
        (b["method"].as_str(), b["status"].as_u64()),
        (Some("POST"), Some(404))
    );
    assert_eq!(b["referer"], serde_json::Value::Null);
    assert_eq!(b["bytes"], 4);
}

#[test]
fn forwarded_address_is_trusted_only_from_allowed_peers() {
    let dir = Dir::new("forwarded");
    let port = free_port();
    let conf = Conf::new(&dir, port).set("", "forwarded_allow_ips", "[\"127.0.0.1\"]");
    let mut m = Master::start(&dir, &conf, port);
    let env = |source: Option<[u8; 4]>, headers: &[(&str, &str)], tag: &str| {
        let r =
            try_request(port, "GET", &format!("/env?tag={tag}"), headers, source).expect("request");
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        let line = wait_line(&dir.join("access.log"), tag, |l| l.contains(tag));
        (v["remote_addr"].as_str().unwrap().to_string(), line)
    };
    // From the trusted proxy (127.0.0.1): X-Forwarded-For (last entry) and X-Real-IP count.
    let (remote, line) = env(None, &[("X-Forwarded-For", "10.0.0.1, 203.0.113.7")], "t1");
    assert_eq!(remote, "203.0.113.7");
    assert!(line.starts_with("203.0.113.7 - - ["), "{line}");
    let (remote, line) = env(None, &[("X-Real-IP", "198.51.100.5")], "t2");
    assert_eq!(remote, "198.51.100.5");
    assert!(line.starts_with("198.51.100.5 "), "{line}");
    // From 127.0.0.2, not in forwarded_allow_ips: the headers are ignored.
    let (remote, line) = env(
        Some([127, 0, 0, 2]),
        &[
            ("X-Forwarded-For", "203.0.113.8"),
            ("X-Real-IP", "203.0.113.9"),
        ],
        "u1",
    );
    assert_eq!(remote, "127.0.0.2");
    assert!(line.starts_with("127.0.0.2 - - ["), "{line}");
    m.remember_children();
}

#[test]
fn size_rotation_makes_dated_files_and_keeps_only_keep() {
    let dir = Dir::new("rotation");
    let port = free_port();
    let conf = Conf::new(&dir, port)
        .set("log", "rotate", &q("4KiB"))
        .set("log", "keep", "2");
    let mut m = Master::start(&dir, &conf, port);
    // A long User-Agent makes ~200-byte lines: ~20 a file, 120 requests are ~6 files.
    let agent = "x".repeat(100);
    for i in 0..120 {
        let r = m.get(&format!("/hello?n={i:04}"), &[("User-Agent", &agent)]);
        assert_eq!(r.status, 200);
    }
    wait_line(&dir.join("access.log"), "for the last request", |l| {
        l.contains("?n=0119 ")
    });
    let names: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("access.log."))
        .collect();
    assert_eq!(names.len(), 2, "keep = 2 rotated files: {names:?}");
    let mut kept_lines = 0;
    for n in &names {
        // access.log.2026-11-22T14-03-07, maybe with .1
        let stamp = &n["access.log.".len()..];
        let shape = stamp.as_bytes();
        assert!(
            shape.len() >= 19
                && shape[..4].iter().all(u8::is_ascii_digit)
                && shape[4] == b'-'
                && shape[10] == b'T'
                && shape[13] == b'-',
            "dated name: {n}"
        );
        let text = dir.read(n);
        // Rotated once past 4 KiB, between writes of at most 256 bytes (limit / 16).
        assert!(text.len() <= 4096 + 256, "{n} is {} bytes", text.len());
        assert!(text.ends_with('\n'), "{n} ends mid-line");
        for l in text.lines() {
            assert!(
                l.starts_with("127.0.0.1 - - [") && l.contains("?n="),
                "{n}: {l}"
            );
            kept_lines += 1;
        }
    }
    let current = dir.read("access.log").lines().count();
    assert!(
        kept_lines + current < 120,
        "older files were deleted: {kept_lines} + {current} lines kept"
    );
    // Oldest kept archive, newer archive, live file: consecutive requests, none lost.
    let mut sorted = names.clone();
    sorted.sort_by_key(|n| {
        let stamp = &n["access.log.".len()..];
        let (s, k) = stamp.split_once('.').unwrap_or((stamp, "0"));
        (s.to_string(), k.parse::<u32>().unwrap())
    });
    let mut text = String::new();
    for n in &sorted {
        text.push_str(&dir.read(n));
    }
    text.push_str(&dir.read("access.log"));
    let ns: Vec<u32> = text
        .lines()
        .map(|l| {
            let i = l.find("?n=").expect("tagged line") + 3;
            l[i..i + 4].parse().unwrap()
        })
        .collect();
    assert_eq!(*ns.last().unwrap(), 119);
    assert!(
        ns.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive requests across the kept files: {ns:?}"
    );
    m.remember_children();
}

/// The local date (`2026-11-22`) of a time in seconds since the epoch.
fn local_date(secs: i64) -> String {
    let t: libc::time_t = secs as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    assert!(!unsafe { libc::localtime_r(&t, &mut tm) }.is_null());
    format!(
        "{:04}-{:02}-{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday
    )
}

#[test]
fn daily_rotation_dates_yesterdays_file_and_deletes_beyond_keep() {
    let dir = Dir::new("daily");
    // A live file last written two days ago (a restart after a quiet weekend), and four older
    // archives of which keep = 2 leaves the newest one beside the new archive.
    fs::write(dir.join("access.log"), "from two days ago\n").unwrap();
    let written = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    fs::File::options()
        .write(true)
        .open(dir.join("access.log"))
        .unwrap()
        .set_modified(written)
        .unwrap();
    let written = written
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for d in 1..=4 {
        fs::write(dir.join(&format!("access.log.2020-01-0{d}")), "old\n").unwrap();
    }
    let port = free_port();
    let conf = Conf::new(&dir, port)
        .set("log", "rotate", &q("daily"))
        .set("log", "keep", "2");
    let mut m = Master::start(&dir, &conf, port);
    assert_eq!(m.get("/hello?today", &[]).status, 200);
    wait_line(&dir.join("access.log"), "for today's request", |l| {
        l.contains("?today")
    });
    let archive = format!("access.log.{}", local_date(written));
    assert_eq!(dir.read(&archive), "from two days ago\n", "{archive}");
    assert!(
        !dir.read("access.log").contains("two days ago"),
        "the live file starts fresh"
    );
    let mut names: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("access.log."))
        .collect();
    names.sort();
    assert_eq!(names, ["access.log.2020-01-04".to_string(), archive]);
    m.remember_children();
}

#[test]
fn usr1_reopens_a_moved_access_log() {
    let dir = Dir::new("usr1");
    let port = free_port();
    let conf = Conf::new(&dir, port);
    let mut m = Master::start(&dir, &conf, port);
    assert_eq!(m.get("/hello?before", &[]).status, 200);
    wait_line(&dir.join("access.log"), "before the move", |l| {
        l.contains("?before")
    });
    fs::rename(dir.join("access.log"), dir.join("access.log.moved")).unwrap();
    send_signal(m.pid, libc::SIGUSR1);
    wait_line(&dir.join("error.log"), "about the reopen", |l| {
        l.contains("log files reopened")
    });
    assert_eq!(m.get("/hello?after", &[]).status, 200);
    wait_line(&dir.join("access.log"), "in the reopened file", |l| {
        l.contains("?after")
    });
    let moved = dir.read("access.log.moved");
    assert!(
        moved.contains("?before") && !moved.contains("?after"),
        "{moved}"
    );
}

#[test]
fn unwritable_log_path_fails_startup_naming_it() {
    let dir = Dir::new("unwritable");
    let port = free_port();
    fs::write(dir.join("not-a-dir"), "a file, not a directory").unwrap();
    let bad = dir.join("not-a-dir/access.log");
    let conf = Conf::new(&dir, port).set("log", "access", &q(bad.to_str().unwrap()));
    let cfg = conf.write(&dir);
    let mut child = command(&cfg, &dir).spawn().unwrap();
    let st = wait_exit(&mut child, Duration::from_secs(30));
    let stderr = dir.read("master.stderr");
    assert_eq!(st.code(), Some(2), "exit code 2 (configuration): {stderr}");
    assert!(
        stderr.contains(bad.to_str().unwrap()) && stderr.contains("access log"),
        "the message names the path: {stderr}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing may be listening"
    );
}

/// `name{labels}` → value, from an OpenMetrics text exposition.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn scrape(port: u16) -> (Resp, BTreeMap<String, f64>) {
    let r = request(port, "GET", "/metrics", &[]);
    let m = parse_metrics(&r.text());
    (r, m)
}

#[test]
fn metrics_count_exactly_the_requests_made() {
    let dir = Dir::new("metrics");
    let port = free_port();
    let mport = free_port();
    let conf = Conf::new(&dir, port)
        .set("", "metrics", &q(format!("127.0.0.1:{mport}")))
        // Metrics work without an access log (the per-request record is still made).
        .set("log", "access", &q("off"))
        .set("workers", "count", "2")
        .set("workers", "max_requests", "4")
        .set("workers", "max_requests_jitter", "0");
    let mut m = Master::start(&dir, &conf, port);
    // The readiness polls above are the master's own answers: not counted.
    let (resp, before) = scrape(mport);
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap_or("")
            .contains("openmetrics-text"),
        "{:?}",
        resp.header("content-type")
    );
    assert!(resp.text().trim_end().ends_with("# EOF"));
    assert_eq!(
        before["gte_requests_total{method=\"GET\",status=\"2xx\"}"],
        0.0
    );
    assert_eq!(before["gte_config_generation"], 1.0);
    for i in 0..7 {
        assert_eq!(m.get(&format!("/hello?{i}"), &[]).status, 200);
    }
    for _ in 0..3 {
        assert_eq!(m.get("/missing", &[]).status, 404);
    }
    for _ in 0..2 {
        assert_eq!(request(port, "POST", "/hello", &[]).status, 200);
    }
    // 12 requests over 2 workers with max_requests = 4: at least one restart for that reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let (_, after) = scrape(mport);
        let restarts = after
            .get("gte_worker_restarts_total{reason=\"max_requests\"}")
            .copied()
            .unwrap_or(0.0);
        if restarts >= 1.0 && after["gte_workers_ready"] >= 2.0 {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "no max_requests restart counted: {after:?}\n{}",
            m.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    m.remember_children();
    let get = |k: &str| {
        after
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {after:?}"))
    };
    assert_eq!(
        get("gte_requests_total{method=\"GET\",status=\"2xx\"}"),
        7.0
    );
    assert_eq!(
        get("gte_requests_total{method=\"GET\",status=\"4xx\"}"),
        3.0
    );
    assert_eq!(
        get("gte_requests_total{method=\"POST\",status=\"2xx\"}"),
        2.0
    );
    assert_eq!(
        get("gte_requests_total{method=\"GET\",status=\"5xx\"}"),
        0.0
    );
    let total: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("gte_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 12.0);
    assert_eq!(get("gte_request_duration_seconds_count"), 12.0);
    assert_eq!(
        get("gte_request_duration_seconds_bucket{le=\"+Inf\"}"),
        12.0
    );
    assert_eq!(get("gte_queue_wait_seconds_count"), 12.0);
    assert_eq!(
        get("gte_response_bytes_total"),
        (7 * 5 + 3 * 4 + 2 * 5) as f64
    );
    assert_eq!(get("gte_requests_cancelled_total"), 0.0);
    assert_eq!(get("gte_queue_depth"), 0.0);
    assert_eq!(get("gte_worker_slots{state=\"busy\"}"), 0.0);
    assert_eq!(
        get("gte_worker_slots{state=\"idle\"}"),
        get("gte_workers_ready")
    );
    assert!(get("gte_master_uptime_seconds") > 0.0);
    assert!(get("gte_master_start_time_seconds") > 1.7e9);
    let rss: Vec<f64> = after
        .iter()
        .filter(|(k, _)| k.starts_with("gte_worker_rss_bytes{worker="))
        .map(|(_, v)| *v)
        .collect();
    assert!(
        rss.len() >= 2 && rss.iter().all(|&b| b > 1e6),
        "per-worker RSS: {rss:?}"
    );
    // Every metric the shipped Grafana dashboard queries exists.
    let dash = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana/gte-supervisor.json"),
    )
    .unwrap();
    let dash_json: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(dash_json["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    let mut rest = dash.as_str();
    let mut names = 0;
    while let Some(i) = rest.find("gte_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        if name == "gte_supervisor" {
            continue;
        }
        names += 1;
        assert!(
            after.keys().any(|k| k.starts_with(&name)),
            "the dashboard queries {name}, which is not exported"
        );
    }
    assert!(names >= 10, "{names} metric references in the dashboard");
    // Only /metrics is served there, and never on the public port.
    assert_eq!(request(mport, "GET", "/", &[]).status, 404);
    assert_eq!(request(port, "GET", "/metrics", &[]).text(), "hello");
}

#[test]
fn full_disk_is_reported_on_stderr_and_requests_go_on() {
    // /dev/full opens fine and fails every write with ENOSPC, like a full disk.
    if !Path::new("/dev/full").exists() {
        eprintln!("no /dev/full here; skipping");
        return;
    }
    let dir = Dir::new("fulldisk");
    let port = free_port();
    let conf = Conf::new(&dir, port).set("log", "access", &q("/dev/full"));
    let mut m = Master::start(&dir, &conf, port);
    for i in 0..20 {
        assert_eq!(m.get(&format!("/hello?{i}"), &[]).status, 200);
    }
    let line = wait_line(&dir.join("master.stderr"), "about /dev/full", |l| {
        l.contains("/dev/full")
    });
    assert!(line.contains("No space left on device"), "{line}");
    let stderr = dir.read("master.stderr");
    assert_eq!(
        stderr.matches("/dev/full").count(),
        1,
        "reported once, not per line: {stderr}"
    );
    assert!(
        m.child.try_wait().unwrap().is_none(),
        "the master keeps running"
    );
}
