//! Worker lifecycle (issue 4): recycling under load with zero failures, per-request timeouts with
//! a traceback, health probes, the memory ceiling, crashes and crash loops. Real binary, real
//! Python, real sockets; every wait is bounded.

mod common;

use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pid_of(r: &Response) -> u32 {
    r.text()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("expected a pid, got {:?}", r.text()))
}

/// CPU time (utime + stime, in clock ticks) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

#[test]
fn recycling_under_load_loses_no_request_and_replaces_workers() {
    let fx = start_life("recycle_load", |c| {
        c.set("workers", "count", "4")
            .set("workers", "max_requests", "50")
            .set("workers", "max_requests_jitter", "10")
            .set("log", "access", &q("off"))
    });
    let port = fx.port;
    let total = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let pids = Arc::new(Mutex::new(HashSet::<u32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut threads = Vec::new();
    for _ in 0..12 {
        let (total, failures, pids, stop) =
            (total.clone(), failures.clone(), pids.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn = Http::connect(port);
            while Instant::now() < deadline
                && !stop.load(Ordering::Relaxed)
                && total.load(Ordering::Relaxed) < 6000
            {
                let req = conn.build("GET", "/pid", &[], b"");
                let res = conn.try_send(&req).and_then(|_| conn.read_response(false));
                match res {
                    Ok(r) if r.status == 200 => {
                        pids.lock().unwrap().insert(pid_of(&r));
                        total.fetch_add(1, Ordering::Relaxed);
                        if r.closes() {
                            conn = Http::connect(port);
                        }
                    }
                    Ok(r) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("status {} {:?}", r.status, r.text()))
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("io error {e}"));
                        conn = Http::connect(port);
                    }
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let n = total.load(Ordering::Relaxed);
    let distinct = pids.lock().unwrap().len();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}\n{}",
        failures.len(),
        n,
        &failures[..failures.len().min(10)],
        fx.srv.diagnostics()
    );
    assert!(n >= 500, "only {n} requests completed");
    // Start-first recycling: an old worker keeps serving until its replacement is ready, so it
    // serves more than its budget; but workers must have been replaced several times.
    assert!(
        distinct >= 8,
        "{distinct} distinct worker pids for {n} requests"
    );
    assert!(
        fx.srv.error_log().contains("reason=\"max_requests\""),
        "{}",
        fx.srv.error_log()
    );
}

#[test]
fn timeout_answers_504_promptly_dumps_traceback_and_replaces_worker() {
    let mut fx = start_life("timeout_504", |c| {
        c.set("workers", "timeout", &q("1s"))
            .set("workers", "count", "1")
    });
    let before = fx.srv.get("/pid");
    let old = pid_of(&before);
    let t0 = Instant::now();
    let r = fx.srv.get("/stuck?s=20");
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", fx.srv.diagnostics());
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(2),
        "504 after {took:?}"
    );
    assert!(r.text().len() < 64, "short error body: {:?}", r.text());
    fx.srv
        .wait_error_log_line("stuck_in_model_call", Duration::from_secs(10), |l| {
            l.contains("stuck_in_model_call")
        });
    let new = wait_until(
        "a replacement worker answers",
        Duration::from_secs(20),
        || {
            let r = fx.srv.get("/pid");
            (r.status == 200 && pid_of(&r) != old).then(|| pid_of(&r))
        },
    );
    assert!(
        !pid_alive(old) || proc_state(old) == Some('Z'),
        "old worker {old} still alive"
    );
    assert_ne!(new, old);
    let access = fx
        .srv
        .wait_access_log_line("/stuck?s=20", Duration::from_secs(5), |l| {
            l.contains("/stuck?s=20")
        });
    assert!(access.contains(" 504 "), "{access}");
    let _ = fx.srv.children();
}

#[test]
fn path_timeout_allows_a_longer_request() {
    let fx = start_life("path_timeout", |c| {
        c.set("workers", "timeout", &q("500ms")).set(
            "workers",
            "path_timeouts",
            "{ \"/stuck\" = \"5s\" }",
        )
    });
    let r = fx.srv.get("/stuck?s=1.2");
    assert_eq!(r.status, 200, "{}", fx.srv.diagnostics());
}

#[test]
fn failing_health_probe_replaces_the_worker() {
    let fx = start_life("health_fail", |c| {
        c.set("workers", "count", "1")
            .set("health", "path", &q("/health"))
            .set("health", "interval", &q("200ms"))
            .set("health", "failures", "2")
    });
    let sick = pid_of(&fx.srv.get("/sicken"));
    fx.srv
        .wait_error_log_line("reason=health", Duration::from_secs(15), |l| {
            l.contains("reason=\"health\"")
        });
    let new = wait_until(
        "a healthy replacement answers",
        Duration::from_secs(20),
        || {
            let r = fx.srv.get("/pid");
            (r.status == 200 && pid_of(&r) != sick).then(|| pid_of(&r))
        },
    );
    assert_ne!(new, sick);
    wait_until("the sick worker exits", Duration::from_secs(15), || {
        (!pid_alive(sick) || proc_state(sick) == Some('Z')).then_some(())
    });
}

#[test]
fn busy_worker_is_never_killed_by_the_probe() {
    let fx = start_life("health_busy", |c| {
        c.set("workers", "count", "1")
            .set("workers", "timeout", "10")
            .set("health", "interval", &q("100ms"))
            .set("health", "timeout", &q("100ms"))
            .set("health", "failures", "1")
    });
    let pid = pid_of(&fx.srv.get("/pid"));
    let r = fx.srv.get("/stuck?s=1.5");
    assert_eq!(r.status, 200, "{}", fx.srv.diagnostics());
    assert_eq!(pid_of(&r), pid);
    assert_eq!(
        pid_of(&fx.srv.get("/pid")),
        pid,
        "worker replaced:\n{}",
        fx.srv.error_log()
    );
    assert!(
        !fx.srv.error_log().contains("health probe failed"),
        "{}",
        fx.srv.error_log()
    );
}

#[test]
fn worker_over_memory_ceiling_is_recycled_with_rss_logged() {
    let fx = start_life("memory_ceiling", |c| {
        c.set("workers", "count", "1")
            .set("workers", "max_worker_memory", &q("80MiB"))
            .set("workers", "memory_check_interval", &q("200ms"))
    });
    let fat = pid_of(&fx.srv.get("/alloc?mb=120"));
    let line = fx
        .srv
        .wait_error_log_line("reason=memory", Duration::from_secs(15), |l| {
            l.contains("reason=\"memory\"")
        });
    assert!(line.contains("rss="), "{line}");
    let new = wait_until("the replacement serves", Duration::from_secs(20), || {
        let r = fx.srv.get("/pid");
        (r.status == 200 && pid_of(&r) != fat).then(|| pid_of(&r))
    });
    assert_ne!(new, fat);
}

#[test]
fn crash_mid_request_gives_502_and_is_replaced_at_once() {
    let mut fx = start_life("crash_502", |c| c.set("workers", "count", "2"));
    let r = fx.srv.get("/exit");
    assert_eq!(r.status, 502, "{}", fx.srv.diagnostics());
    fx.srv
        .wait_error_log_line("exited unexpectedly", Duration::from_secs(5), |l| {
            l.contains("exited unexpectedly")
        });
    let kids = fx.srv.wait_children_count(2, Duration::from_secs(10));
    assert_eq!(kids.len(), 2);
    assert_eq!(fx.srv.get("/pid").status, 200);
}

#[test]
fn crash_loop_backs_off_loudly_and_keeps_serving() {
    let dir = TestDir::new("crash_loop");
    let port = free_port();
    let trigger = dir.join("fail-import");
    let conf = life_conf(
        &dir,
        port,
        &[("LIFEAPP_FAIL_IMPORT", trigger.to_str().unwrap())],
    )
    .set("workers", "count", "2");
    let mut srv = Server::start(&dir, &conf);
    std::fs::write(&trigger, "x").unwrap();
    let victim = pid_of(&srv.get("/pid"));
    send_signal(victim, SIGKILL);
    let ticks0 = cpu_ticks(srv.pid);
    srv.wait_error_log_line("crash loop", Duration::from_secs(20), |l| {
        l.contains("crash loop")
    });
    // The surviving worker keeps serving through the loop.
    for _ in 0..5 {
        let r = srv.get("/pid");
        assert_eq!(r.status, 200, "{}", srv.diagnostics());
        assert_ne!(pid_of(&r), victim);
    }
    let spent = cpu_ticks(srv.pid) - ticks0;
    assert!(
        spent < 200,
        "master used {spent} ticks during the crash loop"
    );
    let log = srv.error_log();
    assert!(log.contains("backoff_ms"), "{log}");
    // Fix the app: the pool comes back to full size.
    std::fs::remove_file(&trigger).unwrap();
    srv.wait_children_count(2, Duration::from_secs(40));
}

/// A reload that fails while the pool is still starting does not stop a master that already
/// serves: worker 1 answers while worker 2 is still importing, the app is then broken and a HUP
/// sent; the new workers fail to load and worker 1 keeps serving (as after the boot). Before,
/// any load failure before every worker was ready stopped the master (exit 3), taking the
/// serving worker with it.
#[test]
fn a_failed_reload_during_the_boot_keeps_the_serving_workers() {
    let dir = TestDir::new("reload_during_boot");
    let port = free_port();
    let trigger = dir.join("fail-import");
    let gate = dir.join("gate");
    let conf = life_conf(
        &dir,
        port,
        &[
            ("LIFEAPP_FAIL_IMPORT", trigger.to_str().unwrap()),
            ("LIFEAPP_GATE_IMPORT", gate.to_str().unwrap()),
        ],
    )
    .set("workers", "count", "2");
    let cfg = conf.write(&dir);
    let mut srv = Server::spawn(&dir, &cfg, port, &dir.path);
    let first = wait_until("worker 1 to answer", Duration::from_secs(20), || {
        Http::try_connect(port).ok().map(|_| ())?;
        let r = srv.get("/pid");
        (r.status == 200).then(|| pid_of(&r))
    });
    std::fs::write(&trigger, "x").unwrap();
    srv.signal(1); // SIGHUP
    srv.wait_error_log_line(
        "a new worker failing to load",
        Duration::from_secs(20),
        |l| l.contains("failed to load the application"),
    );
    for _ in 0..5 {
        let r = srv.get("/pid");
        assert_eq!(r.status, 200, "{}", srv.diagnostics());
        assert_eq!(pid_of(&r), first);
    }
    assert!(srv.try_exit_status().is_none(), "the master stopped");
    std::fs::remove_file(&trigger).unwrap();
    std::fs::write(&gate, "x").unwrap();
}
