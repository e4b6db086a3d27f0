//! Slow clients never hold a Python worker (issue 3): the master reads request bodies completely
//! before dispatch and takes responses off the worker into a bounded buffer while they trickle out.
//! Two sync workers keep serving fast clients while 100 slow clients upload and download.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn slow_uploads_and_downloads_do_not_hold_sync_workers() {
    let fx = start_standard("slow_clients", |c| {
        c.set("workers", "count", "2")
            .set("workers", "timeout", "60")
            .set("workers", "keepalive", "60")
    });
    let mut slow = Vec::new();
    // 50 uploads that announce 100 kB and send a few bytes.
    for _ in 0..50 {
        let mut s = TcpStream::connect(("127.0.0.1", fx.port)).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nab")
            .unwrap();
        slow.push(s);
    }
    // 50 downloads of 1 MiB (one piece and streamed) that never read.
    for i in 0..50 {
        let mut s = TcpStream::connect(("127.0.0.1", fx.port)).unwrap();
        let path = if i % 2 == 0 { "/big" } else { "/big?stream=1" };
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        slow.push(s);
    }
    // Fast clients still get through the two workers, every one of them promptly (a worker held
    // by a slow client would stall them until the 60 s timeout).
    let t0 = Instant::now();
    let mut conn = Http::connect(fx.port);
    let mut pids = std::collections::HashSet::new();
    for _ in 0..200 {
        let started = Instant::now();
        let r = conn.request("GET", "/pid", &[], b"");
        assert_eq!(r.status, 200, "{}", fx.srv.diagnostics());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a fast request waited {:?}",
            started.elapsed()
        );
        pids.insert(r.text());
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
    wait_until("200 access-log lines", Duration::from_secs(10), || {
        (fx.srv.access_log().matches("GET /pid").count() >= 200).then_some(())
    });
    assert!(pids.len() <= 2);
    drop(slow);
}

/// A client that stops reading a response bigger than the master's buffer for it does not keep
/// the worker behind it: after `timeout` without room for the next piece the master cuts that
/// client (a warning says so), drains the rest of the response and the worker serves again,
/// unharmed. Both shapes: a streamed body, and one 24 MiB piece (which the worker sends as
/// 1 MiB frames, so the master never holds it whole).
#[test]
fn a_client_that_stops_reading_is_cut_after_the_timeout_and_the_worker_is_freed() {
    let fx = start_standard("stalled_reader", |c| {
        c.set("workers", "count", "1")
            .set("workers", "timeout", "2")
            .set("workers", "keepalive", "60")
    });
    let pid = fx.srv.get("/pid").text();
    for path in ["/big?stream=1&mib=24", "/big?mib=24"] {
        // Sends the request and never reads: kernel buffers and the master's 4 MiB fill up.
        let mut stalled = TcpStream::connect(("127.0.0.1", fx.port)).unwrap();
        stalled
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let started = Instant::now();
        let mut c = Http::connect(fx.port);
        let r = c.request("GET", "/pid", &[], b"");
        assert_eq!(r.status, 200, "{path}: {}", fx.srv.diagnostics());
        assert_eq!(r.text(), pid, "{path}: the worker was replaced, not freed");
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(20),
            "{path}: a fast request waited {waited:?} behind the stalled client"
        );
        // And the stalled client's connection is closed by the master (reset: the client's socket
        // leaves ESTABLISHED), not left open with its buffered response.
        let port = stalled.local_addr().unwrap().port();
        wait_until(
            "the stalled connection closed by the master",
            Duration::from_secs(10),
            || (tcp_state(port) != Some(0x01)).then_some(()),
        );
        drop(stalled);
    }
    let line =
        fx.srv
            .wait_error_log_line("about the stalled client", Duration::from_secs(10), |l| {
                // The master's two stall checks have the same timeout: whichever comes first
                // (the response buffer's, or the connection's writes') says so.
                l.contains("its connection is closed and the worker freed")
                    || l.contains("read nothing of its answers")
            });
    assert!(line.contains("WARN"), "{line}");
}

/// The state (as in /proc/net/tcp: 1 established, 8 close-wait) of this host's loopback TCP
/// socket whose local port is `port`.
fn tcp_state(port: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!(":{port:04X} ");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 3 && format!("{} ", f[1]).ends_with(&local))
            .then(|| u8::from_str_radix(f[3], 16).ok())
            .flatten()
    })
}

/// A client connection with a 4 KiB receive buffer (set before connecting, so the window stays
/// small): the kernel then holds little of a response it does not read.
fn small_window_connect(port: u16) -> TcpStream {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, port),
    )
    .unwrap();
    TcpStream::from(fd)
}

/// The busy-slot metric counts worker slots, not responses: a streamed response still on its way
/// to a client that does not read gave its slot back once the master had all of it, and the
/// metric says the slot is idle (it used to count it busy until the client had the last byte).
#[test]
fn a_response_waiting_for_a_slow_client_does_not_count_as_a_busy_slot() {
    let mport = free_port();
    let fx = start_standard("busy_metric", |c| {
        c.set("workers", "count", "1")
            .set("workers", "keepalive", "60")
            .set("", "metrics", &format!("\"127.0.0.1:{mport}\""))
    });
    let mut stalled = small_window_connect(fx.port);
    stalled
        .write_all(b"GET /big?stream=1&mib=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // With one worker, this answer means the slot came back (the master took all 3 MiB).
    assert_eq!(fx.srv.get("/pid").status, 200);
    let metrics = Http::connect(mport)
        .request("GET", "/metrics", &[], b"")
        .text();
    let slots: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("gte_worker_slots{"))
        .collect();
    assert!(
        slots.contains(&"gte_worker_slots{state=\"busy\"} 0")
            && slots.contains(&"gte_worker_slots{state=\"idle\"} 1"),
        "{slots:?}"
    );
    drop(stalled);
}

#[test]
fn thread_pool_variables_are_set_per_worker_unless_the_operator_set_them() {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let fx = start_life("thread_vars", |c| {
        c.set("workers", "count", "5")
            .set("app", "env", "{ MKL_NUM_THREADS = \"7\" }")
    });
    let expect = (cpus / 5).max(1).to_string();
    for var in [
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TORCH_NUM_THREADS",
    ] {
        let r = fx.srv.get(&format!("/envvar?name={var}"));
        assert_eq!(r.text(), expect, "{var}");
    }
    assert_eq!(fx.srv.get("/envvar?name=MKL_NUM_THREADS").text(), "7");
}

/// The scheduling policy of a live process, from /proc/PID/sched (0 = SCHED_OTHER, 3 = SCHED_BATCH).
fn sched_policy(pid: u32) -> u32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/sched")).expect("read /proc/PID/sched");
    let line = text
        .lines()
        .find(|l| l.starts_with("policy"))
        .expect("a policy line");
    line.rsplit(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn workers_run_under_sched_batch_by_default_and_forked_ones_too() {
    for preload in ["false", "true"] {
        let mut fx = start_standard(&format!("sched_batch_{preload}"), |c| {
            c.set("workers", "count", "2")
                .set("app", "preload", preload)
        });
        assert_eq!(sched_policy(fx.srv.pid), 0, "the master keeps SCHED_OTHER");
        // The workers (and with preload the warm process they are forked from).
        let children = fx.srv.live_children();
        assert!(children.len() >= 2, "{children:?}");
        for pid in children {
            assert_eq!(
                sched_policy(pid),
                3,
                "child {pid} (preload = {preload}) is not SCHED_BATCH"
            );
        }
    }
}

#[test]
fn sched_batch_false_leaves_workers_on_the_default_policy() {
    let mut fx = start_standard("sched_batch_off", |c| {
        c.set("workers", "count", "2")
            .set("workers", "sched_batch", "false")
    });
    let children = fx.srv.live_children();
    assert_eq!(children.len(), 2, "{children:?}");
    for pid in children {
        assert_eq!(sched_policy(pid), 0, "worker {pid}");
    }
}

/// (soft, hard) open-file limit of a process, from /proc/PID/limits.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

#[test]
fn hundreds_of_idle_clients_fit_under_a_systemd_soft_fd_limit() {
    // Started as systemd starts a service, with a small soft open-file limit (1024 there; 256
    // here) under a higher hard one: the master takes the hard limit, its workers get the
    // original soft limit back (an app that uses select() sees what it would under gunicorn).
    let dir = TestDir::new("nofile");
    let port = free_port();
    let cfg = Conf::standard(&dir, port)
        .set("workers", "keepalive", "60")
        .write(&dir);
    let mut srv = Server::spawn_with(&dir, &cfg, port, &dir.path, "master", |cmd| {
        // SAFETY: getrlimit/setrlimit only, between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, || {
                let mut l = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
                l.rlim_cur = 256.min(l.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &l);
                Ok(())
            });
        }
    });
    srv.wait_ready(READY_TIMEOUT);
    let (soft, hard) = nofile(srv.pid);
    if hard <= 256 {
        eprintln!("hard open-file limit is {hard}: nothing to raise; skipping");
        return;
    }
    assert_eq!(soft, hard, "the master takes the hard limit");
    let workers = srv.wait_children_count(2, Duration::from_secs(30));
    for w in &workers {
        assert_eq!(nofile(*w), (256, hard), "worker {w} gets the original back");
    }
    // 400 idle keep-alive clients: more descriptors than the soft limit the master started with.
    let mut idle = Vec::new();
    for _ in 0..400 {
        let mut h = Http::connect(port);
        let r = h.request("GET", "/", &[], b"");
        assert_eq!(r.status, 200);
        idle.push(h);
    }
    // A new client and the old ones are still served.
    assert_eq!(srv.get("/").status, 200, "{}", srv.diagnostics());
    for h in idle.iter_mut().step_by(50) {
        assert_eq!(h.request("GET", "/", &[], b"").status, 200);
    }
}

/// A client that closes its connection while its request waits in the queue for a worker does
/// not get that request run: when a worker frees up, the master sees the end of file in the
/// client's socket, logs 499 (nginx's "client closed request") and gives the worker to the next
/// request. Otherwise every request of a client that timed out under overload would still
/// cost a worker its full service time.
#[test]
fn a_request_whose_client_left_while_queued_is_not_run() {
    let fx = start_standard("queued_client_left", |c| {
        c.set("workers", "count", "1")
            .set("workers", "pipeline", "1")
    });
    let busy = fx.dir.join("busy");
    let abandoned = fx.dir.join("abandoned");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::create_dir_all(&abandoned).unwrap();
    let block = |d: &std::path::Path| format!("/block?dir={}", pct(d.to_str().unwrap()));
    let mut first = fx.srv.connect();
    first.send(&first.build("GET", &block(&busy), &[], b""));
    wait_until(
        "the first request to be inside the app",
        Duration::from_secs(15),
        || busy.join("started").exists().then_some(()),
    );
    // The only worker is busy: this one waits in the queue.
    let mut second = fx.srv.connect();
    second.send(&second.build("GET", &block(&abandoned), &[], b""));
    let cfg = fx.srv.config.to_str().unwrap().to_owned();
    wait_until(
        "the second request to be queued",
        Duration::from_secs(15),
        || {
            let out = run_bin(&fx.dir, &["status", "-c", &cfg], Duration::from_secs(20));
            out.stdout.contains("queued requests 1").then_some(())
        },
    );
    drop(second);
    std::fs::write(busy.join("release"), b"").unwrap();
    let r = first.read_response(false).expect("first response");
    assert_eq!(r.status, 200, "{}", r.text());
    // Had the abandoned request been sent, the worker would now be blocked in it for 20 s.
    let t0 = Instant::now();
    let r = fx.srv.get("/pid");
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the next request waited {:?}: the abandoned one ran",
        t0.elapsed()
    );
    assert!(
        !abandoned.join("started").exists(),
        "the request of the client that left was run"
    );
    fx.srv.wait_access_log_line(
        "the 499 line of the abandoned request",
        Duration::from_secs(10),
        |l| l.contains("/block") && l.contains("\" 499 "),
    );
}

/// Starts `/endless` (an event stream that never ends by itself) on a raw connection and reads
/// until a few ticks have come.
fn open_endless(port: u16, dir: &std::path::Path) -> TcpStream {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let path = format!("/endless?dir={}", pct(dir.to_str().unwrap()));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("tick 3\n") {
        let n = s.read(&mut buf).expect("the stream's first ticks");
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// A client that leaves an endless streamed response (an event stream, a token generator) ends
/// it: the master closes its connection to the worker, the app's next write fails, the worker
/// closes the generator (its `finally` runs, as under gunicorn when the write to a gone client
/// fails) and the same worker serves the next request. Before, the master read the stream on for
/// as long as the app produced it and the worker was lost to it. A single-threaded worker (its
/// requests share one pipelined connection) and a threaded one.
#[test]
fn a_client_leaving_an_endless_stream_ends_it_and_frees_the_worker() {
    for threads in ["1", "4"] {
        let fx = start_standard(&format!("leave_stream_{threads}"), |c| {
            c.set("workers", "count", "1")
                .set("workers", "threads", threads)
        });
        let pid = fx.srv.get("/pid").text();
        let d = fx.dir.join("events");
        std::fs::create_dir_all(&d).unwrap();
        let client = open_endless(fx.port, &d);
        drop(client);
        let closed = wait_until(
            "the app's generator to be closed",
            Duration::from_secs(15),
            || std::fs::read_to_string(d.join("closed")).ok(),
        );
        assert!(closed.starts_with("closed after"), "{closed}");
        // The worker is free (one worker: this would wait behind the stream otherwise) and the
        // same process: nothing was killed.
        let t0 = Instant::now();
        let r = fx.srv.get("/pid");
        assert_eq!(r.status, 200, "threads={threads}: {}", fx.srv.diagnostics());
        assert_eq!(r.text(), pid, "threads={threads}: the worker was replaced");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        let log = fx.srv.error_log();
        assert!(
            !log.contains("ERROR"),
            "threads={threads}: a client leaving is not an error: {log}"
        );
    }
}

/// A reload (SIGHUP) retires the old workers, which finish what they serve, bounded: by
/// graceful_timeout (as the man page says, and gunicorn's docs for a restart signal), or by the
/// longest request timeout if that is longer, so that a request within its own timeout is never
/// cut by a reload. Here a `/block` request (path timeout 10 s) outlives graceful_timeout (2 s)
/// and is answered by the old worker; an endless stream to a client that stays, which no request
/// timeout bounds, is cut when the 10 s are up and the old worker is killed. Before, the retiring
/// worker lived for as long as the stream did.
#[test]
fn a_retiring_worker_is_stopped_after_its_in_flight_requests_or_the_grace_period() {
    use std::io::Read;
    let fx = start_standard("retire_endless", |c| {
        c.set("workers", "count", "1")
            .set("workers", "threads", "2")
            .set("workers", "timeout", "2")
            .set("workers", "graceful_timeout", "2")
            .set("workers", "path_timeouts", "{ \"/block\" = \"10s\" }")
    });
    let old = fx.srv.get("/pid").text();
    let d = fx.dir.join("events");
    std::fs::create_dir_all(&d).unwrap();
    let mut client = open_endless(fx.port, &d);
    let b = fx.dir.join("block");
    std::fs::create_dir_all(&b).unwrap();
    let mut blocked = fx.srv.connect();
    blocked.send(&blocked.build(
        "GET",
        &format!("/block?dir={}", pct(b.to_str().unwrap())),
        &[],
        b"",
    ));
    wait_until(
        "the /block request in the app",
        Duration::from_secs(15),
        || b.join("started").exists().then_some(()),
    );
    let hup = Instant::now();
    fx.srv.signal(1); // SIGHUP
    let new = wait_until("a new worker to serve", Duration::from_secs(20), || {
        let r = fx.srv.get("/pid");
        (r.status == 200 && r.text() != old).then(|| r.text())
    });
    assert_ne!(new, old);
    // Past graceful_timeout, the old worker's request is still being served; it finishes.
    let wait = Duration::from_secs(3).saturating_sub(hup.elapsed());
    std::thread::sleep(wait); // graceful_timeout (2 s) must have passed: no event marks that
    std::fs::write(b.join("release"), b"").unwrap();
    let r = blocked.read_response(false).expect("the /block answer");
    assert_eq!(r.status, 200, "{}", fx.srv.diagnostics());
    assert_eq!(
        r.text(),
        format!("released {old}"),
        "answered by the old worker"
    );
    // The stream is cut once the longest request timeout (10 s) is up, and the old worker gone.
    let old_pid: u32 = old.trim().parse().unwrap();
    wait_until(
        "the retiring worker to be stopped",
        Duration::from_secs(25),
        || (!pid_alive(old_pid)).then_some(()),
    );
    assert!(
        hup.elapsed() >= Duration::from_secs(9),
        "stopped early: {:?}",
        hup.elapsed()
    );
    let mut buf = [0u8; 4096];
    let mut tail = Vec::new();
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        !String::from_utf8_lossy(&tail).ends_with("0\r\n\r\n"),
        "the cut stream must not look complete"
    );
    fx.srv.wait_error_log_line(
        "the warning about the retiring worker",
        Duration::from_secs(10),
        |l| l.contains("retiring worker still serving") && l.contains("WARN"),
    );
}

/// The same with requests sent ahead to the worker behind the stream (pipelining; a worker
/// that is fast gets the next requests queued in its socket): when the stream's client leaves,
/// the stream is still ended and the requests behind it, never read by the worker, go to a
/// worker again instead of waiting for the stream to end. Before, the master read the stream on
/// (the requests behind needed the worker's answers in order), and they waited up to the app's
/// own 60 s bound with the worker lost meanwhile.
#[test]
fn a_stream_given_up_with_requests_sent_ahead_behind_it_frees_them() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let fx = start_standard("give_up_behind", |c| c.set("workers", "count", "1"));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    // Keeps the worker busy and fast: four pipelined requests at a time on one connection.
    let hot = {
        let (stop, done, port) = (stop.clone(), done.clone(), fx.port);
        std::thread::spawn(move || {
            let mut c = Http::connect(port);
            c.set_read_timeout(Duration::from_secs(30));
            while !stop.load(Ordering::Relaxed) {
                let one = c.build("GET", "/pid", &[], b"");
                c.send(&one.repeat(4));
                for _ in 0..4 {
                    let r = c.read_response(false).expect("a pipelined /pid answer");
                    assert_eq!(r.status, 200);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    wait_until("the load to run", Duration::from_secs(15), || {
        (done.load(Ordering::Relaxed) >= 40).then_some(())
    });
    let d = fx.dir.join("events");
    std::fs::create_dir_all(&d).unwrap();
    let client = open_endless(fx.port, &d);
    drop(client);
    wait_until(
        "the app's generator to be closed",
        Duration::from_secs(15),
        || std::fs::read_to_string(d.join("closed")).ok(),
    );
    // The load kept going (a request stuck behind the stream would stop it).
    let before = done.load(Ordering::Relaxed);
    wait_until("the load to go on", Duration::from_secs(10), || {
        (done.load(Ordering::Relaxed) >= before + 40).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    hot.join().expect("every pipelined request answered 200");
    let t0 = Instant::now();
    assert_eq!(fx.srv.get("/pid").status, 200);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// A request waiting in the queue is watched: when its client closes the connection it leaves the
/// queue within a second (a 499 in the access log), instead of keeping its place — and the place
/// of a live client, once the queue is full — until a worker frees up; and it waits at most
/// `queue_timeout` (here 2 s), then gets 503 (before, a queue that did not move, say with no
/// worker left, held its clients for ever).
#[test]
fn queued_requests_leave_with_their_client_and_wait_at_most_their_timeout() {
    let fx = start_standard("queue_watch", |c| {
        c.set("workers", "count", "1")
            .set("workers", "pipeline", "1")
            .set("workers", "timeout", "2")
            .set("workers", "queue", "5")
            .set("workers", "queue_timeout", "2")
            .set("workers", "path_timeouts", "{ \"/block\" = \"30s\" }")
    });
    let busy = fx.dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    let mut first = fx.srv.connect();
    first.send(&first.build(
        "GET",
        &format!("/block?dir={}", pct(busy.to_str().unwrap())),
        &[],
        b"",
    ));
    wait_until("the worker to be busy", Duration::from_secs(15), || {
        busy.join("started").exists().then_some(())
    });
    // Five clients fill the queue and leave.
    for _ in 0..5 {
        let mut c = fx.srv.connect();
        c.send(&c.build("GET", "/pid", &[], b""));
    }
    wait_until("the five 499 lines", Duration::from_secs(10), || {
        (fx.srv.access_log().matches("\" 499 ").count() >= 5).then_some(())
    });
    // A live client now has a place in the queue (not 503 at once for a full queue), and gets
    // 503 when its 2 s queue_timeout is up: the worker is still busy.
    let t0 = Instant::now();
    let r = fx.srv.get("/pid");
    let waited = t0.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    std::fs::write(busy.join("release"), b"").unwrap();
    let r = first.read_response(false).expect("the first answer");
    assert_eq!(r.status, 200);
}

/// A client that sends requests and never reads the answers (each small, so no worker waits on
/// it) is cut once it has taken nothing for `timeout`, as nginx's `send_timeout` does; before, it
/// kept its connection and megabytes of unread answers in the kernel for as long as it liked.
#[test]
fn a_client_that_never_reads_its_answers_is_cut_after_the_timeout() {
    let fx = start_standard("never_reads", |c| {
        c.set("workers", "count", "1")
            .set("workers", "timeout", "2")
            .set("workers", "keepalive", "60")
    });
    let s = small_window_connect(fx.port);
    let port = s.local_addr().unwrap().port();
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let writer = std::thread::spawn(move || {
        let req = b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        // Until the server stops taking requests (its answers are not read) or cuts us.
        for _ in 0..2000 {
            if w.write_all(&req).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    wait_until(
        "the connection closed by the master",
        Duration::from_secs(30),
        || (tcp_state(port) != Some(0x01)).then_some(()),
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "cut too early: {:?}",
        t0.elapsed()
    );
    writer.join().unwrap();
    // Nothing else was harmed.
    assert_eq!(fx.srv.get("/pid").status, 200);
    drop(s);
    fx.srv
        .wait_error_log_line("the warning", Duration::from_secs(10), |l| {
            l.contains("read nothing of its answers")
        });
}

/// zlib's adler32, as the fixture's `/sum` reports it.
fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// The peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8 % 251)
        .collect()
}

/// Request bodies over `body_buffer_size` go to a file in `body_temp_dir`, not the master's
/// memory (nginx's `client_body_buffer_size`): six 16 MiB uploads queued behind a busy worker
/// keep the master's peak RSS far below their 96 MiB, every one reaches the app whole (sent with
/// `sendfile`), chunked and idempotent (re-sendable) ones too, and nothing is left in the
/// directory. When the directory goes away, an upload gets 500 and the error log says why.
#[test]
fn large_request_bodies_are_spooled_to_disk_not_held_in_memory() {
    let dir = TestDir::new("body_spool");
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let port = free_port();
    let conf = Conf::standard(&dir, port)
        .set("", "body_buffer_size", &q("16KiB"))
        .set("", "body_temp_dir", &q(spool.to_str().unwrap()))
        .set("workers", "count", "1")
        .set("workers", "pipeline", "1");
    let srv = Server::start(&dir, &conf);
    let block = dir.join("block");
    std::fs::create_dir_all(&block).unwrap();
    let mut first = srv.connect();
    first.send(&first.build(
        "GET",
        &format!("/block?dir={}", pct(block.to_str().unwrap())),
        &[],
        b"",
    ));
    wait_until(
        "the blocking request to be inside the app",
        Duration::from_secs(15),
        || block.join("started").exists().then_some(()),
    );

    // Six 16 MiB uploads, each read whole by the master while the only worker is busy.
    const MIB16: usize = 16 << 20;
    let mut uploads = Vec::new();
    for i in 0..6u8 {
        let mut c = srv.connect();
        let body = pattern(MIB16, i);
        let method = if i % 2 == 0 { "POST" } else { "PUT" };
        c.send(&c.build(method, "/sum", &[], &body));
        uploads.push((c, adler32(&body)));
    }
    let cfg = srv.config.to_str().unwrap().to_owned();
    wait_until(
        "the six uploads to be read and queued",
        Duration::from_secs(30),
        || {
            let out = run_bin(&dir, &["status", "-c", &cfg], Duration::from_secs(20));
            out.stdout.contains("queued requests 6").then_some(())
        },
    );
    let peak = peak_rss(srv.pid);
    assert!(
        peak < 48 << 20,
        "the master's peak RSS is {} MiB with 96 MiB of bodies queued: they were held in memory",
        peak >> 20
    );
    std::fs::write(block.join("release"), b"").unwrap();
    assert_eq!(first.read_response(false).unwrap().status, 200);
    for (mut c, sum) in uploads {
        let r = c.read_response(false).expect("an answer to the upload");
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j.get("length").i64(), Some(MIB16 as i64));
        assert_eq!(j.get("adler32").i64(), Some(i64::from(sum)));
    }

    // A chunked body that outgrows the buffer on the way.
    let body = pattern(300_000, 9);
    let pieces: Vec<&[u8]> = body.chunks(7000).collect();
    let mut c = srv.connect();
    let mut req = c.build("POST", "/sum", &[("Transfer-Encoding", "chunked")], b"");
    req.extend_from_slice(&chunked(&pieces));
    c.send(&req);
    let r = c
        .read_response(false)
        .expect("an answer to the chunked upload");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().get("length").i64(), Some(300_000));
    assert_eq!(
        r.json().get("adler32").i64(),
        Some(i64::from(adler32(&body)))
    );
    // A small body stays in memory and is not affected.
    let r = c.request("POST", "/sum", &[], b"small");
    assert_eq!(
        r.json().get("adler32").i64(),
        Some(i64::from(adler32(b"small")))
    );
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool files were left behind"
    );

    // The directory is gone: the upload is refused with 500, the log says why, and the master
    // keeps serving.
    std::fs::remove_dir(&spool).unwrap();
    let r = c.request("POST", "/sum", &[], &pattern(100_000, 1));
    assert_eq!(r.status, 500, "{}", r.text());
    srv.wait_error_log_line("the spool failure", Duration::from_secs(10), |l| {
        l.contains("cannot spool a request body") && l.contains("spool")
    });
    assert_eq!(srv.get("/").status, 200);
}

/// A streamed response bigger than the master's memory buffer for it (1 MiB) goes on into an
/// unnamed spool file in `body_temp_dir` (nginx's `proxy_temp_path`) instead of holding the
/// worker: one worker serves eight 16 MiB downloads (streamed and in one piece) to clients that
/// read nothing, then a fast request at once, with the master's peak RSS far below the 128 MiB
/// they add up to. The clients then read their responses whole and intact, and no file is left.
#[test]
fn large_responses_for_slow_readers_are_spooled_and_free_the_worker() {
    let dir = TestDir::new("response_spool");
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let port = free_port();
    let conf = Conf::standard(&dir, port)
        .set("", "body_temp_dir", &q(spool.to_str().unwrap()))
        .set("workers", "count", "1")
        .set("workers", "keepalive", "60");
    let srv = Server::start(&dir, &conf);
    let pid = srv.get("/pid").text();
    let mut readers = Vec::new();
    for i in 0..8 {
        let mut c = small_window_connect(port);
        let path = if i % 2 == 0 {
            "/big?stream=1&mib=16"
        } else {
            "/big?mib=16"
        };
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        readers.push(c);
        // Each is taken off the worker whole before the next request gets it.
        let t0 = Instant::now();
        let r = srv.get("/pid");
        assert_eq!(r.text(), pid, "{}", srv.diagnostics());
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the fast request waited {:?} behind a slow reader",
            t0.elapsed()
        );
    }
    let peak = peak_rss(srv.pid);
    assert!(
        peak < 64 << 20,
        "the master's peak RSS is {} MiB with 128 MiB of responses waiting for their clients",
        peak >> 20
    );
    // The fixture's 1 MiB block, ((i * 31 + 7) % 251 over i mod 251), sixteen times.
    let expected: Vec<u8> = (0..(16usize << 20))
        .map(|i| (((i % (1 << 20)) % 251 * 31 + 7) % 251) as u8)
        .collect();
    for (i, c) in readers.into_iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut h = Http::from_stream(c, port);
        let r = h.read_response(false).expect("the spooled response");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 16 << 20, "response {i}");
        assert!(r.body == expected, "response {i} arrived changed");
    }
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool files were left behind"
    );
}
