//! `gte-supervisor check -c FILE`, `gte-supervisor migrate FILE`, usage errors.

mod common;

use common::*;
use std::fs;
use std::net::TcpListener;
use std::time::Duration;

const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

fn check(dir: &TestDir, cfg: &std::path::Path) -> Output {
    run_bin(dir, &["check", "-c", cfg.to_str().unwrap()], CHECK_TIMEOUT)
}

/// The standard config with `tweak`, written to `<dir>/workers.toml`.
fn conf(dir: &TestDir, tweak: impl FnOnce(Conf) -> Conf) -> (std::path::PathBuf, u16) {
    let port = free_port();
    let c = tweak(Conf::standard(dir, port));
    (c.write(dir), port)
}

/// Does `check` output contain the effective line `want` (a trailing `# comment` is allowed)?
fn has_effective_line(stdout: &str, want: &str) -> bool {
    stdout
        .lines()
        .any(|l| l.split('#').next().unwrap_or("").trim() == want)
}

fn expected_auto_count() -> usize {
    2 * std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        + 1
}

#[test]
fn check_good_config_prints_effective_config_and_exits_0() {
    let dir = TestDir::new("check_ok");
    let (cfg, _port) = conf(&dir, |c| c.set("workers", "count", "5"));
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        has_effective_line(&out.stdout, "workers.count = 5"),
        "no `workers.count = 5` line:\n{}",
        out.dump()
    );
    // check starts nothing: no pidfile, no process
    assert!(
        !dir.join("master.pid").exists(),
        "check must not write the pidfile"
    );
    assert!(procs_with_cwd_under(&dir.path).is_empty());
}

#[test]
fn check_resolves_auto_count() {
    let dir = TestDir::new("check_auto");
    let (cfg, _) = conf(&dir, |c| c.set("workers", "count", &q("auto")));
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let want = format!("workers.count = {}", expected_auto_count());
    assert!(
        has_effective_line(&out.stdout, &want),
        "expected `{want}` (2 x usable CPUs + 1):\n{}",
        out.dump()
    );
}

#[test]
fn check_does_not_import_the_app() {
    let dir = TestDir::new("check_no_import");
    dir.install_app(&["importerror.py"]);
    let (cfg, _) = conf(&dir, |c| c.set("app", "wsgi", &q("importerror:app")));
    let out = check(&dir, &cfg);
    assert_eq!(
        out.code(),
        Some(0),
        "the module exists; check must find it without importing it\n{}",
        out.dump()
    );
    assert!(
        !out.all().contains("fixture-import-failure"),
        "check imported the app:\n{}",
        out.dump()
    );
}

#[test]
fn check_missing_chdir_exits_2() {
    let dir = TestDir::new("check_chdir");
    let missing = dir.join("no-such-dir");
    let (cfg, _) = conf(&dir, |c| {
        c.set("app", "chdir", &q(missing.to_str().unwrap()))
    });
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    let msg = out.all();
    assert!(msg.contains("chdir"), "message must name chdir: {msg}");
    assert!(
        msg.contains("no-such-dir"),
        "message must name the missing directory: {msg}"
    );
}

#[test]
fn check_module_not_found_exits_2() {
    let dir = TestDir::new("check_module");
    let (cfg, _) = conf(&dir, |c| c.set("app", "wsgi", &q("nosuchmod_xq9:app")));
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.all().contains("nosuchmod_xq9"),
        "message must name the module: {}",
        out.dump()
    );
}

#[test]
fn check_missing_interpreter_exits_2() {
    let dir = TestDir::new("check_python");
    let (cfg, _) = conf(&dir, |c| {
        c.set("app", "python", &q("/nonexistent/bin/python3"))
    });
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.all().contains("/nonexistent/bin/python3"),
        "message must name the interpreter: {}",
        out.dump()
    );
}

#[test]
fn check_bind_in_use_exits_2() {
    let dir = TestDir::new("check_bind");
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let (cfg, _) = conf(&dir, |c| c.set("", "bind", &q(format!("127.0.0.1:{port}"))));
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.all().contains(&port.to_string()),
        "message must name the address: {}",
        out.dump()
    );
    // ... and who holds it (this test process), so that "stop gunicorn first" is obvious.
    assert!(
        out.all()
            .contains(&format!("held by {}", process_name(std::process::id())))
            && out.all().contains(&format!("pid {}", std::process::id())),
        "message must name the holder: {}",
        out.dump()
    );
    drop(holder);
}

fn process_name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn check_beside_a_running_master_without_pidfile_is_not_an_error() {
    // No pidfile to tell that the port's holder is this service's own master: check finds the
    // listening socket's process and says so instead of failing a pre-reload check.
    let dir = TestDir::new("check_running");
    let port = free_port();
    let conf = Conf::standard(&dir, port).remove("", "pidfile");
    let mut srv = Server::start(&dir, &conf);
    let out = check(&dir, &srv.config);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        out.all()
            .contains(&format!("in use by gte-supervisor (pid {})", srv.pid)),
        "{}",
        out.dump()
    );
    srv.stop_term();
}

#[test]
fn check_unwritable_log_dir_exits_2() {
    let dir = TestDir::new("check_logdir");
    // a regular file where a directory is expected (root ignores permission bits)
    fs::write(dir.join("afile"), b"").unwrap();
    let bad = dir.join("afile/error.log");
    let (cfg, _) = conf(&dir, |c| c.set("log", "error", &q(bad.to_str().unwrap())));
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.all().contains("afile"),
        "message must name the log path: {}",
        out.dump()
    );
}

#[test]
fn check_unwritable_pidfile_dir_exits_2() {
    let dir = TestDir::new("check_piddir");
    fs::write(dir.join("afile"), b"").unwrap();
    let bad = dir.join("afile/master.pid");
    let (cfg, _) = conf(&dir, |c| c.set("", "pidfile", &q(bad.to_str().unwrap())));
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    let msg = out.all();
    assert!(
        msg.contains("pidfile") && msg.contains("afile"),
        "message must name the pidfile: {msg}"
    );
}

#[test]
fn check_invalid_value_exits_2_with_line() {
    let dir = TestDir::new("check_invalid");
    let (cfg, _) = conf(&dir, |c| c.set("workers", "count", "0"));
    let text = fs::read_to_string(&cfg).unwrap();
    let out = check(&dir, &cfg);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    let line = line_of(&text, "count = 0");
    assert!(
        out.all().contains(&format!("workers.toml:{line}")),
        "{}",
        out.dump()
    );
    assert!(out.all().contains("count"), "{}", out.dump());
}

#[test]
fn usage_errors_exit_2() {
    let dir = TestDir::new("usage");
    let none = run_bin(&dir, &[], Duration::from_secs(10));
    assert_eq!(none.code(), Some(2), "no arguments: {}", none.dump());
    let bogus = run_bin(&dir, &["--no-such-flag"], Duration::from_secs(10));
    assert_eq!(bogus.code(), Some(2), "unknown flag: {}", bogus.dump());
    assert!(bogus.stderr.contains("--no-such-flag"), "{}", bogus.dump());
}

// ---------------------------------------------------------------------------------------------
// migrate
// ---------------------------------------------------------------------------------------------

const REFERENCE: &str = "/work/shared/reference/gunicorn.conf.py";

fn reference() -> std::path::PathBuf {
    // the reference lives beside the repository (shared/), wherever the checkout is
    let beside = std::path::Path::new(MANIFEST_DIR).join("../shared/reference/gunicorn.conf.py");
    if beside.exists() {
        beside
    } else {
        std::path::PathBuf::from(REFERENCE)
    }
}

fn migrate(dir: &TestDir) -> String {
    let r = reference();
    assert!(
        r.exists(),
        "reference gunicorn config not found at {}",
        r.display()
    );
    let out = run_bin(
        dir,
        &["migrate", r.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        !out.stdout.trim().is_empty(),
        "migrate printed nothing:\n{}",
        out.dump()
    );
    out.stdout
}

fn unquote(v: &str) -> &str {
    v.trim().trim_matches('"')
}

#[test]
fn migrate_maps_the_reference_gunicorn_settings() {
    let dir = TestDir::new("migrate_map");
    let toml = migrate(&dir);
    let get = |s: &str, k: &str| {
        toml_get(&toml, s, k).unwrap_or_else(|| panic!("migrate output lacks [{s}] {k}:\n{toml}"))
    };
    assert_eq!(unquote(&get("", "bind")), "127.0.0.1:8000");
    assert_eq!(unquote(&get("", "pidfile")), "/var/run/gte-gunicorn.pid");
    assert_eq!(get("", "daemon"), "true");
    assert_eq!(get("app", "preload"), "true");
    let count = get("workers", "count");
    let cpu = std::process::Command::new(python3())
        .args([
            "-c",
            "import multiprocessing; print(multiprocessing.cpu_count() * 2 + 1)",
        ])
        .output()
        .unwrap();
    let gunicorn_workers = String::from_utf8(cpu.stdout).unwrap().trim().to_owned();
    assert!(
        unquote(&count) == "auto" || count == gunicorn_workers,
        "workers.count = {count}"
    );
    assert!(
        ["30", "\"30s\"", "\"30\""].contains(&get("workers", "timeout").as_str()),
        "timeout: {toml}"
    );
    assert!(
        ["5", "\"5s\"", "\"5\""].contains(&get("workers", "keepalive").as_str()),
        "keepalive: {toml}"
    );
    assert_eq!(get("workers", "max_requests"), "1000");
    assert_eq!(get("workers", "max_requests_jitter"), "100");
    assert_eq!(get("workers", "connections"), "1000");
    assert_eq!(
        unquote(&get("log", "access")),
        "/var/log/gte-gunicorn-access.log"
    );
    assert_eq!(
        unquote(&get("log", "error")),
        "/var/log/gte-gunicorn-error.log"
    );
    assert_eq!(unquote(&get("log", "level")), "info");
    assert_eq!(get("log", "capture_output"), "true");
}

#[test]
fn migrate_output_passes_check_once_paths_point_at_the_test_env() {
    let dir = TestDir::new("migrate_check");
    let app = dir.install_app(&["testapp.py"]);
    let toml = migrate(&dir);
    let port = free_port();
    let mut t = toml;
    t = toml_set(&t, "", "bind", &q(format!("127.0.0.1:{port}")));
    t = toml_set(
        &t,
        "",
        "pidfile",
        &q(dir.join("run/gte.pid").to_str().unwrap()),
    );
    t = toml_set(&t, "app", "chdir", &q(app.to_str().unwrap()));
    t = toml_set(&t, "app", "wsgi", &q("testapp:app"));
    t = toml_set(&t, "app", "python", &q(python3().to_str().unwrap()));
    t = toml_set(
        &t,
        "log",
        "access",
        &q(dir.join("logs/access.log").to_str().unwrap()),
    );
    t = toml_set(
        &t,
        "log",
        "error",
        &q(dir.join("logs/error.log").to_str().unwrap()),
    );
    fs::create_dir_all(dir.join("run")).unwrap();
    fs::create_dir_all(dir.join("logs")).unwrap();
    let cfg = dir.join("workers.toml");
    fs::write(&cfg, &t).unwrap();
    let out = check(&dir, &cfg);
    assert_eq!(
        out.code(),
        Some(0),
        "--- migrated + rewritten config ---\n{t}\n{}",
        out.dump()
    );
    assert!(out.stdout.contains("workers.count = "), "{}", out.dump());
}
