//! The `workers.toml` schema: one documented struct per table, defaults, parsing and `validate()`.
//!
//! Parsing is two steps. `serde` + `toml` read the file into [`RawConfig`] (unknown keys and wrong
//! types are rejected there, with the line they stand on); [`RawConfig::resolve`] then checks the
//! values that types cannot express (count = 0, a bind that is not an address, no app) and turns
//! the raw form into [`Config`]: paths resolved against the config file's directory, durations as
//! [`Duration`], sizes in bytes, "auto" as a number. Every error names the file, the line (when it
//! can be found) and the key, so `check` can print it the way `nginx -t` does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

pub mod process;

/// A configuration error: file, optional line, the key it concerns and what is wrong.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A duration given as seconds (integer or float) or as a string with a unit: "500ms", "30s", "2m", "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(i64),
            Float(f64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) if n >= 0 => Ok(Dur(Duration::from_secs(n as u64))),
            Repr::Float(f) if f >= 0.0 && f.is_finite() => Ok(Dur(Duration::from_secs_f64(f))),
            Repr::Str(s) => parse_duration(&s).map(Dur).map_err(de::Error::custom),
            _ => Err(de::Error::custom(
                "expected a duration: seconds (e.g. 30) or a string like \"500ms\", \"30s\", \"2m\"",
            )),
        }
    }
}

/// Parses "500ms", "30s", "2m", "1h", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. \"500ms\", \"30s\", \"2m\""))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A size in bytes given as an integer or a string with a unit: "50MiB", "10MB", "512KiB", "2GiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(i64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) if n >= 0 => Ok(Size(n as u64)),
            Repr::Str(s) => parse_size(&s).map(Size).map_err(de::Error::custom),
            _ => Err(de::Error::custom(
                "expected a size: bytes (e.g. 1048576) or a string like \"50MiB\", \"10MB\"",
            )),
        }
    }
}

/// Parses "50MiB", "10MB", "512KiB", "2GiB", "100k", or a bare number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. \"50MiB\", \"10MB\""))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?}: use KiB, MiB, GiB, KB, MB, GB"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid size {s:?}"));
    }
    Ok(v as u64)
}

/// `count = "auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Auto,
    Fixed(i64),
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(i64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) => Ok(Count::Fixed(n)),
            Repr::Str(s) if s == "auto" => Ok(Count::Auto),
            Repr::Str(s) => Err(de::Error::custom(format!(
                "expected \"auto\" or a number of workers, found {s:?}"
            ))),
        }
    }
}

/// Where request bodies over `body_buffer_size` go by default: `$TMPDIR`, else `/var/tmp` (on
/// disk by the FHS, unlike a tmpfs `/tmp`; private to the service under the packaged unit's
/// `PrivateTmp=yes`).
fn default_body_temp_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        _ => PathBuf::from("/var/tmp"),
    }
}

/// The file as written: every key optional, unknown keys rejected.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub bind: Option<String>,
    pub pidfile: Option<String>,
    pub daemon: Option<bool>,
    pub backlog: Option<i64>,
    pub limit_request_body: Option<Size>,
    pub body_buffer_size: Option<Size>,
    pub body_temp_dir: Option<String>,
    pub limit_request_header: Option<Size>,
    pub limit_request_fields: Option<i64>,
    pub limit_request_line: Option<i64>,
    pub limit_request_field_size: Option<i64>,
    pub forwarded_allow_ips: Option<Vec<String>>,
    pub master_threads: Option<i64>,
    pub ready_path: Option<String>,
    pub metrics: Option<String>,
    pub app: Option<RawApp>,
    #[serde(default)]
    pub workers: RawWorkers,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub health: RawHealth,
    /// Path prefixes routed to a `[[process]]` instead of the pool: `{ "/v1/" = "vllm" }`.
    pub routes: Option<BTreeMap<String, String>>,
    /// Supervised processes besides the pool (see [`process`]).
    #[serde(default)]
    pub process: Vec<RawProcess>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<String>,
    pub interval: Option<Dur>,
    pub timeout: Option<Dur>,
    pub failures: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub wsgi: Option<String>,
    pub command: Option<Vec<String>>,
    pub chdir: Option<String>,
    pub python: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub preload: Option<bool>,
    pub ready_timeout: Option<Dur>,
    /// `[[process]]` names the pool waits for (ready) before its first workers start.
    pub after: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawWorkers {
    pub count: Option<Count>,
    pub threads: Option<i64>,
    pub connections: Option<i64>,
    pub pipeline: Option<i64>,
    pub sched_batch: Option<bool>,
    pub queue: Option<i64>,
    pub queue_timeout: Option<Dur>,
    pub timeout: Option<Dur>,
    pub graceful_timeout: Option<Dur>,
    pub keepalive: Option<Dur>,
    pub max_requests: Option<i64>,
    pub max_requests_jitter: Option<i64>,
    pub max_worker_memory: Option<Size>,
    pub memory_check_interval: Option<Dur>,
    #[serde(default)]
    pub path_timeouts: BTreeMap<String, Dur>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub access: Option<String>,
    pub error: Option<String>,
    pub capture_output: Option<bool>,
    pub access_format: Option<String>,
    pub rotate: Option<RawRotate>,
    pub keep: Option<i64>,
}

/// `rotate = "daily" | "hourly" | "never"`, or a size: `"100MiB"` or a number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRotate {
    Bytes(i64),
    Word(String),
}

// ---------------------------------------------------------------------------------------------
// [[process]]: supervised sidecar processes (issue #8). Validation lives in `config/process.rs`.
// ---------------------------------------------------------------------------------------------

/// One `[[process]]` entry as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawProcess {
    pub name: Option<String>,
    pub command: Option<Vec<String>>,
    pub chdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub after: Option<Vec<String>>,
    pub restart: Option<String>,
    pub restart_delay: Option<Dur>,
    pub start_limit_burst: Option<i64>,
    pub start_limit_interval: Option<Dur>,
    pub ready: Option<process::ReadySpec>,
    pub start_timeout: Option<Dur>,
    pub stop_signal: Option<String>,
    pub stop_timeout: Option<Dur>,
    pub listen: Option<String>,
    pub log: Option<String>,
}

pub use process::{ProcessConfig, ReadyCheck, RestartPolicy, Route};

/// What the workers run.
#[derive(Debug, Clone, PartialEq)]
pub enum AppKind {
    /// The bundled WSGI worker imports `module:callable`.
    Wsgi { module: String, callable: String },
    /// Any HTTP server program; `{port}` in its arguments is replaced by the worker's port.
    Command(Vec<String>),
}

/// Where a log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
    File(PathBuf),
    Off,
}

/// The effective configuration: everything resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (absolute).
    pub source: PathBuf,
    /// The public listener address.
    pub bind: SocketAddr,
    pub pidfile: Option<PathBuf>,
    pub daemon: bool,
    pub backlog: u32,
    pub limit_request_body: u64,
    /// Request bodies longer than this are written to a file in `body_temp_dir` instead of
    /// being held in the master's memory.
    pub body_buffer_size: usize,
    pub body_temp_dir: PathBuf,
    pub limit_request_header: usize,
    pub limit_request_fields: usize,
    /// Longest request line (method, target, version), 0 = no limit of its own.
    pub limit_request_line: usize,
    /// Longest header field ("Name: value"), 0 = no limit of its own.
    pub limit_request_field_size: usize,
    pub forwarded_allow_ips: Vec<String>,
    /// Threads of the master's async runtime (1 = current-thread runtime).
    pub master_threads: usize,
    /// Path the master answers itself: 200 while a worker is ready.
    pub ready_path: String,
    /// Address of the Prometheus metrics listener (None: no metrics).
    pub metrics: Option<SocketAddr>,
    pub app: AppConfig,
    pub workers: WorkersConfig,
    pub log: LogConfig,
    pub health: HealthConfig,
    /// False when the file has no `[app]` (only `[[process]]` entries): no worker pool.
    pub pool: bool,
    /// Processes the pool waits for (`[app] after`).
    pub pool_after: Vec<String>,
    /// Supervised `[[process]]` entries, in file order.
    pub processes: Vec<ProcessConfig>,
    /// Path prefixes routed to processes, longest first.
    pub routes: Vec<Route>,
}

/// The health probe of idle workers.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// HTTP path to GET; None = ping the bundled worker's request loop (or connect, for a command).
    pub path: Option<String>,
    /// Zero = no probing.
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: u32,
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub kind: AppKind,
    pub chdir: PathBuf,
    /// The interpreter as configured (relative to chdir, absolute, or a bare name for PATH).
    pub python: PathBuf,
    pub env: BTreeMap<String, String>,
    pub preload: bool,
    /// How long a starting worker may take to become ready.
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct WorkersConfig {
    pub count: usize,
    /// True when `count = "auto"` was resolved from the usable CPUs.
    pub count_auto: bool,
    pub threads: usize,
    pub connections: usize,
    /// Requests a single-threaded bundled worker may hold at once (1 = strictly one): the
    /// extra ones wait in its socket, sent only when no worker is idle and this one is fast.
    pub pipeline: usize,
    /// Run workers under the kernel's SCHED_BATCH policy: a worker woken by the master does
    /// not preempt it, so the master finishes its batch of events first (fewer context switches).
    pub sched_batch: bool,
    pub queue: usize,
    /// Longest wait in the queue for a worker (at least the request's own timeout): then 503.
    pub queue_timeout: Duration,
    pub timeout: Duration,
    pub graceful_timeout: Duration,
    pub keepalive: Duration,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Recycle a worker whose RSS stays above this many bytes (0 = off).
    pub max_worker_memory: u64,
    pub memory_check_interval: Duration,
    /// Longer (or shorter) timeouts for path prefixes, longest prefix first.
    pub path_timeouts: Vec<(String, Duration)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: tracing::Level,
    pub access: LogTarget,
    pub error: LogTarget,
    pub capture_output: bool,
    /// The access-log line, parsed once here (gunicorn tokens or JSON).
    pub access_format: crate::logging::format::AccessFormat,
    /// Built-in rotation of the log files.
    pub rotate: crate::logging::rotate::Rotate,
    /// Rotated files kept per log (0 = all).
    pub keep: usize,
}

impl WorkersConfig {
    /// Requests one worker really serves at the same time (threads, or a command's connections),
    /// without the extra requests pipelining lets wait in its socket.
    pub fn concurrency(&self, app: &AppKind) -> usize {
        match app {
            AppKind::Wsgi { .. } => self.threads,
            AppKind::Command(_) => self.connections,
        }
    }

    /// Whether a worker of this configuration is sent requests ahead (pipelining).
    pub fn pipelined(&self, app: &AppKind) -> bool {
        self.slots_per_worker(app) > self.concurrency(app)
    }

    /// Requests one worker may hold: threads (or `pipeline` for a single-threaded bundled
    /// worker), connections for a command.
    pub fn slots_per_worker(&self, app: &AppKind) -> usize {
        match app {
            AppKind::Wsgi { .. } if self.threads == 1 => self.pipeline,
            AppKind::Wsgi { .. } => self.threads,
            AppKind::Command(_) => self.connections,
        }
    }
}

/// CPUs this process may really use: scheduler affinity and cgroup CPU quota (v1 and v2) are
/// honoured by `available_parallelism` on Linux, unlike a plain count of the host's CPUs.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Reads and resolves a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = std::fs::read_to_string(&abs).map_err(|e| ConfigError {
        file: abs.clone(),
        line: None,
        key: String::new(),
        message: format!("cannot read the config file: {e}"),
    })?;
    parse(&text, &abs)
}

/// Parses config text that came from `file` (used for messages and to resolve relative paths).
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        ConfigError {
            file: file.to_path_buf(),
            line,
            key: line.and_then(|l| key_at_line(text, l)).unwrap_or_default(),
            message: e.message().trim().to_string(),
        }
    })?;
    raw.resolve(text, file)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The `[section] key` written on line `line` (1-based), if that line assigns a key.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            if t.starts_with("[[") {
                // An array of tables: the key is shown as `[[process]] key`.
                section = format!("[{section}]");
            }
        }
        if i + 1 == line {
            let (k, _) = t.split_once('=')?;
            let k = k.trim().trim_matches('"');
            if k.is_empty() || t.starts_with('#') {
                return None;
            }
            return Some(if section.is_empty() {
                k.to_string()
            } else {
                format!("[{section}] {k}")
            });
        }
    }
    None
}

/// Finds the line of `key` inside `[section]` (or at the top level when section is empty).
fn find_key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            current = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if key.is_empty() && current == section {
                return Some(i + 1);
            }
            continue;
        }
        if current == section && !key.is_empty() {
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

impl RawConfig {
    /// Checks values and resolves the raw file into a [`Config`].
    pub fn resolve(self, text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |section: &str, key: &str, message: String| {
            let line = find_key_line(text, section, key);
            let key = if section.is_empty() {
                key.to_string()
            } else {
                format!("[{section}] {key}")
            };
            ConfigError {
                file: file.to_path_buf(),
                line,
                key,
                message,
            }
        };
        let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let resolve_path = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let bind_str = self.bind.unwrap_or_else(|| "127.0.0.1:8000".to_string());
        let bind: SocketAddr = parse_bind(&bind_str).map_err(|m| err("", "bind", m))?;

        let pidfile = self
            .pidfile
            .filter(|p| !p.is_empty())
            .map(|p| resolve_path(&p));
        let backlog = self.backlog.unwrap_or(2048);
        if !(1..=65535).contains(&backlog) {
            return Err(err(
                "",
                "backlog",
                format!("must be 1..=65535, found {backlog}"),
            ));
        }
        let limit_request_body = self.limit_request_body.map(|s| s.0).unwrap_or(50 << 20);
        let body_buffer_size = self.body_buffer_size.map(|s| s.0).unwrap_or(64 << 10);
        if body_buffer_size > 1 << 30 {
            return Err(err(
                "",
                "body_buffer_size",
                format!("must be at most 1GiB, found {body_buffer_size} bytes"),
            ));
        }
        let body_temp_dir = match self.body_temp_dir.as_deref() {
            Some("") => return Err(err("", "body_temp_dir", "must not be empty".into())),
            Some(d) => {
                let dir = resolve_path(d);
                if !dir.is_dir() {
                    return Err(err(
                        "",
                        "body_temp_dir",
                        format!("{} is not an existing directory", dir.display()),
                    ));
                }
                dir
            }
            None => default_body_temp_dir(),
        };
        let limit_request_header = self.limit_request_header.map(|s| s.0).unwrap_or(64 << 10);
        if !(8192..=(16 << 20)).contains(&limit_request_header) {
            return Err(err(
                "",
                "limit_request_header",
                format!("must be between 8KiB and 16MiB, found {limit_request_header} bytes"),
            ));
        }
        let limit_request_fields = self.limit_request_fields.unwrap_or(100);
        if !(1..=32768).contains(&limit_request_fields) {
            return Err(err(
                "",
                "limit_request_fields",
                format!("must be 1..=32768, found {limit_request_fields}"),
            ));
        }
        // gunicorn's per-line limits, with its defaults; 0 leaves only limit_request_header.
        let per_line = |key: &str, v: Option<i64>, default: i64| {
            let n = v.unwrap_or(default);
            if n != 0 && !(64..=limit_request_header as i64).contains(&n) {
                return Err(err(
                    "",
                    key,
                    format!(
                        "must be 0 (no limit of its own) or 64..={limit_request_header} \
                         (limit_request_header), found {n}"
                    ),
                ));
            }
            Ok(n as usize)
        };
        let limit_request_line = per_line("limit_request_line", self.limit_request_line, 4094)?;
        let limit_request_field_size = per_line(
            "limit_request_field_size",
            self.limit_request_field_size,
            8190,
        )?;
        let forwarded_allow_ips = self
            .forwarded_allow_ips
            .unwrap_or_else(|| vec!["127.0.0.1".into(), "::1".into()]);
        for ip in &forwarded_allow_ips {
            if ip != "*" && ip.parse::<std::net::IpAddr>().is_err() {
                return Err(err(
                    "",
                    "forwarded_allow_ips",
                    format!("{ip:?} is not an IP address (or \"*\")"),
                ));
            }
        }
        let master_threads = self.master_threads.unwrap_or(1);
        if !(1..=256).contains(&master_threads) {
            return Err(err(
                "",
                "master_threads",
                format!("must be 1..=256, found {master_threads}"),
            ));
        }
        let ready_path = self.ready_path.unwrap_or_else(|| "/-/ready".to_string());
        if !ready_path.starts_with('/') {
            return Err(err(
                "",
                "ready_path",
                format!("must start with '/', found {ready_path:?}"),
            ));
        }

        // [[process]] and routes (config/process.rs), then [app]
        let (processes, routes) = process::resolve(
            self.process,
            self.routes.unwrap_or_default(),
            text,
            file,
            &base,
        )?;
        let pool = self.app.is_some();
        let Some(app) = self
            .app
            .or_else(|| (!processes.is_empty()).then(process::no_pool_app))
        else {
            return Err(ConfigError {
                file: file.to_path_buf(),
                line: None,
                key: "[app]".into(),
                message: "missing: set [app] wsgi = \"module:callable\" or [app] command = [...] (or list [[process]] entries)"
                    .into(),
            });
        };
        let pool_after = process::resolve_pool_after(app.after.clone(), &processes, text, file)?;
        let kind = match (app.wsgi, app.command) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "app",
                    "command",
                    "set either wsgi or command, not both".into(),
                ))
            }
            (None, None) => {
                return Err(err(
                    "app",
                    "",
                    "missing app: set wsgi = \"module:callable\" or command = [...]".into(),
                ))
            }
            (Some(w), None) => {
                let (module, callable) = parse_wsgi(&w).map_err(|m| err("app", "wsgi", m))?;
                AppKind::Wsgi { module, callable }
            }
            (None, Some(cmd)) => {
                if cmd.is_empty() || cmd[0].trim().is_empty() {
                    return Err(err(
                        "app",
                        "command",
                        "must be a non-empty list: [\"program\", \"arg\", ...]".into(),
                    ));
                }
                if !cmd.iter().any(|a| a.contains("{port}")) {
                    return Err(err(
                        "app",
                        "command",
                        "no argument contains {port}: the program must listen on the port the master gives it".into(),
                    ));
                }
                AppKind::Command(cmd)
            }
        };
        let chdir = match app.chdir {
            Some(c) if c.is_empty() => {
                return Err(err("app", "chdir", "must not be empty".into()));
            }
            Some(c) => resolve_path(&c),
            None => base.clone(),
        };
        let python = PathBuf::from(app.python.unwrap_or_else(|| "python3".to_string()));
        if python.as_os_str().is_empty() {
            return Err(err("app", "python", "must not be empty".into()));
        }
        for k in app.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(err(
                    "app",
                    "env",
                    format!("{k:?} is not a valid environment variable name"),
                ));
            }
        }
        let preload = app.preload.unwrap_or(false);
        if preload && matches!(kind, AppKind::Command(_)) {
            return Err(err(
                "app",
                "preload",
                "preload applies to the bundled WSGI worker (`wsgi = \"module:callable\"`); a \
                 `command` program imports its own code: remove `preload` or use `wsgi`"
                    .to_string(),
            ));
        }
        let ready_timeout = app
            .ready_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(120));

        // [workers]
        let w = self.workers;
        let (count, count_auto) = match w.count.unwrap_or(Count::Auto) {
            // Only [[process]] entries: no worker pool at all.
            _ if !pool => (0, false),
            Count::Auto => (2 * usable_cpus() + 1, true),
            Count::Fixed(n) if (1..=4096).contains(&n) => (n as usize, false),
            Count::Fixed(n) => {
                return Err(err(
                    "workers",
                    "count",
                    format!("must be \"auto\" or 1..=4096, found {n}"),
                ))
            }
        };
        let int_in = |key: &str, v: Option<i64>, default: i64, lo: i64, hi: i64| {
            let v = v.unwrap_or(default);
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(err(
                    "workers",
                    key,
                    format!("must be {lo}..={hi}, found {v}"),
                ))
            }
        };
        let threads = int_in("threads", w.threads, 1, 1, 1024)? as usize;
        let connections = int_in("connections", w.connections, 1000, 1, 100_000)? as usize;
        let pipeline = int_in("pipeline", w.pipeline, 6, 1, 8)? as usize;
        let queue = int_in("queue", w.queue, 1024, 0, 1_000_000)? as usize;
        let max_requests = int_in("max_requests", w.max_requests, 0, 0, i64::MAX)? as u64;
        let max_requests_jitter =
            int_in("max_requests_jitter", w.max_requests_jitter, 0, 0, i64::MAX)? as u64;
        let timeout = w.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30));
        if timeout.is_zero() {
            return Err(err("workers", "timeout", "must be greater than 0".into()));
        }
        let graceful_timeout = w
            .graceful_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30));
        // nginx's default proxy_read_timeout: a client behind it has left by then anyway.
        let queue_timeout = w
            .queue_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60));
        if queue_timeout.is_zero() {
            return Err(err(
                "workers",
                "queue_timeout",
                "must be greater than 0 (queue = 0 is the way to not wait at all)".into(),
            ));
        }
        let keepalive = w.keepalive.map(|d| d.0).unwrap_or(Duration::from_secs(5));
        let max_worker_memory = w.max_worker_memory.map(|s| s.0).unwrap_or(0);
        if max_worker_memory != 0 && max_worker_memory < (16 << 20) {
            return Err(err(
                "workers",
                "max_worker_memory",
                format!("{max_worker_memory} bytes is below 16MiB: no Python worker fits; use e.g. \"2GiB\""),
            ));
        }
        let memory_check_interval = w
            .memory_check_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(5));
        if memory_check_interval < Duration::from_millis(100) {
            return Err(err(
                "workers",
                "memory_check_interval",
                "must be at least 100ms".into(),
            ));
        }
        let mut path_timeouts = Vec::new();
        for (prefix, d) in w.path_timeouts {
            if !prefix.starts_with('/') {
                return Err(err(
                    "workers",
                    "path_timeouts",
                    format!("{prefix:?}: a path prefix must start with '/'"),
                ));
            }
            if d.0.is_zero() {
                return Err(err(
                    "workers",
                    "path_timeouts",
                    format!("{prefix:?}: the timeout must be greater than 0"),
                ));
            }
            path_timeouts.push((prefix, d.0));
        }
        path_timeouts.sort_by_key(|p| std::cmp::Reverse(p.0.len()));

        let h = self.health;
        if let Some(p) = &h.path {
            if !p.starts_with('/') {
                return Err(err(
                    "health",
                    "path",
                    format!("must start with '/', found {p:?}"),
                ));
            }
        }
        let failures = h.failures.unwrap_or(3);
        if !(1..=1000).contains(&failures) {
            return Err(err(
                "health",
                "failures",
                format!("must be 1..=1000, found {failures}"),
            ));
        }
        let health = HealthConfig {
            path: h.path,
            interval: h.interval.map(|d| d.0).unwrap_or(Duration::from_secs(10)),
            timeout: h.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
            failures: failures as u32,
        };
        if health.timeout.is_zero() {
            return Err(err("health", "timeout", "must be greater than 0".into()));
        }

        // [log]
        let l = self.log;
        let level = match l
            .level
            .as_deref()
            .unwrap_or("info")
            .to_ascii_lowercase()
            .as_str()
        {
            "trace" => tracing::Level::TRACE,
            "debug" => tracing::Level::DEBUG,
            "info" => tracing::Level::INFO,
            "warn" | "warning" => tracing::Level::WARN,
            "error" | "critical" => tracing::Level::ERROR,
            other => {
                return Err(err(
                    "log",
                    "level",
                    format!("unknown level {other:?}: use trace, debug, info, warning or error"),
                ))
            }
        };
        let target = |v: Option<String>, dash: LogTarget| match v.as_deref() {
            None => dash,
            Some("-") => dash,
            Some("off") | Some("") => LogTarget::Off,
            Some(p) => LogTarget::File(resolve_path(p)),
        };
        let access = target(l.access, LogTarget::Stdout);
        let error = match target(l.error, LogTarget::Stderr) {
            LogTarget::Off => LogTarget::Stderr,
            t => t,
        };
        let access_format = match &l.access_format {
            None => crate::logging::format::AccessFormat::default(),
            Some(f) => crate::logging::format::AccessFormat::parse(f)
                .map_err(|m| err("log", "access_format", m))?,
        };
        use crate::logging::rotate::Rotate;
        let rotate = parse_rotate(l.rotate).map_err(|m| err("log", "rotate", m))?;
        if let Rotate::Size(n) = rotate {
            if n < 4096 {
                return Err(err(
                    "log",
                    "rotate",
                    format!("{n} bytes is too small a log file: use at least \"4KiB\""),
                ));
            }
        }
        let keep = l.keep.unwrap_or(14);
        if !(0..=100_000).contains(&keep) {
            return Err(err(
                "log",
                "keep",
                format!("must be 0..=100000 (0 = keep all), found {keep}"),
            ));
        }
        if rotate != Rotate::Never {
            if let (LogTarget::File(a), LogTarget::File(e)) = (&access, &error) {
                if a == e {
                    return Err(err(
                        "log",
                        "rotate",
                        format!(
                            "access and error are the same file ({}): with built-in rotation give each log its own file",
                            a.display()
                        ),
                    ));
                }
            }
        }

        let metrics = match self.metrics.as_deref() {
            None | Some("") | Some("off") => None,
            Some(m) => {
                let addr = parse_bind(m).map_err(|e| err("", "metrics", e))?;
                let shares_port = addr.port() == bind.port()
                    && (addr.ip() == bind.ip()
                        || addr.ip().is_unspecified()
                        || bind.ip().is_unspecified());
                if shares_port {
                    return Err(err(
                        "",
                        "metrics",
                        format!(
                            "{addr} overlaps the public listener bind = \"{bind}\": metrics need their own address, e.g. \"127.0.0.1:9191\""
                        ),
                    ));
                }
                Some(addr)
            }
        };

        Ok(Config {
            source: file.to_path_buf(),
            bind,
            pidfile,
            daemon: self.daemon.unwrap_or(false),
            backlog: backlog as u32,
            limit_request_body,
            body_buffer_size: body_buffer_size as usize,
            body_temp_dir,
            limit_request_header: limit_request_header as usize,
            limit_request_fields: limit_request_fields as usize,
            limit_request_line,
            limit_request_field_size,
            forwarded_allow_ips,
            master_threads: master_threads as usize,
            ready_path,
            metrics,
            app: AppConfig {
                kind,
                chdir,
                python,
                env: app.env,
                preload,
                ready_timeout,
            },
            workers: WorkersConfig {
                count,
                count_auto,
                threads,
                connections,
                pipeline,
                sched_batch: w.sched_batch.unwrap_or(true),
                queue,
                queue_timeout,
                timeout,
                graceful_timeout,
                keepalive,
                max_requests,
                max_requests_jitter,
                max_worker_memory,
                memory_check_interval,
                path_timeouts,
            },
            log: LogConfig {
                level,
                access,
                error,
                capture_output: l.capture_output.unwrap_or(true),
                access_format,
                rotate,
                keep: keep as usize,
            },
            health,
            pool,
            pool_after,
            processes,
            routes,
        })
    }
}

/// `[log] rotate`: "daily", "hourly", "never", or a size (string with a unit, or bytes).
fn parse_rotate(raw: Option<RawRotate>) -> Result<crate::logging::rotate::Rotate, String> {
    use crate::logging::rotate::Rotate;
    let usage = "use \"daily\", \"hourly\", \"never\" or a size like \"100MiB\"";
    match raw {
        None => Ok(Rotate::Never),
        Some(RawRotate::Bytes(n)) if n > 0 => Ok(Rotate::Size(n as u64)),
        Some(RawRotate::Bytes(n)) => Err(format!("a size must be greater than 0, found {n}")),
        Some(RawRotate::Word(w)) => match w.to_ascii_lowercase().as_str() {
            "never" | "" => Ok(Rotate::Never),
            "daily" => Ok(Rotate::Daily),
            "hourly" => Ok(Rotate::Hourly),
            _ => match parse_size(&w) {
                Ok(n) if n > 0 => Ok(Rotate::Size(n)),
                _ => Err(format!("{w:?}: {usage}")),
            },
        },
    }
}

fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    if s.starts_with("unix:") {
        return Err(format!(
            "{s:?}: unix socket binds are not supported; use host:port (e.g. \"127.0.0.1:8000\")"
        ));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    // "localhost:8000" and similar: resolve without touching the network (hosts file only).
    if let Some((host, port)) = s.rsplit_once(':') {
        if host == "localhost" {
            if let Ok(p) = port.parse::<u16>() {
                return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
            }
        }
    }
    Err(format!(
        "{s:?} is not an address: use host:port with an IP, e.g. \"127.0.0.1:8000\" or \"[::1]:8000\""
    ))
}

fn parse_wsgi(s: &str) -> Result<(String, String), String> {
    let (m, c) = s.split_once(':').unwrap_or((s, "application"));
    let ident = |p: &str| {
        !p.is_empty()
            && p.split('.').all(|part| {
                !part.is_empty()
                    && !part.starts_with(|c: char| c.is_ascii_digit())
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    if !ident(m) || !ident(c) {
        return Err(format!(
            "{s:?} is not module:callable (e.g. \"app:app\" or \"pkg.wsgi:application\")"
        ));
    }
    Ok((m.to_string(), c.to_string()))
}

impl Config {
    /// The effective configuration as TOML-like lines, for `check`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| {
            s.push_str(k);
            s.push_str(" = ");
            s.push_str(&v);
            s.push('\n');
        };
        line("bind", format!("\"{}\"", self.bind));
        line(
            "pidfile",
            self.pidfile
                .as_ref()
                .map(|p| format!("\"{}\"", p.display()))
                .unwrap_or_else(|| "(none)".into()),
        );
        line("daemon", self.daemon.to_string());
        line("backlog", self.backlog.to_string());
        line("limit_request_body", self.limit_request_body.to_string());
        line("body_buffer_size", self.body_buffer_size.to_string());
        line(
            "body_temp_dir",
            format!("\"{}\"", self.body_temp_dir.display()),
        );
        line(
            "limit_request_header",
            self.limit_request_header.to_string(),
        );
        line(
            "limit_request_fields",
            self.limit_request_fields.to_string(),
        );
        line("limit_request_line", self.limit_request_line.to_string());
        line(
            "limit_request_field_size",
            self.limit_request_field_size.to_string(),
        );
        line(
            "forwarded_allow_ips",
            format!("{:?}", self.forwarded_allow_ips),
        );
        line("master_threads", self.master_threads.to_string());
        line("ready_path", format!("\"{}\"", self.ready_path));
        line(
            "metrics",
            self.metrics
                .map(|a| format!("\"{a}\""))
                .unwrap_or_else(|| "(off)".into()),
        );
        match &self.app.kind {
            // No [app]: the stand-in is never run; say so instead of showing it.
            _ if !self.pool => line(
                "app",
                "(none: no worker pool, only [[process]] entries)".into(),
            ),
            AppKind::Wsgi { module, callable } => {
                line("app.wsgi", format!("\"{module}:{callable}\""))
            }
            AppKind::Command(c) => line("app.command", format!("{c:?}")),
        }
        line("app.chdir", format!("\"{}\"", self.app.chdir.display()));
        line("app.python", format!("\"{}\"", self.app.python.display()));
        line("app.env", format!("{:?}", self.app.env));
        line("app.preload", self.app.preload.to_string());
        line(
            "app.ready_timeout",
            format!("{}s", self.app.ready_timeout.as_secs_f64()),
        );
        let w = &self.workers;
        line(
            "workers.count",
            if w.count_auto {
                format!(
                    "{}   # auto: 2 x {} usable CPUs + 1",
                    w.count,
                    (w.count - 1) / 2
                )
            } else {
                w.count.to_string()
            },
        );
        line("workers.threads", w.threads.to_string());
        line("workers.connections", w.connections.to_string());
        line("workers.pipeline", w.pipeline.to_string());
        line("workers.sched_batch", w.sched_batch.to_string());
        line("workers.queue", w.queue.to_string());
        line(
            "workers.queue_timeout",
            format!("{}s", w.queue_timeout.as_secs_f64()),
        );
        line("workers.timeout", format!("{}s", w.timeout.as_secs_f64()));
        line(
            "workers.graceful_timeout",
            format!("{}s", w.graceful_timeout.as_secs_f64()),
        );
        line(
            "workers.keepalive",
            format!("{}s", w.keepalive.as_secs_f64()),
        );
        line("workers.max_requests", w.max_requests.to_string());
        line(
            "workers.max_requests_jitter",
            w.max_requests_jitter.to_string(),
        );
        line("log.level", self.log.level.to_string().to_ascii_lowercase());
        let t = |t: &LogTarget| match t {
            LogTarget::Stdout => "\"-\" (stdout)".to_string(),
            LogTarget::Stderr => "\"-\" (stderr)".to_string(),
            LogTarget::Off => "\"off\"".to_string(),
            LogTarget::File(p) => format!("\"{}\"", p.display()),
        };
        line("log.access", t(&self.log.access));
        line("log.error", t(&self.log.error));
        line("log.capture_output", self.log.capture_output.to_string());
        line(
            "log.access_format",
            format!("{:?}", self.log.access_format.source()),
        );
        use crate::logging::rotate::Rotate;
        line(
            "log.rotate",
            match self.log.rotate {
                Rotate::Never => "\"never\"".to_string(),
                Rotate::Daily => "\"daily\"".to_string(),
                Rotate::Hourly => "\"hourly\"".to_string(),
                Rotate::Size(n) => n.to_string(),
            },
        );
        line("log.keep", self.log.keep.to_string());
        if !self.pool_after.is_empty() {
            line("app.after", format!("{:?}", self.pool_after));
        }
        if !self.routes.is_empty() {
            let r: Vec<String> = self
                .routes
                .iter()
                .map(|r| format!("\"{}\" = \"{}\" ({})", r.prefix, r.process, r.addr))
                .collect();
            line("routes", format!("{{ {} }}", r.join(", ")));
        }
        for p in &self.processes {
            let n = &p.name;
            line(&format!("process.{n}.command"), format!("{:?}", p.command));
            line(
                &format!("process.{n}.chdir"),
                format!("\"{}\"", p.chdir.display()),
            );
            if let Some((u, uid, _)) = &p.user {
                line(&format!("process.{n}.user"), format!("\"{u}\" (uid {uid})"));
            }
            line(&format!("process.{n}.after"), format!("{:?}", p.after));
            line(
                &format!("process.{n}.restart"),
                format!(
                    "\"{}\" (delay {}s, limit {} starts in {}s)",
                    p.restart.as_str(),
                    p.restart_delay.as_secs_f64(),
                    p.start_limit_burst,
                    p.start_limit_interval.as_secs_f64()
                ),
            );
            line(&format!("process.{n}.ready"), p.describe_ready());
            line(
                &format!("process.{n}.start_timeout"),
                format!("{}s", p.start_timeout.as_secs_f64()),
            );
            line(
                &format!("process.{n}.stop"),
                format!(
                    "{} then SIGKILL after {}s",
                    p.stop_signal.as_str(),
                    p.stop_timeout.as_secs_f64()
                ),
            );
        }
        s
    }

    /// The interpreter path as the workers will run it (relative paths are relative to chdir).
    pub fn python_path(&self) -> PathBuf {
        let p = &self.app.python;
        if p.is_absolute() || p.components().count() == 1 {
            p.clone()
        } else {
            self.app.chdir.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/gte/workers.toml"))
    }

    const MIN: &str = "[app]\nwsgi = \"app:app\"\n";

    #[test]
    fn minimal_defaults() {
        let c = p(MIN).expect("valid");
        assert_eq!(c.bind.to_string(), "127.0.0.1:8000");
        assert_eq!(c.workers.count, 2 * usable_cpus() + 1);
        assert!(c.workers.count_auto);
        assert_eq!(c.workers.timeout, Duration::from_secs(30));
        assert_eq!(c.limit_request_body, 50 << 20);
        assert_eq!(c.app.chdir, PathBuf::from("/etc/gte"));
        assert_eq!(
            c.app.kind,
            AppKind::Wsgi {
                module: "app".into(),
                callable: "app".into()
            }
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("3 parsecs").is_err());
        assert_eq!(parse_size("50MiB").unwrap(), 50 << 20);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert!(parse_size("lots").is_err());
        let c =
            p("[app]\nwsgi = \"a:b\"\n[workers]\ntimeout = \"500ms\"\nkeepalive = 2\n").unwrap();
        assert_eq!(c.workers.timeout, Duration::from_millis(500));
        assert_eq!(c.workers.keepalive, Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_names_line() {
        let e = p("[app]\nwsgi = \"a:b\"\n[workers]\ncout = 3\n").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("cout"), "{e}");
    }

    #[test]
    fn wrong_type_names_line() {
        let e = p("[app]\nwsgi = \"a:b\"\n[workers]\nthreads = \"many\"\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.key, "[workers] threads", "{e}");
    }

    #[test]
    fn count_zero_rejected_with_line() {
        let e = p("[app]\nwsgi = \"a:b\"\n\n[workers]\ncount = 0\n").unwrap_err();
        assert_eq!(e.key, "[workers] count");
        assert_eq!(e.line, Some(5));
        assert!(
            e.to_string().contains("workers.toml:5: [workers] count"),
            "{e}"
        );
    }

    #[test]
    fn bad_bind_rejected() {
        let e = p("bind = \"nonsense\"\n[app]\nwsgi = \"a:b\"\n").unwrap_err();
        assert_eq!(e.key, "bind");
        assert_eq!(e.line, Some(1));
        assert!(p("bind = \"[::1]:9000\"\n[app]\nwsgi = \"a:b\"\n").is_ok());
    }

    #[test]
    fn missing_app_rejected() {
        let e = p("bind = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.to_string().contains("[app]"), "{e}");
        let e = p("[app]\nchdir = \".\"\n").unwrap_err();
        assert!(e.message.contains("missing app"), "{e}");
    }

    #[test]
    fn bad_wsgi_and_command() {
        assert!(p("[app]\nwsgi = \"app:\"\n").is_err());
        assert!(p("[app]\nwsgi = \"1app:app\"\n").is_err());
        assert!(p("[app]\ncommand = []\n").is_err());
        let e = p("[app]\ncommand = [\"uvicorn\", \"app:app\"]\n").unwrap_err();
        assert!(e.message.contains("{port}"), "{e}");
        assert!(p("[app]\ncommand = [\"uvicorn\", \"--port\", \"{port}\"]\n").is_ok());
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let c = p("pidfile = \"run/x.pid\"\n[app]\nwsgi = \"a:b\"\nchdir = \"srv\"\npython = \"venv/bin/python3\"\n[log]\naccess = \"log/a.log\"\n").unwrap();
        assert_eq!(c.pidfile.as_deref(), Some(Path::new("/etc/gte/run/x.pid")));
        assert_eq!(c.app.chdir, PathBuf::from("/etc/gte/srv"));
        assert_eq!(
            c.python_path(),
            PathBuf::from("/etc/gte/srv/venv/bin/python3")
        );
        assert_eq!(c.log.access, LogTarget::File("/etc/gte/log/a.log".into()));
    }

    #[test]
    fn log_format_rotation_and_metrics_keys() {
        use crate::logging::rotate::Rotate;
        let c = p(MIN).unwrap();
        assert_eq!(c.log.rotate, Rotate::Never);
        assert_eq!(c.log.keep, 14);
        assert_eq!(c.metrics, None);
        assert!(!c.log.access_format.is_json());

        let e = p("[app]\nwsgi = \"a:b\"\n[log]\naccess_format = \"%(h)s %(x)s\"\n").unwrap_err();
        assert_eq!(e.key, "[log] access_format");
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("%(x)s"), "{e}");
        let c = p("[app]\nwsgi = \"a:b\"\n[log]\naccess_format = \"JSON\"\n").unwrap();
        assert!(c.log.access_format.is_json());

        let rot = |v: &str| p(&format!("[app]\nwsgi = \"a:b\"\n[log]\nrotate = {v}\n"));
        assert_eq!(rot("\"daily\"").unwrap().log.rotate, Rotate::Daily);
        assert_eq!(rot("\"hourly\"").unwrap().log.rotate, Rotate::Hourly);
        assert_eq!(
            rot("\"100MiB\"").unwrap().log.rotate,
            Rotate::Size(100 << 20)
        );
        assert_eq!(rot("65536").unwrap().log.rotate, Rotate::Size(65536));
        assert_eq!(rot("\"weekly\"").unwrap_err().key, "[log] rotate");
        assert!(rot("\"1KiB\"").is_err());
        assert!(rot("0").is_err());
        let e = p("[app]\nwsgi = \"a:b\"\n[log]\nkeep = -1\n").unwrap_err();
        assert_eq!(e.key, "[log] keep");
        let e = p("[app]\nwsgi = \"a:b\"\n[log]\nrotate = \"daily\"\naccess = \"x.log\"\nerror = \"x.log\"\n")
            .unwrap_err();
        assert!(e.message.contains("same file"), "{e}");

        let c = p("metrics = \"127.0.0.1:9191\"\n[app]\nwsgi = \"a:b\"\n").unwrap();
        assert_eq!(c.metrics.unwrap().to_string(), "127.0.0.1:9191");
        for clash in ["127.0.0.1:8000", "0.0.0.0:8000"] {
            let e = p(&format!("metrics = \"{clash}\"\n[app]\nwsgi = \"a:b\"\n")).unwrap_err();
            assert_eq!(e.key, "metrics");
            assert_eq!(e.line, Some(1));
            assert!(e.message.contains("public listener"), "{e}");
        }
        assert!(p("metrics = \"nonsense\"\n[app]\nwsgi = \"a:b\"\n").is_err());
        assert!(p("metrics = \"127.0.0.2:8000\"\n[app]\nwsgi = \"a:b\"\n").is_ok());
    }

    #[test]
    fn packaged_default_config_is_valid() {
        let text = include_str!("../packaging/workers.toml");
        let c = p(text).expect("packaging/workers.toml must be valid");
        assert_eq!(c.workers.max_requests, 1000);
    }
}
