//! Prometheus metrics, served on their own listener (`metrics = "127.0.0.1:9191"`, never the
//! public one) in the OpenMetrics text format, through the `prometheus-client` crate.
//!
//! The request path pays a handful of atomic increments per request: the counters of every
//! (method, status class) pair are registered up front and kept in a fixed table, so counting a
//! request is an index and a `fetch_add`, never a label lookup; the two histograms take an
//! uncontended lock each. Everything else is sampled when Prometheus scrapes: queue depth, ready
//! workers, busy and idle slots, worker RSS (read from /proc through `sysinfo`, only for the
//! workers alive at that moment), uptime, dropped log lines.
//!
//! Depends only on `config`; what it samples from the proxy comes in through a [`Sample`]
//! closure, and the master reports worker lifecycle through three small hooks.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Methods with their own label value; anything else is `OTHER`.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Latency buckets (seconds): 1 ms … 60 s, dense where model inference lives.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 60.0,
];
/// Queue-wait buckets (seconds): 100 µs … 30 s.
const QUEUE_BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

type Labels2 = [(&'static str, &'static str); 2];
type Labels1 = [(&'static str, &'static str); 1];
type WorkerLabel = [(&'static str, String); 1];
type ProcessLabel = [(&'static str, String); 1];

/// What the scrape samples from the proxy and the logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    /// Requests waiting for an idle worker slot.
    pub queued: usize,
    /// Workers ready (serving).
    pub ready_workers: usize,
    /// Log lines dropped because the writer could not keep up (all log files).
    pub dropped_log_lines: u64,
}

/// A closure that reads a [`Sample`]; `main` builds it from the proxy's shared state.
pub type Sampler = Box<dyn Fn() -> Sample + Send + Sync>;

/// All metrics of one master.
pub struct Metrics {
    registry: Registry,
    /// `[method][status class]`.
    requests: Vec<[Counter; 5]>,
    duration: Histogram,
    queue_wait: Histogram,
    response_bytes: Counter,
    cancelled: Counter,
    restarts: Family<Labels1, Counter>,
    queue_depth: Gauge,
    workers_ready: Gauge,
    slots: Family<Labels1, Gauge>,
    worker_rss: Family<WorkerLabel, Gauge>,
    process_up: Family<ProcessLabel, Gauge>,
    process_restarts: Family<ProcessLabel, Counter>,
    uptime: Gauge<f64, AtomicU64>,
    generation: Gauge,
    dropped_log_lines: Counter,
    dropped_seen: AtomicU64,
    /// Requests holding a worker slot now (live, not sampled).
    busy: AtomicI64,
    slots_per_worker: AtomicUsize,
    started: Instant,
    /// Live workers (id → pid), kept by the master's hooks, for the RSS sample.
    workers: Mutex<BTreeMap<u64, u32>>,
    sys: Mutex<sysinfo::System>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric; `slots_per_worker` is the concurrency of one worker (1 for sync
    /// workers, even when pipelining lets a second request wait in their socket).
    pub fn new(slots_per_worker: usize) -> Self {
        let mut registry = Registry::default();
        let requests_family = Family::<Labels2, Counter>::default();
        registry.register(
            "gte_requests",
            "Requests answered, by method and status class (the master's own readiness path excluded)",
            requests_family.clone(),
        );
        let requests: Vec<[Counter; 5]> = METHODS
            .iter()
            .map(|m| {
                CLASSES
                    .map(|c| requests_family.get_or_create_owned(&[("method", *m), ("status", c)]))
            })
            .collect();
        let duration = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "gte_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            duration.clone(),
        );
        let queue_wait = Histogram::new(QUEUE_BUCKETS);
        registry.register(
            "gte_queue_wait_seconds",
            "Time requests waited for an idle worker slot",
            queue_wait.clone(),
        );
        let response_bytes = Counter::default();
        registry.register(
            "gte_response_bytes",
            "Response body bytes sent to clients",
            response_bytes.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "gte_requests_cancelled",
            "Requests whose client went away before the response was complete (not in gte_requests)",
            cancelled.clone(),
        );
        let restarts = Family::<Labels1, Counter>::default();
        registry.register(
            "gte_worker_restarts",
            "Worker processes that exited, by reason (max_requests, memory, reload, timeout, crash, health, resize, stop)",
            restarts.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "gte_queue_depth",
            "Requests waiting for an idle worker slot",
            queue_depth.clone(),
        );
        let workers_ready = Gauge::default();
        registry.register(
            "gte_workers_ready",
            "Worker processes ready to serve",
            workers_ready.clone(),
        );
        let slots = Family::<Labels1, Gauge>::default();
        registry.register(
            "gte_worker_slots",
            "Worker request slots (one per sync worker, threads per threaded worker), busy or idle",
            slots.clone(),
        );
        let worker_rss = Family::<WorkerLabel, Gauge>::default();
        registry.register(
            "gte_worker_rss_bytes",
            "Resident memory of each live worker process, sampled at scrape time",
            worker_rss.clone(),
        );
        let process_up = Family::<ProcessLabel, Gauge>::default();
        registry.register(
            "gte_process_up",
            "1 while a [[process]] is running and ready, 0 otherwise",
            process_up.clone(),
        );
        let process_restarts = Family::<ProcessLabel, Counter>::default();
        registry.register(
            "gte_process_restarts",
            "Restarts of each [[process]] (by its restart policy, health check, restart NAME or reload)",
            process_restarts.clone(),
        );
        let uptime = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "gte_master_uptime_seconds",
            "Seconds since the master started",
            uptime.clone(),
        );
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        registry.register(
            "gte_master_start_time_seconds",
            "Unix time the master started",
            start_time,
        );
        let generation = Gauge::default();
        generation.set(1);
        registry.register(
            "gte_config_generation",
            "Configuration generation: 1 at start, +1 on every successful reload (SIGHUP)",
            generation.clone(),
        );
        let dropped_log_lines = Counter::default();
        registry.register(
            "gte_log_dropped_lines",
            "Log lines dropped because the log writer's bounded buffer was full",
            dropped_log_lines.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            queue_wait,
            response_bytes,
            cancelled,
            restarts,
            queue_depth,
            workers_ready,
            slots,
            worker_rss,
            process_up,
            process_restarts,
            uptime,
            generation,
            dropped_log_lines,
            dropped_seen: AtomicU64::new(0),
            busy: AtomicI64::new(0),
            slots_per_worker: AtomicUsize::new(slots_per_worker.max(1)),
            started: Instant::now(),
            workers: Mutex::new(BTreeMap::new()),
            sys: Mutex::new(sysinfo::System::new()),
        }
    }

    // --- request path -------------------------------------------------------------------

    /// A request got its answer (any status, also the proxy's own 502/503/504).
    pub fn request_done(&self, method: &Method, status: u16, bytes: u64, elapsed: Duration) {
        let m = match *method {
            Method::GET => 0,
            Method::HEAD => 1,
            Method::POST => 2,
            Method::PUT => 3,
            Method::DELETE => 4,
            Method::PATCH => 5,
            Method::OPTIONS => 6,
            _ => 7,
        };
        let c = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[m][c].inc();
        self.duration.observe(elapsed.as_secs_f64());
        if bytes > 0 {
            self.response_bytes.inc_by(bytes);
        }
    }

    /// A request's client left before its response was complete.
    pub fn request_cancelled(&self) {
        self.cancelled.inc();
    }

    /// A request waited `d` for a slot and now holds one.
    pub fn slot_taken(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that held a slot is finished.
    pub fn slot_released(&self) {
        self.busy.fetch_sub(1, Ordering::Relaxed);
    }

    // --- master hooks -------------------------------------------------------------------

    /// A worker process was started.
    pub fn worker_spawned(&self, id: u64, pid: u32) {
        if let Ok(mut w) = self.workers.lock() {
            w.insert(id, pid);
        }
    }

    /// A worker process exited; `reason` is the master's word for why.
    pub fn worker_exited(&self, id: u64, reason: &'static str) {
        if let Ok(mut w) = self.workers.lock() {
            w.remove(&id);
        }
        self.restarts.get_or_create(&[("reason", reason)]).inc();
    }

    /// A `[[process]]` became ready (`up`) or stopped being so.
    pub fn process_up(&self, name: &str, up: bool) {
        self.process_up
            .get_or_create(&[("process", name.to_string())])
            .set(up as i64);
    }

    /// A `[[process]]` was restarted `n` more times.
    pub fn process_restarted(&self, name: &str, n: u64) {
        self.process_restarts
            .get_or_create(&[("process", name.to_string())])
            .inc_by(n);
    }

    /// The configuration was reloaded.
    pub fn config_reloaded(&self, generation: u64, slots_per_worker: usize) {
        self.generation.set(generation as i64);
        self.slots_per_worker
            .store(slots_per_worker.max(1), Ordering::Relaxed);
    }

    // --- scrape -------------------------------------------------------------------------

    /// Samples the gauges and encodes everything (OpenMetrics text).
    pub fn render(&self, sample: Sample) -> String {
        self.queue_depth.set(sample.queued as i64);
        self.workers_ready.set(sample.ready_workers as i64);
        let busy = self.busy.load(Ordering::Relaxed).max(0);
        let total = (sample.ready_workers * self.slots_per_worker.load(Ordering::Relaxed)) as i64;
        self.slots.get_or_create(&[("state", "busy")]).set(busy);
        self.slots
            .get_or_create(&[("state", "idle")])
            .set((total - busy).max(0));
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let seen = self
            .dropped_seen
            .swap(sample.dropped_log_lines, Ordering::Relaxed);
        if sample.dropped_log_lines > seen {
            self.dropped_log_lines
                .inc_by(sample.dropped_log_lines - seen);
        }
        self.sample_rss();
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn sample_rss(&self) {
        let workers: Vec<(u64, u32)> = match self.workers.lock() {
            Ok(w) => w.iter().map(|(k, v)| (*k, *v)).collect(),
            Err(_) => return,
        };
        self.worker_rss.clear();
        let Ok(mut sys) = self.sys.lock() else {
            return;
        };
        let pids: Vec<sysinfo::Pid> = workers
            .iter()
            .map(|(_, p)| sysinfo::Pid::from_u32(*p))
            .collect();
        sys.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&pids),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        for (id, pid) in workers {
            // A worker that has exited but is not reaped yet shows 0: leave it out.
            if let Some(p) = sys
                .process(sysinfo::Pid::from_u32(pid))
                .filter(|p| p.memory() > 0)
            {
                self.worker_rss
                    .get_or_create(&[("worker", id.to_string())])
                    .set(p.memory() as i64);
            }
        }
    }
}

/// Binds the metrics listener (before the runtime starts, like the public one).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>, sampler: Sampler) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics listener unusable; metrics are off");
            return;
        }
    };
    let sampler: Arc<Sampler> = Arc::new(sampler);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let sampler = sampler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = answer(&req, &metrics, &sampler);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

fn answer<B>(req: &Request<B>, metrics: &Metrics, sampler: &Sampler) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let body = metrics.render(sampler());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_series() {
        let m = Metrics::new(1);
        m.request_done(&Method::GET, 200, 10, Duration::from_millis(3));
        m.request_done(&Method::GET, 204, 0, Duration::from_millis(3));
        m.request_done(&Method::POST, 503, 5, Duration::from_secs(2));
        m.request_done(
            &Method::from_bytes(b"PROPFIND").unwrap(),
            404,
            0,
            Duration::ZERO,
        );
        m.slot_taken(Duration::from_millis(1));
        m.worker_spawned(1, std::process::id());
        m.worker_exited(7, "max_requests");
        m.config_reloaded(3, 1);
        let text = m.render(Sample {
            queued: 4,
            ready_workers: 2,
            dropped_log_lines: 5,
        });
        for want in [
            "gte_requests_total{method=\"GET\",status=\"2xx\"} 2",
            "gte_requests_total{method=\"POST\",status=\"5xx\"} 1",
            "gte_requests_total{method=\"OTHER\",status=\"4xx\"} 1",
            "gte_requests_total{method=\"PUT\",status=\"2xx\"} 0",
            "gte_request_duration_seconds_count 4",
            "gte_response_bytes_total 15",
            "gte_queue_depth 4",
            "gte_workers_ready 2",
            "gte_worker_slots{state=\"busy\"} 1",
            "gte_worker_slots{state=\"idle\"} 1",
            "gte_worker_restarts_total{reason=\"max_requests\"} 1",
            "gte_config_generation 3",
            "gte_log_dropped_lines_total 5",
            "gte_worker_rss_bytes{worker=\"1\"} ",
            "gte_master_uptime_seconds ",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
