//! A real nginx in front of the real gte-supervisor, configured from the packaged site.
//!
//! nginx (Debian's `/usr/sbin/nginx`) runs unprivileged-style in a scratch directory with the
//! plain-HTTP variant of the packaged site, `packaging/nginx/gte-api-plain.conf.template`, and
//! proxies to gte-supervisor on a free loopback port. The tests check what the site promises:
//! proxying (bodies included), the client address arriving in the app as `REMOTE_ADDR` (through
//! `X-Real-IP`, and through `X-Forwarded-For` alone), `/health` following the master's readiness
//! endpoint (503 while loading, 200 when ready, JSON 502 when the master is gone), `/-/` staying
//! private, a WebSocket through both to a `command` worker, and that the production site
//! `packaging/nginx/gte-api.conf` passes `nginx -t`.
//!
//! To make the client address observable, the test's own http{} block (not the site) tells nginx
//! to take its `$remote_addr` from an `X-Test-Client` request header (realip module): nginx then
//! believes the client is 203.0.113.9, and the app must see exactly that address — never
//! nginx's 127.0.0.1 nor a client-supplied spoof.
//!
//! Self-contained and std only (no `tests/common`). Every wait has a deadline; every process the
//! test starts (nginx and its workers, the master and its workers) is stopped by pid when its
//! guard is dropped, also on panic. Without `/usr/sbin/nginx` each test prints
//! "SKIPPED: nginx not installed" to the terminal and passes.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gte-supervisor");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const NGINX: &str = "/usr/sbin/nginx";

/// How long a master may take until `/-/ready` answers 200, and nginx until it listens.
const STARTUP: Duration = Duration::from_secs(60);
/// Socket timeouts of the test client.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a process gets to exit after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// The address the test makes nginx believe the client has (RFC 5737 documentation range).
const CLIENT_IP: &str = "203.0.113.9";
/// An address a client tries to spoof; it must never become REMOTE_ADDR.
const SPOOFED_IP: &str = "198.51.100.7";

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn geteuid() -> u32;
}

// ---------------------------------------------------------------------------------------------
// Skipping, scratch directories, ports
// ---------------------------------------------------------------------------------------------

/// True when nginx is installed; otherwise prints a message that `cargo test` does not capture
/// (it goes straight to the terminal's stderr) and the caller returns.
fn nginx_installed() -> bool {
    if Path::new(NGINX).is_file() {
        return true;
    }
    let _ = writeln!(
        io::stderr(),
        "SKIPPED: nginx not installed ({NGINX} is missing; `apt-get install nginx-light`)"
    );
    false
}

/// A fresh directory under cargo's per-target scratch dir; removed when the test passes, kept
/// (with every log) when it fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "nginx-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        let s = dir.to_str().expect("scratch path is UTF-8");
        // The path goes into TOML strings and nginx directives unquoted-safe.
        assert!(
            !s.contains(['"', '\\', ' ', ';', '\'']),
            "scratch path {s:?} needs quoting"
        );
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn str(&self) -> &str {
        self.0.to_str().expect("scratch path is UTF-8")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!("--- {} ---\n{}", path.display(), all[from..].join("\n"))
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// `/proc/PID/stat` fields after the command name: [state, ppid, ..., starttime at index 19].
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Start time of a process (clock ticks since boot), to tell it from a later one with its pid.
fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(19)?.parse().ok()
}

/// True while `pid` exists and has not exited (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

/// The direct children of `pid`, each with its start time.
fn children(pid: u32) -> Vec<(u32, u64)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let f = proc_stat(p)?;
            (f.get(1)?.parse::<u32>().ok()? == pid).then(|| Some((p, f.get(19)?.parse().ok()?)))?
        })
        .collect()
}

fn signal(pid: u32, sig: i32) {
    assert!(
        pid > 1 && pid != std::process::id(),
        "refusing to signal pid {pid}"
    );
    // SAFETY: kill(2) on one explicit pid that this test started.
    unsafe {
        kill(pid as i32, sig);
    }
}

/// A process this test started (nginx or the master). Dropping it stops it: SIGTERM, then
/// SIGKILL after `STOP_GRACE`; children it leaves behind (nginx workers, Python workers) are
/// SIGKILLed by pid, after checking their start time.
struct Proc {
    name: &'static str,
    child: Child,
    /// Files to show when something about this process fails.
    logs: Vec<PathBuf>,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, output: PathBuf, logs: Vec<PathBuf>) -> Proc {
        let out = fs::File::create(&output).expect("create output file");
        let err = out.try_clone().expect("clone output file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut logs = logs;
        logs.insert(0, output);
        Proc { name, child, logs }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn diagnostics(&self) -> String {
        self.logs
            .iter()
            .map(|p| tail(p, 40))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics, with the process's logs, if it has exited.
    fn assert_running(&mut self, doing: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited ({status}) while {doing}\n{}",
                self.name,
                self.diagnostics()
            );
        }
    }

    /// Sends `sig` and waits up to `grace` for the process to exit.
    fn stop(&mut self, sig: i32, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited() {
            return Some(s);
        }
        signal(self.pid(), sig);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(POLL);
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        let kids = if self.exited().is_none() {
            children(pid)
        } else {
            Vec::new()
        };
        if self.stop(SIGTERM, STOP_GRACE).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for (kid, started) in kids {
            if alive(kid) && start_time(kid) == Some(started) {
                signal(kid, SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP and WebSocket client
// ---------------------------------------------------------------------------------------------

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A string field of the app's JSON report; None for null or a missing key.
    fn json(&self, key: &str) -> Option<String> {
        json_field(&self.text(), key)
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {:?}", self.status, self.headers, self.text())
    }
}

/// Reads `"key": "string"`, `"key": number` or `"key": null` out of a flat JSON object as
/// written by Python's json.dumps (the values here are addresses, paths and numbers).
fn json_field(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    let rest = &json[at..];
    if let Some(s) = rest.strip_prefix('"') {
        return Some(s[..s.find('"')?].to_string());
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    let v = rest[..end].trim();
    (v != "null").then(|| v.to_string())
}

fn connect(port: u16) -> TcpStream {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Splits a response head into status and headers.
fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (status, headers)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(data, b"\r\n") else {
            return out;
        };
        let size_hex = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_hex.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

/// One request on a fresh connection (`Connection: close`), the response read to EOF.
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut s = connect(port);
    s.write_all(req.as_bytes()).expect("send request head");
    s.write_all(body).expect("send request body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: reading the response: {e}"));
    let split = find(&raw, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)));
    let (status, headers) = parse_head(&String::from_utf8_lossy(&raw[..split]));
    let mut resp = Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        resp.body = dechunk(&resp.body);
    }
    resp
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    request(port, "GET", path, headers, b"")
}

/// A masked client frame (RFC 6455 5.2), FIN set.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x88];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 1 << 16 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one unmasked server frame: (opcode, payload).
fn read_server_frame(s: &mut TcpStream, pending: &mut Vec<u8>) -> (u8, Vec<u8>) {
    fn need(s: &mut TcpStream, pending: &mut Vec<u8>, n: usize) {
        let mut buf = [0u8; 4096];
        while pending.len() < n {
            let got = s.read(&mut buf).expect("read websocket frame");
            assert!(got > 0, "connection closed mid-frame; have {pending:?}");
            pending.extend_from_slice(&buf[..got]);
        }
    }
    need(s, pending, 2);
    let opcode = pending[0] & 0x0f;
    assert_eq!(pending[0] & 0x80, 0x80, "fragmented frame from the server");
    assert_eq!(pending[1] & 0x80, 0, "a server frame must not be masked");
    let (len, head) = match pending[1] & 0x7f {
        126 => {
            need(s, pending, 4);
            (u16::from_be_bytes([pending[2], pending[3]]) as usize, 4)
        }
        127 => {
            need(s, pending, 10);
            let mut b = [0u8; 8];
            b.copy_from_slice(&pending[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    need(s, pending, head + len);
    let payload = pending[head..head + len].to_vec();
    pending.drain(..head + len);
    (opcode, payload)
}

// ---------------------------------------------------------------------------------------------
// gte-supervisor and nginx
// ---------------------------------------------------------------------------------------------

/// Starts the master on `port` with `app_table` (the body of `[app]`) and waits until its
/// readiness endpoint answers 200 — unless `wait_ready` is false.
fn start_supervisor(dir: &Scratch, port: u16, app_table: &str, wait_ready: bool) -> Proc {
    let apps = Path::new(MANIFEST_DIR).join("tests/apps");
    let config = format!(
        "bind = \"127.0.0.1:{port}\"\n\
         \n\
         [app]\n\
         {app_table}\n\
         chdir = \"{apps}\"\n\
         \n\
         [workers]\n\
         count = 2\n\
         graceful_timeout = 5\n\
         \n\
         [log]\n\
         access = \"{dir}/access.log\"\n\
         error = \"{dir}/error.log\"\n",
        apps = apps.display(),
        dir = dir.str(),
    );
    let path = dir.path("workers.toml");
    fs::write(&path, config).expect("write workers.toml");
    let mut master = Proc::spawn(
        "gte-supervisor",
        Command::new(BIN)
            .arg("-c")
            .arg(&path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUNTIME_DIRECTORY"),
        dir.path("supervisor.out"),
        vec![dir.path("error.log")],
    );
    if wait_ready {
        let deadline = Instant::now() + STARTUP;
        loop {
            master.assert_running("starting");
            if try_get(port, "/-/ready").is_some_and(|r| r.status == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gte-supervisor not ready within {STARTUP:?}\n{}",
                master.diagnostics()
            );
            std::thread::sleep(POLL);
        }
    }
    master
}

/// GET on a fresh connection; None while nothing listens or the connection breaks.
fn try_get(port: u16, path: &str) -> Option<Response> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = find(&raw, b"\r\n\r\n")?;
    let (status, headers) = parse_head(&String::from_utf8_lossy(&raw[..split]));
    Some(Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// The packaged plain-HTTP site with its placeholders filled in.
fn plain_site(nginx_port: u16, upstream_port: u16) -> String {
    let template_path = Path::new(MANIFEST_DIR).join("packaging/nginx/gte-api-plain.conf.template");
    let template = fs::read_to_string(&template_path)
        .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
    for placeholder in ["@NGINX_PORT@", "@UPSTREAM_PORT@"] {
        assert!(
            template.contains(placeholder),
            "template lacks {placeholder}"
        );
    }
    let site = template
        .replace("@NGINX_PORT@", &nginx_port.to_string())
        .replace("@UPSTREAM_PORT@", &upstream_port.to_string());
    assert!(
        !site.contains("_PORT@"),
        "an unknown placeholder is left in the template"
    );
    site
}

/// nginx in front of the master on `upstream_port`, serving two sites:
/// - `port`: the packaged plain site as it is;
/// - `xff_port`: the same site without its `X-Real-IP` header, so the master has only
///   `X-Forwarded-For` to go by.
struct Nginx {
    /// Held for its Drop: stops nginx and its workers.
    _proc: Proc,
    port: u16,
    xff_port: u16,
}

fn start_nginx(dir: &Scratch, upstream_port: u16) -> Nginx {
    let port = free_port();
    let xff_port = free_port();
    let site = plain_site(port, upstream_port);
    fs::write(dir.path("gte-api-plain.conf"), &site).expect("write site");

    let real_ip = "proxy_set_header X-Real-IP $remote_addr;";
    assert!(
        site.contains(real_ip),
        "the plain site no longer sets X-Real-IP: update this test"
    );
    let xff_site = plain_site(xff_port, upstream_port)
        .replace(real_ip, "proxy_set_header X-Real-IP \"\";")
        // Both sites live in one http{}: upstream and map names must differ.
        .replace("gte_plain_backend", "gte_xff_backend")
        .replace(
            "$gte_plain_connection_upgrade",
            "$gte_xff_connection_upgrade",
        );
    fs::write(dir.path("gte-api-xff-only.conf"), xff_site).expect("write xff site");

    let d = dir.str();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { geteuid() } == 0 {
        // As root, nginx would switch its workers to `nobody`, who may not reach this directory.
        "user root root;\n"
    } else {
        ""
    };
    let main = format!(
        "{user}worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log notice;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         \x20   access_log {d}/nginx-access.log;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   # Test only: the client address is whatever X-Test-Client says.\n\
         \x20   set_real_ip_from 127.0.0.1;\n\
         \x20   real_ip_header X-Test-Client;\n\
         \x20   include {d}/gte-api-plain.conf;\n\
         \x20   include {d}/gte-api-xff-only.conf;\n\
         }}\n"
    );
    fs::write(dir.path("nginx.conf"), main).expect("write nginx.conf");

    let nginx_args = |cmd: &mut Command| {
        cmd.arg("-p")
            .arg(format!("{d}/"))
            .arg("-c")
            .arg(dir.path("nginx.conf"))
            .arg("-e")
            .arg(dir.path("nginx-error.log"));
    };
    let mut test = Command::new(NGINX);
    test.arg("-t");
    nginx_args(&mut test);
    let out = test.output().expect("run nginx -t");
    assert!(
        out.status.success(),
        "nginx -t rejected the generated config:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut cmd = Command::new(NGINX);
    nginx_args(&mut cmd);
    cmd.arg("-g").arg("daemon off;");
    let mut proc = Proc::spawn(
        "nginx",
        &mut cmd,
        dir.path("nginx.out"),
        vec![dir.path("nginx-error.log")],
    );
    let deadline = Instant::now() + STARTUP;
    for p in [port, xff_port] {
        let addr = SocketAddr::from(([127, 0, 0, 1], p));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            proc.assert_running("starting");
            assert!(
                Instant::now() < deadline,
                "nginx not listening on {addr} within {STARTUP:?}\n{}",
                proc.diagnostics()
            );
            std::thread::sleep(POLL);
        }
    }
    Nginx {
        _proc: proc,
        port,
        xff_port,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn nginx_proxies_to_the_app_and_forwards_the_client_address() {
    if !nginx_installed() {
        return;
    }
    let dir = Scratch::new("proxy");
    let upstream = free_port();
    let mut master = start_supervisor(&dir, upstream, "wsgi = \"nginxapp:app\"", true);
    let nginx = start_nginx(&dir, upstream);

    // Plain proxying.
    let r = get(nginx.port, "/hello?x=1", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.json("path").as_deref(), Some("/hello"), "{r:?}");
    assert_eq!(r.json("method").as_deref(), Some("GET"), "{r:?}");
    assert_eq!(r.json("scheme").as_deref(), Some("http"), "{r:?}");
    // Without a client address from the realip header, nginx's client is the test: 127.0.0.1.
    assert_eq!(r.json("remote_addr").as_deref(), Some("127.0.0.1"), "{r:?}");

    // The client address nginx sees arrives as REMOTE_ADDR, via X-Real-IP; the client's own
    // X-Forwarded-For is kept in front of it, and believed by nobody.
    let r = get(
        nginx.port,
        "/who",
        &[
            ("X-Test-Client", CLIENT_IP),
            ("X-Forwarded-For", SPOOFED_IP),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json("remote_addr").as_deref(), Some(CLIENT_IP), "{r:?}");
    assert_eq!(r.json("x_real_ip").as_deref(), Some(CLIENT_IP), "{r:?}");
    assert_eq!(
        r.json("x_forwarded_for"),
        Some(format!("{SPOOFED_IP}, {CLIENT_IP}")),
        "nginx must append its client to X-Forwarded-For: {r:?}"
    );
    assert_eq!(
        r.json("x_forwarded_proto").as_deref(),
        Some("http"),
        "{r:?}"
    );

    // A client-supplied X-Real-IP is replaced by nginx, not passed through.
    let r = get(nginx.port, "/who", &[("X-Real-IP", SPOOFED_IP)]);
    assert_eq!(r.json("remote_addr").as_deref(), Some("127.0.0.1"), "{r:?}");

    // X-Forwarded-For alone (no X-Real-IP): the master takes the entry nginx appended, the last
    // one, not the client's spoofed first one.
    let r = get(
        nginx.xff_port,
        "/who",
        &[
            ("X-Test-Client", CLIENT_IP),
            ("X-Forwarded-For", SPOOFED_IP),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json("x_real_ip"), None, "{r:?}");
    assert_eq!(
        r.json("x_forwarded_for"),
        Some(format!("{SPOOFED_IP}, {CLIENT_IP}")),
        "{r:?}"
    );
    assert_eq!(r.json("remote_addr").as_deref(), Some(CLIENT_IP), "{r:?}");

    // A request body larger than nginx's in-memory buffer (goes through its temp file).
    let body = vec![b'x'; 200 * 1024];
    let r = request(
        nginx.port,
        "POST",
        "/upload",
        &[("Content-Type", "application/octet-stream")],
        &body,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json("body_len"), Some(body.len().to_string()), "{r:?}");

    // /health is the master's readiness endpoint; the master's own /-/ paths stay private.
    let r = get(nginx.port, "/health", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "OK\n"), "{r:?}");
    let r = get(nginx.port, "/-/ready", &[]);
    assert_eq!(r.status, 403, "{r:?}");

    master.assert_running("serving");
    // The master's access log records the client nginx reported, not nginx. Log lines are
    // written by a background thread: wait for them (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let access = fs::read_to_string(dir.path("access.log")).unwrap_or_default();
        if access
            .lines()
            .any(|l| l.contains(CLIENT_IP) && l.contains("/who"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line for {CLIENT_IP} within 10 s:\n{access}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(nginx);
}

#[test]
fn nginx_health_follows_the_master_readiness() {
    if !nginx_installed() {
        return;
    }
    let dir = Scratch::new("health");
    let upstream = free_port();
    // nginx first, with nothing behind it yet.
    let nginx = start_nginx(&dir, upstream);
    let r = get(nginx.port, "/health", &[]);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.text(), "{\"error\": \"service unavailable\"}\n", "{r:?}");

    // Workers that take 5 s to import the app: the master listens at once and says 503 until
    // a worker is ready, then 200.
    let mut master = start_supervisor(
        &dir,
        upstream,
        "wsgi = \"nginxapp:app\"\nenv = { NGINXAPP_IMPORT_DELAY = \"5\" }",
        false,
    );
    let deadline = Instant::now() + STARTUP;
    let mut seen = Vec::new();
    loop {
        master.assert_running("starting");
        let status = get(nginx.port, "/health", &[]).status;
        if seen.last() != Some(&status) {
            seen.push(status);
        }
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health never became 200; saw {seen:?}\n{}",
            master.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // 502 (master not listening yet) may come first; then 503 while loading, then 200.
    let seen: Vec<u16> = seen.into_iter().filter(|s| *s != 502).collect();
    assert_eq!(
        seen,
        vec![503, 200],
        "/health statuses while the app loaded"
    );
    let r = get(nginx.port, "/", &[]);
    assert_eq!(r.status, 200, "{r:?}");

    // The master stops: /health turns into nginx's JSON 502 again.
    let status = master.stop(SIGTERM, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop: {status:?}\n{}",
        master.diagnostics()
    );
    let r = get(nginx.port, "/health", &[]);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.text(), "{\"error\": \"service unavailable\"}\n", "{r:?}");
}

#[test]
fn websocket_through_nginx_and_the_master_to_a_command_worker() {
    if !nginx_installed() {
        return;
    }
    let dir = Scratch::new("websocket");
    let upstream = free_port();
    let _master = start_supervisor(
        &dir,
        upstream,
        "command = [\"python3\", \"ws_server.py\", \"{port}\"]",
        true,
    );
    let nginx = start_nginx(&dir, upstream);

    // Plain HTTP reaches the command worker too.
    let r = get(nginx.port, "/", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().starts_with("ws-server "), "{r:?}");

    // Handshake (the key and accept value are RFC 6455's own example).
    let mut s = connect(nginx.port);
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        nginx.port
    );
    s.write_all(handshake.as_bytes()).expect("send handshake");
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&pending, b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).expect("read handshake response");
        assert!(
            n > 0,
            "closed during handshake: {:?}",
            String::from_utf8_lossy(&pending)
        );
        pending.extend_from_slice(&buf[..n]);
    };
    let (status, headers) = parse_head(&String::from_utf8_lossy(&pending[..head_end]));
    pending.drain(..head_end + 4);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(status, 101, "handshake answered {status} {headers:?}");
    assert_eq!(
        header("sec-websocket-accept").as_deref(),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{headers:?}"
    );
    assert!(
        header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{headers:?}"
    );

    // A masked text frame goes out, the worker's echo comes back; twice on one connection.
    for msg in ["hello through nginx", "and a second message"] {
        s.write_all(&client_frame(0x1, msg.as_bytes()))
            .expect("send frame");
        let (opcode, payload) = read_server_frame(&mut s, &mut pending);
        assert_eq!(opcode, 0x1, "text frame expected");
        assert_eq!(String::from_utf8_lossy(&payload), format!("echo: {msg}"));
    }
    // A message past the 125-byte short form (16-bit length) survives both proxies intact.
    let long: String = (0..300)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    s.write_all(&client_frame(0x1, long.as_bytes()))
        .expect("send long frame");
    let (_, payload) = read_server_frame(&mut s, &mut pending);
    assert_eq!(String::from_utf8_lossy(&payload), format!("echo: {long}"));

    // Close handshake: status 1000 comes back.
    s.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .expect("send close");
    let (opcode, payload) = read_server_frame(&mut s, &mut pending);
    assert_eq!((opcode, payload), (0x8, 1000u16.to_be_bytes().to_vec()));
    drop(nginx);
}

#[test]
fn production_site_passes_nginx_config_test() {
    if !nginx_installed() {
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        let _ = writeln!(
            io::stderr(),
            "SKIPPED: openssl not installed (needed for a throwaway certificate)"
        );
        return;
    }
    let dir = Scratch::new("site");
    let d = dir.str();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=gte-api.example.com"])
        .arg("-keyout")
        .arg(dir.path("privkey.pem"))
        .arg("-out")
        .arg(dir.path("fullchain.pem"))
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The site as shipped, with only its machine-specific paths pointed into the scratch dir.
    let site_path = Path::new(MANIFEST_DIR).join("packaging/nginx/gte-api.conf");
    let mut site = fs::read_to_string(&site_path).expect("read gte-api.conf");
    for (from, to) in [
        (
            "/etc/letsencrypt/live/gte-api.example.com/fullchain.pem",
            format!("{d}/fullchain.pem"),
        ),
        (
            "/etc/letsencrypt/live/gte-api.example.com/privkey.pem",
            format!("{d}/privkey.pem"),
        ),
        (
            "/etc/letsencrypt/live/gte-api.example.com/chain.pem",
            format!("{d}/fullchain.pem"),
        ),
        (
            "/var/log/nginx/gte-access.log",
            format!("{d}/gte-access.log"),
        ),
        ("/var/log/nginx/gte-error.log", format!("{d}/gte-error.log")),
    ] {
        assert!(
            site.contains(from),
            "gte-api.conf no longer mentions {from}: update this test"
        );
        site = site.replace(from, &to);
    }
    fs::write(dir.path("gte-api.conf"), site).expect("write site");
    let main = format!(
        "pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         \x20   access_log {d}/nginx-access.log;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   include {d}/gte-api.conf;\n\
         }}\n"
    );
    fs::write(dir.path("nginx.conf"), main).expect("write nginx.conf");
    let out = Command::new(NGINX)
        .arg("-t")
        .arg("-p")
        .arg(format!("{d}/"))
        .arg("-c")
        .arg(dir.path("nginx.conf"))
        .arg("-e")
        .arg(dir.path("nginx-error.log"))
        .stdin(Stdio::null())
        .output()
        .expect("run nginx -t");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nginx -t rejected gte-api.conf:\n{stderr}"
    );
    assert!(
        !stderr.contains("[warn]") && !stderr.contains("[emerg]"),
        "nginx -t warned about gte-api.conf:\n{stderr}"
    );
}
