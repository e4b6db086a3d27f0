//! Preload (`[app] preload = true`): the app is imported once in a warm process and workers are
//! forked from it. Real binary, real Python (tests/apps/preloadapp.py), real sockets; every wait
//! is bounded and every process is killed by pid.

mod common;

use common::*;
use std::fs;
use std::time::{Duration, Instant};

/// What `/who` answers: the pid that imported the app, the worker's pid and parent, the version.
#[derive(Debug, Clone, PartialEq)]
struct Who {
    import_pid: u32,
    pid: u32,
    ppid: u32,
    version: String,
}

fn who(r: &Response) -> Who {
    let t = r.text();
    let f: Vec<&str> = t.split_whitespace().collect();
    assert!(
        r.status == 200 && f.len() == 5,
        "unexpected /who answer {} {t:?}",
        r.status
    );
    Who {
        import_pid: f[0].parse().unwrap(),
        pid: f[1].parse().unwrap(),
        ppid: f[2].parse().unwrap(),
        version: f[3].to_owned(),
    }
}

fn start_preload(name: &str, tweak: impl FnOnce(Conf) -> Conf) -> Fx {
    let dir = TestDir::new(name);
    let port = free_port();
    let app = dir.install_app(&["preloadapp.py"]);
    let conf = tweak(
        Conf::standard(&dir, port)
            .set("app", "wsgi", &q("preloadapp:app"))
            .set("app", "chdir", &q(app.to_str().unwrap()))
            .set("app", "preload", "true")
            .set("workers", "count", "3"),
    );
    let srv = Server::start(&dir, &conf);
    Fx { srv, dir, port }
}

fn imports(fx: &Fx) -> Vec<String> {
    fs::read_to_string(fx.dir.join("app/imports.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The warm process's pid, from `gte-supervisor status`.
fn warm_pid(fx: &Fx) -> Option<u32> {
    let cfg = fx.srv.config.to_str().unwrap().to_owned();
    let out = run_bin(&fx.dir, &["status", "-c", &cfg], Duration::from_secs(20));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("warm process pid "))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// (Rss, Pss) in KiB from /proc/PID/smaps_rollup.
fn rss_pss(pid: u32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Answers of `n` requests held open at once (so that `n` different workers answer).
fn who_concurrently(fx: &Fx, n: usize) -> Vec<Who> {
    let mut conns: Vec<Http> = (0..n).map(|_| fx.srv.connect()).collect();
    for c in conns.iter_mut() {
        let req = c.build("GET", "/stuck?s=0.3", &[], b"");
        c.send(&req);
    }
    conns
        .iter_mut()
        .map(|c| who(&c.read_response(false).expect("response")))
        .collect()
}

#[test]
fn workers_share_one_import_and_its_memory() {
    let mut fx = start_preload("preload_share", |c| c);
    let master = fx.srv.pid;
    // One import for the whole pool, done by the warm process.
    let lines = imports(&fx);
    assert_eq!(
        lines.len(),
        1,
        "imports: {lines:?}\n{}",
        fx.srv.diagnostics()
    );
    let warm = warm_pid(&fx).expect("status names the warm process");
    assert_eq!(lines[0], format!("{warm} 1"));
    let answers = who_concurrently(&fx, 3);
    let mut pids: Vec<u32> = answers.iter().map(|w| w.pid).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three workers answered: {answers:?}");
    for w in &answers {
        assert_eq!(w.import_pid, warm, "{w:?}");
        assert_ne!(w.pid, warm);
        assert_eq!(
            w.ppid, master,
            "forked workers are the master's children: {w:?}"
        );
        assert_eq!(proc_ppid(w.pid), Some(master));
    }
    // The 48 MiB blob is shared: each worker's proportional share is far below what it maps.
    for &pid in &pids {
        let (rss, pss) = rss_pss(pid);
        assert!(rss > 48 * 1024, "worker {pid} rss {rss} KiB");
        assert!(
            pss * 2 < rss,
            "worker {pid}: pss {pss} KiB is not well below rss {rss} KiB (memory not shared)"
        );
    }
    let kids = fx.srv.live_children();
    assert_eq!(kids.len(), 4, "3 workers + the warm process: {kids:?}");
}

#[test]
fn hup_imports_changed_code_in_a_fresh_warm_process() {
    let mut fx = start_preload("preload_hup", |c| c.set("workers", "count", "2"));
    let old_warm = warm_pid(&fx).unwrap();
    let before = who(&fx.srv.get("/who"));
    assert_eq!(before.version, "1");
    let old_workers: Vec<u32> = fx
        .srv
        .live_children()
        .into_iter()
        .filter(|&p| p != old_warm)
        .collect();
    fs::write(fx.dir.join("app/version.txt"), "2\n").unwrap();
    fx.srv.signal(libc_sighup());
    fx.srv
        .wait_error_log_line("reload complete", Duration::from_secs(30), |l| {
            l.contains("reload complete")
        });
    let after = who(&fx.srv.get("/who"));
    assert_eq!(after.version, "2", "{}", fx.srv.diagnostics());
    assert_ne!(after.import_pid, old_warm);
    let lines = imports(&fx);
    assert_eq!(lines.len(), 2, "one import per generation: {lines:?}");
    wait_until(
        "old workers and warm process gone",
        Duration::from_secs(20),
        || {
            let alive = old_workers
                .iter()
                .chain(std::iter::once(&old_warm))
                .any(|&p| pid_alive(p) && proc_state(p) != Some('Z'));
            (!alive).then_some(())
        },
    );
    assert_eq!(warm_pid(&fx), Some(after.import_pid));
}

fn libc_sighup() -> i32 {
    1
}

#[test]
fn killing_the_warm_process_does_not_strand_the_pool() {
    let fx = start_preload("preload_warm_killed", |c| {
        c.set("workers", "count", "2")
            .set("workers", "max_requests", "5")
    });
    let warm = warm_pid(&fx).unwrap();
    assert!(send_signal(warm, SIGKILL));
    // The forked workers are the master's children: they keep serving meanwhile.
    let r = fx.srv.get("/who");
    assert_eq!(r.status, 200, "{}", fx.srv.diagnostics());
    let new_warm = wait_until("a new warm process", Duration::from_secs(30), || {
        warm_pid(&fx).filter(|&p| p != warm)
    });
    // Recycling still works, with workers forked from the new warm process.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = who(&fx.srv.get("/who"));
        if w.import_pid == new_warm {
            assert_eq!(w.ppid, fx.srv.pid);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker forked from the new warm process {new_warm}\n{}",
            fx.srv.diagnostics()
        );
    }
    assert!(
        fx.srv
            .error_log()
            .contains("the warm process exited unexpectedly"),
        "{}",
        fx.srv.error_log()
    );
}

#[test]
fn forked_workers_are_timed_out_replaced_and_die_with_the_master() {
    let mut fx = start_preload("preload_lifecycle", |c| {
        c.set("workers", "count", "2")
            .set("workers", "timeout", &q("1s"))
    });
    // Timeout: 504, the traceback names the stuck function, the worker is replaced.
    let t0 = Instant::now();
    let r = fx.srv.get("/stuck?s=20");
    assert_eq!(r.status, 504, "{}", fx.srv.diagnostics());
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "504 after {:?}",
        t0.elapsed()
    );
    let tb = fx
        .srv
        .wait_error_log_line("the timeout traceback", Duration::from_secs(10), |l| {
            l.contains("stuck_in_model_call")
        });
    // A forked worker's output lines carry its pid (known only once it reported it).
    assert!(
        tb.contains(" pid=") && !tb.contains(" pid=0 "),
        "output line without the worker's pid: {tb}"
    );
    fx.srv
        .wait_error_log_line("the reaped worker", Duration::from_secs(10), |l| {
            l.contains("worker exited") && l.contains("reason=\"timeout\"")
        });
    // A crash mid-request: 502, and a replacement forked from the same warm process.
    let r = fx.srv.get("/exit");
    assert_eq!(r.status, 502);
    let line = fx
        .srv
        .wait_error_log_line("the crash exit status", Duration::from_secs(10), |l| {
            l.contains("worker exited unexpectedly") && l.contains("exit code 7")
        });
    assert!(line.contains("reason=\"crash\""), "{line}");
    wait_until("two ready workers again", Duration::from_secs(20), || {
        let r = fx.srv.get("/-/ready");
        (r.status == 200 && fx.srv.live_children().len() == 3).then_some(())
    });
    // SIGKILL of the master takes every forked worker and the warm process down with it.
    let kids = fx.srv.live_children();
    assert_eq!(kids.len(), 3, "{kids:?}");
    assert!(send_signal(fx.srv.pid, SIGKILL));
    let _ = fx.srv.wait_exit(Duration::from_secs(10));
    wait_until(
        "workers dead with the master",
        Duration::from_secs(10),
        || kids.iter().all(|&p| !pid_alive(p)).then_some(()),
    );
}

#[test]
fn import_failure_in_the_warm_process_exits_3_with_the_traceback() {
    let dir = TestDir::new("preload_import_error");
    let port = free_port();
    let app = dir.install_app(&["preloadapp.py"]);
    fs::write(app.join("import_fails"), "").unwrap();
    let conf = Conf::standard(&dir, port)
        .set("app", "wsgi", &q("preloadapp:app"))
        .set("app", "chdir", &q(app.to_str().unwrap()))
        .set("app", "preload", "true")
        .set("log", "error", &q("-"));
    let cfg = conf.write(&dir);
    let out = run_master_to_exit(&dir, &cfg, Duration::from_secs(30));
    assert_eq!(out.code(), Some(3), "{}", out.dump());
    assert_eq!(
        out.stderr
            .matches("RuntimeError: preloadapp: import disabled")
            .count(),
        1,
        "{}",
        out.dump()
    );
}

/// A reload whose import fails leaves the previous configuration's workers serving, and its warm
/// process is kept: a worker of it that dies is replaced by a fork of it (the previous code), so
/// the pool does not shrink while the new code is broken. Once the import succeeds (the master
/// retries it with backoff), the new workers take over and the kept warm process goes.
#[test]
fn a_failed_reload_keeps_the_previous_warm_process_to_replace_dying_workers() {
    let fx = start_preload("preload_failed_reload", |c| {
        c.set("workers", "count", "2")
            .set("workers", "max_requests", "20")
    });
    let old_warm = warm_pid(&fx).unwrap();
    let first = who_concurrently(&fx, 2);
    let old_pids: Vec<u32> = first.iter().map(|w| w.pid).collect();
    fs::write(fx.dir.join("app/import_fails"), b"").unwrap();
    fx.srv.signal(libc_sighup());
    fx.srv
        .wait_error_log_line("the failed import", Duration::from_secs(30), |l| {
            l.contains("the warm process failed to import the application")
        });
    let cfg = fx.srv.config.to_str().unwrap().to_owned();
    let status = run_bin(&fx.dir, &["status", "-c", &cfg], Duration::from_secs(20));
    assert!(
        status
            .stdout
            .contains(&format!("previous warm process pid {old_warm} ")),
        "{}",
        status.dump()
    );

    // One of the previous configuration's workers dies: a fork of the kept warm process
    // replaces it.
    assert!(send_signal(old_pids[0], SIGKILL));
    let dead = format!("pid={} ", old_pids[0]);
    fx.srv
        .wait_error_log_line("the worker's death", Duration::from_secs(20), |l| {
            l.contains("worker exited unexpectedly") && l.contains(&dead)
        });
    let replacement = wait_until(
        "a replacement forked from the previous warm process",
        Duration::from_secs(40),
        || {
            let w = who_concurrently(&fx, 2);
            w.iter()
                .find(|w| !old_pids.contains(&w.pid))
                .cloned()
                .filter(|_| w.iter().all(|w| w.version == "1"))
        },
    );
    assert_eq!(replacement.import_pid, old_warm, "{replacement:?}");
    assert_eq!(replacement.ppid, fx.srv.pid);

    // Recycling goes on too (max_requests = 20): every request is answered, and new workers
    // forked from the previous warm process take over.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 && Instant::now() < deadline {
        let w = who(&fx.srv.get("/who"));
        assert_eq!((w.import_pid, w.version.as_str()), (old_warm, "1"));
        if !old_pids.contains(&w.pid) && w.pid != replacement.pid {
            seen.insert(w.pid);
        }
    }
    assert!(
        seen.len() >= 2,
        "no recycling while the new import fails: new workers {seen:?}\n{}",
        fx.srv.diagnostics()
    );

    // The code is fixed: the retried import succeeds, version 2 serves, the kept warm process
    // and the previous workers go.
    fs::write(fx.dir.join("app/version.txt"), "2\n").unwrap();
    fs::remove_file(fx.dir.join("app/import_fails")).unwrap();
    fx.srv
        .wait_error_log_line("reload complete", Duration::from_secs(60), |l| {
            l.contains("reload complete")
        });
    assert_eq!(who(&fx.srv.get("/who")).version, "2");
    wait_until(
        "the previous warm process and its workers gone",
        Duration::from_secs(30),
        || {
            let alive = [old_warm, old_pids[1], replacement.pid]
                .iter()
                .any(|&p| pid_alive(p) && proc_state(p) != Some('Z'));
            (!alive).then_some(())
        },
    );
}
