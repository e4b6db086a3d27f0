//! The error log (master events and worker output, through `tracing`) and the access log (one
//! line per request, in the `[log] access_format`), plus the per-request hook that feeds the
//! metrics.
//!
//! Writing a log never blocks a request. The access log's line is rendered on the request path
//! and appended to a bounded buffer (16 MiB) that a writer thread flushes in batches
//! ([`writer`]); the error log goes through `tracing_appender::non_blocking` (a bounded queue of
//! 64 Ki lines). When either is full (the disk cannot keep up) new lines are dropped — counted in
//! the `gte_log_dropped_lines_total` metric — rather than stalling anything. Files are
//! [`rotate::LogFile`]s: they reopen their path on SIGUSR1 ([`Logs::reopen`]), rotate themselves
//! when `[log] rotate` says so, and report write errors (full disk, file removed) on stderr
//! instead of failing.

pub mod format;
pub mod rotate;
pub mod writer;

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Uri, Version};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::{LogConfig, LogTarget};
use crate::metrics::Metrics;
use format::{AccessFormat, Facts};
use rotate::{open_append, LogFile, Rotate};
use writer::{LineWriter, WriterGuard};

/// Lines the error log may have queued for its writer thread before new ones are dropped.
pub const QUEUE_LINES: usize = 64 * 1024;

/// Handles that must live as long as the logs are used (they flush on drop).
pub struct Logs {
    _guards: Vec<WorkerGuard>,
    _access_guard: Option<WriterGuard>,
    pub access: AccessLog,
    reopen: Vec<Arc<AtomicBool>>,
    dropped: Vec<ErrorCounter>,
    access_writer: Option<LineWriter>,
}

impl Logs {
    /// Asks every log file to be reopened at its next write (SIGUSR1).
    pub fn reopen(&self) {
        for r in &self.reopen {
            r.store(true, Ordering::Release);
        }
    }

    /// A reader of the lines dropped so far by all logs (their queues were full).
    pub fn dropped_lines(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let counters = self.dropped.clone();
        let access = self.access_writer.clone();
        move || {
            counters
                .iter()
                .map(|c| c.dropped_lines() as u64)
                .sum::<u64>()
                + access.as_ref().map_or(0, |w| w.dropped())
        }
    }
}

/// Checks that a log file can be opened for appending (a clear start-up error otherwise).
pub fn check_writable(target: &LogTarget, what: &str) -> Result<(), String> {
    if let LogTarget::File(p) = target {
        open_append(p).map_err(|e| format!("cannot open the {what} log {}: {e}", p.display()))?;
    }
    Ok(())
}

/// The error log's writer (tracing-appender's non-blocking channel: low volume).
fn error_writer_for(
    target: &LogTarget,
    rotate: Rotate,
    keep: usize,
    logs: &mut Logs,
) -> Option<NonBlocking> {
    let builder = || {
        NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(QUEUE_LINES)
    };
    let (nb, guard) = match target {
        LogTarget::Off => return None,
        LogTarget::Stdout => builder().finish(io::stdout()),
        LogTarget::Stderr => builder().finish(io::stderr()),
        LogTarget::File(p) => {
            let flag = Arc::new(AtomicBool::new(false));
            logs.reopen.push(flag.clone());
            builder().finish(LogFile::new(p.clone(), rotate, keep, flag))
        }
    };
    logs._guards.push(guard);
    logs.dropped.push(nb.error_counter());
    Some(nb)
}

/// The access log's writer (batching: see [`writer`]).
fn access_writer_for(
    target: &LogTarget,
    rotate: Rotate,
    keep: usize,
    logs: &mut Logs,
) -> Result<Option<LineWriter>, String> {
    let name = "gte-access-log";
    let spawned = match target {
        LogTarget::Off => return Ok(None),
        LogTarget::Stdout => LineWriter::spawn(io::stdout(), name),
        LogTarget::Stderr => LineWriter::spawn(io::stderr(), name),
        LogTarget::File(p) => {
            let flag = Arc::new(AtomicBool::new(false));
            logs.reopen.push(flag.clone());
            LineWriter::spawn(LogFile::new(p.clone(), rotate, keep, flag), name)
        }
    };
    let (w, guard) = spawned.map_err(|e| format!("cannot start the access log writer: {e}"))?;
    logs._access_guard = Some(guard);
    logs.access_writer = Some(w.clone());
    Ok(Some(w))
}

/// Sets up both logs. Fails (with the path) when a log file cannot be opened.
pub fn init(cfg: &LogConfig) -> Result<Logs, String> {
    check_writable(&cfg.error, "error")?;
    check_writable(&cfg.access, "access")?;
    let mut logs = Logs {
        _guards: Vec::new(),
        _access_guard: None,
        access: AccessLog::disabled(),
        reopen: Vec::new(),
        dropped: Vec::new(),
        access_writer: None,
    };
    let error = error_writer_for(&cfg.error, cfg.rotate, cfg.keep, &mut logs)
        .expect("the error log is never off");
    let access = access_writer_for(&cfg.access, cfg.rotate, cfg.keep, &mut logs)?;
    let subscriber = tracing_subscriber::fmt()
        .with_writer(error)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(cfg.level)
        .finish();
    // A second init (tests in one process) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(subscriber);
    logs.access = AccessLog::new(access, cfg.access_format.clone(), None);
    Ok(logs)
}

// ---------------------------------------------------------------------------------------------
// Access log and request metrics
// ---------------------------------------------------------------------------------------------

struct AccessInner {
    writer: Option<LineWriter>,
    format: AccessFormat,
    metrics: Option<Arc<Metrics>>,
}

/// The per-request hook: writes the access-log line and counts the request in the metrics.
/// Cheap to clone and to call from the request path; does nothing when both are off.
#[derive(Clone)]
pub struct AccessLog {
    inner: Option<Arc<AccessInner>>,
}

/// What one request's log line and metrics need, captured when the request arrives. Only the
/// parts the format uses are copied (a header for `%({name}i)s` only when the format names it).
pub struct AccessRecord {
    start: Instant,
    method: Method,
    line: Option<LineFacts>,
    meter: Option<Meter>,
}

struct LineFacts {
    remote: String,
    uri: Uri,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    authorization: Option<HeaderValue>,
    request_headers: Vec<Option<HeaderValue>>,
    response_headers: Vec<Option<HeaderValue>>,
}

/// The metrics side of a record: queue timing, the busy-slot count, and "cancelled" if the
/// record is dropped before its response was logged (the client went away).
struct Meter {
    metrics: Arc<Metrics>,
    queued_at: Option<Instant>,
    slot: Option<SlotMeter>,
    done: AtomicBool,
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Relaxed) {
            self.metrics.request_cancelled();
        }
    }
}

/// One busy worker slot in the metrics, counted until this is dropped: with the record when the
/// response is complete at once, or by whoever gives the slot back while the response is still
/// on its way to the client (see [`AccessRecord::take_slot_meter`]).
pub struct SlotMeter(Arc<Metrics>);

impl Drop for SlotMeter {
    fn drop(&mut self) {
        self.0.slot_released();
    }
}

impl AccessRecord {
    /// The request starts waiting for a worker slot.
    pub fn queue_enter(&mut self) {
        if let Some(m) = &mut self.meter {
            if m.slot.is_none() {
                m.queued_at = Some(Instant::now());
            }
        }
    }

    /// The request got a worker slot.
    pub fn queue_leave(&mut self) {
        if let Some(m) = &mut self.meter {
            if let Some(t) = m.queued_at.take() {
                m.metrics.slot_taken(t.elapsed());
                m.slot = Some(SlotMeter(m.metrics.clone()));
            }
        }
    }

    /// Hands the busy-slot count to whoever returns the slot: a streamed response's record
    /// lives until the client has it all, but its slot may go back long before.
    pub fn take_slot_meter(&mut self) -> Option<SlotMeter> {
        self.meter.as_mut()?.slot.take()
    }
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

impl AccessLog {
    /// An access log writing to `writer` (None: no access log) and counting into `metrics`.
    pub fn new(
        writer: Option<LineWriter>,
        format: AccessFormat,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        if writer.is_none() && metrics.is_none() {
            return AccessLog::disabled();
        }
        AccessLog {
            inner: Some(Arc::new(AccessInner {
                writer,
                format,
                metrics,
            })),
        }
    }

    pub fn disabled() -> Self {
        AccessLog { inner: None }
    }

    /// The same access log, also feeding `metrics`.
    pub fn with_metrics(&self, metrics: Option<Arc<Metrics>>) -> Self {
        let (writer, format) = match &self.inner {
            Some(i) => (i.writer.clone(), i.format.clone()),
            None => (None, AccessFormat::default()),
        };
        AccessLog::new(writer, format, metrics)
    }

    /// True when requests need a record (an access log or metrics are on).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Captures what the log line and the metrics of `req` will need. `remote` is the client
    /// address as trusted (X-Forwarded-For / X-Real-IP only from `forwarded_allow_ips`).
    pub fn begin<B>(&self, req: &Request<B>, remote: &str, start: Instant) -> Option<AccessRecord> {
        let inner = self.inner.as_ref()?;
        let line = inner.writer.as_ref().map(|_| {
            let f = &inner.format;
            let h = req.headers();
            let get = |want: bool, name: header::HeaderName| {
                if want {
                    h.get(name).cloned()
                } else {
                    None
                }
            };
            LineFacts {
                remote: remote.to_owned(),
                uri: req.uri().clone(),
                version: req.version(),
                referer: get(f.needs_referer, header::REFERER),
                user_agent: get(f.needs_user_agent, header::USER_AGENT),
                authorization: get(f.needs_authorization, header::AUTHORIZATION),
                request_headers: f
                    .request_headers
                    .iter()
                    .map(|n| h.get(n).cloned())
                    .collect(),
                response_headers: Vec::new(),
            }
        });
        let meter = inner.metrics.as_ref().map(|m| Meter {
            metrics: m.clone(),
            queued_at: None,
            slot: None,
            done: AtomicBool::new(false),
        });
        Some(AccessRecord {
            start,
            method: req.method().clone(),
            line,
            meter,
        })
    }

    /// Keeps the response headers the format names (`%({name}o)s`); free otherwise.
    pub fn capture_response(&self, record: &mut Option<AccessRecord>, headers: &HeaderMap) {
        let (Some(inner), Some(r)) = (&self.inner, record.as_mut()) else {
            return;
        };
        if inner.format.response_headers.is_empty() {
            return;
        }
        if let Some(line) = &mut r.line {
            line.response_headers = inner
                .format
                .response_headers
                .iter()
                .map(|n| headers.get(n).cloned())
                .collect();
        }
    }

    /// The response is complete (or failed): write the line, count the request.
    pub fn log(&self, r: &AccessRecord, status: u16, bytes: u64, worker_pid: Option<u32>) {
        let Some(inner) = &self.inner else { return };
        let elapsed = r.start.elapsed();
        if let Some(m) = &r.meter {
            m.done.store(true, Ordering::Relaxed);
            m.metrics.request_done(&r.method, status, bytes, elapsed);
        }
        let (Some(w), Some(l)) = (&inner.writer, &r.line) else {
            return;
        };
        let facts = Facts {
            remote: &l.remote,
            method: &r.method,
            uri: &l.uri,
            version: l.version,
            status,
            bytes,
            elapsed,
            worker_pid,
            referer: l.referer.as_ref(),
            user_agent: l.user_agent.as_ref(),
            authorization: l.authorization.as_ref(),
            request_headers: &l.request_headers,
            response_headers: &l.response_headers,
            now: SystemTime::now(),
        };
        LINE.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            inner.format.render(&mut buf, &facts);
            w.write_line(buf.as_bytes());
            if buf.capacity() > 64 * 1024 {
                *buf = String::with_capacity(512);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_captures_only_what_the_format_uses() {
        let fmt = AccessFormat::parse("%(h)s %({x-req}i)s %({x-out}o)s").unwrap();
        let (w, _guard) = LineWriter::spawn(io::sink(), "t").unwrap();
        let log = AccessLog::new(Some(w), fmt, None);
        let req = Request::builder()
            .uri("/p")
            .header("x-req", "r1")
            .header("user-agent", "ua")
            .body(())
            .unwrap();
        let mut rec = log.begin(&req, "1.2.3.4", Instant::now());
        let line = rec.as_ref().unwrap().line.as_ref().unwrap();
        assert!(line.user_agent.is_none() && line.referer.is_none());
        assert_eq!(
            line.request_headers,
            vec![Some(HeaderValue::from_static("r1"))]
        );
        let mut resp = HeaderMap::new();
        resp.insert("x-out", HeaderValue::from_static("o1"));
        log.capture_response(&mut rec, &resp);
        let line = rec.as_ref().unwrap().line.as_ref().unwrap();
        assert_eq!(
            line.response_headers,
            vec![Some(HeaderValue::from_static("o1"))]
        );
        assert!(AccessLog::disabled()
            .begin(&req, "x", Instant::now())
            .is_none());
    }

    /// Per-request cost of the hook: `cargo test --release --lib hook_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hook_cost() {
        let req = Request::builder()
            .uri("/embed?lang=zh")
            .header("user-agent", "bench/1.0")
            .header("referer", "http://example/")
            .body(())
            .unwrap();
        let n = 1_000_000u32;
        let run = |label: &str, log: &AccessLog| {
            let t = Instant::now();
            for _ in 0..n {
                let mut r = log.begin(&req, "127.0.0.1", Instant::now());
                if let Some(r) = r.as_mut() {
                    r.queue_enter();
                    r.queue_leave();
                }
                if let Some(r) = &r {
                    log.log(r, 200, 1234, Some(4242));
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!("{label:<32} {ns:>7.0} ns/request");
        };
        let metrics = Some(Arc::new(Metrics::new(1)));
        let writer = || {
            let (w, guard) = LineWriter::spawn(io::sink(), "bench").unwrap();
            std::mem::forget(guard);
            Some(w)
        };
        run("off (no record)", &AccessLog::disabled());
        {
            // The parts: rendering a line, and handing a line to the writer thread.
            let rec = AccessLog::new(writer(), AccessFormat::default(), None)
                .begin(&req, "127.0.0.1", Instant::now())
                .unwrap();
            let l = rec.line.as_ref().unwrap();
            let fmt = AccessFormat::default();
            let mut buf = String::new();
            let t = Instant::now();
            for _ in 0..n {
                buf.clear();
                let facts = Facts {
                    remote: &l.remote,
                    method: &rec.method,
                    uri: &l.uri,
                    version: l.version,
                    status: 200,
                    bytes: 1234,
                    elapsed: rec.start.elapsed(),
                    worker_pid: Some(4242),
                    referer: l.referer.as_ref(),
                    user_agent: l.user_agent.as_ref(),
                    authorization: None,
                    request_headers: &[],
                    response_headers: &[],
                    now: SystemTime::now(),
                };
                fmt.render(&mut buf, &facts);
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!("{:<32} {ns:>7.0} ns/request", "  render only (default)");
            let w = writer().unwrap();
            let t = Instant::now();
            for _ in 0..n {
                w.write_line(buf.as_bytes());
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!("{:<32} {ns:>7.0} ns/request", "  hand-off only");
        }
        run(
            "metrics only",
            &AccessLog::new(None, AccessFormat::default(), metrics.clone()),
        );
        run(
            "access log (default format)",
            &AccessLog::new(writer(), AccessFormat::default(), None),
        );
        let json = AccessFormat::parse("json").unwrap();
        run("access log (json)", &AccessLog::new(writer(), json, None));
        run(
            "access log + metrics",
            &AccessLog::new(writer(), AccessFormat::default(), metrics),
        );
    }

    #[test]
    fn metrics_count_done_cancelled_and_busy() {
        let m = Arc::new(Metrics::new(1));
        let log = AccessLog::new(None, AccessFormat::default(), Some(m.clone()));
        let req = Request::builder().uri("/").body(()).unwrap();
        let mut a = log.begin(&req, "x", Instant::now()).unwrap();
        assert!(a.line.is_none(), "no access log: no line facts");
        a.queue_enter();
        a.queue_leave();
        log.log(&a, 200, 3, Some(1));
        drop(a);
        let b = log.begin(&req, "x", Instant::now()).unwrap();
        drop(b); // never answered: cancelled
        let text = m.render(crate::metrics::Sample::default());
        assert!(
            text.contains("gte_requests_total{method=\"GET\",status=\"2xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("gte_requests_cancelled_total 1"), "{text}");
        assert!(
            text.contains("gte_worker_slots{state=\"busy\"} 0"),
            "{text}"
        );
        assert!(text.contains("gte_queue_wait_seconds_count 1"), "{text}");
    }
}
