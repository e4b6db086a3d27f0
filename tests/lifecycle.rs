//! Process lifecycle: readiness, load failures, signals, pidfile, bind conflicts, worker
//! replacement and recycling.

mod common;

use common::*;
use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

fn pid_of(body: &str) -> u32 {
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("expected a pid, got {body:?}"))
}

/// Start a /block request on its own connection and wait until the app is inside it.
fn start_blocked_request(fx: &Fx, gate_name: &str) -> (Http, std::path::PathBuf) {
    let gate = fx.dir.join(gate_name);
    fs::create_dir_all(&gate).unwrap();
    let mut c = fx.srv.connect();
    c.send(&c.build(
        "GET",
        &format!("/block?dir={}", pct(gate.to_str().unwrap())),
        &[],
        b"",
    ));
    wait_until(
        "the request to be inside the app",
        Duration::from_secs(15),
        || gate.join("started").exists().then_some(()),
    );
    (c, gate)
}

fn assert_all_dead(pids: &[u32], within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let info: Vec<String> = alive
                .iter()
                .map(|p| format!("{p}: {}", proc_cmdline(*p)))
                .collect();
            panic!("{what}: still alive after {within:?}: {info:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn pidfile_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

// ---------------------------------------------------------------------------------------------
// readiness
// ---------------------------------------------------------------------------------------------

#[test]
fn ready_notification_comes_when_every_worker_is_ready() {
    let dir = TestDir::new("ready_notify");
    let port = free_port();
    let conf = Conf::standard(&dir, port).set("workers", "count", "3");
    let mut srv = Server::start(&dir, &conf);
    let ready = srv.wait_notification("READY=1", Duration::from_secs(1));
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=")),
        "READY datagram without STATUS=: {ready:?}"
    );
    let kids = srv.children();
    assert_eq!(
        kids.len(),
        3,
        "3 workers at READY: {kids:?}\n{}",
        srv.diagnostics()
    );
    // each of them was reported ready in the error log, with its pid
    for k in &kids {
        srv.wait_error_log_line(
            &format!("'worker ready' with pid={k}"),
            Duration::from_secs(5),
            |l| l.contains("ready") && l.contains(&format!("pid={k}")) && l.contains("worker="),
        );
    }
    let served = pid_of(&srv.get("/pid").text());
    assert!(kids.contains(&served));
}

#[test]
fn ready_endpoint_and_master_pid_in_pidfile() {
    let dir = TestDir::new("pidfile_content");
    let port = free_port();
    let conf = Conf::standard(&dir, port);
    let mut srv = Server::start(&dir, &conf);
    let pidfile = dir.join("master.pid");
    assert_eq!(
        pidfile_pid(&pidfile),
        Some(srv.pid),
        "pidfile content: {:?}",
        fs::read_to_string(&pidfile)
    );
    assert_eq!(srv.get("/-/ready").status, 200);
    let st = srv.stop_term();
    assert_eq!(
        st.code(),
        Some(0),
        "clean stop: {}\n{}",
        describe_status(&st),
        srv.diagnostics()
    );
    assert!(!pidfile.exists(), "pidfile must be removed on clean exit");
}

// ---------------------------------------------------------------------------------------------
// app load failures
// ---------------------------------------------------------------------------------------------

fn import_error_run(name: &str, error_log: &str) -> (TestDir, Output) {
    let dir = TestDir::new(name);
    let port = free_port();
    dir.install_app(&["importerror.py"]);
    let err = if error_log == "-" {
        q("-")
    } else {
        q(dir.join(error_log).to_str().unwrap())
    };
    let conf = Conf::standard(&dir, port)
        .set("app", "wsgi", &q("importerror:app"))
        .set("workers", "count", "3")
        .set("log", "error", &err);
    let cfg = conf.write(&dir);
    let out = run_master_to_exit(&dir, &cfg, Duration::from_secs(30));
    (dir, out)
}

#[test]
fn import_error_exits_3_with_traceback_once_on_stderr() {
    let (dir, out) = import_error_run("import_error_stderr", "-");
    assert_eq!(out.code(), Some(3), "{}", out.dump());
    let n = out
        .stderr
        .matches("RuntimeError: fixture-import-failure-7f3a")
        .count();
    assert_eq!(
        n,
        1,
        "the traceback must appear exactly once on stderr (count {n}):\n{}",
        out.dump()
    );
    assert_eq!(
        out.stderr
            .matches("Traceback (most recent call last)")
            .count(),
        1,
        "{}",
        out.dump()
    );
    assert!(
        procs_with_cwd_under(&dir.path).is_empty(),
        "workers left behind"
    );
}

#[test]
fn import_error_with_error_log_file_still_prints_traceback_once_on_stderr() {
    let (dir, out) = import_error_run("import_error_file", "error.log");
    assert_eq!(out.code(), Some(3), "{}", out.dump());
    let n = out
        .stderr
        .matches("RuntimeError: fixture-import-failure-7f3a")
        .count();
    assert_eq!(
        n,
        1,
        "the traceback must appear exactly once on stderr (count {n}):\n{}",
        out.dump()
    );
    assert!(
        procs_with_cwd_under(&dir.path).is_empty(),
        "workers left behind"
    );
}

// ---------------------------------------------------------------------------------------------
// signals
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    let mut fx = start_standard("sigterm_graceful", |c| c.set("workers", "count", "2"));
    let (mut c, gate) = start_blocked_request(&fx, "gate");
    let workers = fx.srv.children();
    assert_eq!(workers.len(), 2);
    fx.srv.signal(SIGTERM);
    fx.srv
        .wait_notification("STOPPING=1", Duration::from_secs(10));
    // A HUP now changes nothing, and says so.
    fx.srv.signal(1);
    fx.srv
        .wait_error_log_line("the ignored HUP", Duration::from_secs(10), |l| {
            l.contains("reload requested while stopping: ignored")
        });
    fs::write(gate.join("release"), b"go").unwrap();
    let r = c
        .read_response(false)
        .expect("the in-flight request completes during a graceful stop");
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("released "), "{}", r.text());
    let st = fx.srv.wait_exit(Duration::from_secs(20));
    assert_eq!(
        st.code(),
        Some(0),
        "{}\n{}",
        describe_status(&st),
        fx.srv.diagnostics()
    );
    assert_all_dead(
        &workers,
        Duration::from_millis(500),
        "workers after SIGTERM",
    );
    assert!(
        procs_with_cwd_under(&fx.dir.path).is_empty(),
        "processes left in the app dir"
    );
    assert!(
        !fx.dir.join("master.pid").exists(),
        "pidfile removed on clean exit"
    );
}

#[test]
fn sigterm_stops_accepting_new_requests() {
    let mut fx = start_standard("sigterm_no_accept", |c| c.set("workers", "count", "1"));
    let (mut c, gate) = start_blocked_request(&fx, "gate");
    fx.srv.signal(SIGTERM);
    fx.srv
        .wait_notification("STOPPING=1", Duration::from_secs(10));
    // a new connection is refused, or at least not served by the app
    match Http::try_connect(fx.port) {
        Err(_) => {}
        Ok(mut n) => {
            n.set_read_timeout(Duration::from_secs(3));
            let served = n
                .try_send(&n.build("GET", "/pid", &[], b""))
                .ok()
                .and_then(|_| n.read_response(false).ok());
            if let Some(r) = served {
                assert_ne!(
                    r.status,
                    200,
                    "a new request was served after SIGTERM: {:?}",
                    r.text()
                );
            }
        }
    }
    fs::write(gate.join("release"), b"go").unwrap();
    assert_eq!(
        c.read_response(false).expect("in-flight response").status,
        200
    );
    let st = fx.srv.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", describe_status(&st));
}

/// graceful_timeout bounds the whole stop: draining the connections and stopping the workers
/// share it (they used to take it once each, so a stop took twice as long, past systemd's
/// TimeoutStopSec for a unit sized by it).
#[test]
fn sigterm_graceful_timeout_bounds_the_stop() {
    let mut fx = start_standard("sigterm_graceful_timeout", |c| {
        c.set("workers", "count", "1")
            .set("workers", "graceful_timeout", "3")
    });
    let (mut c, _gate) = start_blocked_request(&fx, "gate");
    let workers = fx.srv.children();
    let t0 = Instant::now();
    fx.srv.signal(SIGTERM);
    // the app would block for 20 s: the master must cut it off after ~3 s (one second more at
    // most: a worker always gets a second to exit on SIGTERM)
    let st = fx.srv.wait_exit(Duration::from_secs(15));
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(5500),
        "stop took {took:?} with graceful_timeout = 3"
    );
    assert!(
        took >= Duration::from_millis(2900),
        "stop did not wait for graceful_timeout: {took:?}"
    );
    let log = fx.srv.error_log();
    assert!(
        log.contains("graceful_timeout reached: stopping workers with connections still open"),
        "{log}"
    );
    assert!(!log.contains("in-flight requests finished"), "{log}");
    assert_all_dead(
        &workers,
        Duration::from_millis(500),
        "workers after graceful timeout",
    );
    if let Ok(r) = c.read_response(false) {
        assert_ne!(r.status, 200, "the cut-off request cannot have succeeded");
    }
    eprintln!("exit after graceful timeout: {}", describe_status(&st));
}

fn fast_stop(name: &str, sig: i32) {
    let mut fx = start_standard(name, |c| {
        c.set("workers", "count", "2")
            .set("workers", "graceful_timeout", "20")
    });
    let (_c, _gate) = start_blocked_request(&fx, "gate");
    let workers = fx.srv.children();
    let t0 = Instant::now();
    fx.srv.signal(sig);
    let st = fx.srv.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "fast stop (signal {sig}) took {took:?}"
    );
    assert_eq!(
        st.code(),
        Some(0),
        "{}\n{}",
        describe_status(&st),
        fx.srv.diagnostics()
    );
    assert_all_dead(
        &workers,
        Duration::from_millis(500),
        "workers after fast stop",
    );
    assert!(!fx.dir.join("master.pid").exists(), "pidfile removed");
    // The request the stop cut is the operator's doing, not a worker's failure: a warning, not
    // an error saying the worker failed.
    let log = fx.srv.error_log();
    assert!(!log.contains("worker failed mid-request"), "{log}");
    // (Whether the cut request is logged at all before the master exits is a race; when it is,
    // it is this warning.)
    for l in log.lines().filter(|l| l.contains("request cut")) {
        assert!(l.contains("WARN"), "{l}");
    }
}

#[test]
fn sigint_is_a_fast_stop() {
    fast_stop("sigint_fast", SIGINT);
}

#[test]
fn sigquit_is_a_fast_stop() {
    fast_stop("sigquit_fast", SIGQUIT);
}

#[test]
fn sigkill_of_master_takes_workers_down_within_2s() {
    let mut fx = start_standard("sigkill_master", |c| c.set("workers", "count", "3"));
    let workers = fx.srv.children();
    assert_eq!(workers.len(), 3);
    fx.srv.signal(SIGKILL);
    let t0 = Instant::now();
    fx.srv.wait_exit(Duration::from_secs(5));
    assert_all_dead(
        &workers,
        Duration::from_secs(2).saturating_sub(t0.elapsed()),
        "workers after SIGKILL of the master",
    );
}

// ---------------------------------------------------------------------------------------------
// worker replacement and recycling
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_worker_killed_is_replaced() {
    let mut fx = start_standard("idle_worker_killed", |c| c.set("workers", "count", "2"));
    let before = fx.srv.children();
    assert_eq!(before.len(), 2);
    let victim = before[0];
    assert!(send_signal(victim, SIGKILL));
    let after = wait_until("a replacement worker", Duration::from_secs(15), || {
        let k = fx.srv.live_children();
        (k.len() == 2 && !k.contains(&victim)).then_some(k)
    });
    assert!(
        after.contains(&before[1]),
        "the other worker must be untouched: {before:?} → {after:?}"
    );
    let new = *after.iter().find(|p| **p != before[1]).unwrap();
    fx.srv.wait_error_log_line(
        "'worker exited' for the killed pid",
        Duration::from_secs(5),
        |l| l.contains("exited") && l.contains(&format!("pid={victim}")),
    );
    fx.srv.wait_error_log_line(
        "'worker spawned' for the new pid",
        Duration::from_secs(5),
        |l| l.contains("spawned") && l.contains(&format!("pid={new}")),
    );
    fx.srv.wait_error_log_line(
        "'worker ready' for the new pid",
        Duration::from_secs(15),
        |l| l.contains("ready") && l.contains(&format!("pid={new}")),
    );
    for _ in 0..4 {
        assert_eq!(fx.srv.get("/pid").status, 200);
    }
}

#[test]
fn max_requests_recycles_the_worker() {
    let mut fx = start_standard("max_requests", |c| {
        c.set("workers", "count", "1")
            .set("workers", "max_requests", "3")
            .set("workers", "max_requests_jitter", "0")
    });
    let pids: Vec<u32> = (0..3).map(|_| pid_of(&fx.srv.get("/pid").text())).collect();
    let old = pids[0];
    assert_eq!(pids, vec![old; 3], "one worker serves the first 3 requests");
    // no further traffic is needed: the spent worker is replaced and exits by itself
    wait_until(
        "the worker to be retired after max_requests = 3",
        Duration::from_secs(15),
        || (!pid_alive(old)).then_some(()),
    );
    let kids = fx.srv.wait_children_count(1, Duration::from_secs(10));
    assert_ne!(kids, vec![old]);
    let next = pid_of(&fx.srv.get("/pid").text());
    assert_eq!(vec![next], kids, "the replacement serves the next request");
    fx.srv.wait_error_log_line(
        "'worker exited' for the retired pid",
        Duration::from_secs(5),
        |l| l.contains("exited") && l.contains(&format!("pid={old}")),
    );
}

#[test]
fn preload_workers_serve_in_parallel() {
    let fx = start_standard("preload", |c| {
        c.set("app", "preload", "true").set("workers", "count", "2")
    });
    let g1 = fx.dir.join("g1");
    let g2 = fx.dir.join("g2");
    let mut conns = Vec::new();
    for g in [&g1, &g2] {
        fs::create_dir_all(g).unwrap();
        let mut c = fx.srv.connect();
        c.send(&c.build(
            "GET",
            &format!("/block?dir={}", pct(g.to_str().unwrap())),
            &[],
            b"",
        ));
        conns.push(c);
    }
    let (p1, p2) = wait_until(
        "both requests inside the app",
        Duration::from_secs(15),
        || {
            Some((
                fs::read_to_string(g1.join("started")).ok()?,
                fs::read_to_string(g2.join("started")).ok()?,
            ))
        },
    );
    assert_ne!(p1, p2, "two preloaded workers, two processes");
    let master_tree = proc_descendants(fx.srv.pid);
    for p in [&p1, &p2] {
        assert!(
            master_tree.contains(&p.parse().unwrap()),
            "worker {p} is not under the master: {master_tree:?}"
        );
    }
    fs::write(g1.join("release"), b"go").unwrap();
    fs::write(g2.join("release"), b"go").unwrap();
    for c in &mut conns {
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.text().starts_with("released "), "{}", r.text());
    }
}

// ---------------------------------------------------------------------------------------------
// pidfile and bind conflicts
// ---------------------------------------------------------------------------------------------

#[test]
fn second_master_with_same_pidfile_exits_4() {
    let dir = TestDir::new("pidfile_lock");
    let port = free_port();
    let conf = Conf::standard(&dir, port).set("workers", "count", "1");
    let srv = Server::start(&dir, &conf);
    let pidfile = dir.join("master.pid");
    // same pidfile, different port and logs, so that only the pidfile conflicts
    let port2 = free_port();
    let cfg2 = dir.join("second.toml");
    fs::write(
        &cfg2,
        conf.clone()
            .set("", "bind", &q(format!("127.0.0.1:{port2}")))
            .set("log", "error", &q(dir.join("error2.log").to_str().unwrap()))
            .set(
                "log",
                "access",
                &q(dir.join("access2.log").to_str().unwrap()),
            )
            .render(),
    )
    .unwrap();
    let out = run_master_to_exit(&dir, &cfg2, Duration::from_secs(20));
    assert_eq!(out.code(), Some(4), "{}", out.dump());
    let msg = out.all();
    assert!(
        msg.contains(pidfile.to_str().unwrap()),
        "message must name the pidfile: {msg}"
    );
    assert!(
        msg.contains(&srv.pid.to_string()),
        "message must name the running master's pid {}: {msg}",
        srv.pid
    );
    // the first master is untouched
    assert_eq!(pidfile_pid(&pidfile), Some(srv.pid));
    assert_eq!(srv.get("/pid").status, 200);
}

#[test]
fn stale_pidfile_is_taken_over() {
    let dir = TestDir::new("pidfile_stale");
    let port = free_port();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    assert!(!pid_alive(dead_pid));
    let pidfile = dir.join("master.pid");
    fs::write(&pidfile, format!("{dead_pid}\n")).unwrap();
    let conf = Conf::standard(&dir, port).set("workers", "count", "1");
    let mut srv = Server::start(&dir, &conf);
    assert_eq!(pidfile_pid(&pidfile), Some(srv.pid));
    assert_eq!(srv.get("/pid").status, 200);
    assert_eq!(srv.stop_term().code(), Some(0));
    assert!(!pidfile.exists());
}

#[test]
fn bind_address_in_use_exits_4() {
    let dir = TestDir::new("bind_in_use");
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let conf = Conf::standard(&dir, port).set("workers", "count", "1");
    let cfg = conf.write(&dir);
    let out = run_master_to_exit(&dir, &cfg, Duration::from_secs(20));
    assert_eq!(out.code(), Some(4), "{}", out.dump());
    assert!(
        out.all().contains(&format!("127.0.0.1:{port}")),
        "message must name the address: {}",
        out.dump()
    );
    assert!(
        procs_with_cwd_under(&dir.path).is_empty(),
        "no workers left behind"
    );
    drop(holder);
}

// ---------------------------------------------------------------------------------------------
// paths
// ---------------------------------------------------------------------------------------------

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let dir = TestDir::new("relative_paths");
    let port = free_port();
    let app = dir.install_app(&["testapp.py"]);
    // python relative to chdir: app/venv/bin/python3 -> the real interpreter
    fs::create_dir_all(app.join("venv/bin")).unwrap();
    std::os::unix::fs::symlink(python3(), app.join("venv/bin/python3")).unwrap();
    let body = r#"bind = "127.0.0.1:{port}"
pidfile = "../run/master.pid"

[app]
wsgi = "testapp:app"
chdir = "../app"
python = "venv/bin/python3"

[workers]
count = 1

[log]
access = "../logs/access.log"
error = "../logs/error.log"
"#;
    fs::create_dir_all(dir.join("run")).unwrap();
    fs::create_dir_all(dir.join("logs")).unwrap();
    let cfg = write_config(&dir, "conf/workers.toml", body, port);
    let elsewhere = dir.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let mut srv = Server::spawn(&dir, &cfg, port, &elsewhere);
    srv.wait_ready(READY_TIMEOUT);
    assert_eq!(srv.get("/pid").status, 200);
    assert_eq!(pidfile_pid(&dir.join("run/master.pid")), Some(srv.pid));
    // The writer thread flushes in batches: wait for the line, not just for a non-empty file.
    wait_until(
        "'ready' in the error log at ../logs/error.log",
        Duration::from_secs(5),
        || {
            fs::read_to_string(dir.join("logs/error.log"))
                .ok()
                .filter(|s| s.contains("ready"))
        },
    );
    wait_until(
        "access log at ../logs/access.log",
        Duration::from_secs(5),
        || {
            fs::read_to_string(dir.join("logs/access.log"))
                .ok()
                .filter(|s| s.contains("/pid"))
        },
    );
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing may be created in the master's cwd"
    );
    assert_eq!(srv.stop_term().code(), Some(0));
}
