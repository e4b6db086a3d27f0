//! `[[process]]` supervision (issue #8) against the real binary and real Python programs
//! (`tests/apps/sidecar.py`, stdlib only): dependency order on start and reverse order on stop,
//! restart policies and the start limit, health-triggered restarts, `start_timeout`, sd_notify
//! readiness, output capture, `status` and `restart NAME`, SIGHUP restarting only changed entries,
//! and routed prefixes (streamed response, WebSocket). Every test is bounded in time; the
//! `Server` guard kills what it started by pid.

mod common;

use common::*;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// A test service: its directory, config text pieces and the events file the sidecars write.
struct Svc {
    dir: TestDir,
    port: u16,
    app: PathBuf,
    events: PathBuf,
}

impl Svc {
    fn new(name: &str) -> Svc {
        let dir = TestDir::new(name);
        let app = dir.install_app(&["sidecar.py", "testapp.py"]);
        let events = dir.join("events.log");
        Svc {
            port: free_port(),
            app,
            events,
            dir,
        }
    }

    /// Top-level keys and `[log]`; `top` goes before any table.
    fn head(&self, top: &str) -> String {
        format!(
            "bind = \"127.0.0.1:{}\"\npidfile = {}\n{top}\n[log]\nerror = {}\naccess = {}\n",
            self.port,
            q(self.dir.join("master.pid").to_str().unwrap()),
            q(self.dir.join("error.log").to_str().unwrap()),
            q(self.dir.join("access.log").to_str().unwrap()),
        )
    }

    /// A `[[process]]` block running sidecar.py as `name` on `port`.
    fn process(&self, name: &str, port: u16, args: &[&str], keys: &str) -> String {
        let mut argv = vec![
            q(python3().to_str().unwrap()),
            q("sidecar.py"),
            q("--name"),
            q(name),
            q("--port"),
            q(port.to_string()),
            q("--events"),
            q(self.events.to_str().unwrap()),
        ];
        argv.extend(args.iter().map(q));
        format!(
            "\n[[process]]\nname = {}\ncommand = [{}]\nchdir = {}\n{keys}\n",
            q(name),
            argv.join(", "),
            q(self.app.to_str().unwrap()),
        )
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.dir.join("workers.toml");
        fs::write(&p, text).unwrap();
        p
    }

    fn start(&self, text: &str) -> Server {
        let cfg = self.write(text);
        let mut srv = Server::spawn(&self.dir, &cfg, self.port, &self.dir.path);
        srv.wait_ready(READY_TIMEOUT);
        srv
    }

    /// (what, name, pid) of every event so far.
    fn events(&self) -> Vec<(String, String, u32)> {
        fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                    w.next()?.parse().ok()?,
                ))
            })
            .collect()
    }

    fn position(&self, what: &str, name: &str) -> Option<usize> {
        self.events()
            .iter()
            .position(|(w, n, _)| w == what && n == name)
    }

    fn count(&self, what: &str, name: &str) -> usize {
        self.events()
            .iter()
            .filter(|(w, n, _)| w == what && n == name)
            .count()
    }

    fn status(&self) -> String {
        let cfg = self.dir.join("workers.toml");
        let out = run_bin(
            &self.dir,
            &["status", "-c", cfg.to_str().unwrap()],
            Duration::from_secs(20),
        );
        assert_eq!(out.code(), Some(0), "{}", out.dump());
        out.stdout
    }

    /// The status line of process `name`, split in words.
    fn status_of(&self, name: &str) -> Vec<String> {
        let s = self.status();
        s.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no status line for {name}:\n{s}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn pid_of(&self, name: &str) -> Option<u32> {
        self.status_of(name).get(2).and_then(|p| p.parse().ok())
    }
}

fn get(port: u16, path: &str) -> Response {
    let mut c = Http::connect(port);
    c.request("GET", path, &[("Connection", "close")], b"")
}

/// A GET that may fail (the process may be restarting).
fn try_get(port: u16, path: &str) -> Option<Response> {
    let mut c = Http::try_connect(port).ok()?;
    c.try_send(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    c.read_response(false).ok()
}

#[test]
fn dependencies_start_in_order_pool_waits_and_stop_is_reversed() {
    let s = Svc::new("proc_order");
    let (model, ui) = (free_port(), free_port());
    let text = format!(
        "{}\n[app]\nwsgi = \"testapp:app\"\nchdir = {}\npython = {}\nafter = [\"model\"]\n\n[workers]\ncount = 1\n{}{}",
        s.head(""),
        q(s.app.to_str().unwrap()),
        q(python3().to_str().unwrap()),
        s.process(
            "model",
            model,
            &["--healthy-after", "1.5"],
            &format!(
                "ready = {{ http = \"http://127.0.0.1:{model}/health\", interval = \"200ms\" }}\nstart_timeout = \"20s\""
            )
        ),
        s.process(
            "ui",
            ui,
            &[],
            &format!("after = [\"model\"]\nready = {{ tcp = \"127.0.0.1:{ui}\", interval = \"200ms\" }}")
        ),
    );
    let started = Instant::now();
    let mut srv = s.start(&text);
    // READY=1 only once the model answered healthy (after its 1.5 s load) and the UI is up.
    assert!(started.elapsed() >= Duration::from_millis(1400));
    let healthy = s
        .position("healthy", "model")
        .expect("model became healthy");
    let ui_start = s.position("start", "ui").expect("ui started");
    assert!(
        healthy < ui_start,
        "ui must start after model is ready: {:?}",
        s.events()
    );
    // The pool waited for the model too: its worker logged after the model was ready.
    let log = srv.error_log();
    let ready_at = log.find("process ready").expect("process ready in the log");
    let spawned_at = log.find("worker spawned").expect("worker spawned");
    assert!(
        ready_at < spawned_at,
        "pool started before model ready:\n{log}"
    );
    assert_eq!(get(s.port, "/").status, 200);
    assert_eq!(get(ui, "/x").text(), "ui /x\n");

    let st = srv.stop_term();
    assert_eq!(st.code(), Some(0), "{}", srv.diagnostics());
    let term_ui = s.position("term", "ui").expect("ui got SIGTERM");
    let term_model = s.position("term", "model").expect("model got SIGTERM");
    assert!(
        term_ui < term_model,
        "stop must be in reverse order: {:?}",
        s.events()
    );
    let log = srv.error_log();
    assert!(
        log.find("stopping process").is_some(),
        "no stop logged:\n{log}"
    );
}

#[test]
fn restart_policies_and_the_start_limit() {
    let s = Svc::new("proc_policies");
    let trigger = s.dir.join("crash-now");
    let (a, b, c, d) = (free_port(), free_port(), free_port(), free_port());
    let ready = |p: u16| format!("ready = {{ tcp = \"127.0.0.1:{p}\", interval = \"100ms\" }}\n");
    let text = format!(
        "{}{}{}{}{}",
        s.head(""),
        s.process(
            "flappy",
            a,
            &["--crash-if", trigger.to_str().unwrap()],
            &format!("{}restart = \"always\"\nrestart_delay = \"100ms\"\nstart_limit_burst = 3\nstart_limit_interval = \"30s\"", ready(a))
        ),
        s.process("once", b, &[], &format!("{}restart = \"never\"", ready(b))),
        s.process("careful", c, &[], &format!("{}restart = \"on-failure\"", ready(c))),
        s.process(
            "crashy",
            d,
            &[],
            &format!("{}restart = \"on-failure\"\nrestart_delay = \"100ms\"", ready(d))
        ),
    );
    let srv = s.start(&text);

    // never: a crash is not restarted.
    assert_eq!(get(b, "/crash").status, 200);
    wait_until("once exited", T, || {
        (s.status_of("once")[1] == "exited").then_some(())
    });
    // on-failure: a clean exit is not restarted, a crash is (checked below with flappy).
    assert_eq!(get(c, "/exit0").status, 200);
    wait_until("careful exited", T, || {
        (s.status_of("careful")[1] == "exited").then_some(())
    });
    assert!(s.status_of("careful").join(" ").contains("exit code 0"));
    // on-failure: a crash (exit 3) is restarted.
    let crashy = s.pid_of("crashy").expect("crashy runs");
    assert_eq!(get(d, "/crash").status, 200);
    wait_until("crashy restarted", T, || {
        let st = s.status_of("crashy");
        (st[1] == "running" && st[2] != crashy.to_string()).then_some(())
    });
    assert!(s
        .status_of("crashy")
        .join(" ")
        .contains("exit code 3 (crash)"));

    // always + start limit: with the trigger file every restart crashes at once; after 3
    // starts within the interval the process is failed, loudly, and left alone.
    let first_pid = s.pid_of("flappy").expect("flappy runs");
    fs::write(&trigger, "").unwrap();
    assert_eq!(get(a, "/crash").status, 200);
    wait_until("flappy failed", T, || {
        (s.status_of("flappy")[1] == "failed").then_some(())
    });
    assert_eq!(s.count("start", "flappy"), 3, "{:?}", s.events());
    let line = srv.wait_error_log_line("start limit", T, |l| l.contains("process FAILED"));
    assert!(line.contains("flappy"), "{line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(!pid_alive(first_pid));
    // Failed stays failed (no flapping).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.count("start", "flappy"), 3);
    // `restart NAME` clears it: without the trigger it runs again.
    fs::remove_file(&trigger).unwrap();
    let out = run_bin(
        &s.dir,
        &[
            "restart",
            "flappy",
            "-c",
            s.dir.join("workers.toml").to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    wait_until("flappy running again", T, || {
        (s.status_of("flappy")[1] == "running").then_some(())
    });
    assert_eq!(get(a, "/").status, 200);
    drop(srv);
}

#[test]
fn failing_health_check_restarts_the_process() {
    let s = Svc::new("proc_health");
    let sick = s.dir.join("sick");
    let p = free_port();
    let text = format!(
        "{}{}",
        s.head(""),
        s.process(
            "model",
            p,
            &["--unhealthy-if", sick.to_str().unwrap()],
            &format!("ready = {{ http = \"http://127.0.0.1:{p}/health\", interval = \"150ms\", timeout = \"1s\", failures = 2 }}\nrestart_delay = \"100ms\"")
        ),
    );
    let srv = s.start(&text);
    let pid = s.pid_of("model").expect("model pid");
    fs::write(&sick, "").unwrap();
    srv.wait_error_log_line("health restart", T, |l| {
        l.contains("failed its health check") && l.contains("model")
    });
    fs::remove_file(&sick).unwrap();
    let new_pid = wait_until("model restarted and running", T, || {
        let st = s.status_of("model");
        let np: u32 = st.get(2)?.parse().ok()?;
        (st[1] == "running" && np != pid).then_some(np)
    });
    assert!(!pid_alive(pid), "old model process still alive");
    assert!(pid_alive(new_pid));
    let st = s.status_of("model").join(" ");
    assert!(st.contains("(health)"), "last exit names the reason: {st}");
    assert_eq!(s.status_of("model")[3], "1", "restarts: {st}");
}

#[test]
fn start_timeout_lets_a_slow_load_finish_and_stops_a_stuck_one() {
    let s = Svc::new("proc_start_timeout");
    let (slow, stuck) = (free_port(), free_port());
    let text = format!(
        "{}{}{}",
        s.head(""),
        // Loads for 2.5 s, checked every 200 ms with failures = 1: still not killed.
        s.process(
            "slow",
            slow,
            &["--healthy-after", "2.5"],
            &format!("ready = {{ http = \"http://127.0.0.1:{slow}/health\", interval = \"200ms\", failures = 1 }}\nstart_timeout = \"20s\"")
        ),
        // Never healthy: stopped after start_timeout, restarted; burst 2 then failed.
        s.process(
            "stuck",
            stuck,
            &["--healthy-after", "1000"],
            &format!("ready = {{ http = \"http://127.0.0.1:{stuck}/health\", interval = \"100ms\" }}\nstart_timeout = \"1s\"\nrestart_delay = \"100ms\"\nstart_limit_burst = 2\nafter = [\"slow\"]")
        ),
    );
    let cfg = s.write(&text);
    let mut srv = Server::spawn(&s.dir, &cfg, s.port, &s.dir.path);
    // stuck never becomes ready, so the service never reports READY=1: wait for the log.
    srv.wait_error_log_line("slow ready", T, |l| {
        l.contains("process ready") && l.contains("slow")
    });
    assert_eq!(
        s.count("start", "slow"),
        1,
        "slow was restarted: {:?}",
        s.events()
    );
    srv.wait_error_log_line("start timeout", T, |l| {
        l.contains("start_timeout") && l.contains("stuck")
    });
    // A process failing before the service was ever ready stops the master (exit 3).
    let st = srv.wait_exit(T);
    assert_eq!(st.code(), Some(3), "{}", srv.diagnostics());
    assert_eq!(s.count("start", "stuck"), 2, "{:?}", s.events());
    assert!(srv.error_log().contains("process FAILED"));
}

#[test]
fn notify_readiness_and_output_capture() {
    let s = Svc::new("proc_notify_output");
    let (a, b) = (free_port(), free_port());
    let own_log = s.dir.join("b.log");
    let text = format!(
        "{}{}{}",
        s.head(""),
        s.process(
            "notifier",
            a,
            &["--notify", "--healthy-after", "1"],
            "ready = { notify = true }\nstart_timeout = \"20s\""
        ),
        s.process(
            "quiet",
            b,
            &[],
            &format!("log = {}", q(own_log.to_str().unwrap()))
        ),
    );
    let started = Instant::now();
    let srv = s.start(&text);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(s.position("notified", "notifier").is_some());
    // The error log has the notifier's lines, tagged with its name and stream.
    let line = srv.wait_error_log_line("notifier stdout", T, |l| {
        l.contains("notifier listening on")
    });
    assert!(line.contains("process=notifier"), "{line}");
    assert!(line.contains("stdout"), "{line}");
    srv.wait_error_log_line("notifier stderr", T, |l| {
        l.contains("a line on stderr") && l.contains("process=notifier")
    });
    // quiet writes to its own file instead.
    wait_until("quiet's own log", T, || {
        let t = fs::read_to_string(&own_log).unwrap_or_default();
        (t.contains("quiet listening on") && t.contains("quiet: a line on stderr")).then_some(())
    });
    assert!(!srv.error_log().contains("quiet listening on"));
    // SIGUSR1 (after logrotate moved the file away): the process's log is reopened too.
    fs::rename(&own_log, s.dir.join("b.log.1")).unwrap();
    srv.signal(10);
    srv.wait_error_log_line("USR1 handled", T, |l| l.contains("log files reopened"));
    assert_eq!(get(b, "/say/after-rotation").status, 200);
    wait_until("the new b.log gets the next line", T, || {
        fs::read_to_string(&own_log)
            .is_ok_and(|t| t.contains("after-rotation"))
            .then_some(())
    });
    assert!(!fs::read_to_string(s.dir.join("b.log.1"))
        .unwrap()
        .contains("after-rotation"));
    // Without a pool, /-/ready follows the processes.
    assert_eq!(get(s.port, "/-/ready").status, 200);
    assert_eq!(get(s.port, "/anything").status, 404);
}

#[test]
fn status_lists_processes_and_restart_name_restarts_one() {
    let s = Svc::new("proc_status");
    let (a, b, m) = (free_port(), free_port(), free_port());
    let text = format!(
        "{}{}{}",
        s.head(&format!("metrics = \"127.0.0.1:{m}\"")),
        s.process(
            "alpha",
            a,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{a}\" }}")
        ),
        s.process(
            "beta",
            b,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{b}\" }}")
        ),
    );
    let _srv = s.start(&text);
    let st = s.status();
    assert!(st.contains("process") && st.contains("restarts"), "{st}");
    let alpha = s.status_of("alpha");
    assert_eq!(alpha[1], "running", "{st}");
    let (pa, pb) = (s.pid_of("alpha").unwrap(), s.pid_of("beta").unwrap());
    assert!(pid_alive(pa) && pid_alive(pb));

    let cfg = s.dir.join("workers.toml");
    let out = run_bin(
        &s.dir,
        &["restart", "alpha", "-c", cfg.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let na = wait_until("alpha restarted", T, || {
        let st = s.status_of("alpha");
        let np: u32 = st.get(2)?.parse().ok()?;
        (st[1] == "running" && np != pa).then_some(np)
    });
    assert!(pid_alive(na));
    assert!(!pid_alive(pa));
    assert_eq!(s.pid_of("beta"), Some(pb), "beta must keep running");
    assert_eq!(s.status_of("alpha")[3], "1");
    assert!(s.status_of("alpha").join(" ").contains("(restart)"));
    // The metrics listener counts it and shows both up.
    let metrics = get(m, "/metrics").text();
    assert!(
        metrics.contains("gte_process_restarts_total{process=\"alpha\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gte_process_up{process=\"beta\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gte_process_up{process=\"alpha\"} 1"),
        "{metrics}"
    );
    // An unknown name is an error (exit 1) naming the known ones.
    let out = run_bin(
        &s.dir,
        &["restart", "gamma", "-c", cfg.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(out.stderr.contains("alpha, beta"), "{}", out.dump());
}

#[test]
fn hup_restarts_only_the_changed_process() {
    let s = Svc::new("proc_hup");
    let (a, b) = (free_port(), free_port());
    let text = |flavour: &str| {
        format!(
            "{}{}{}",
            s.head(""),
            s.process(
                "steady",
                a,
                &[],
                &format!("ready = {{ tcp = \"127.0.0.1:{a}\" }}")
            ),
            s.process(
                "changing",
                b,
                &[],
                &format!(
                    "ready = {{ tcp = \"127.0.0.1:{b}\" }}\nenv = {{ FLAVOUR = {} }}",
                    q(flavour)
                )
            ),
        )
    };
    let mut srv = s.start(&text("vanilla"));
    assert_eq!(get(b, "/env/FLAVOUR").text(), "vanilla\n");
    let (pa, pb) = (s.pid_of("steady").unwrap(), s.pid_of("changing").unwrap());
    s.write(&text("chocolate"));
    srv.signal(libc_sighup());
    // Without a pool there is nothing to wait for: systemd hears READY=1 after RELOADING=1.
    srv.wait_notification("reloaded", T);
    wait_until("changing restarted with the new env", T, || {
        try_get(b, "/env/FLAVOUR")
            .is_some_and(|r| r.status == 200 && r.text() == "chocolate\n")
            .then_some(())
    });
    assert_eq!(
        s.pid_of("steady"),
        Some(pa),
        "unchanged process must keep running"
    );
    assert_ne!(s.pid_of("changing"), Some(pb));
    assert!(!pid_alive(pb));
    assert_eq!(s.count("start", "steady"), 1);

    // A new entry starts, a removed one stops; the unchanged one still keeps running.
    let n = free_port();
    let with_new = format!(
        "{}{}",
        text("chocolate"),
        s.process(
            "newcomer",
            n,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{n}\" }}")
        )
    );
    s.write(&with_new);
    srv.signal(libc_sighup());
    wait_until("newcomer serves", T, || {
        try_get(n, "/")
            .is_some_and(|r| r.status == 200)
            .then_some(())
    });
    let pn = s.pid_of("newcomer").expect("newcomer pid");
    let changing = s.pid_of("changing");
    s.write(&text("chocolate"));
    srv.signal(libc_sighup());
    wait_until("newcomer stopped and gone from status", T, || {
        (!pid_alive(pn) && !s.status().contains("newcomer")).then_some(())
    });
    assert_eq!(s.pid_of("steady"), Some(pa));
    assert_eq!(s.pid_of("changing"), changing);
}

fn libc_sighup() -> i32 {
    1
}

#[test]
fn sigterm_ignoring_process_and_its_helpers_are_killed_after_stop_timeout() {
    let s = Svc::new("proc_stubborn");
    let p = free_port();
    let text = format!(
        "{}{}",
        s.head(""),
        s.process(
            "stubborn",
            p,
            &["--ignore-term", "--helper"],
            &format!("ready = {{ tcp = \"127.0.0.1:{p}\" }}\nstop_timeout = \"1s\"")
        ),
    );
    let mut srv = s.start(&text);
    let leader = s.pid_of("stubborn").unwrap();
    let helper = s
        .events()
        .iter()
        .find(|(w, _, _)| w == "helperpid")
        .map(|(_, _, pid)| *pid)
        .expect("helper pid recorded");
    srv.record(helper);
    assert!(pid_alive(leader) && pid_alive(helper));
    let t = Instant::now();
    let st = srv.stop_term();
    assert_eq!(st.code(), Some(0), "{}", srv.diagnostics());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "stop_timeout not waited"
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    wait_until("leader and helper gone", Duration::from_secs(5), || {
        (!pid_alive(leader) && !pid_alive(helper)).then_some(())
    });
    let log = srv.error_log();
    assert!(log.contains("ignoring SIGTERM"), "{log}");
    assert!(log.contains("SIGKILL to its process group"), "{log}");
}

/// A masked client frame (RFC 6455 5.2), FIN set.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x88];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, pred: impl Fn(&[u8]) -> bool) {
    let mut chunk = [0u8; 4096];
    while !pred(buf) {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn routed_prefixes_stream_and_pass_websockets() {
    let s = Svc::new("proc_routes");
    let (model, ui) = (free_port(), free_port());
    let text = format!(
        "{}{}{}",
        s.head("routes = { \"/v1/\" = \"model\", \"/\" = \"ui\" }"),
        s.process(
            "model",
            model,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{model}\" }}\nlisten = \"127.0.0.1:{model}\"")
        ),
        s.process(
            "ui",
            ui,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{ui}\" }}\nlisten = \"127.0.0.1:{ui}\"\nafter = [\"model\"]")
        ),
    );
    let srv = s.start(&text);
    assert_eq!(get(s.port, "/v1/models").text(), "model /v1/models\n");
    assert_eq!(get(s.port, "/chat").text(), "ui /chat\n");
    // The master's own readiness path is not routed.
    assert_eq!(get(s.port, "/-/ready").status, 200);

    // Streamed: the first piece arrives long before the last is produced (5 x 300 ms apart).
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let t = Instant::now();
    c.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, |b| {
        String::from_utf8_lossy(b).contains("data: 0")
    });
    let first = t.elapsed();
    read_until(&mut c, &mut buf, |b| b.ends_with(b"0\r\n\r\n"));
    let all = t.elapsed();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: 4"), "{text}");
    // The pieces are produced 1.2 s apart from first to last: buffering would deliver them
    // together.
    assert!(
        all.saturating_sub(first) >= Duration::from_millis(800),
        "not streamed: first piece after {first:?}, all after {all:?}"
    );

    // WebSocket through "/" to the UI.
    let mut w = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    w.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut w, &mut buf, |b| b.windows(4).any(|x| x == b"\r\n\r\n"));
    let head = String::from_utf8_lossy(&buf).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    let end = buf.windows(4).position(|x| x == b"\r\n\r\n").unwrap() + 4;
    let mut rest = buf[end..].to_vec();
    for msg in ["hello ui", "second"] {
        w.write_all(&client_frame(0x1, msg.as_bytes())).unwrap();
        let want = format!("echo: {msg}");
        read_until(&mut w, &mut rest, |b| b.len() >= 2 + want.len());
        assert_eq!(rest[0], 0x81);
        assert_eq!(&rest[2..2 + want.len()], want.as_bytes());
        rest.drain(..2 + want.len());
    }
    drop(w);
    // Routed requests are in the access log.
    srv.wait_access_log_line("routed request", T, |l| l.contains("/v1/models"));
}

#[test]
fn process_runs_as_its_user_when_the_master_is_root() {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: not root, `user` cannot switch (the config test covers the error)"
        );
        return;
    }
    let s = Svc::new("proc_user");
    // With a system python (readable by nobody) it also reports READY=1 on its NOTIFY_SOCKET,
    // which must be reachable for the other user.
    let command = if std::path::Path::new("/usr/bin/python3").exists() {
        "command = [\"/usr/bin/python3\", \"-c\", \"import os, socket, time; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); time.sleep(120)\"]\nready = { notify = true }\nstart_timeout = \"20s\""
    } else {
        "command = [\"sleep\", \"120\"]"
    };
    let text = format!(
        "{}\n[[process]]\nname = \"as-nobody\"\n{command}\nchdir = \"/\"\nuser = \"nobody\"\n",
        s.head(""),
    );
    let _srv = s.start(&text);
    let pid = s.pid_of("as-nobody").expect("pid");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "still root: {uid_line}"
    );
}

#[test]
fn example_llm_chat_serves_a_streamed_completion_through_one_listener() {
    let dir = TestDir::new("example_llm_chat");
    let src = std::path::Path::new(MANIFEST_DIR).join("examples/llm-chat");
    for f in ["model_server.py", "chat_ui.py"] {
        fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    fs::create_dir_all(dir.join("run")).unwrap();
    let (port, model, ui) = (free_port(), free_port(), free_port());
    let text = fs::read_to_string(src.join("workers.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("8000", &model.to_string())
        .replace("8001", &ui.to_string())
        .replace("\"--load-seconds\", \"3\"", "\"--load-seconds\", \"1\"")
        .replace("\"python3\"", &q(python3().to_str().unwrap()));
    let cfg = dir.join("workers.toml");
    fs::write(&cfg, &text).unwrap();
    let mut srv = Server::spawn(&dir, &cfg, port, &dir.path);
    srv.wait_ready(READY_TIMEOUT);
    let models = get(port, "/v1/models");
    assert_eq!(models.status, 200, "{}", srv.diagnostics());
    assert!(models.text().contains("fake-llm"));
    assert!(get(port, "/").text().contains("<title>fake chat</title>"));
    let mut c = Http::connect(port);
    let body = br#"{"stream": true, "messages": [{"role": "user", "content": "hello model"}]}"#;
    let r = c.request(
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ],
        body,
    );
    assert_eq!(r.status, 200);
    let t = r.text();
    assert!(
        t.contains("\"content\": \" model\"") && t.ends_with("data: [DONE]\n\n"),
        "{t}"
    );
    // The UI calls the model server itself, too.
    let mut c = Http::connect(port);
    let r = c.request("POST", "/ask", &[("Connection", "close")], b"ping");
    assert_eq!(r.text(), "You said: ping\n");
    assert_eq!(srv.stop_term().code(), Some(0));
}

#[test]
fn fast_stop_stops_every_process_at_once() {
    let s = Svc::new("proc_fast_stop");
    let (a, b) = (free_port(), free_port());
    let text = format!(
        "{}{}{}",
        s.head(""),
        s.process(
            "base",
            a,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{a}\" }}\nstop_timeout = \"60s\"")
        ),
        // Ignores SIGTERM and has a long stop_timeout: a fast stop caps the wait at 2 s.
        s.process(
            "top",
            b,
            &["--ignore-term"],
            &format!(
                "ready = {{ tcp = \"127.0.0.1:{b}\" }}\nafter = [\"base\"]\nstop_timeout = \"60s\""
            )
        ),
    );
    let mut srv = s.start(&text);
    let (pa, pb) = (s.pid_of("base").unwrap(), s.pid_of("top").unwrap());
    let t = Instant::now();
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    srv.signal(SIGINT);
    let st = srv.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", srv.diagnostics());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(!pid_alive(pa) && !pid_alive(pb));
    // Both got their stop signal at once: base did not wait for top (killed after 2 s).
    let log = fs::read_to_string(&s.events).unwrap();
    let term_at: f64 = log
        .lines()
        .find(|l| l.starts_with("term base "))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("base got no SIGTERM: {log}"));
    assert!(
        term_at - sent < 1.5,
        "base stopped {:.2}s after SIGINT",
        term_at - sent
    );
}

#[test]
fn one_shot_step_runs_to_completion_before_its_dependents() {
    let s = Svc::new("proc_oneshot");
    let p = free_port();
    let ev = s.events.to_str().unwrap().to_string();
    let script = format!(
        "import os, time; open({ev:?}, 'a').write('start setup %d 0\\n' % os.getpid()); time.sleep(0.8); open({ev:?}, 'a').write('done setup %d 0\\n' % os.getpid())"
    );
    let text = format!(
        "{}\n[[process]]\nname = \"setup\"\ncommand = [{}, \"-c\", {}]\nready = {{ exit = true }}\n{}",
        s.head(""),
        q(python3().to_str().unwrap()),
        q(&script),
        s.process(
            "app",
            p,
            &[],
            &format!("after = [\"setup\"]\nready = {{ tcp = \"127.0.0.1:{p}\" }}")
        ),
    );
    let _srv = s.start(&text);
    let done = s.position("done", "setup").expect("setup finished");
    let app = s.position("start", "app").expect("app started");
    assert!(
        done < app,
        "app started before setup was done: {:?}",
        s.events()
    );
    // Done for good: restart = "always" (the default) does not run it again.
    let st = s.status_of("setup");
    assert_eq!(st[1], "exited", "{st:?}");
    assert_eq!(st[3], "0", "{st:?}");
    assert_eq!(s.count("start", "setup"), 1);
}

#[test]
fn processes_die_with_a_killed_master() {
    let s = Svc::new("proc_pdeathsig");
    let (a, b) = (free_port(), free_port());
    let text = format!(
        "{}{}{}",
        s.head(""),
        s.process(
            "one",
            a,
            &[],
            &format!("ready = {{ tcp = \"127.0.0.1:{a}\" }}")
        ),
        s.process(
            "two",
            b,
            &["--ignore-term"],
            &format!("ready = {{ tcp = \"127.0.0.1:{b}\" }}")
        ),
    );
    let mut srv = s.start(&text);
    let pids = [s.pid_of("one").unwrap(), s.pid_of("two").unwrap()];
    for p in pids {
        srv.record(p);
    }
    srv.signal(SIGKILL);
    srv.wait_exit(Duration::from_secs(10));
    wait_until(
        "processes gone after the master was SIGKILLed",
        Duration::from_secs(10),
        || pids.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
}
