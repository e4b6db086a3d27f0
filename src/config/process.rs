//! `[[process]]` entries and `routes`: the validated form of the sidecar processes the master
//! supervises beside (or instead of) the worker pool, and the checks that types cannot express —
//! names unique, dependencies known and acyclic, a command that is not empty, readiness URLs that
//! are plain `http://IP:PORT/path`, routes that name a process with a `listen` address, a `user`
//! that exists and that this master may switch to. Every error names the file, the line of the
//! offending key inside its `[[process]]` block, and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;

use super::{ConfigError, Dur, RawApp, RawProcess};

/// `ready = { http = "...", interval = "5s", timeout = "2s", failures = 3 }` as written (an inline
/// table of a `[[process]]`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReadySpec {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub notify: Option<bool>,
    pub exit: Option<bool>,
    pub interval: Option<Dur>,
    pub timeout: Option<Dur>,
    pub failures: Option<i64>,
}

/// When an exited process is started again (systemd's `Restart=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// How the master learns that a process is ready, and keeps checking that it is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyCheck {
    /// Ready as soon as it is started (systemd `Type=simple`); never health-checked.
    Started,
    /// GET `path` on `addr`: 2xx or 3xx is healthy.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
    },
    /// A TCP connect to `addr` succeeds.
    Tcp(SocketAddr),
    /// The program sends `READY=1` on `NOTIFY_SOCKET` (sd_notify); not health-checked after.
    Notify,
    /// A one-shot step (systemd `Type=oneshot`): done, and ready for its dependents, when it
    /// exits with status 0; never restarted after that.
    Exit,
}

/// One supervised process, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessConfig {
    pub name: String,
    /// argv; a relative program path (with a `/`) is relative to `chdir`.
    pub command: Vec<String>,
    pub chdir: PathBuf,
    pub env: BTreeMap<String, String>,
    /// (name, uid, gid) to run as; None = the master's own user.
    pub user: Option<(String, u32, u32)>,
    pub after: Vec<String>,
    pub restart: RestartPolicy,
    pub restart_delay: Duration,
    pub start_limit_burst: u32,
    pub start_limit_interval: Duration,
    pub ready: ReadyCheck,
    pub check_interval: Duration,
    pub check_timeout: Duration,
    pub check_failures: u32,
    pub start_timeout: Duration,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// Where it serves HTTP (target of `routes`).
    pub listen: Option<SocketAddr>,
    /// Its own log file (None: its output goes to the error log).
    pub log: Option<PathBuf>,
}

impl ProcessConfig {
    /// The readiness check in words, for `check`.
    pub fn describe_ready(&self) -> String {
        let every = format!(
            "every {}s (timeout {}s, restart after {} failures)",
            self.check_interval.as_secs_f64(),
            self.check_timeout.as_secs_f64(),
            self.check_failures
        );
        match &self.ready {
            ReadyCheck::Started => "ready once started (no checks)".into(),
            ReadyCheck::Http { host, path, .. } => format!("GET http://{host}{path} {every}"),
            ReadyCheck::Tcp(a) => format!("connect {a} {every}"),
            ReadyCheck::Notify => "READY=1 on NOTIFY_SOCKET (sd_notify)".into(),
            ReadyCheck::Exit => "done when it exits with status 0 (one-shot)".into(),
        }
    }
}

/// A path prefix routed to a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: String,
    pub process: String,
    pub addr: SocketAddr,
}

/// The `[app]` stand-in when only processes are listed: never started (the pool has 0 workers).
pub(super) fn no_pool_app() -> RawApp {
    RawApp {
        command: Some(vec!["true".into(), "{port}".into()]),
        ..RawApp::default()
    }
}

/// Line (1-based) of `key` inside the `index`-th `[[process]]` block (or of its header when
/// `key` is empty or not written there).
fn process_key_line(text: &str, index: usize, key: &str) -> Option<usize> {
    let mut block: Option<usize> = None;
    let mut seen = 0usize;
    let mut header = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if t.starts_with("[[") && t.trim_start_matches('[').starts_with("process") {
                block = Some(seen);
                seen += 1;
                if block == Some(index) {
                    header = Some(i + 1);
                }
            } else {
                block = None;
            }
            continue;
        }
        if block == Some(index) && !key.is_empty() {
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return Some(i + 1);
                }
            }
        }
    }
    header
}

/// Line of a top-level key (before the first table header).
fn top_key_line(text: &str, key: &str) -> Option<usize> {
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            return None;
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return Some(i + 1);
            }
        }
    }
    None
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// `"http://127.0.0.1:8000/health"` → (address, Host header, path).
fn parse_http_url(u: &str) -> Result<(SocketAddr, String, String), String> {
    let usage = "expected http://IP:PORT/path, e.g. \"http://127.0.0.1:8000/health\"";
    let Some(rest) = u.strip_prefix("http://") else {
        return Err(format!("{u:?}: only http:// URLs are supported; {usage}"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = parse_addr(hostport).map_err(|_| format!("{u:?} is not a valid URL: {usage}"))?;
    if path.contains(char::is_whitespace) {
        return Err(format!("{u:?}: the path must not contain spaces"));
    }
    Ok((addr, hostport.to_string(), path.to_string()))
}

/// `IP:PORT` or `localhost:PORT`.
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() != 0 {
            return Ok(a);
        }
    }
    if let Some(p) = s.strip_prefix("localhost:") {
        if let Ok(port) = p.parse::<u16>() {
            if port != 0 {
                return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
    }
    Err(format!(
        "{s:?} is not an address: use IP:PORT, e.g. \"127.0.0.1:8000\""
    ))
}

fn parse_signal(s: &str) -> Result<Signal, String> {
    let up = s.trim().to_ascii_uppercase();
    let full = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    full.parse::<Signal>()
        .map_err(|_| format!("{s:?} is not a signal name: use e.g. \"TERM\", \"INT\", \"QUIT\""))
}

/// Resolves `[[process]]` entries and `routes`.
pub(super) fn resolve(
    raw: Vec<RawProcess>,
    routes: BTreeMap<String, String>,
    text: &str,
    file: &Path,
    base: &Path,
) -> Result<(Vec<ProcessConfig>, Vec<Route>), ConfigError> {
    let err_at = |index: usize, key: &str, message: String| ConfigError {
        file: file.to_path_buf(),
        line: process_key_line(text, index, key),
        key: if key.is_empty() {
            "[[process]]".to_string()
        } else {
            format!("[[process]] {key}")
        },
        message,
    };
    let mut out: Vec<ProcessConfig> = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        let err = |key: &str, m: String| err_at(i, key, m);
        let name = match p.name {
            None => return Err(err("", "every [[process]] needs a name".into())),
            Some(n) if !valid_name(&n) => {
                return Err(err(
                    "name",
                    format!("{n:?}: use 1-64 letters, digits, '-', '_' or '.'"),
                ))
            }
            Some(n) => n,
        };
        let who = format!("process {name:?}");
        if out.iter().any(|o| o.name == name) {
            return Err(err(
                "name",
                format!("duplicate name {name:?}: each [[process]] needs its own"),
            ));
        }
        let command = match p.command {
            Some(c) if !c.is_empty() && !c[0].trim().is_empty() => c,
            Some(_) => {
                return Err(err(
                    "command",
                    format!("{who}: must be a non-empty list: [\"program\", \"arg\", ...]"),
                ))
            }
            None => {
                return Err(err(
                    "command",
                    format!("{who}: missing: set command = [\"program\", \"arg\", ...]"),
                ))
            }
        };
        let chdir = match p.chdir {
            Some(c) if c.is_empty() => {
                return Err(err("chdir", format!("{who}: must not be empty")))
            }
            Some(c) if Path::new(&c).is_absolute() => PathBuf::from(c),
            Some(c) => base.join(c),
            None => base.to_path_buf(),
        };
        for k in p.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(err(
                    "env",
                    format!("{who}: {k:?} is not a valid environment variable name"),
                ));
            }
        }
        let user = match p.user {
            None => None,
            Some(u) => Some(resolve_user(&u).map_err(|m| err("user", format!("{who}: {m}")))?),
        };
        let restart = match p.restart.as_deref().unwrap_or("always") {
            "always" => RestartPolicy::Always,
            "on-failure" | "on_failure" => RestartPolicy::OnFailure,
            "never" | "no" => RestartPolicy::Never,
            other => {
                return Err(err(
                    "restart",
                    format!("{who}: {other:?}: use \"always\", \"on-failure\" or \"never\""),
                ))
            }
        };
        let restart_delay = p
            .restart_delay
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1));
        let burst = p.start_limit_burst.unwrap_or(5);
        if !(1..=10_000).contains(&burst) {
            return Err(err(
                "start_limit_burst",
                format!("{who}: must be 1..=10000, found {burst}"),
            ));
        }
        let start_limit_interval = p
            .start_limit_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60));
        if start_limit_interval.is_zero() {
            return Err(err(
                "start_limit_interval",
                format!("{who}: must be greater than 0"),
            ));
        }
        let spec = p.ready.unwrap_or_default();
        let chosen = [
            spec.http.is_some(),
            spec.tcp.is_some(),
            spec.notify == Some(true),
            spec.exit == Some(true),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if chosen > 1 {
            return Err(err(
                "ready",
                format!("{who}: set one of http, tcp, notify = true or exit = true, not several"),
            ));
        }
        let ready = if let Some(u) = &spec.http {
            let (addr, host, path) =
                parse_http_url(u).map_err(|m| err("ready", format!("{who}: http: {m}")))?;
            ReadyCheck::Http { addr, host, path }
        } else if let Some(t) = &spec.tcp {
            ReadyCheck::Tcp(parse_addr(t).map_err(|m| err("ready", format!("{who}: tcp: {m}")))?)
        } else if spec.notify == Some(true) {
            ReadyCheck::Notify
        } else if spec.exit == Some(true) {
            ReadyCheck::Exit
        } else {
            ReadyCheck::Started
        };
        let check_interval = spec.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5));
        let check_timeout = spec.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(2));
        if check_interval < Duration::from_millis(50) || check_timeout.is_zero() {
            return Err(err(
                "ready",
                format!("{who}: interval must be at least 50ms and timeout greater than 0"),
            ));
        }
        let failures = spec.failures.unwrap_or(3);
        if !(1..=1000).contains(&failures) {
            return Err(err(
                "ready",
                format!("{who}: failures must be 1..=1000, found {failures}"),
            ));
        }
        let start_timeout = p
            .start_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(90));
        if start_timeout.is_zero() {
            return Err(err(
                "start_timeout",
                format!("{who}: must be greater than 0"),
            ));
        }
        let stop_signal = match &p.stop_signal {
            None => Signal::SIGTERM,
            Some(s) => parse_signal(s).map_err(|m| err("stop_signal", format!("{who}: {m}")))?,
        };
        let stop_timeout = p
            .stop_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30));
        let listen = match &p.listen {
            None => None,
            Some(l) => Some(parse_addr(l).map_err(|m| err("listen", format!("{who}: {m}")))?),
        };
        let log = match p.log.as_deref() {
            None | Some("-") | Some("") => None,
            Some(l) if Path::new(l).is_absolute() => Some(PathBuf::from(l)),
            Some(l) => Some(base.join(l)),
        };
        out.push(ProcessConfig {
            name,
            command,
            chdir,
            env: p.env,
            user,
            after: p.after.unwrap_or_default(),
            restart,
            restart_delay,
            start_limit_burst: burst as u32,
            start_limit_interval,
            ready,
            check_interval,
            check_timeout,
            check_failures: failures as u32,
            start_timeout,
            stop_signal,
            stop_timeout,
            listen,
            log,
        });
    }

    // Dependencies: known, not self, no cycle.
    let names: BTreeSet<&str> = out.iter().map(|p| p.name.as_str()).collect();
    for (i, p) in out.iter().enumerate() {
        for d in &p.after {
            if d == &p.name {
                return Err(err_at(
                    i,
                    "after",
                    format!("process {:?} cannot depend on itself", p.name),
                ));
            }
            if !names.contains(d.as_str()) {
                return Err(err_at(
                    i,
                    "after",
                    format!(
                        "process {:?}: unknown dependency {d:?} (known processes: {})",
                        p.name,
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    if let Some((i, cycle)) = find_cycle(&out) {
        return Err(err_at(
            i,
            "after",
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }

    // Routes: a prefix names a process that has a listen address.
    let route_err = |m: String| ConfigError {
        file: file.to_path_buf(),
        line: top_key_line(text, "routes"),
        key: "routes".into(),
        message: m,
    };
    let mut resolved = Vec::new();
    for (prefix, proc_name) in routes {
        if !prefix.starts_with('/') {
            return Err(route_err(format!(
                "{prefix:?}: a path prefix must start with '/'"
            )));
        }
        let Some(p) = out.iter().find(|p| p.name == proc_name) else {
            return Err(route_err(format!(
                "{prefix:?} routes to {proc_name:?}, but no [[process]] has that name"
            )));
        };
        let Some(addr) = p.listen else {
            return Err(route_err(format!(
                "{prefix:?} routes to process {proc_name:?}, which has no listen address: set listen = \"127.0.0.1:PORT\" in its [[process]]"
            )));
        };
        resolved.push(Route {
            prefix,
            process: proc_name,
            addr,
        });
    }
    resolved.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    Ok((out, resolved))
}

/// `[app] after`: names of processes the pool waits for.
pub(super) fn resolve_pool_after(
    after: Option<Vec<String>>,
    processes: &[ProcessConfig],
    text: &str,
    file: &Path,
) -> Result<Vec<String>, ConfigError> {
    let after = after.unwrap_or_default();
    for d in &after {
        if !processes.iter().any(|p| &p.name == d) {
            return Err(ConfigError {
                file: file.to_path_buf(),
                line: super::find_key_line(text, "app", "after"),
                key: "[app] after".into(),
                message: format!("unknown dependency {d:?}: no [[process]] has that name"),
            });
        }
    }
    Ok(after)
}

/// The first dependency cycle found: (index of a process on it, the names along it).
fn find_cycle(procs: &[ProcessConfig]) -> Option<(usize, Vec<String>)> {
    // 0 = unvisited, 1 = on the stack, 2 = done
    fn visit(
        i: usize,
        procs: &[ProcessConfig],
        mark: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        mark[i] = 1;
        stack.push(i);
        for d in &procs[i].after {
            let Some(j) = procs.iter().position(|p| &p.name == d) else {
                continue;
            };
            if mark[j] == 1 {
                let start = stack.iter().position(|&k| k == j).unwrap_or(0);
                let mut cyc = stack[start..].to_vec();
                cyc.push(j);
                return Some(cyc);
            }
            if mark[j] == 0 {
                if let Some(c) = visit(j, procs, mark, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        mark[i] = 2;
        None
    }
    let mut mark = vec![0u8; procs.len()];
    for i in 0..procs.len() {
        if mark[i] == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(i, procs, &mut mark, &mut stack) {
                let names = c.iter().map(|&k| procs[k].name.clone()).collect();
                return Some((c[0], names));
            }
        }
    }
    None
}

/// Looks a user up; refuses one other than the current user unless the master runs as root.
fn resolve_user(name: &str) -> Result<(String, u32, u32), String> {
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => return Err(format!("no such user {name:?}")),
        Err(e) => return Err(format!("cannot look up user {name:?}: {e}")),
    };
    let me = nix::unistd::geteuid();
    if user.uid != me && !me.is_root() {
        return Err(format!(
            "running as user {name:?} needs root: the master runs as uid {me}; start it as root or remove `user`"
        ));
    }
    Ok((name.to_string(), user.uid.as_raw(), user.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use std::path::Path;

    fn p(text: &str) -> Result<super::super::Config, super::super::ConfigError> {
        parse(text, Path::new("/etc/gte/workers.toml"))
    }

    const TWO: &str = "[[process]]\nname = \"vllm\"\ncommand = [\"python3\", \"-m\", \"x\"]\nready = { http = \"http://127.0.0.1:8000/health\" }\nlisten = \"127.0.0.1:8000\"\n\n[[process]]\nname = \"chat\"\ncommand = [\"python3\", \"ui.py\"]\nafter = [\"vllm\"]\n";

    #[test]
    fn urls_addresses_and_signals() {
        use super::{parse_addr, parse_http_url, parse_signal};
        let (a, host, path) = parse_http_url("http://127.0.0.1:8000/health").unwrap();
        assert_eq!(
            (a.to_string().as_str(), host.as_str(), path.as_str()),
            ("127.0.0.1:8000", "127.0.0.1:8000", "/health")
        );
        assert_eq!(parse_http_url("http://localhost:9/").unwrap().0.port(), 9);
        assert_eq!(parse_http_url("http://[::1]:8000").unwrap().2, "/");
        for bad in [
            "https://127.0.0.1:1/",
            "http://example.com/x",
            "http://127.0.0.1/x",
            "127.0.0.1:1",
            "http://127.0.0.1:0/",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
        assert!(parse_addr("127.0.0.1:65536").is_err());
        assert_eq!(
            parse_signal("TERM").unwrap(),
            nix::sys::signal::Signal::SIGTERM
        );
        assert_eq!(
            parse_signal("sigint").unwrap(),
            nix::sys::signal::Signal::SIGINT
        );
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn processes_without_app() {
        let c = p(TWO).expect("valid");
        assert!(!c.pool);
        assert_eq!(c.workers.count, 0);
        assert_eq!(c.processes.len(), 2);
        assert_eq!(c.processes[1].after, vec!["vllm".to_string()]);
        assert_eq!(c.processes[0].restart, super::RestartPolicy::Always);
    }

    #[test]
    fn unknown_dependency_names_line() {
        let e = p(&TWO.replace("after = [\"vllm\"]", "after = [\"vlm\"]")).unwrap_err();
        assert_eq!(e.key, "[[process]] after");
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.message.contains("unknown dependency \"vlm\""), "{e}");
    }

    #[test]
    fn cycle_duplicate_empty_url_route() {
        let cyc = TWO.replace(
            "listen = \"127.0.0.1:8000\"\n",
            "listen = \"127.0.0.1:8000\"\nafter = [\"chat\"]\n",
        );
        let e = p(&cyc).unwrap_err();
        assert!(e.message.contains("dependency cycle"), "{e}");
        let dup = TWO.replace("name = \"chat\"", "name = \"vllm\"");
        let e = p(&dup).unwrap_err();
        assert!(e.message.contains("duplicate name"), "{e}");
        assert_eq!(e.line, Some(8));
        let empty = TWO.replace("[\"python3\", \"ui.py\"]", "[]");
        assert_eq!(p(&empty).unwrap_err().key, "[[process]] command");
        let url = TWO.replace("http://127.0.0.1:8000/health", "https://x/health");
        assert_eq!(p(&url).unwrap_err().key, "[[process]] ready");
        let route = format!("routes = {{ \"/v1/\" = \"nope\" }}\n{TWO}");
        let e = p(&route).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("routes", Some(1)));
        let route = format!("routes = {{ \"/\" = \"chat\" }}\n{TWO}");
        assert!(p(&route).unwrap_err().message.contains("no listen address"));
        let ok = format!("routes = {{ \"/v1/\" = \"vllm\" }}\n{TWO}");
        assert_eq!(p(&ok).unwrap().routes[0].prefix, "/v1/");
    }
}
