//! Signals and control (issue 5): HUP reload under load with zero failures, a broken config on
//! HUP, TTIN/TTOU, USR1 log reopen, sd_notify messages, the control socket (`status`, `reload`,
//! `stop`), a changed `bind` on reload, and socket activation (LISTEN_FDS).

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIGHUP: i32 = 1;
const SIGUSR1: i32 = 10;
const SIGTTIN: i32 = 21;
const SIGTTOU: i32 = 22;

/// Counters of a load run: requests answered 200, failures, client threads.
type Load = (
    Arc<AtomicU64>,
    Arc<Mutex<Vec<String>>>,
    Vec<std::thread::JoinHandle<()>>,
);

/// Keeps `threads` keep-alive clients busy until stopped; returns (ok, failures).
fn load(port: u16, threads: usize, stop: Arc<AtomicBool>) -> Load {
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let handles = (0..threads)
        .map(|_| {
            let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn = Http::connect(port);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let req = conn.build("GET", "/pid", &[], b"");
                    match conn.try_send(&req).and_then(|_| conn.read_response(false)) {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if r.closes() {
                                conn = Http::connect(port);
                            }
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status)),
                        Err(e) => {
                            // A keep-alive connection closed by the server just as the request
                            // went out (graceful stop of idle connections): RFC 9112 §9.3.1
                            // lets a client retry an idempotent request once, as nginx does.
                            conn = Http::connect(port);
                            let req = conn.build("GET", "/pid", &[], b"");
                            match conn.try_send(&req).and_then(|_| conn.read_response(false)) {
                                Ok(r) if r.status == 200 => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                other => failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("io: {e}; retry: {:?}", other.map(|r| r.status))),
                            }
                        }
                    }
                }
            })
        })
        .collect();
    (ok, failures, handles)
}

#[test]
fn ten_hups_under_load_lose_nothing_and_apply_the_new_count() {
    let mut fx = start_standard("hup_load", |c| c.set("workers", "count", "2"));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures, handles) = load(fx.port, 8, stop.clone());
    let text = std::fs::read_to_string(&fx.srv.config).unwrap();
    std::fs::write(&fx.srv.config, toml_set(&text, "workers", "count", "3")).unwrap();
    for i in 0..10 {
        let before = fx.srv.error_log().matches("reload complete").count();
        fx.srv.signal(SIGHUP);
        wait_until(
            &format!("reload {i} completes"),
            Duration::from_secs(30),
            || (fx.srv.error_log().matches("reload complete").count() > before).then_some(()),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        fx.srv.diagnostics()
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "too few requests served");
    let kids = fx.srv.wait_children_count(3, Duration::from_secs(30));
    assert_eq!(kids.len(), 3);
    assert!(
        fx.srv
            .notifications
            .iter()
            .any(|n| n.contains("RELOADING=1"))
            || {
                fx.srv
                    .wait_notification("RELOADING=1", Duration::from_secs(5));
                true
            }
    );
}

#[test]
fn broken_config_on_hup_keeps_the_old_pool_serving() {
    let mut fx = start_standard("hup_broken", |c| c);
    let pids_before = fx.srv.wait_children_count(2, Duration::from_secs(10));
    let text = std::fs::read_to_string(&fx.srv.config).unwrap();
    std::fs::write(&fx.srv.config, toml_set(&text, "workers", "count", "0")).unwrap();
    fx.srv.signal(SIGHUP);
    let line =
        fx.srv
            .wait_error_log_line("invalid config on reload", Duration::from_secs(10), |l| {
                l.contains("keeping the running one")
            });
    assert!(line.contains("count"), "{line}");
    assert_eq!(fx.srv.get("/").status, 200);
    let mut after = fx.srv.live_children();
    after.sort();
    let mut before = pids_before.clone();
    before.sort();
    assert_eq!(after, before, "workers changed after a broken reload");
}

#[test]
fn ttin_and_ttou_resize_the_pool() {
    let mut fx = start_standard("ttin_ttou", |c| c);
    fx.srv.wait_children_count(2, Duration::from_secs(10));
    fx.srv.signal(SIGTTIN);
    fx.srv.wait_children_count(3, Duration::from_secs(20));
    // Signals of one kind coalesce while pending: wait for each step.
    fx.srv.signal(SIGTTOU);
    fx.srv.wait_children_count(2, Duration::from_secs(20));
    fx.srv.signal(SIGTTOU);
    fx.srv.wait_children_count(1, Duration::from_secs(20));
    assert_eq!(fx.srv.get("/").status, 200);
}

#[test]
fn usr1_reopens_a_moved_access_log() {
    let fx = start_standard("usr1_reopen", |c| c);
    assert_eq!(fx.srv.get("/first").status, 404);
    fx.srv
        .wait_access_log_line("first", Duration::from_secs(5), |l| l.contains("/first"));
    let log = fx.dir.join("access.log");
    let moved = fx.dir.join("access.log.1");
    std::fs::rename(&log, &moved).unwrap();
    fx.srv.signal(SIGUSR1);
    fx.srv
        .wait_error_log_line("reopen", Duration::from_secs(5), |l| {
            l.contains("log files reopened")
        });
    assert_eq!(fx.srv.get("/second").status, 404);
    wait_until(
        "the new access.log gets /second",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("/second"))
                .map(|_| ())
        },
    );
    let old = std::fs::read_to_string(&moved).unwrap();
    assert!(old.contains("/first") && !old.contains("/second"), "{old}");
}

#[test]
fn sd_notify_ready_status_and_stopping() {
    let mut fx = start_standard("notify", |c| c);
    let ready = fx.srv.wait_notification("READY=1", Duration::from_secs(5));
    assert!(ready.contains("STATUS="), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", fx.srv.pid)),
        "{ready}"
    );
    fx.srv.signal(SIGTERM);
    fx.srv
        .wait_notification("STOPPING=1", Duration::from_secs(10));
    let st = fx.srv.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{}", describe_status(&st));
}

#[test]
fn status_reload_and_stop_through_the_cli() {
    let mut fx = start_standard("control_cli", |c| c);
    let cfg = fx.srv.config.to_str().unwrap().to_owned();
    let out = run_bin(&fx.dir, &["status", "-c", &cfg], Duration::from_secs(20));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let kids = fx.srv.live_children();
    for k in &kids {
        assert!(
            out.stdout.contains(&k.to_string()),
            "status lacks worker pid {k}:\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.contains("ready"), "{}", out.stdout);
    let ctl = fx.dir.join("master.ctl");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ctl).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let out = run_bin(&fx.dir, &["reload", "-c", &cfg], Duration::from_secs(20));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    fx.srv
        .wait_error_log_line("reload", Duration::from_secs(20), |l| {
            l.contains("reload complete")
        });
    let out = run_bin(&fx.dir, &["stop", "-c", &cfg], Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let st = fx.srv.wait_exit(Duration::from_secs(10));
    assert!(st.success());
    let out = run_bin(&fx.dir, &["status", "-c", &cfg], Duration::from_secs(20));
    assert_ne!(out.code(), Some(0));
    assert!(out.all().contains("no master is running"), "{}", out.dump());
}

#[test]
fn reload_with_a_new_bind_moves_the_listener() {
    let fx = start_standard("hup_bind", |c| c);
    let new_port = free_port();
    let text = std::fs::read_to_string(&fx.srv.config).unwrap();
    std::fs::write(
        &fx.srv.config,
        toml_set(&text, "", "bind", &q(format!("127.0.0.1:{new_port}"))),
    )
    .unwrap();
    fx.srv.signal(SIGHUP);
    fx.srv.wait_error_log_line(
        "listening on the new address",
        Duration::from_secs(20),
        |l| l.contains("now listening on the new address"),
    );
    let r = Http::connect(new_port).request("GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    assert!(
        Http::try_connect(fx.port).is_err(),
        "old port still accepts"
    );
}

#[test]
fn socket_activation_serves_the_inherited_listener() {
    let dir = TestDir::new("listen_fds");
    let bind_port = free_port();
    let conf = Conf::standard(&dir, bind_port);
    let cfg = conf.write(&dir);
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = inherited.local_addr().unwrap().port();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&inherited);
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" -c \"$1\"")
        .arg(BIN)
        .arg(&cfg)
        .stdout(std::fs::File::create(dir.join("master.stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("master.stderr")).unwrap());
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup first: if the listener already is fd 3, dup2(3, 3) would keep its CLOEXEC flag.
            let tmp = libc_dup(fd);
            if tmp < 0 || libc_dup2(tmp, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(inherited);
    let guard = ProcId::of(child.id());
    let r = wait_until(
        "the inherited socket serves",
        Duration::from_secs(30),
        || {
            let mut c = Http::try_connect(port).ok()?;
            let req = c.build("GET", "/-/ready", &[], b"");
            c.try_send(&req).ok()?;
            c.read_response(false).ok().filter(|r| r.status == 200)
        },
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        Http::connect(port).request("GET", "/", &[], b"").status,
        200
    );
    assert!(
        Http::try_connect(bind_port).is_err(),
        "the master bound its own address too"
    );
    let kids = proc_descendants(child.id());
    send_signal(child.id(), SIGTERM);
    let st = wait_child(&mut child, Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    for k in kids {
        if let Some(p) = ProcId::of(k) {
            p.kill();
        }
    }
    let _ = guard;
}

extern "C" {
    #[link_name = "dup2"]
    fn libc_dup2_raw(old: i32, new: i32) -> i32;
    #[link_name = "dup"]
    fn libc_dup_raw(old: i32) -> i32;
}

fn libc_dup(old: i32) -> i32 {
    // SAFETY: plain syscall wrapper on an fd owned by this (child) process.
    unsafe { libc_dup_raw(old) }
}

fn libc_dup2(old: i32, new: i32) -> i32 {
    // SAFETY: plain syscall wrapper on fds owned by this (child) process.
    unsafe { libc_dup2_raw(old, new) }
}

const SIGUSR2: i32 = 12;

#[test]
fn usr2_upgrades_in_place_under_load_without_failures() {
    let mut fx = start_standard("usr2", |c| c.set("workers", "count", "2"));
    let old = fx.srv.pid;
    let pidfile = fx.dir.join("master.pid");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures, handles) = load(fx.port, 8, stop.clone());
    wait_until("some load", Duration::from_secs(10), || {
        (ok.load(Ordering::Relaxed) > 50).then_some(())
    });
    fx.srv.signal(SIGUSR2);
    let new = wait_until(
        "a new master pid in the pidfile",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|p| *p != old)
        },
    );
    // Guard the new master (and its workers) for cleanup even if an assertion fails below.
    let _guard = KillPid(new);
    let st = fx.srv.wait_exit(Duration::from_secs(40));
    assert!(st.success(), "old master: {}", describe_status(&st));
    let served_before_stop = ok.load(Ordering::Relaxed);
    wait_until(
        "the new master serves the load",
        Duration::from_secs(10),
        || (ok.load(Ordering::Relaxed) > served_before_stop + 50).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(pid_alive(new));
    assert_eq!(
        Http::connect(fx.port).request("GET", "/", &[], b"").status,
        200
    );
    send_signal(new, SIGTERM);
    wait_until("the new master stops", Duration::from_secs(30), || {
        (!pid_alive(new) || proc_state(new) == Some('Z')).then_some(())
    });
}

/// SIGKILLs `pid` and its descendants.
fn kill_tree(pid: u32) {
    for k in proc_descendants(pid) {
        if let Some(p) = ProcId::of(k) {
            p.kill();
        }
    }
    send_signal(pid, SIGKILL);
}

/// Kills, on drop, a process and its descendants.
struct KillPid(u32);
impl Drop for KillPid {
    fn drop(&mut self) {
        kill_tree(self.0);
    }
}

/// Kills, on drop, the process named by a pidfile (read at drop time) and its descendants.
struct KillTree(std::path::PathBuf);
impl Drop for KillTree {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            kill_tree(pid);
        }
    }
}

#[test]
fn daemon_detaches_writes_its_pid_and_stops_by_pidfile() {
    let dir = TestDir::new("daemon");
    let port = free_port();
    let cfg = Conf::standard(&dir, port)
        .set("", "daemon", "true")
        .write(&dir);
    let cfg_s = cfg.to_str().unwrap().to_owned();
    let _guard = KillTree(dir.join("master.pid"));
    let out = run_bin(&dir, &["-c", &cfg_s], Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let pid: u32 = std::fs::read_to_string(dir.join("master.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(pid));
    // Detached: a new session, not a child of the process that started it.
    assert_ne!(proc_ppid(pid), Some(std::process::id()));
    assert_eq!(
        Http::connect(port).request("GET", "/", &[], b"").status,
        200
    );
    let out = run_bin(&dir, &["stop", "-c", &cfg_s], Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    wait_until("the daemon exits", Duration::from_secs(20), || {
        (!pid_alive(pid) || proc_state(pid) == Some('Z')).then_some(())
    });
}

#[test]
fn daemon_reports_a_startup_failure_before_detaching() {
    let dir = TestDir::new("daemon_fail");
    let port = free_port();
    let app = dir.install_app(&["importerror.py"]);
    let cfg = Conf::standard(&dir, port)
        .set("", "daemon", "true")
        .set("app", "wsgi", &q("importerror:app"))
        .set("app", "chdir", &q(app.to_str().unwrap()))
        .write(&dir);
    let _guard = KillTree(dir.join("master.pid"));
    let out = run_bin(
        &dir,
        &["-c", cfg.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(3), "{}", out.dump());
    assert!(out.all().contains("failed"), "{}", out.dump());
}

const SIGWINCH: i32 = 28;

#[test]
fn winch_retires_all_workers_of_a_daemonized_master() {
    let dir = TestDir::new("winch");
    let port = free_port();
    let cfg = Conf::standard(&dir, port)
        .set("", "daemon", "true")
        .write(&dir);
    let _guard = KillTree(dir.join("master.pid"));
    let out = run_bin(
        &dir,
        &["-c", cfg.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let pid: u32 = std::fs::read_to_string(dir.join("master.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let live = |pid: u32| {
        proc_children(pid)
            .into_iter()
            .filter(|c| proc_state(*c).is_some_and(|s| s != 'Z'))
            .count()
    };
    wait_until("two workers", Duration::from_secs(20), || {
        (live(pid) == 2).then_some(())
    });
    send_signal(pid, SIGWINCH);
    wait_until("no worker left", Duration::from_secs(20), || {
        (live(pid) == 0).then_some(())
    });
    assert!(pid_alive(pid), "the master itself stays");
    send_signal(pid, SIGTTIN);
    wait_until("one worker back", Duration::from_secs(20), || {
        (live(pid) == 1).then_some(())
    });
    assert_eq!(
        Http::connect(port).request("GET", "/", &[], b"").status,
        200
    );
}

/// A USR2 whose new master stops before it is ready leaves the old master whole: it keeps
/// serving, its pidfile is back, and `status` reaches it again (the new master had taken the
/// control socket's name and removed it on its way out).
#[test]
fn a_failed_upgrade_leaves_the_old_master_reachable_by_status() {
    let dir = TestDir::new("usr2_failed");
    let port = free_port();
    let gate = dir.join("gate");
    std::fs::write(&gate, "x").unwrap();
    let conf = life_conf(
        &dir,
        port,
        &[
            ("LIFEAPP_GATE_IMPORT", gate.to_str().unwrap()),
            ("LIFEAPP_GATE_ALL", "1"),
        ],
    )
    .set("workers", "count", "1");
    let srv = Server::start(&dir, &conf);
    let old = srv.pid;
    let pidfile = dir.join("master.pid");
    // The new master's workers will wait in their import: it cannot become ready.
    std::fs::remove_file(&gate).unwrap();
    srv.signal(SIGUSR2);
    let new = wait_until("the new master's pid", Duration::from_secs(30), || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .filter(|p| *p != old)
    });
    let _guard = KillPid(new);
    send_signal(new, SIGTERM);
    srv.wait_error_log_line("the failed upgrade", Duration::from_secs(30), |l| {
        l.contains("upgrade failed")
    });
    let cfg = srv.config.to_str().unwrap().to_owned();
    let out = wait_until("status to answer", Duration::from_secs(10), || {
        let out = run_bin(&dir, &["status", "-c", &cfg], Duration::from_secs(20));
        (out.code() == Some(0) && out.stdout.contains("queued requests")).then_some(out)
    });
    assert!(out.stdout.contains(&old.to_string()), "{}", out.stdout);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        old.to_string()
    );
    assert_eq!(srv.get("/pid").status, 200);
}

/// A USR2 whose new master cannot start (here: the configuration file was broken meanwhile)
/// says why in the old master's error log, not only the new master's exit status; the old
/// master keeps serving.
#[test]
fn a_failed_upgrade_logs_the_new_masters_reason() {
    let fx = start_standard("usr2_broken_config", |c| c.set("workers", "count", "1"));
    let text = std::fs::read_to_string(&fx.srv.config).unwrap();
    std::fs::write(
        &fx.srv.config,
        toml_set(&text, "workers", "count", "\"lots\""),
    )
    .unwrap();
    fx.srv.signal(SIGUSR2);
    let line = fx
        .srv
        .wait_error_log_line("the failed upgrade", Duration::from_secs(30), |l| {
            l.contains("upgrade failed")
        });
    assert!(
        line.contains("exit status: 2") && line.contains("count") && line.contains("lots"),
        "{line}"
    );
    assert_eq!(fx.srv.get("/").status, 200);
}
