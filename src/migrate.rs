//! `gte-supervisor migrate gunicorn.conf.py`: turn a gunicorn config into an equivalent `workers.toml`.
//!
//! A gunicorn config is Python code, so it is not parsed here: [`migrate`] runs it with the given
//! interpreter through a small embedded dump script (fresh namespace, `__file__` set, working
//! directory unchanged, killed after 30 s), which prints every public top-level name as JSON plus
//! `os.cpu_count()`. [`render`] then maps those settings, purely, to `workers.toml` text.
//!
//! Mapping rules:
//! * every name the config defines ends up either as a key or as a `# name = value: ...` comment
//!   saying why it has no equivalent (server hooks, TLS, syslog, statsd, ...);
//! * keys with a gunicorn counterpart that the config leaves unset get gunicorn's default, marked
//!   `# gunicorn default`, so the migrated service behaves as it did under gunicorn;
//! * `workers` equal to `2 * os.cpu_count() + 1` (the `multiprocessing.cpu_count() * 2 + 1` idiom)
//!   becomes `count = "auto"`;
//! * lines that need a human decision (the app, the interpreter, ...) are marked `CHECK`.

use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Errors carry the file path and what went wrong.
#[derive(Debug)]
pub struct MigrateError(pub String);

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MigrateError {}

/// How long the gunicorn config may run before it is killed.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes kept from each of the dump script's stdout and stderr (the rest is discarded).
const OUTPUT_CAP: usize = 8 << 20;

/// Prefix of the one stdout line that carries the settings JSON (the config may print too).
const MARKER: &str = "@@gte-supervisor-migrate-settings@@";

/// Exit status of the dump script when the config itself raised.
const CONFIG_RAISED: i32 = 3;

/// Run as `python -c DUMP_SCRIPT CONF`. Executes CONF like gunicorn does (fresh namespace,
/// `__name__ = "__config__"`, `__file__` set), prints the public top-level names as JSON after
/// [`MARKER`]. Modules, functions and classes are skipped, except that functions named like a
/// gunicorn server hook are listed in `__hooks__` and a class given as `worker_class` or
/// `logger_class` becomes its dotted name. The config's own prints go to stderr.
const DUMP_SCRIPT: &str = r#"
import inspect, json, math, os, sys, traceback

MARKER = "@@gte-supervisor-migrate-settings@@"
HOOKS = {"on_starting", "on_reload", "when_ready", "pre_fork", "post_fork", "post_worker_init",
         "worker_int", "worker_abort", "pre_exec", "pre_request", "post_request", "child_exit",
         "worker_exit", "nworkers_changed", "on_exit", "ssl_context"}
CLASS_SETTINGS = {"worker_class", "logger_class"}

def text(s):
    s = str(s)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s

def conv(v, depth=0):
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else repr(v)
    if isinstance(v, str):
        return text(v)
    if depth < 32:
        if isinstance(v, (list, tuple)):
            return [conv(x, depth + 1) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted((conv(x, depth + 1) for x in v), key=repr)
        if isinstance(v, dict):
            return {text(k) if isinstance(k, str) else text(repr(k)): conv(x, depth + 1)
                    for k, x in v.items()}
    try:
        return text(repr(v))
    except Exception:
        return "<%s object>" % type(v).__name__

def main():
    path = sys.argv[1]
    out = sys.stdout
    sys.stdout = sys.stderr
    ns = {"__builtins__": __builtins__, "__name__": "__config__", "__file__": path,
          "__doc__": None, "__package__": None}
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec")
        exec(code, ns)
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        sys.stderr.flush()
        os._exit(3)
    try:
        settings, hooks = {}, []
        for name, value in list(ns.items()):
            if not isinstance(name, str) or name.startswith("_") or inspect.ismodule(value):
                continue
            if inspect.isclass(value):
                if name in CLASS_SETTINGS:
                    settings[name] = text("%s.%s" % (value.__module__, value.__qualname__))
                continue
            if inspect.isfunction(value) or inspect.ismethod(value) or inspect.isbuiltin(value):
                if name in HOOKS:
                    hooks.append(name)
                continue
            settings[name] = conv(value)
        settings["__cpu_count__"] = os.cpu_count()
        settings["__hooks__"] = sorted(hooks)
        data = json.dumps(settings, ensure_ascii=True, allow_nan=False, sort_keys=True)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(4)
    out.write("\n" + MARKER + data + "\n")
    out.flush()
    sys.stderr.flush()
    os._exit(0)

main()
"#;

/// Run the gunicorn config file with `python` (a gunicorn config is Python code), dump its settings, and map them.
///
/// The config runs in the current working directory, like `gunicorn -c` would from here. A
/// Python error while running it (or a config that runs longer than 30 s) is an error carrying
/// the traceback and the file path.
pub fn migrate(conf: &Path, python: &Path) -> Result<String, MigrateError> {
    let fail = |what: String| MigrateError(format!("{}: {what}", conf.display()));
    let meta = std::fs::metadata(conf).map_err(|e| fail(e.to_string()))?;
    if meta.is_dir() {
        return Err(fail("is a directory, not a gunicorn config file".into()));
    }
    let abs = std::path::absolute(conf).map_err(|e| fail(e.to_string()))?;
    let (status, stdout, stderr) = run_dump(&abs, python).map_err(fail)?;
    let stdout = String::from_utf8_lossy(&stdout);
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim_end();
    if !status.success() {
        return Err(fail(if status.code() == Some(CONFIG_RAISED) {
            format!(
                "error while running the config with {}:\n{stderr}",
                python.display()
            )
        } else {
            format!(
                "{} failed ({status}) dumping the config:\n{stderr}",
                python.display()
            )
        }));
    }
    let json = stdout
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(MARKER))
        .ok_or_else(|| {
            fail(format!(
                "{} printed no settings (is it a Python 3 interpreter?)\n{stderr}",
                python.display()
            ))
        })?;
    let mut settings: Map<String, Value> = serde_json::from_str(json)
        .map_err(|e| fail(format!("cannot read the dumped settings: {e}")))?;
    let cpu_count = settings.remove("__cpu_count__").and_then(|v| v.as_u64());
    Ok(render(&settings, &abs, cpu_count))
}

/// Runs the dump script on `conf` (absolute) and returns its exit status, stdout and stderr.
///
/// The output is streamed from reader threads, so a process the config left running with our
/// pipes open cannot hold things up: after Python exits, output is collected for at most
/// [`EXIT_GRACE`] more.
fn run_dump(conf: &Path, python: &Path) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), String> {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(DUMP_SCRIPT)
        .arg(conf)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONIOENCODING", "utf-8:backslashreplace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let (tx, rx) = mpsc::channel();
    drain(child.stdout.take(), Stream::Out, tx.clone());
    drain(child.stderr.take(), Stream::Err, tx);

    let mut output = Output::default();
    let deadline = Instant::now() + DUMP_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => output.receive(&rx, Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "running the config with {} did not finish within {} s and was killed \
                     (does it wait for something, or start a server?)",
                    python.display(),
                    DUMP_TIMEOUT.as_secs()
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for {}: {e}", python.display()));
            }
        }
    };
    let grace = Instant::now() + EXIT_GRACE;
    while output.open > 0 {
        let left = grace.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        output.receive(&rx, left);
    }
    Ok((status, output.out, output.err))
}

/// How long output is still collected after Python exited (a child it started may hold the pipes).
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Which pipe of the dump script a chunk came from.
#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

/// A piece of the dump script's output; `None` is end of file.
type Chunk = (Stream, Option<Vec<u8>>);

/// The dump script's output collected so far.
struct Output {
    out: Vec<u8>,
    err: Vec<u8>,
    /// Pipes not at end of file yet.
    open: u8,
}

impl Default for Output {
    fn default() -> Self {
        Output {
            out: Vec::new(),
            err: Vec::new(),
            open: 2,
        }
    }
}

impl Output {
    /// Waits up to `wait` for a chunk, then takes whatever else is already there.
    fn receive(&mut self, rx: &mpsc::Receiver<Chunk>, wait: Duration) {
        let mut next = rx.recv_timeout(wait).ok();
        while let Some((stream, chunk)) = next {
            match chunk {
                None => self.open = self.open.saturating_sub(1),
                Some(bytes) => {
                    let buf = match stream {
                        Stream::Out => &mut self.out,
                        Stream::Err => &mut self.err,
                    };
                    let room = OUTPUT_CAP.saturating_sub(buf.len());
                    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
            }
            next = rx.try_recv().ok();
        }
    }
}

/// Reads `pipe` to the end on a thread, sending each chunk, then `None`.
fn drain<R: Read + Send + 'static>(pipe: Option<R>, stream: Stream, tx: mpsc::Sender<Chunk>) {
    thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send((stream, Some(buf[..n].to_vec()))).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = tx.send((stream, None));
    });
}

// ---------------------------------------------------------------------------------------------
// Pure mapping
// ---------------------------------------------------------------------------------------------

/// gunicorn's default bind when `$PORT` is not set (also gte-supervisor's default).
const DEFAULT_BIND: &str = "127.0.0.1:8000";

/// Why a gunicorn setting has no gte-supervisor equivalent, for the ones not mapped below.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "user",
        "run gte-supervisor as that user instead: User= in the systemd unit",
    ),
    (
        "group",
        "run gte-supervisor as that group instead: Group= in the systemd unit",
    ),
    (
        "initgroups",
        "supplementary groups come from the systemd unit (User=, SupplementaryGroups=)",
    ),
    ("umask", "set UMask= in the systemd unit"),
    (
        "worker_tmp_dir",
        "workers are watched through pipes; there are no heartbeat files",
    ),
    (
        "tmp_upload_dir",
        "request bodies are buffered by the master, bounded by limit_request_body",
    ),
    (
        "secure_scheme_headers",
        "not configurable: gunicorn's default three (X-Forwarded-Proto: https, X-Forwarded-Ssl: on, X-Forwarded-Protocol: ssl) are believed from forwarded_allow_ips",
    ),
    (
        "forwarder_headers",
        "not configurable: SCRIPT_NAME from forwarded_allow_ips is honoured (gunicorn's default); PATH_INFO is not",
    ),
    (
        "proxy_protocol",
        "the PROXY protocol is not supported; nginx in front speaks plain HTTP",
    ),
    (
        "proxy_allow_ips",
        "the PROXY protocol is not supported; nginx in front speaks plain HTTP",
    ),
    (
        "reload",
        "no code reloading; restart or reload the service after a deploy",
    ),
    (
        "reload_engine",
        "no code reloading; restart or reload the service after a deploy",
    ),
    (
        "reload_extra_files",
        "no code reloading; restart or reload the service after a deploy",
    ),
    ("spew", "debugging option without equivalent"),
    ("check_config", "use `gte-supervisor check -c workers.toml`"),
    ("print_config", "use `gte-supervisor check -c workers.toml`"),
    (
        "sendfile",
        "responses are proxied from the workers; no sendfile",
    ),
    ("reuse_port", "the master owns the only listening socket"),
    (
        "paste",
        "PasteDeploy apps are not supported; point [app].wsgi at a module:callable",
    ),
    (
        "raw_paste_global_conf",
        "PasteDeploy apps are not supported",
    ),
    (
        "strip_header_spaces",
        "the HTTP parser is strict and not configurable",
    ),
    (
        "permit_unconventional_http_method",
        "the HTTP parser is strict and not configurable",
    ),
    (
        "permit_unconventional_http_version",
        "the HTTP parser is strict and not configurable",
    ),
    (
        "casefold_http_method",
        "the HTTP parser is strict and not configurable",
    ),
    (
        "header_map",
        "the HTTP parser is strict and not configurable",
    ),
    (
        "logger_class",
        "logging is done by the master, not by a Python logger class",
    ),
    ("logconfig", "logging is configured by [log] only"),
    ("logconfig_dict", "logging is configured by [log] only"),
    ("logconfig_json", "logging is configured by [log] only"),
    (
        "syslog",
        "no syslog output; log to \"-\" and let journald collect it",
    ),
    (
        "syslog_addr",
        "no syslog output; log to \"-\" and let journald collect it",
    ),
    (
        "syslog_prefix",
        "no syslog output; log to \"-\" and let journald collect it",
    ),
    (
        "syslog_facility",
        "no syslog output; log to \"-\" and let journald collect it",
    ),
    ("disable_redirect_access_to_syslog", "no syslog output"),
    ("statsd_host", "no StatsD metrics"),
    ("statsd_prefix", "no StatsD metrics"),
    ("dogstatsd_tags", "no StatsD metrics"),
    ("proc_name", "process titles are not configurable"),
    ("default_proc_name", "process titles are not configurable"),
    ("config", "this file is the configuration"),
];

/// TLS settings: all reported next to `bind`.
const TLS: &[&str] = &[
    "bind_ssl",
    "certfile",
    "keyfile",
    "ca_certs",
    "cert_reqs",
    "ssl_version",
    "ciphers",
    "suppress_ragged_eofs",
    "do_handshake_on_connect",
    "ssl_context",
];

/// gunicorn's server hooks (Python callables run inside gunicorn).
const HOOKS: &[&str] = &[
    "on_starting",
    "on_reload",
    "when_ready",
    "pre_fork",
    "post_fork",
    "post_worker_init",
    "worker_int",
    "worker_abort",
    "pre_exec",
    "pre_request",
    "post_request",
    "child_exit",
    "worker_exit",
    "nworkers_changed",
    "on_exit",
];

const HOOK_WHY: &str = "Python server hooks do not exist in gte-supervisor; do per-worker set-up \
                        when the app module is imported";

/// Pure mapping from the dumped settings (JSON object: name -> value) to workers.toml text; unit-tested.
///
/// `source` is the gunicorn config (its directory becomes `[app].chdir` unless the config sets
/// `chdir`); `cpu_count` is `os.cpu_count()` where the config ran, used to recognise
/// `workers = cpu_count * 2 + 1` as `count = "auto"`. Names starting with `_` are ignored, except
/// `__hooks__` (a list of server-hook function names the dump found).
pub fn render(settings: &Map<String, Value>, source: &Path, cpu_count: Option<u64>) -> String {
    let mut s = Settings {
        map: settings,
        used: BTreeSet::new(),
    };
    let mut out = Out::default();
    let conf_dir = match source.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };

    out.comment(&format!(
        "gte-supervisor configuration, generated by gte-supervisor migrate from\n  {}",
        sanitize_comment(&source.display().to_string())
    ));
    out.comment(
        "Every setting of that file is below, as a key or as a comment saying why it has no \
         equivalent;\nkeys it left unset carry gunicorn's default (\"gunicorn default\") so the \
         service behaves as before.\nReview the lines marked CHECK, then validate with: \
         gte-supervisor check -c workers.toml",
    );
    out.blank();

    let chdir = app_chdir(&mut s, &conf_dir);
    let worker = WorkerModel::read(&mut s);

    top_level(&mut s, &mut out, &chdir);
    out.blank();
    out.table("app");
    app(&mut s, &mut out, &chdir, &worker);
    out.blank();
    out.table("workers");
    workers(&mut s, &mut out, &worker, cpu_count);
    out.blank();
    out.table("log");
    log(&mut s, &mut out, &chdir);
    leftovers(&mut s, &mut out);
    out.buf
}

/// The dumped settings, remembering which ones were mapped.
struct Settings<'a> {
    map: &'a Map<String, Value>,
    used: BTreeSet<String>,
}

impl<'a> Settings<'a> {
    /// The value of `name` if the config set it, marking it as handled.
    fn take(&mut self, name: &str) -> Option<&'a Value> {
        let map = self.map;
        let v = map.get(name)?;
        self.used.insert(name.to_string());
        Some(v)
    }
}

/// The output text, built line by line.
#[derive(Default)]
struct Out {
    buf: String,
}

impl Out {
    /// One `# ` line per line of `text` (control characters escaped, so the TOML stays valid).
    fn comment(&mut self, text: &str) {
        for line in text.split('\n') {
            self.buf.push('#');
            if !line.is_empty() {
                self.buf.push(' ');
                self.buf.push_str(&sanitize_comment(line));
            }
            self.buf.push('\n');
        }
    }

    /// `key = value` (value already TOML).
    fn kv(&mut self, key: &str, value: &str) {
        self.buf.push_str(&format!("{key} = {value}\n"));
    }

    /// `key = value  # note`.
    fn kv_note(&mut self, key: &str, value: &str, note: &str) {
        self.buf
            .push_str(&format!("{key} = {value}  # {}\n", sanitize_comment(note)));
    }

    /// `key = value  # gunicorn default` for a setting the config did not set.
    fn kv_default(&mut self, key: &str, value: &str) {
        self.kv_note(key, value, "gunicorn default");
    }

    /// `# name = value: not supported by gte-supervisor (why)`.
    fn unsupported(&mut self, name: &str, value: &Value, why: &str) {
        self.comment(&format!(
            "{name} = {}: not supported by gte-supervisor ({why})",
            py_repr(value)
        ));
    }

    /// `# name = value: invalid, not carried over (why)`.
    fn invalid(&mut self, name: &str, value: &Value, why: &str) {
        self.comment(&format!(
            "CHECK: {name} = {}: invalid ({why}; gunicorn would refuse it too), not carried over",
            py_repr(value)
        ));
    }

    fn table(&mut self, name: &str) {
        self.buf.push_str(&format!("[{name}]\n"));
    }

    fn blank(&mut self) {
        self.buf.push('\n');
    }
}

// ---- value helpers --------------------------------------------------------------------------

/// A non-negative integer, as gunicorn's `validate_pos_int` accepts it (int, or int string).
fn as_uint(v: &Value) -> Result<u64, String> {
    const WANT: &str = "expected a non-negative integer";
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| WANT.to_string()),
        Value::String(s) => parse_int(s.trim()).ok_or_else(|| WANT.to_string()),
        _ => Err(WANT.to_string()),
    }
}

/// Parses `int(s, 0)` forms: decimal, `0x..`, `0o..`, `0b..`, with `_` separators.
fn parse_int(s: &str) -> Option<u64> {
    let s = s.replace('_', "");
    let lower = s.to_ascii_lowercase();
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(digits) = lower.strip_prefix(prefix) {
            return u64::from_str_radix(digits, radix).ok();
        }
    }
    s.parse().ok()
}

/// A boolean, as gunicorn's `validate_bool` accepts it (bool, or "true"/"false").
fn as_bool(v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("expected True or False".into()),
        },
        _ => Err("expected True or False".into()),
    }
}

/// An optional string, trimmed like gunicorn's `validate_string`.
fn as_opt_str(v: &Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.trim().to_string())),
        _ => Err("expected a string".into()),
    }
}

/// A list of strings: one string, a list of strings, or None (gunicorn's `validate_list_string`).
fn as_str_list(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.trim().to_string()]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.trim().to_string()),
                _ => Err("expected a list of strings".to_string()),
            })
            .collect(),
        _ => Err("expected a string or a list of strings".into()),
    }
}

/// A TOML basic string with everything escaped that needs it.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML key: bare if it can be, quoted otherwise.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml_str(k)
    }
}

/// A TOML array of strings.
fn toml_str_array<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_str(s.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

/// Comment text with control characters (not allowed in TOML comments) escaped.
fn sanitize_comment(line: &str) -> String {
    line.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                format!("\\u{:04X}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A value written back the way it looks in Python (for comments), cut to a readable length.
fn py_repr(v: &Value) -> String {
    const MAX: usize = 160;
    let full = py_repr_full(v);
    if full.chars().count() <= MAX {
        full
    } else {
        let cut: String = full.chars().take(MAX).collect();
        format!("{cut}...")
    }
}

fn py_repr_full(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => toml_str(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(py_repr_full).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", toml_str(k), py_repr_full(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// `p` as written if absolute (or "-"), else joined onto `base` (gunicorn resolves relative
/// paths against its working directory, gte-supervisor against the directory of workers.toml).
fn resolve(base: &Path, p: &str) -> String {
    if p == "-" || Path::new(p).is_absolute() {
        p.to_string()
    } else {
        base.join(p).to_string_lossy().into_owned()
    }
}

// ---- sections -------------------------------------------------------------------------------

/// `[app].chdir`: the config's `chdir` (relative to the config's directory), else that directory.
/// Returned as a path together with its own comment lines, written later in `[app]`.
struct Chdir {
    path: PathBuf,
    notes: Vec<String>,
}

fn app_chdir(s: &mut Settings, conf_dir: &Path) -> Chdir {
    let mut notes = Vec::new();
    if let Some(v) = s.take("chdir") {
        match as_opt_str(v) {
            Ok(Some(dir)) if !dir.is_empty() => {
                let path = if Path::new(&dir).is_absolute() {
                    PathBuf::from(&dir)
                } else {
                    notes.push(format!(
                        "CHECK: chdir = {}: gunicorn resolved it against its working directory, \
                         taken here to be the config's directory",
                        toml_str(&dir)
                    ));
                    conf_dir.join(&dir)
                };
                return Chdir { path, notes };
            }
            Ok(_) => {}
            Err(why) => notes.push(format!(
                "CHECK: chdir = {}: invalid ({why}), not carried over",
                py_repr(v)
            )),
        }
    }
    notes.push(
        "CHECK: gunicorn ran the app in its working directory; this is the directory of the \
         gunicorn config"
            .into(),
    );
    Chdir {
        path: conf_dir.to_path_buf(),
        notes,
    }
}

/// What kind of gunicorn worker the config used, and the resulting threads per worker.
#[derive(Debug, Clone, PartialEq)]
enum WorkerKind {
    /// `sync`: one request at a time.
    Sync,
    /// `gthread` (or `sync` with threads > 1, which gunicorn turns into gthread).
    Threaded,
    /// eventlet / gevent / tornado: green threads serving a WSGI app.
    Green(String),
    /// An ASGI worker (uvicorn, aiohttp): the bundled WSGI worker cannot run the app.
    Asgi(String),
    /// A worker class gte-supervisor does not know.
    Custom(String),
}

struct WorkerModel {
    kind: WorkerKind,
    threads: u64,
    /// The config set `threads` (otherwise `threads` is gunicorn's default 1).
    threads_set: bool,
    /// Comments for the `threads` key.
    notes: Vec<String>,
}

impl WorkerModel {
    fn read(s: &mut Settings) -> WorkerModel {
        let mut notes = Vec::new();
        let class = s.take("worker_class").cloned();
        let mut kind = match &class {
            None => WorkerKind::Sync,
            Some(Value::String(c)) => classify(c.trim()),
            Some(other) => {
                notes.push(format!(
                    "CHECK: worker_class = {}: not a class name, taken as \"sync\"",
                    py_repr(other)
                ));
                WorkerKind::Sync
            }
        };
        let (threads, threads_set) = match s.take("threads") {
            None => (1, false),
            Some(v) => match as_uint(v) {
                Ok(n) if n >= 1 => (n, true),
                Ok(_) => {
                    notes.push(format!(
                        "CHECK: threads = {}: at least 1 thread is needed, using 1",
                        py_repr(v)
                    ));
                    (1, true)
                }
                Err(why) => {
                    notes.push(format!(
                        "CHECK: threads = {}: invalid ({why}), using gunicorn's default 1",
                        py_repr(v)
                    ));
                    (1, false)
                }
            },
        };
        let class_text = class
            .as_ref()
            .map(py_repr)
            .unwrap_or_else(|| "\"sync\"".into());
        match &kind {
            WorkerKind::Sync if threads > 1 => {
                notes.push(format!(
                    "worker_class = {class_text} with threads = {threads}: gunicorn runs that as \
                     gthread; {threads} requests in flight per worker"
                ));
                kind = WorkerKind::Threaded;
            }
            WorkerKind::Sync => notes.push(format!(
                "worker_class = {class_text}{}: one request at a time per worker",
                if class.is_none() {
                    " (gunicorn default)"
                } else {
                    ""
                }
            )),
            WorkerKind::Threaded => notes.push(format!(
                "worker_class = {class_text}: {threads} request thread(s) per worker"
            )),
            WorkerKind::Green(_) | WorkerKind::Custom(_) => notes.push(format!(
                "CHECK: worker_class = {class_text}: the bundled worker uses OS threads, not this \
                 worker class; concurrency per worker is `threads` (or see [app] for running it \
                 as `command`)"
            )),
            WorkerKind::Asgi(_) => notes.push(format!(
                "CHECK: worker_class = {class_text}: only meaningful with `command` (see [app])"
            )),
        }
        WorkerModel {
            kind,
            threads,
            threads_set,
            notes,
        }
    }

    /// Whether gunicorn's `timeout` was a per-request bound (sync workers) or a heartbeat.
    fn timeout_is_per_request(&self) -> bool {
        self.kind == WorkerKind::Sync
    }
}

/// Sorts a gunicorn `worker_class` string into a [`WorkerKind`].
fn classify(class: &str) -> WorkerKind {
    let lower = class.to_ascii_lowercase();
    let short = lower.strip_prefix("egg:gunicorn#").unwrap_or(&lower);
    match short {
        "sync" | "gunicorn.workers.sync.syncworker" => WorkerKind::Sync,
        "gthread" | "gunicorn.workers.gthread.threadworker" => WorkerKind::Threaded,
        "eventlet" | "gevent" | "gevent_wsgi" | "gevent_pywsgi" | "tornado" => {
            WorkerKind::Green(class.to_string())
        }
        _ if short.starts_with("gunicorn.workers.ggevent")
            || short.starts_with("gunicorn.workers.geventlet")
            || short.starts_with("gunicorn.workers.gtornado") =>
        {
            WorkerKind::Green(class.to_string())
        }
        _ if short.contains("uvicorn") || short.contains("aiohttp") || short.contains("asgi") => {
            WorkerKind::Asgi(class.to_string())
        }
        _ => WorkerKind::Custom(class.to_string()),
    }
}

/// Parses one gunicorn bind into `host:port`, or says why it cannot be used.
fn parse_bind(bind: &str) -> Result<String, String> {
    let b = bind.trim();
    let b = b.strip_prefix("tcp://").unwrap_or(b);
    if b.starts_with("unix:") {
        return Err(
            "a unix socket; only TCP binds (host:port) are supported, so point nginx's \
                    proxy_pass at the TCP address"
                .into(),
        );
    }
    if b.starts_with("fd://") {
        return Err("an inherited file descriptor; gte-supervisor opens its own TCP socket".into());
    }
    let (host, port) = if b.starts_with('[') {
        let end = b.find(']').ok_or("unterminated IPv6 address")?;
        let (host, rest) = b.split_at(end + 1);
        match rest {
            "" => (host, "8000"),
            _ => (host, rest.strip_prefix(':').ok_or("expected host:port")?),
        }
    } else {
        match b.split_once(':') {
            // gunicorn binds an empty host to all interfaces.
            Some(("", port)) => ("0.0.0.0", port),
            Some((host, port)) => (host, port),
            None => (b, "8000"),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("no host".into());
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("cannot read the port {port:?}"))?;
    Ok(format!("{host}:{port}"))
}

/// Top-level keys: bind, pidfile, daemon, backlog, request limits, forwarded_allow_ips; TLS notes.
fn top_level(s: &mut Settings, out: &mut Out, chdir: &Chdir) {
    // bind
    match s.take("bind") {
        None => out.kv_note(
            "bind",
            &toml_str(DEFAULT_BIND),
            "gunicorn default (without $PORT)",
        ),
        Some(v) => {
            let mut chosen = None;
            match as_str_list(v) {
                Ok(binds) => {
                    for b in &binds {
                        match parse_bind(b) {
                            Ok(addr) if chosen.is_none() => chosen = Some(addr),
                            Ok(_) => out.comment(&format!(
                                "CHECK: gunicorn also listened on {}: gte-supervisor listens on \
                                 one address only; not carried over",
                                toml_str(b)
                            )),
                            Err(why) => out.comment(&format!(
                                "CHECK: bind {}: not supported by gte-supervisor ({why})",
                                toml_str(b)
                            )),
                        }
                    }
                }
                Err(why) => out.invalid("bind", v, &why),
            }
            match chosen {
                Some(addr) => out.kv("bind", &toml_str(&addr)),
                None => out.kv_note(
                    "bind",
                    &toml_str(DEFAULT_BIND),
                    "CHECK: no usable TCP bind in the gunicorn config",
                ),
            }
        }
    }
    for &name in TLS {
        if let Some(v) = s.take(name) {
            let mut why = "TLS is terminated by nginx in front of gte-supervisor".to_string();
            if name == "bind_ssl" {
                why.push_str("; bind_ssl is not a gunicorn setting either");
            }
            if !v.is_null() && (name == "certfile" || name == "keyfile") {
                why.push_str(
                    "; CHECK: gunicorn served HTTPS itself, gte-supervisor speaks plain HTTP",
                );
            }
            out.unsupported(name, v, &why);
        }
    }

    // pidfile
    match s.take("pidfile") {
        Some(v) => match as_opt_str(v) {
            Ok(Some(p)) if !p.is_empty() => out.kv("pidfile", &toml_str(&resolve(&chdir.path, &p))),
            Ok(_) => out.comment("pidfile = None: no pid file, as with gunicorn"),
            Err(why) => out.invalid("pidfile", v, &why),
        },
        None => out
            .comment("pidfile: not set in the gunicorn config, so no pid file (gunicorn default)"),
    }

    // daemon
    match s.take("daemon").map(|v| (v, as_bool(v))) {
        None => out.kv_default("daemon", "false"),
        Some((_, Ok(true))) => {
            out.comment(
                "gunicorn ran daemonized. Keep it for a start script like the old one; \
                 under a systemd service set daemon = false.",
            );
            out.kv("daemon", "true");
        }
        Some((_, Ok(false))) => out.kv("daemon", "false"),
        Some((v, Err(why))) => {
            out.invalid("daemon", v, &why);
            out.kv_default("daemon", "false");
        }
    }

    uint_key(s, out, "backlog", "backlog", 2048);

    out.comment(
        "limit_request_body: gunicorn does not limit request bodies; gte-supervisor's default \
         (50MiB) applies.",
    );
    request_limits(s, out);
    forwarded_allow_ips(s, out);
}

/// A non-negative integer setting mapped 1:1 (gunicorn's default when unset or invalid).
fn uint_key(s: &mut Settings, out: &mut Out, gname: &str, key: &str, default: u64) -> u64 {
    match s.take(gname) {
        None => {
            out.kv_default(key, &default.to_string());
            default
        }
        Some(v) => match as_uint(v) {
            Ok(n) => {
                out.kv(key, &n.to_string());
                n
            }
            Err(why) => {
                out.invalid(gname, v, &why);
                out.kv_default(key, &default.to_string());
                default
            }
        },
    }
}

/// limit_request_line, limit_request_field_size, limit_request_fields as they are; when either
/// per-line limit is set, limit_request_header to match gunicorn's bound on the whole head.
fn request_limits(s: &mut Settings, out: &mut Out) {
    // gunicorn's caps (gunicorn/http/message.py): MAX_REQUEST_LINE, MAX_HEADERS.
    const MAX_LINE: u64 = 8190;
    const MAX_FIELDS: u64 = 32768;
    // gte-supervisor's own cap on limit_request_header.
    const MAX_HEAD: u64 = 16 << 20;
    fn read(s: &mut Settings, out: &mut Out, name: &str, default: u64) -> (u64, bool) {
        match s.take(name) {
            None => (default, false),
            Some(v) => match as_uint(v) {
                Ok(n) => (n, true),
                Err(why) => {
                    out.invalid(name, v, &why);
                    (default, false)
                }
            },
        }
    }
    let (line, line_set) = read(s, out, "limit_request_line", 4094);
    let (field, field_set) = read(s, out, "limit_request_field_size", 8190);
    let (fields, fields_set) = read(s, out, "limit_request_fields", 100);
    // gunicorn turns 0 and anything above 32768 into 32768 header fields.
    let fields = if fields == 0 || fields > MAX_FIELDS {
        MAX_FIELDS
    } else {
        fields
    };

    // The per-line limits carry over as they are (0 = no limit of its own, as gunicorn's
    // "unlimited"; gunicorn never allows a request line over 8190 bytes; below 64 bytes nothing
    // useful fits, so 64 is the floor here).
    let line = if line == 0 {
        0
    } else {
        line.clamp(64, MAX_LINE)
    };
    let field = if field == 0 { 0 } else { field.max(64) };
    let per_line = |out: &mut Out, key: &str, v: u64, set: bool| {
        if set {
            out.kv(key, &v.to_string());
        } else {
            out.kv_default(key, &v.to_string());
        }
    };
    per_line(out, "limit_request_line", line, line_set);
    per_line(out, "limit_request_field_size", field, field_set);
    if line_set || field_set {
        // gunicorn's bound on the whole head is its field count times the field size; the
        // default limit_request_header (64KiB) could refuse heads gunicorn took. (Its
        // "unlimited" per-line values are 8190 bytes in that sum.)
        let or_max = |v: u64| if v == 0 { MAX_LINE } else { v };
        let (line, field) = (or_max(line), or_max(field));
        let total = line
            .saturating_add(fields.saturating_mul(field))
            .clamp(8192, MAX_HEAD);
        out.comment(&format!(
            "limit_request_header: gunicorn limited the request line to {line} bytes and each \
             of up to {fields} header fields to {field} bytes;\nthe whole line + header block \
             is bounded to match: {line} + {fields} x {field} = {total} bytes (at most 16MiB)."
        ));
        out.kv("limit_request_header", &total.to_string());
    } else {
        out.comment(
            "limit_request_header: the whole line + header block; its default (64KiB) applies.",
        );
    }
    if fields_set {
        out.kv("limit_request_fields", &fields.to_string());
    } else {
        out.kv_default("limit_request_fields", &fields.to_string());
    }
}

fn forwarded_allow_ips(s: &mut Settings, out: &mut Out) {
    let default = || toml_str_array(&["127.0.0.1", "::1"]);
    match s.take("forwarded_allow_ips") {
        None => out.kv_note(
            "forwarded_allow_ips",
            &default(),
            "gunicorn default (without $FORWARDED_ALLOW_IPS)",
        ),
        Some(v) => {
            let ips = match v {
                Value::String(list) => Ok(list
                    .split(',')
                    .map(str::trim)
                    .filter(|ip| !ip.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()),
                _ => as_str_list(v),
            };
            match ips {
                Ok(ips) => out.kv("forwarded_allow_ips", &toml_str_array(&ips)),
                Err(why) => {
                    out.invalid("forwarded_allow_ips", v, &why);
                    out.kv_default("forwarded_allow_ips", &default());
                }
            }
        }
    }
}

/// `[app]`: wsgi (or a `command` suggestion), chdir, python, env, preload.
fn app(s: &mut Settings, out: &mut Out, chdir: &Chdir, worker: &WorkerModel) {
    let mut wsgi = "app:app".to_string();
    match s.take("wsgi_app").map(|v| (v, as_opt_str(v))) {
        Some((_, Ok(Some(app)))) if !app.is_empty() => {
            wsgi = app;
            out.kv("wsgi", &toml_str(&wsgi));
        }
        other => {
            if let Some((v, Err(why))) = other {
                out.invalid("wsgi_app", v, &why);
            }
            out.comment(
                "CHECK: gunicorn takes the app from its command line (gunicorn -c gunicorn.conf.py \
                 module:callable);\nput the module:callable you ran here.",
            );
            out.kv("wsgi", &toml_str(&wsgi));
        }
    }
    let command: Option<Vec<String>> = match &worker.kind {
        WorkerKind::Asgi(class) => {
            out.comment(&format!(
                "CHECK: worker_class = {} serves an ASGI app, which the bundled WSGI worker cannot \
                 run.\nReplace `wsgi` with a per-worker server (\"{{port}}\" is each worker's \
                 loopback port), e.g.:",
                toml_str(class)
            ));
            Some(
                [
                    "uvicorn",
                    wsgi.as_str(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                ]
                .map(str::to_string)
                .to_vec(),
            )
        }
        WorkerKind::Green(class) | WorkerKind::Custom(class) => {
            out.comment(&format!(
                "CHECK: worker_class = {}: keep `wsgi` (the bundled worker runs {} thread(s) per \
                 worker), or replace it\nwith one single-worker gunicorn per slot (\"{{port}}\" is \
                 each worker's loopback port):",
                toml_str(class),
                worker.threads
            ));
            Some(
                [
                    "gunicorn",
                    "-k",
                    class.as_str(),
                    "-w",
                    "1",
                    "-b",
                    "127.0.0.1:{port}",
                    wsgi.as_str(),
                ]
                .map(str::to_string)
                .to_vec(),
            )
        }
        WorkerKind::Sync | WorkerKind::Threaded => None,
    };
    if let Some(command) = command {
        out.comment(&format!("command = {}", toml_str_array(&command)));
    }

    for note in &chdir.notes {
        out.comment(note);
    }
    out.kv("chdir", &toml_str(&chdir.path.to_string_lossy()));
    out.comment(
        "CHECK: the interpreter that has your app's dependencies; gunicorn ran under the one it \
         was installed in,\ne.g. \"venv/bin/python3\" (relative to chdir) for a virtualenv.",
    );
    out.kv("python", &toml_str("python3"));

    app_env(s, out, chdir);

    match (s.take("preload_app"), s.take("preload")) {
        (Some(v), other) => {
            match as_bool(v) {
                Ok(b) => out.kv("preload", if b { "true" } else { "false" }),
                Err(why) => {
                    out.invalid("preload_app", v, &why);
                    out.kv_default("preload", "false");
                }
            }
            if let Some(other) = other {
                out.comment(&format!(
                    "preload = {}: ignored, like gunicorn does (preload_app is the setting)",
                    py_repr(other)
                ));
            }
        }
        (None, Some(v)) => match as_bool(v) {
            Ok(b) => {
                if b {
                    out.comment(
                        "CHECK: gunicorn ignores `preload` in a config file (the setting is \
                         preload_app; --preload is the\ncommand-line flag), so unless you ran \
                         gunicorn --preload it did not preload. gte-supervisor will;\nset false \
                         to keep the old behaviour.",
                    );
                }
                out.kv("preload", if b { "true" } else { "false" });
            }
            Err(why) => {
                out.invalid("preload", v, &why);
                out.kv_default("preload", "false");
            }
        },
        (None, None) => out.kv_default("preload", "false"),
    }
}

/// `[app].env` from raw_env (gunicorn's setting), env (a common mistake gunicorn ignores) and
/// pythonpath (added to PYTHONPATH).
fn app_env(s: &mut Settings, out: &mut Out, chdir: &Chdir) {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let add_pairs = |out: &mut Out, name: &str, v: &Value, env: &mut BTreeMap<String, String>| {
        let entries = match v {
            Value::Object(map) => {
                for (k, val) in map {
                    match val {
                        Value::String(text) => {
                            env.insert(k.clone(), text.clone());
                        }
                        Value::Number(n) => {
                            env.insert(k.clone(), n.to_string());
                        }
                        other => out.comment(&format!(
                            "CHECK: {name}[{}] = {}: not a string, not carried over",
                            toml_str(k),
                            py_repr(other)
                        )),
                    }
                }
                return;
            }
            _ => as_str_list(v),
        };
        match entries {
            Ok(entries) => {
                for e in entries {
                    match e.split_once('=') {
                        Some((k, val)) if !k.is_empty() => {
                            env.insert(k.to_string(), val.to_string());
                        }
                        _ => out.comment(&format!(
                            "CHECK: {name} entry {}: not KEY=VALUE, not carried over",
                            toml_str(&e)
                        )),
                    }
                }
            }
            Err(why) => out.invalid(name, v, &why),
        }
    };
    if let Some(v) = s.take("raw_env") {
        add_pairs(out, "raw_env", v, &mut env);
    }
    if let Some(v) = s.take("env") {
        out.comment(
            "CHECK: gunicorn ignores `env` in a config file (the setting is raw_env), so it did \
             not set these; gte-supervisor will.",
        );
        add_pairs(out, "env", v, &mut env);
    }
    if let Some(v) = s.take("pythonpath") {
        match as_opt_str(v) {
            Ok(Some(list)) if !list.is_empty() => {
                let dirs: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(|d| resolve(&chdir.path, d))
                    .collect();
                let mut value = dirs.join(":");
                if let Some(old) = env.get("PYTHONPATH") {
                    value = format!("{value}:{old}");
                }
                out.comment(&format!(
                    "pythonpath = {}: gunicorn put these first on sys.path; carried over as \
                     PYTHONPATH.",
                    py_repr(v)
                ));
                env.insert("PYTHONPATH".into(), value);
            }
            Ok(_) => {}
            Err(why) => out.invalid("pythonpath", v, &why),
        }
    }
    if !env.is_empty() {
        let items: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("{} = {}", toml_key(k), toml_str(v)))
            .collect();
        out.kv("env", &format!("{{ {} }}", items.join(", ")));
    }
}

/// `[workers]`: count, threads, connections, timeouts, keepalive, recycling.
fn workers(s: &mut Settings, out: &mut Out, worker: &WorkerModel, cpu_count: Option<u64>) {
    // count
    match s.take("workers") {
        None => out.kv_note("count", "1", "gunicorn default (without $WEB_CONCURRENCY)"),
        Some(v) => match as_uint(v) {
            Ok(n)
                if cpu_count
                    .is_some_and(|c| c > 0 && n == c.saturating_mul(2).saturating_add(1)) =>
            {
                let cpus = cpu_count.unwrap_or_default();
                out.comment(&format!(
                    "workers = {n} = 2 x {cpus} CPUs + 1 where migrate ran: the \
                     multiprocessing.cpu_count() * 2 + 1 idiom.\n\"auto\" is that formula, \
                     evaluated at start-up (2 x usable CPUs + 1, affinity and cgroup quota \
                     aware).\nCHECK: if {n} was meant as a fixed number, write count = {n}."
                ));
                out.kv("count", &toml_str("auto"));
            }
            Ok(n) if n >= 1 => out.kv("count", &n.to_string()),
            Ok(_) => {
                out.comment("CHECK: workers = 0: at least one worker is needed, using 1");
                out.kv("count", "1");
            }
            Err(why) => {
                out.invalid("workers", v, &why);
                out.kv_default("count", "1");
            }
        },
    }

    // threads
    for note in &worker.notes {
        out.comment(note);
    }
    if worker.threads_set {
        out.kv("threads", &worker.threads.to_string());
    } else {
        out.kv_default("threads", &worker.threads.to_string());
    }

    // connections
    out.comment(
        "worker_connections: requests in flight per `command` worker; the bundled WSGI worker \
         serves `threads` at a time.",
    );
    uint_key(s, out, "worker_connections", "connections", 1000);

    out.comment(
        "queue: no gunicorn equivalent (gunicorn leaves waiting clients in the listen backlog); \
         gte-supervisor's default (1024) applies.",
    );

    // timeout
    match s.take("timeout").map(|v| (v, as_uint(v))) {
        Some((_, Ok(0))) => out.comment(
            "CHECK: timeout = 0: gunicorn never timed workers out; gte-supervisor always bounds a \
             request,\nso its default (30) applies. Set timeout to the longest request you expect.",
        ),
        Some((_, Ok(n))) => {
            if !worker.timeout_is_per_request() {
                out.comment(
                    "CHECK: for non-sync gunicorn workers timeout was a heartbeat, not a bound on \
                     each request; here it is\nper request (504 and the worker is replaced).",
                );
            }
            out.kv("timeout", &n.to_string());
        }
        Some((v, Err(why))) => {
            out.invalid("timeout", v, &why);
            out.kv_default("timeout", "30");
        }
        None => out.kv_default("timeout", "30"),
    }
    uint_key(s, out, "graceful_timeout", "graceful_timeout", 30);
    if worker.kind == WorkerKind::Sync {
        out.comment(
            "keepalive: gunicorn's sync workers ignore it (they close every connection); here it \
             applies to the master's client connections.",
        );
    }
    uint_key(s, out, "keepalive", "keepalive", 2);
    if s.map.get("max_requests").map_or(Ok(0), as_uint) == Ok(0) {
        out.comment(
            "max_requests = 0: workers are never recycled, as with gunicorn (gte-supervisor's \
             default is 1000).",
        );
    }
    uint_key(s, out, "max_requests", "max_requests", 0);
    uint_key(s, out, "max_requests_jitter", "max_requests_jitter", 0);
}

/// `[log]`: level, access, error, capture_output; enable_stdio_inheritance note.
fn log(s: &mut Settings, out: &mut Out, chdir: &Chdir) {
    match s.take("loglevel") {
        None => out.kv_default("level", &toml_str("info")),
        Some(v) => match as_opt_str(v) {
            Ok(Some(level)) => {
                let lower = level.to_ascii_lowercase();
                let mapped = match lower.as_str() {
                    "debug" | "info" | "warning" | "error" => lower.clone(),
                    "critical" => {
                        out.comment("loglevel = \"critical\": the closest level is error");
                        "error".into()
                    }
                    _ => {
                        out.comment(&format!(
                            "CHECK: loglevel = {}: unknown to gunicorn too, which then logs at info",
                            toml_str(&level)
                        ));
                        "info".into()
                    }
                };
                out.kv("level", &toml_str(&mapped));
            }
            Ok(None) | Err(_) => {
                out.invalid("loglevel", v, "expected a level name");
                out.kv_default("level", &toml_str("info"));
            }
        },
    }

    match s.take("accesslog") {
        None => out.kv_note(
            "access",
            &toml_str("off"),
            "gunicorn default: no access log",
        ),
        Some(v) => match as_opt_str(v) {
            Ok(None) => out.kv("access", &toml_str("off")),
            Ok(Some(p)) if p.is_empty() => out.kv("access", &toml_str("off")),
            Ok(Some(p)) => out.kv("access", &toml_str(&resolve(&chdir.path, &p))),
            Err(why) => {
                out.invalid("accesslog", v, &why);
                out.kv_default("access", &toml_str("off"));
            }
        },
    }

    // The same tokens as gunicorn: carried over as it is, unless it uses one we cannot render.
    if let Some(v) = s.take("access_log_format") {
        match as_opt_str(v) {
            Ok(Some(f)) => match crate::logging::format::AccessFormat::parse(&f) {
                Ok(_) => out.kv("access_format", &toml_str(&f)),
                Err(why) => out.comment(&format!(
                    "CHECK: access_log_format = {}: not carried over ({why}); the default \
                     (Apache combined + %(D)s %(P)s) is used",
                    py_repr(v)
                )),
            },
            Ok(None) => {}
            Err(why) => out.invalid("access_log_format", v, &why),
        }
    }

    match s.take("errorlog") {
        None => out.kv_note("error", &toml_str("-"), "gunicorn default: stderr"),
        Some(v) => match as_opt_str(v) {
            Ok(Some(p)) if !p.is_empty() => out.kv("error", &toml_str(&resolve(&chdir.path, &p))),
            Ok(_) => {
                out.comment(&format!("errorlog = {}: logging to stderr", py_repr(v)));
                out.kv("error", &toml_str("-"));
            }
            Err(why) => {
                out.invalid("errorlog", v, &why);
                out.kv_default("error", &toml_str("-"));
            }
        },
    }

    match s.take("capture_output").map(|v| (v, as_bool(v))) {
        None => out.kv_note(
            "capture_output",
            "false",
            "gunicorn default: workers' output goes to the master's stdout/stderr",
        ),
        Some((_, Ok(b))) => out.kv("capture_output", if b { "true" } else { "false" }),
        Some((v, Err(why))) => {
            out.invalid("capture_output", v, &why);
            out.kv_default("capture_output", "false");
        }
    }

    if let Some(v) = s.take("enable_stdio_inheritance") {
        out.comment(&format!(
            "enable_stdio_inheritance = {}: no separate knob in gte-supervisor (the workers' \
             stdout/stderr are always\neither captured into the error log or inherited, per \
             capture_output)",
            py_repr(v)
        ));
    }
}

/// Everything not mapped yet: known-unsupported gunicorn settings, hooks, and unknown names.
fn leftovers(s: &mut Settings, out: &mut Out) {
    let mut lines: Vec<(String, Value, String)> = Vec::new();
    for (name, value) in s.map {
        if name.starts_with('_') || s.used.contains(name) {
            continue;
        }
        let why = if let Some((_, why)) = UNSUPPORTED.iter().find(|(n, _)| n == name) {
            (*why).to_string()
        } else if HOOKS.contains(&name.as_str()) {
            HOOK_WHY.to_string()
        } else {
            "not a gunicorn setting either, so gunicorn ignored it".to_string()
        };
        lines.push((name.clone(), value.clone(), why));
    }
    let hooks: Vec<&str> = match s.map.get("__hooks__") {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if lines.is_empty() && hooks.is_empty() {
        return;
    }
    out.blank();
    out.comment("Other settings of the gunicorn config, not carried over:");
    for (name, value, why) in &lines {
        out.unsupported(name, value, why);
    }
    for hook in hooks {
        out.comment(&format!(
            "def {hook}(...): not supported by gte-supervisor ({HOOK_WHY})"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = "/work/shared/reference/gunicorn.conf.py";

    /// What the dump script prints for /work/shared/reference/gunicorn.conf.py on a 4-CPU machine
    /// (`import multiprocessing` is dropped as a module).
    fn reference_settings() -> Map<String, Value> {
        let json = r#"{
            "accesslog": "/var/log/gte-gunicorn-access.log", "bind": "127.0.0.1:8000",
            "bind_ssl": null, "capture_output": true, "daemon": true,
            "enable_stdio_inheritance": true, "errorlog": "/var/log/gte-gunicorn-error.log",
            "keepalive": 5, "loglevel": "info", "max_requests": 1000, "max_requests_jitter": 100,
            "pidfile": "/var/run/gte-gunicorn.pid", "preload": true, "timeout": 30,
            "worker_class": "sync", "worker_connections": 1000, "workers": 9, "__hooks__": []
        }"#;
        serde_json::from_str(json).expect("fixture JSON")
    }

    fn map(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).expect("test JSON")
    }

    fn parse(text: &str) -> toml::Value {
        toml::from_str::<toml::Value>(text).unwrap_or_else(|e| panic!("invalid TOML: {e}\n{text}"))
    }

    fn get<'a>(doc: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
        path.split('.').try_fold(doc, |v, k| v.get(k))
    }

    #[test]
    fn reference_config() {
        let text = render(&reference_settings(), Path::new(REFERENCE), Some(4));
        let doc = parse(&text);
        assert!(text.starts_with(
            "# gte-supervisor configuration, generated by gte-supervisor migrate from\n"
        ));
        assert!(text.contains(REFERENCE));
        let s = |p: &str| get(&doc, p).and_then(|v| v.as_str()).map(str::to_string);
        let i = |p: &str| get(&doc, p).and_then(toml::Value::as_integer);
        let b = |p: &str| get(&doc, p).and_then(toml::Value::as_bool);
        assert_eq!(s("bind").as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(s("pidfile").as_deref(), Some("/var/run/gte-gunicorn.pid"));
        assert_eq!(b("daemon"), Some(true));
        assert_eq!(i("backlog"), Some(2048));
        assert_eq!(i("limit_request_fields"), Some(100));
        assert_eq!(i("limit_request_line"), Some(4094));
        assert_eq!(i("limit_request_field_size"), Some(8190));
        assert!(get(&doc, "limit_request_header").is_none());
        assert_eq!(s("app.wsgi").as_deref(), Some("app:app"));
        assert_eq!(s("app.chdir").as_deref(), Some("/work/shared/reference"));
        assert_eq!(s("app.python").as_deref(), Some("python3"));
        assert_eq!(b("app.preload"), Some(true));
        assert!(get(&doc, "app.env").is_none());
        assert_eq!(s("workers.count").as_deref(), Some("auto"));
        assert_eq!(i("workers.threads"), Some(1));
        assert_eq!(i("workers.connections"), Some(1000));
        assert_eq!(i("workers.timeout"), Some(30));
        assert_eq!(i("workers.graceful_timeout"), Some(30));
        assert_eq!(i("workers.keepalive"), Some(5));
        assert_eq!(i("workers.max_requests"), Some(1000));
        assert_eq!(i("workers.max_requests_jitter"), Some(100));
        assert_eq!(s("log.level").as_deref(), Some("info"));
        assert_eq!(
            s("log.access").as_deref(),
            Some("/var/log/gte-gunicorn-access.log")
        );
        assert_eq!(
            s("log.error").as_deref(),
            Some("/var/log/gte-gunicorn-error.log")
        );
        assert_eq!(b("log.capture_output"), Some(true));
        // Settings without a key are comments.
        assert!(text.contains(
            "# bind_ssl = None: not supported by gte-supervisor (TLS is terminated by nginx"
        ));
        assert!(text.contains("# enable_stdio_inheritance = True: no separate knob"));
        assert!(text.contains("CHECK: gunicorn ignores `preload`"));
        // Section order: top-level keys, then [app], [workers], [log].
        let pos = |needle: &str| text.find(needle).unwrap_or(usize::MAX);
        assert!(pos("\nbind = ") < pos("\n[app]"));
        assert!(pos("\n[app]") < pos("\n[workers]"));
        assert!(pos("\n[workers]") < pos("\n[log]"));
        assert_eq!(text.matches("\n[").count(), 3);
        // Every table key is known to workers.toml.
        let known: &[&str] = &[
            "bind",
            "pidfile",
            "daemon",
            "backlog",
            "limit_request_body",
            "limit_request_header",
            "limit_request_fields",
            "limit_request_line",
            "limit_request_field_size",
            "forwarded_allow_ips",
            "app",
            "workers",
            "log",
        ];
        for key in doc.as_table().into_iter().flat_map(|t| t.keys()) {
            assert!(
                known.contains(&key.as_str()),
                "unexpected top-level key {key}"
            );
        }
    }

    #[test]
    fn access_log_format_carries_over_or_is_flagged() {
        let fmt = r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s %({x-request-id}i)s"#;
        let mut settings = map(r#"{"bind": "127.0.0.1:8000", "__hooks__": []}"#);
        settings.insert("access_log_format".into(), Value::String(fmt.into()));
        let text = render(&settings, Path::new("/srv/gunicorn.conf.py"), Some(2));
        let doc = parse(&text);
        assert_eq!(
            get(&doc, "log.access_format").and_then(|v| v.as_str()),
            Some(fmt),
            "{text}"
        );
        // The rendered value is accepted by the real config loader's parser.
        assert!(crate::logging::format::AccessFormat::parse(fmt).is_ok());

        // %({var}e)s needs the environ, which lives in the worker: a CHECK comment, no key.
        let mut settings = map(r#"{"__hooks__": []}"#);
        settings.insert(
            "access_log_format".into(),
            Value::String("%(h)s %({REMOTE_USER}e)s".into()),
        );
        let text = render(&settings, Path::new("/srv/gunicorn.conf.py"), Some(2));
        let doc = parse(&text);
        assert!(get(&doc, "log.access_format").is_none(), "{text}");
        assert!(
            text.contains(
                "# CHECK: access_log_format = \"%(h)s %({REMOTE_USER}e)s\": not carried over"
            ),
            "{text}"
        );
    }

    #[test]
    fn auto_only_for_two_cpus_plus_one() {
        let auto = render(&map(r#"{"workers": 17}"#), Path::new("/x/g.py"), Some(8));
        assert_eq!(
            get(&parse(&auto), "workers.count").and_then(|v| v.as_str()),
            Some("auto")
        );
        assert!(auto.contains("2 x 8 CPUs + 1"));

        let fixed = render(&map(r#"{"workers": 9}"#), Path::new("/x/g.py"), Some(8));
        assert_eq!(
            get(&parse(&fixed), "workers.count").and_then(|v| v.as_integer()),
            Some(9)
        );

        let unknown_cpus = render(&map(r#"{"workers": 9}"#), Path::new("/x/g.py"), None);
        assert_eq!(
            get(&parse(&unknown_cpus), "workers.count").and_then(|v| v.as_integer()),
            Some(9)
        );

        let unset = render(&map("{}"), Path::new("/x/g.py"), Some(4));
        let doc = parse(&unset);
        assert_eq!(
            get(&doc, "workers.count").and_then(|v| v.as_integer()),
            Some(1)
        );
        // Unset settings get gunicorn's defaults.
        assert_eq!(
            get(&doc, "workers.keepalive").and_then(|v| v.as_integer()),
            Some(2)
        );
        assert_eq!(
            get(&doc, "workers.max_requests").and_then(|v| v.as_integer()),
            Some(0)
        );
        assert_eq!(
            get(&doc, "log.access").and_then(|v| v.as_str()),
            Some("off")
        );
        assert_eq!(get(&doc, "log.error").and_then(|v| v.as_str()), Some("-"));
        assert_eq!(
            get(&doc, "log.capture_output").and_then(|v| v.as_bool()),
            Some(false)
        );
        assert!(get(&doc, "pidfile").is_none());
    }

    #[test]
    fn unknown_and_unsupported_names_are_comments() {
        let settings = map(
            r#"{"workers": 2, "my_helper": [1, "two\nlines"], "user": "www-data",
                "statsd_host": "localhost:8125", "syslog": true, "preload_app": false,
                "__hooks__": ["post_fork", "when_ready"], "__private": 1}"#,
        );
        let text = render(&settings, Path::new("/srv/app/gunicorn.conf.py"), Some(2));
        let doc = parse(&text);
        assert!(text.contains(
            "# my_helper = [1, \"two\\nlines\"]: not supported by gte-supervisor (not a gunicorn \
             setting either, so gunicorn ignored it)"
        ));
        assert!(text.contains("# user = \"www-data\": not supported by gte-supervisor (run gte-supervisor as that user"));
        assert!(text.contains("# statsd_host = \"localhost:8125\": not supported by gte-supervisor (no StatsD metrics)"));
        assert!(text.contains("# syslog = True: not supported by gte-supervisor"));
        assert!(text.contains("# def post_fork(...): not supported by gte-supervisor"));
        assert!(text.contains("# def when_ready(...): not supported by gte-supervisor"));
        assert!(!text.contains("__private"));
        assert!(!text.contains("__hooks__"));
        assert_eq!(
            get(&doc, "app.preload").and_then(|v| v.as_bool()),
            Some(false)
        );
        assert!(get(&doc, "my_helper").is_none());
    }

    #[test]
    fn binds_workers_and_limits() {
        let settings = map(
            r#"{"bind": ["unix:/run/app.sock", "0.0.0.0:9000", "[::1]:9000"],
                "worker_class": "uvicorn.workers.UvicornWorker", "threads": 4,
                "limit_request_line": 8190, "limit_request_field_size": 16380,
                "limit_request_fields": 50, "loglevel": "CRITICAL", "accesslog": "-",
                "errorlog": "logs/error.log", "chdir": "/srv/app", "timeout": 0,
                "forwarded_allow_ips": "10.0.0.1, 10.0.0.2", "wsgi_app": "svc.main:api",
                "certfile": "/etc/ssl/cert.pem"}"#,
        );
        let text = render(&settings, Path::new("/etc/g.py"), Some(4));
        let doc = parse(&text);
        let s = |p: &str| get(&doc, p).and_then(|v| v.as_str()).map(str::to_string);
        assert_eq!(s("bind").as_deref(), Some("0.0.0.0:9000"));
        assert!(text.contains("unix socket; only TCP binds"));
        assert!(text.contains("also listened on \"[::1]:9000\""));
        assert_eq!(
            get(&doc, "limit_request_header").and_then(|v| v.as_integer()),
            Some(8190 + 50 * 16380)
        );
        assert_eq!(
            get(&doc, "limit_request_fields").and_then(|v| v.as_integer()),
            Some(50)
        );
        assert_eq!(
            get(&doc, "limit_request_line").and_then(|v| v.as_integer()),
            Some(8190)
        );
        assert_eq!(
            get(&doc, "limit_request_field_size").and_then(|v| v.as_integer()),
            Some(16380)
        );
        assert_eq!(s("log.level").as_deref(), Some("error"));
        assert_eq!(s("log.access").as_deref(), Some("-"));
        assert_eq!(s("log.error").as_deref(), Some("/srv/app/logs/error.log"));
        assert_eq!(s("app.chdir").as_deref(), Some("/srv/app"));
        assert_eq!(s("app.wsgi").as_deref(), Some("svc.main:api"));
        assert!(text.contains(
            "# command = [\"uvicorn\", \"svc.main:api\", \"--host\", \"127.0.0.1\", \"--port\", \"{port}\"]"
        ));
        assert!(get(&doc, "workers.timeout").is_none());
        assert_eq!(
            get(&doc, "workers.threads").and_then(|v| v.as_integer()),
            Some(4)
        );
        let ips: Vec<&str> = get(&doc, "forwarded_allow_ips")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        assert!(text.contains("gunicorn served HTTPS itself"));
    }

    #[test]
    fn env_and_escaping() {
        let settings = map(
            r#"{"raw_env": ["A=1", "WEIRD=q\"uo\\te\u0001", "BAD"], "env": {"X.Y": "z"},
                "pythonpath": "lib,/opt/x", "sync_threads": 3, "threads": 3}"#,
        );
        let text = render(&settings, Path::new("/srv/a\"b/g.py"), None);
        let doc = parse(&text);
        let env = get(&doc, "app.env")
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default();
        assert_eq!(env.get("A").and_then(|v| v.as_str()), Some("1"));
        assert_eq!(
            env.get("WEIRD").and_then(|v| v.as_str()),
            Some("q\"uo\\te\u{1}")
        );
        assert_eq!(env.get("X.Y").and_then(|v| v.as_str()), Some("z"));
        assert_eq!(
            env.get("PYTHONPATH").and_then(|v| v.as_str()),
            Some("/srv/a\"b/lib:/opt/x")
        );
        assert!(text.contains("raw_env entry \"BAD\": not KEY=VALUE"));
        assert_eq!(
            get(&doc, "app.chdir").and_then(|v| v.as_str()),
            Some("/srv/a\"b")
        );
        assert!(text.contains("gunicorn runs that as gthread"));
        assert_eq!(
            get(&doc, "workers.threads").and_then(|v| v.as_integer()),
            Some(3)
        );
    }

    #[test]
    fn bind_forms() {
        assert_eq!(parse_bind("0.0.0.0").as_deref(), Ok("0.0.0.0:8000"));
        assert_eq!(parse_bind(":8080").as_deref(), Ok("0.0.0.0:8080"));
        assert_eq!(
            parse_bind("tcp://localhost:81").as_deref(),
            Ok("localhost:81")
        );
        assert_eq!(parse_bind("[::1]").as_deref(), Ok("[::1]:8000"));
        assert_eq!(parse_bind("[::]:8000").as_deref(), Ok("[::]:8000"));
        assert!(parse_bind("unix:/tmp/s").is_err());
        assert!(parse_bind("fd://3").is_err());
        assert!(parse_bind("host:http").is_err());
    }

    #[test]
    fn values_in_comments_stay_on_one_line() {
        let settings = map(r#"{"logconfig_dict": {"a": "x\ny", "b": [null, false, 1.5]}}"#);
        let text = render(&settings, Path::new("/x/line\nbreak/g.py"), None);
        parse(&text);
        assert!(text.contains("# logconfig_dict = {\"a\": \"x\\ny\", \"b\": [None, False, 1.5]}"));
        assert!(text.contains("/x/line\\u000Abreak/g.py"));
    }
}
