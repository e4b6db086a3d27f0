//! Pipelining (`[workers] pipeline = 2`): a fast, busy single-threaded worker may be sent the next
//! request ahead, to wait in its socket. These tests show that a fast request never waits behind a
//! slow one while another worker is idle, that many concurrent requests with bodies come back
//! intact through multiplexed worker connections, and that a request waiting behind one that
//! kills its worker is answered by another worker instead of failing.

mod common;

use common::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pid_of(r: &Response) -> u32 {
    r.text()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("expected a pid, got {} {:?}", r.status, r.text()))
}

/// Sends `path` on a fresh connection without waiting for the answer.
fn send_get(fx: &Fx, path: &str) -> Http {
    let mut c = fx.srv.connect();
    let req = c.build("GET", path, &[], b"");
    c.send(&req);
    c
}

/// Sends `path` (a lifeapp route) and waits until the app is running it.
fn send_get_inside(fx: &Fx, path: &str, name: &str) -> Http {
    let mark = fx.dir.join(name);
    let sep = if path.contains('?') { '&' } else { '?' };
    let c = send_get(
        fx,
        &format!("{path}{sep}mark={}", pct(mark.to_str().unwrap())),
    );
    wait_until(
        "the request to be inside the app",
        Duration::from_secs(15),
        || mark.exists().then_some(()),
    );
    c
}

/// Requests enough to give both workers a (fast) service-time average.
fn warm_up(fx: &Fx) {
    for _ in 0..20 {
        assert_eq!(fx.srv.get("/pid").status, 200);
    }
}

/// Joins the client threads and fails with the first bad answers they recorded, if any.
fn assert_all_answered(
    fx: &Fx,
    threads: Vec<std::thread::JoinHandle<()>>,
    errors: &Mutex<Vec<String>>,
) {
    for t in threads {
        t.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} bad answers: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(10)],
        fx.srv.diagnostics()
    );
}

#[test]
fn a_fast_request_never_waits_behind_a_slow_one_while_a_worker_is_idle() {
    let fx = start_life("pipeline_fair", |c| {
        c.set("workers", "count", "2")
            .set("workers", "pipeline", "2")
    });
    // Both workers have been fast so far: pipelining would be allowed onto either.
    warm_up(&fx);
    let mut slow = send_get_inside(&fx, "/stuck?s=2", "slow-started");
    let mut fast_pids = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let r = fx.srv.get("/pid");
        assert_eq!(r.status, 200);
        assert!(
            t0.elapsed() < Duration::from_millis(1000),
            "a fast request took {:?} while a worker was idle",
            t0.elapsed()
        );
        fast_pids.push(pid_of(&r));
    }
    let slow_pid = pid_of(&slow.read_response(false).expect("slow response"));
    assert!(
        !fast_pids.contains(&slow_pid),
        "a fast request went to the worker busy with the slow one ({slow_pid}): {fast_pids:?}"
    );
}

/// A worker whose earlier requests were fast but that is now in a long request (a model call, a
/// stream, a slow client) gets nothing sent ahead behind it, even while the other worker is busy:
/// fast requests wait for the free worker (microseconds), not behind the long one (seconds).
#[test]
fn nothing_is_sent_ahead_to_a_fast_worker_that_is_in_a_long_request() {
    let fx = start_life("pipeline_stale", |c| c.set("workers", "count", "2"));
    warm_up(&fx);
    let mut long = send_get_inside(&fx, "/stuck?s=6", "long-started");
    // A worker counts as "in a long request" once it has finished nothing for 20 ms (a time
    // rule, so a wait: this is past it however slow the machine, the request being inside).
    std::thread::sleep(Duration::from_millis(100));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let port = fx.port;
            let errors = errors.clone();
            std::thread::spawn(move || {
                let mut c = Http::connect(port);
                for _ in 0..100 {
                    let t0 = Instant::now();
                    let r = c.request("GET", "/pid", &[], b"");
                    let took = t0.elapsed();
                    if r.status != 200 || took > Duration::from_secs(3) {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("{} after {took:?}", r.status));
                    }
                }
            })
        })
        .collect();
    assert_all_answered(&fx, threads, &errors);
    assert_eq!(
        long.read_response(false).expect("the long request").status,
        200
    );
}

#[test]
fn concurrent_requests_with_bodies_come_back_intact() {
    let fx = start_standard("pipeline_bodies", |c| {
        c.set("workers", "count", "2")
            .set("workers", "pipeline", "2")
    });
    let port = fx.port;
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for t in 0..8u32 {
        let errors = errors.clone();
        threads.push(std::thread::spawn(move || {
            let mut c = Http::connect(port);
            for i in 0..150u32 {
                let body = format!("thread {t} request {i} ").repeat((i % 7 + 1) as usize);
                let req = c.build(
                    "POST",
                    "/echo",
                    &[("Content-Type", "application/octet-stream")],
                    body.as_bytes(),
                );
                match c.try_send(&req).and_then(|_| c.read_response(false)) {
                    Ok(r)
                        if r.status == 200
                            && r.json().get("body").str() == Some(body.as_str())
                            && r.json().get("length").i64() == Some(body.len() as i64) => {}
                    Ok(r) => {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("{t}/{i}: {} {:?}", r.status, r.text()))
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(format!("{t}/{i}: {e}"));
                        c = Http::connect(port);
                    }
                }
            }
        }));
    }
    assert_all_answered(&fx, threads, &errors);
}

#[test]
fn a_request_waiting_behind_a_crash_is_answered_by_another_worker() {
    let fx = start_life("pipeline_resend", |c| {
        c.set("workers", "count", "2")
            .set("workers", "pipeline", "2")
    });
    // One worker is kept in a long request (so it gets nothing sent ahead); the other is given a
    // request that will kill it and, right behind it, more requests: with no worker idle and this
    // one fast and just given work, they are sent ahead to wait in its socket. A worker only
    // counts as fast for 20 ms after it last finished or was given a request, so the requests
    // must follow within that; on a machine too busy for that they wait in the master instead
    // (answered all the same), and the round is tried again.
    let resends = |fx: &Fx| {
        fx.srv
            .error_log()
            .matches("sending that request to another worker")
            .count()
    };
    for round in 0.. {
        assert!(
            round < 5,
            "no request was ever sent ahead behind the crash\n{}",
            fx.srv.diagnostics()
        );
        warm_up(&fx);
        let before = resends(&fx);
        let mut slow = send_get_inside(&fx, "/stuck?s=2", &format!("slow-{round}"));
        std::thread::sleep(Duration::from_millis(50)); // the slow worker is past its 20 ms
        let mut dying = send_get(&fx, "/exit?s=0.5");
        let mut waiting: Vec<Http> = (0..4).map(|_| send_get(&fx, "/pid")).collect();
        for (i, c) in waiting.iter_mut().enumerate() {
            let r = c.read_response(false).expect("response");
            assert_eq!(
                r.status,
                200,
                "request {i} waiting behind the crash: {} {:?}\n{}",
                r.status,
                r.text(),
                fx.srv.diagnostics()
            );
        }
        assert_eq!(slow.read_response(false).expect("slow").status, 200);
        assert_eq!(dying.read_response(false).expect("dying").status, 502);
        // The access/error logs are written by a thread: give the line its moment.
        let seen = (0..50).any(|_| {
            let more = resends(&fx) > before;
            if !more {
                std::thread::sleep(Duration::from_millis(20));
            }
            more
        });
        if seen {
            break;
        }
    }
}

/// One worker, its requests sent ahead on its one connection (`pipeline = 6`): streamed
/// responses, buffered ones, bodies the app reads and bodies it answers without reading (larger
/// than the socket buffer, so the rest is still being written when the answer comes) all share
/// the connection, and every client gets its own answer, whole.
#[test]
fn mixed_requests_sent_ahead_on_one_connection_all_come_back_whole() {
    let fx = start_standard("pipeline_mixed", |c| {
        c.set("workers", "count", "1")
            .set("workers", "pipeline", "6")
    });
    for _ in 0..20 {
        assert_eq!(fx.srv.get("/pid").status, 200);
    }
    let big = fx.srv.get("/big").body;
    assert_eq!(big.len(), 1 << 20);
    let big = Arc::new(big);
    let port = fx.port;
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for t in 0..6u32 {
        let errors = errors.clone();
        let big = big.clone();
        threads.push(std::thread::spawn(move || {
            let mut c = Http::connect(port);
            let unread = vec![b'u'; 300 * 1024];
            for i in 0..30u32 {
                let (req, what) = match (t + i) % 4 {
                    0 => {
                        let body = format!("t{t} i{i} ").repeat((i % 5 + 1) as usize);
                        (c.build("POST", "/echo", &[], body.as_bytes()), body)
                    }
                    1 => (c.build("POST", "/pid", &[], &unread), "pid".to_string()),
                    2 => (c.build("GET", "/big?stream=1", &[], b""), "big".to_string()),
                    _ => (
                        c.build("GET", &format!("/gen?parts=3&size={}", 100 + i), &[], b""),
                        "gen".to_string(),
                    ),
                };
                let r = match c.try_send(&req).and_then(|_| c.read_response(false)) {
                    Ok(r) => r,
                    Err(e) => {
                        errors.lock().unwrap().push(format!("{t}/{i} {what}: {e}"));
                        c = Http::connect(port);
                        continue;
                    }
                };
                let ok = r.status == 200
                    && match what.as_str() {
                        "pid" => r.text().trim().parse::<u32>().is_ok(),
                        "big" => r.body == *big,
                        "gen" => {
                            let n = 100 + i as usize;
                            r.body.len() == 3 * n
                                && r.body[..n].iter().all(|&b| b == b'a')
                                && r.body[2 * n..].iter().all(|&b| b == b'c')
                        }
                        body => r.json().get("body").str() == Some(body),
                    };
                if !ok {
                    errors.lock().unwrap().push(format!(
                        "{t}/{i} {}: {} ({} bytes) {:?}",
                        &what[..what.len().min(12)],
                        r.status,
                        r.body.len(),
                        String::from_utf8_lossy(&r.body[..r.body.len().min(80)])
                    ));
                }
            }
        }));
    }
    assert_all_answered(&fx, threads, &errors);
}

/// A request sent ahead waits behind another one on the same worker; its timeout (here a
/// `path_timeouts` entry shorter than the run of the request ahead) counts from its turn, as if
/// it had waited in the master: the busy worker is not taken for a stuck one and killed.
#[test]
fn a_short_path_timeout_counts_from_the_turn_of_a_request_sent_ahead() {
    let fx = start_life("pipeline_path_timeout", |c| {
        c.set("workers", "count", "1")
            .set("workers", "pipeline", "2")
            .set("workers", "path_timeouts", "{ \"/pid\" = \"1s\" }")
    });
    warm_up(&fx);
    let worker = pid_of(&fx.srv.get("/pid"));
    let started = Instant::now();
    let mut slow = send_get_inside(&fx, "/stuck?s=2.5", "slow-started");
    // The only worker is busy and has been fast: /pid is sent ahead, to wait in its socket for
    // about 2.5 s, longer than its own 1 s timeout.
    let mut fast = send_get(&fx, "/pid");
    let r = fast.read_response(false).expect("the request sent ahead");
    assert_eq!(r.status, 200, "{:?}\n{}", r.text(), fx.srv.diagnostics());
    assert_eq!(pid_of(&r), worker, "answered by the same worker");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited behind the slow request (else the test shows nothing)"
    );
    assert_eq!(slow.read_response(false).expect("slow").status, 200);
    assert_eq!(
        pid_of(&fx.srv.get("/pid")),
        worker,
        "no worker was replaced"
    );
}
