//! The public side: the listener, one hyper HTTP/1.1 connection task per client, and the
//! per-request handler that reads the request body, takes an idle worker slot and forwards.
//! Nothing here waits on the master task: the handler reads a shared snapshot of the settings and
//! takes slots from the [`pool::IdlePool`]; it tells the master about trouble with events.

pub mod body;
pub mod http;
pub mod pool;
pub mod probe;
pub mod route;
pub mod stall;
pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::http::header::{self, HeaderValue};
use ::http::{Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use wire::Piece;

use crate::config::{AppKind, Config};
use crate::logging::{AccessLog, AccessRecord};
use crate::worker::protocol::{self, RequestFacts, ServerInfo, TrustedProxies};
pub use body::ProxyBody;
use pool::IdlePool;

/// Settings the request path reads; replaced as a whole on reload.
#[derive(Debug)]
pub struct Settings {
    pub limit_request_body: u64,
    /// Request bodies longer than this are spooled to a file in `body_temp_dir`.
    pub body_buffer_size: usize,
    pub body_temp_dir: std::path::PathBuf,
    pub ready_path: String,
    pub trusted: TrustedProxies,
    pub server: ServerInfo,
    pub wsgi: bool,
    pub keepalive: Duration,
    /// Longest wait for the next piece of a request body (`[workers] timeout`): 408 after it.
    pub body_timeout: Duration,
    /// Longest wait in the queue (`[workers] queue_timeout`, at least the request's timeout).
    pub queue_timeout: Duration,
    pub limit_request_header: usize,
    pub limit_request_fields: usize,
    pub limit_request_line: usize,
    pub limit_request_field_size: usize,
    /// Per-path-prefix timeouts, longest prefix first.
    pub path_timeouts: Vec<(String, Duration)>,
    /// False when there is no `[app]`: only routes are served.
    pub pool: bool,
    /// Path prefixes routed to `[[process]]` addresses, longest first.
    pub routes: Vec<(String, SocketAddr)>,
}

impl Settings {
    /// The timeout for `path` when a `path_timeouts` prefix matches it.
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        self.path_timeouts
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, d)| *d)
    }

    pub fn from_config(cfg: &Config) -> Self {
        Settings {
            limit_request_body: cfg.limit_request_body,
            body_buffer_size: cfg.body_buffer_size,
            body_temp_dir: cfg.body_temp_dir.clone(),
            ready_path: cfg.ready_path.clone(),
            trusted: TrustedProxies::new(&cfg.forwarded_allow_ips),
            server: ServerInfo {
                name: cfg.bind.ip().to_string(),
                port: cfg.bind.port().to_string(),
            },
            wsgi: matches!(cfg.app.kind, AppKind::Wsgi { .. }),
            keepalive: cfg.workers.keepalive,
            body_timeout: cfg.workers.timeout,
            queue_timeout: cfg.workers.queue_timeout,
            limit_request_header: cfg.limit_request_header,
            limit_request_fields: cfg.limit_request_fields,
            limit_request_line: cfg.limit_request_line,
            limit_request_field_size: cfg.limit_request_field_size,
            path_timeouts: cfg.workers.path_timeouts.clone(),
            pool: cfg.pool,
            routes: cfg
                .routes
                .iter()
                .map(|r| (r.prefix.clone(), r.addr))
                .collect(),
        }
    }
}

/// State shared by the request path and the master.
pub struct Shared {
    pub pool: IdlePool,
    pub settings: RwLock<Arc<Settings>>,
    /// Workers ready and not retiring (for the readiness path).
    pub ready_workers: AtomicUsize,
    /// Access log + per-request metrics hook.
    pub access: AccessLog,
    /// Prometheus metrics (`metrics = "host:port"`); the master reports worker lifecycle here.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    open_connections: AtomicUsize,
    connections_gone: Notify,
    /// Set when the listener closes for a stop: responses then carry `Connection: close`.
    stopping: std::sync::atomic::AtomicBool,
    /// Every `[[process]]` is ready (the readiness path uses it when there is no pool).
    pub processes_ready: std::sync::atomic::AtomicBool,
    /// Bytes of responses waiting in spool files for slow clients (see `wire::Spool`).
    pub spooled: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    pub fn new(cfg: &Config, access: AccessLog) -> Self {
        let metrics = cfg.metrics.map(|_| {
            Arc::new(crate::metrics::Metrics::new(
                cfg.workers.concurrency(&cfg.app.kind),
            ))
        });
        Shared {
            pool: IdlePool::new(cfg.workers.queue),
            settings: RwLock::new(Arc::new(Settings::from_config(cfg))),
            ready_workers: AtomicUsize::new(0),
            access: access.with_metrics(metrics.clone()),
            metrics,
            open_connections: AtomicUsize::new(0),
            connections_gone: Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            processes_ready: std::sync::atomic::AtomicBool::new(false),
            spooled: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Longest wait in the queue for a request whose own timeout is `timeout` (None: the
    /// workers' `timeout`): `queue_timeout`, or that timeout if it is longer.
    pub fn queue_limit(&self, timeout: Option<Duration>) -> Duration {
        let s = self.settings();
        s.queue_timeout.max(timeout.unwrap_or(s.body_timeout))
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .map(|s| Arc::clone(&s))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    pub fn set_settings(&self, s: Settings) {
        match self.settings.write() {
            Ok(mut g) => *g = Arc::new(s),
            Err(p) => *p.into_inner() = Arc::new(s),
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::SeqCst)
    }

    /// An error response the proxy produced itself (no worker involved), logged.
    pub fn reject(&self, status: StatusCode, record: Option<AccessRecord>) -> Response<ProxyBody> {
        let resp = error_response(status);
        if let Some(r) = &record {
            let len = match resp.body() {
                ProxyBody::Full(Some(b)) => b.len() as u64,
                _ => 0,
            };
            self.access.log(r, status.as_u16(), len, None);
        }
        resp
    }

    /// [`reject`](Self::reject), and the connection closed after the answer: for a request
    /// whose framing or size the client and we may disagree on.
    pub fn reject_closing(
        &self,
        status: StatusCode,
        record: Option<AccessRecord>,
    ) -> Response<ProxyBody> {
        let mut r = self.reject(status, record);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// nginx's "client closed request": a request dropped unsent because its client left while it
/// waited for a worker (logged; nobody reads the response).
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// A short plain-text error: never a traceback, a path or a version.
pub fn error_response(status: StatusCode) -> Response<ProxyBody> {
    let text = match status {
        CLIENT_CLOSED => "",
        StatusCode::BAD_REQUEST => "Bad Request\n",
        StatusCode::NOT_FOUND => "Not Found\n",
        StatusCode::REQUEST_TIMEOUT => "Request Timeout\n",
        StatusCode::EXPECTATION_FAILED => "Expectation Failed\n",
        StatusCode::PAYLOAD_TOO_LARGE => "Payload Too Large\n",
        StatusCode::INTERNAL_SERVER_ERROR => "Internal Server Error\n",
        StatusCode::BAD_GATEWAY => "Bad Gateway\n",
        StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable\n",
        StatusCode::GATEWAY_TIMEOUT => "Gateway Timeout\n",
        StatusCode::NOT_IMPLEMENTED => "Not Implemented\n",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "Request Header Fields Too Large\n",
        _ => "Error\n",
    };
    let mut r = Response::new(ProxyBody::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == CLIENT_CLOSED {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The status for a request whose framing or target hyper accepts but the HTTP RFCs do not
/// (None for a sound one):
/// - Host: an HTTP/1.1 request without one, any request with two, or one that is not a host
///   and port: 400 (RFC 9112 §3.2);
/// - Transfer-Encoding: chunked more than once: 400; a coding other than chunked: 501 (§6.1),
///   instead of handing the app a still-encoded body. (With a Content-Length too, hyper
///   drops the Content-Length, reads the body as chunked and closes the connection after the
///   answer, as §6.3 asks.)
/// - `*` as the target of anything but OPTIONS: 400 (§3.2.4);
/// - CONNECT, which asks an origin server for a tunnel: 501.
pub fn message_error<B>(req: &Request<B>) -> Option<StatusCode> {
    let headers = req.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == ::http::Version::HTTP_11 => {
            return Some(StatusCode::BAD_REQUEST)
        }
        (Some(_), Some(_)) => return Some(StatusCode::BAD_REQUEST),
        (Some(h), None) if !valid_host(h.as_bytes()) => return Some(StatusCode::BAD_REQUEST),
        _ => {}
    }
    // RFC 9110 §4.2.4: user info in a target ("GET http://user@host/") is treated as an error,
    // as it is in Host.
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Some(StatusCode::BAD_REQUEST);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let mut codings = 0;
        let mut chunked = 0;
        for value in headers.get_all(header::TRANSFER_ENCODING) {
            for coding in value.as_bytes().split(|&c| c == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                codings += 1;
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked += 1;
                }
            }
        }
        if chunked < codings {
            return Some(StatusCode::NOT_IMPLEMENTED);
        }
        if chunked != 1 {
            return Some(StatusCode::BAD_REQUEST);
        }
    }
    if req.method() == ::http::Method::CONNECT {
        return Some(StatusCode::NOT_IMPLEMENTED);
    }
    // RFC 9110 §10.1.1: an expectation other than 100-continue (which hyper answers) may get 417;
    // gunicorn answers it so, rather than proceed as if it had been met.
    for v in headers.get_all(header::EXPECT) {
        if !v
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"100-continue")
        {
            return Some(StatusCode::EXPECTATION_FAILED);
        }
    }
    let uri = req.uri();
    if uri == "*" {
        if req.method() != ::http::Method::OPTIONS {
            return Some(StatusCode::BAD_REQUEST);
        }
    } else if uri.scheme().is_none() && !uri.path().starts_with('/') {
        // RFC 9112 §3.2: an origin server takes origin-form ("/path"), absolute-form
        // ("http://host/path"), "*" for OPTIONS, and authority-form only for CONNECT (answered
        // above). hyper also lets through "abc" or "host:80" for a GET, which would reach the app
        // as an empty PATH_INFO (Flask serves "/" for it); gunicorn answers 400 too.
        return Some(StatusCode::BAD_REQUEST);
    }
    None
}

/// A request body as it arrives, kept in memory up to `body_buffer_size` bytes and beyond that
/// written to a spool file (as nginx's `client_body_buffer_size` / `client_body_temp_path`), so
/// that a thousand large uploads cost the master disk, not a thousand buffers of memory.
///
/// In memory, the first piece is kept as it is (a body in one piece, the usual case, costs no
/// copy); from the second on, the pieces are copied into one buffer. Each piece hyper hands over
/// shares its read buffer, so keeping a thousand one-byte pieces would keep a thousand buffers: a
/// 400 KB body sent in 1-byte segments had cost the master 930 MiB.
struct BodyBuf<'a> {
    first: Option<Bytes>,
    rest: bytes::BytesMut,
    /// The Content-Length (0 if none), already checked against the limit.
    announced: usize,
    /// Once the body outgrew `in_memory`: the file it is written to, and its length.
    spool: Option<(std::fs::File, u64)>,
    in_memory: usize,
    temp_dir: &'a std::path::Path,
}

impl<'a> BodyBuf<'a> {
    fn new(announced: usize, settings: &'a Settings) -> Self {
        BodyBuf {
            first: None,
            rest: bytes::BytesMut::new(),
            announced,
            spool: None,
            in_memory: settings.body_buffer_size,
            temp_dir: &settings.body_temp_dir,
        }
    }

    fn push(&mut self, data: Bytes) -> std::io::Result<()> {
        use std::io::Write;
        if data.is_empty() {
            return Ok(());
        }
        if let Some((file, len)) = self.spool.as_mut() {
            file.write_all(&data)?;
            *len += data.len() as u64;
            return Ok(());
        }
        let held = self.first.as_ref().map_or(0, Bytes::len) + self.rest.len();
        if held + data.len() > self.in_memory || self.announced > self.in_memory {
            let mut file = spool_file(self.temp_dir)?;
            let first = self.first.take().unwrap_or_default();
            let rest = std::mem::take(&mut self.rest);
            let mut len = 0;
            for b in [&first[..], &rest[..], &data[..]] {
                file.write_all(b)?;
                len += b.len() as u64;
            }
            self.spool = Some((file, len));
            return Ok(());
        }
        if self.rest.is_empty() {
            let Some(first) = self.first.take() else {
                self.first = Some(data);
                return Ok(());
            };
            // The announced length sizes the buffer once, but at most 1 MiB of it up front: it
            // is only announced, and a client could announce `in_memory` (up to 1 GiB) and
            // trickle; beyond that the buffer grows with what arrives.
            self.rest
                .reserve(self.announced.min(1 << 20).max(first.len() + data.len()));
            self.rest.extend_from_slice(&first);
        }
        self.rest.extend_from_slice(&data);
        Ok(())
    }

    fn into_pieces(self) -> Vec<Piece> {
        if let Some((file, len)) = self.spool {
            return vec![Piece::File(Arc::new(file), len)];
        }
        match self.first {
            Some(first) => vec![Piece::Mem(first)],
            None if self.rest.is_empty() => Vec::new(),
            None => vec![Piece::Mem(self.rest.freeze())],
        }
    }
}

/// A new anonymous file in `dir` for a request body: `O_TMPFILE` (it has no name, so nothing is
/// left behind whatever happens to the master), or where the file system cannot do that a file
/// created under a random name and unlinked at once. Mode 0600.
pub fn spool_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let anonymous = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match anonymous {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {}
        r => return r,
    }
    loop {
        let path = dir.join(format!(".gte-body-{:016x}", rand::random::<u64>()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                // Unnamed from now on; should that fail, the file still serves, and the warning
                // names it for removal by hand.
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the name of a spool file");
                }
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// gunicorn's `secure_scheme_headers` default, believed from a trusted proxy: the request came
/// over HTTPS when `X-Forwarded-Proto: https`, `X-Forwarded-Ssl: on` or `X-Forwarded-Protocol:
/// ssl`. Headers that disagree (one says HTTPS, another says otherwise) are an error, answered
/// 400 as gunicorn answers them ("Contradictory scheme headers").
fn forwarded_scheme(headers: &::http::HeaderMap) -> Result<bool, ()> {
    const SECURE: [(&str, &[u8]); 3] = [
        ("x-forwarded-proto", b"https"),
        ("x-forwarded-ssl", b"on"),
        ("x-forwarded-protocol", b"ssl"),
    ];
    let mut said: Option<bool> = None;
    for (name, secure) in SECURE {
        for v in headers.get_all(name) {
            let this = v.as_bytes().trim_ascii().eq_ignore_ascii_case(secure);
            match said {
                Some(s) if s != this => return Err(()),
                _ => said = Some(this),
            }
        }
    }
    Ok(said.unwrap_or(false))
}

/// The status for a request head over the configured limits, as it was on the wire: 414 when
/// the request line is longer than `limit_request_line`, 431 when a header field line is longer
/// than `limit_request_field_size` or the whole head longer than `limit_request_header` (a 0
/// per-line limit is none). hyper's `max_buf_size` only bounds its read buffer, which grows in
/// steps and is checked only while the head is incomplete, so a head of up to about twice the
/// limit would get through. (Counted from the parsed request: method, target, version and one
/// `name: value` line per field, without CRLF; optional whitespace around values is not counted,
/// so this never overcounts.)
pub fn head_over_limits<B>(req: &Request<B>, settings: &Settings) -> Option<StatusCode> {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method().as_str().len() + 1 + target + 9;
    if settings.limit_request_line > 0 && line > settings.limit_request_line {
        return Some(StatusCode::URI_TOO_LONG);
    }
    let field_limit = match settings.limit_request_field_size {
        0 => usize::MAX,
        n => n,
    };
    let mut head = line + 2 + 2;
    for (n, v) in req.headers() {
        let field = n.as_str().len() + 2 + v.len();
        if field > field_limit {
            return Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        head += field + 2;
    }
    (head > settings.limit_request_header).then_some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty: registered-name and IP-literal
/// characters only, so no user info, path, space or control character.
fn valid_host(h: &[u8]) -> bool {
    h.iter().all(|&c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'%'
                    | b'['
                    | b']'
            )
    })
}

/// Handles one request.
pub async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    client: std::os::fd::RawFd,
    cut: Arc<tokio::sync::Notify>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = std::time::Instant::now();
    let settings = shared.settings();

    if req.uri().path() == settings.ready_path
        && (req.method() == ::http::Method::GET || req.method() == ::http::Method::HEAD)
    {
        let ready = if settings.pool {
            shared.ready_workers.load(Ordering::Relaxed)
        } else {
            shared.processes_ready.load(Ordering::Relaxed) as usize
        };
        let (status, text) = if ready > 0 {
            (StatusCode::OK, "OK\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "no worker ready\n")
        };
        let mut r = Response::new(ProxyBody::full(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(r);
    }

    let client_ip: Option<Vec<u8>> =
        protocol::forwarded_client(req.headers(), peer.ip(), &settings.trusted).map(<[u8]>::to_vec);
    let client_ip_string = match &client_ip {
        Some(ip) => String::from_utf8_lossy(ip).into_owned(),
        None => peer.ip().to_string(),
    };
    // Captures only what the access format and the metrics use (None when both are off).
    let record = shared.access.begin(&req, &client_ip_string, start);

    // What hyper lets through but RFC 9112 / 9110 do not: answered here, and the connection
    // closed after, since the client and we may disagree on where the next request starts.
    if let Some(status) = message_error(&req) {
        return Ok(shared.reject_closing(status, record));
    }

    // The limits hyper enforces only roughly or not at all (see `head_over_limits`): 414 for a
    // request line over limit_request_line (RFC 9112 §3, as nginx), 431 for a header field over
    // limit_request_field_size or a head over limit_request_header (as gunicorn and nginx); the
    // connection is closed.
    if let Some(status) = head_over_limits(&req, &settings) {
        return Ok(shared.reject_closing(status, record));
    }

    // Refuse an announced oversized body before reading any of it.
    let mut announced = 0;
    if let Some(cl) = req.headers().get(header::CONTENT_LENGTH) {
        match cl.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(n) if n > settings.limit_request_body => {
                return Ok(shared.reject_closing(StatusCode::PAYLOAD_TOO_LARGE, record));
            }
            Some(n) => announced = n as usize,
            None => return Ok(shared.reject(StatusCode::BAD_REQUEST, record)),
        }
    }

    if let Some(addr) = route::target(&settings.routes, req.uri().path()) {
        return Ok(route::forward(req, addr, client_ip_string, record, &shared).await);
    }
    if !settings.pool {
        return Ok(shared.reject(StatusCode::NOT_FOUND, record));
    }
    let timeout = settings.timeout_for(req.uri().path());
    if !settings.wsgi {
        return Ok(http::forward(&shared, req, client_ip_string, record, timeout).await);
    }

    let (parts, mut body) = req.into_parts();
    // Read the whole body first: a slow upload never holds a Python worker.
    let has_body = parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut read = BodyBuf::new(announced, &settings);
    let mut total: u64 = 0;
    if has_body {
        loop {
            // A client that sends nothing of its body for `timeout` is answered 408 and cut,
            // as nginx's client_body_timeout does (a gunicorn worker would have been killed).
            let frame = match tokio::time::timeout(settings.body_timeout, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(client = %client_ip_string, timeout_s = settings.body_timeout.as_secs_f64(), received = total, "request body stalled past the timeout; answered 408 and closed");
                    return Ok(shared.reject_closing(StatusCode::REQUEST_TIMEOUT, record));
                }
            };
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        total += data.len() as u64;
                        if total > settings.limit_request_body {
                            return Ok(shared.reject_closing(StatusCode::PAYLOAD_TOO_LARGE, record));
                        }
                        if let Err(e) = read.push(data) {
                            // nginx answers 500 when it cannot write its client_body_temp_path.
                            tracing::error!(dir = %settings.body_temp_dir.display(), error = %e, "cannot spool a request body to body_temp_dir; answered 500");
                            return Ok(
                                shared.reject_closing(StatusCode::INTERNAL_SERVER_ERROR, record)
                            );
                        }
                    }
                }
                Err(_) => return Ok(shared.reject(StatusCode::BAD_REQUEST, record)),
            }
        }
    }
    let body = read.into_pieces();
    let trusted_peer = settings.trusted.contains(peer.ip());
    let scheme = if trusted_peer {
        match forwarded_scheme(&parts.headers) {
            Ok(true) => "https",
            Ok(false) => "http",
            Err(()) => return Ok(shared.reject(StatusCode::BAD_REQUEST, record)),
        }
    } else {
        "http"
    };
    let facts = RequestFacts {
        method: &parts.method,
        uri: &parts.uri,
        version: parts.version,
        headers: &parts.headers,
        remote: peer,
        remote_ip_override: client_ip.as_deref(),
        scheme,
        trusted_peer,
        server: &settings.server,
        body_len: total,
        has_body,
    };
    let mut frame = Vec::with_capacity(256 + parts.headers.len() * 48);
    if protocol::encode_request(&mut frame, &facts).is_err() {
        return Ok(shared.reject(StatusCode::BAD_REQUEST, record));
    }
    // RFC 9110 §9.2.2: these may be sent again when the first worker died without answering.
    let idempotent = matches!(
        parts.method,
        ::http::Method::GET
            | ::http::Method::HEAD
            | ::http::Method::PUT
            | ::http::Method::DELETE
            | ::http::Method::OPTIONS
            | ::http::Method::TRACE
    );
    let head_request = parts.method == ::http::Method::HEAD;
    drop(parts);
    Ok(wire::forward(
        &shared,
        Bytes::from(frame),
        body,
        record,
        timeout,
        wire::RequestInfo {
            idempotent,
            head_request,
            client,
            cut,
        },
    )
    .await)
}

/// Binds the public listener.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(backlog)
}

/// Accepts clients until `stop` turns true, then waits (up to `grace`) for open connections to
/// finish their in-flight requests, and returns.
pub async fn serve(
    mut listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    grace_rx: watch::Receiver<Duration>,
    mut new_listener: tokio::sync::mpsc::UnboundedReceiver<TcpListener>,
) {
    loop {
        tokio::select! {
            Some(l) = new_listener.recv() => {
                // A reload changed `bind`: the new listener is already open; close the old one.
                listener = l;
            }
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    shared.open_connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve_connection(tcp, peer, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => {
                if *stop.borrow() { break; }
            }
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    drop(listener);
    let grace = *grace_rx.borrow();
    let wait = async {
        loop {
            let notified = shared.connections_gone.notified();
            if shared.open_connections.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    };
    if tokio::time::timeout(grace, wait).await.is_err() {
        tracing::warn!(
            open = shared.open_connections.load(Ordering::SeqCst),
            "graceful_timeout reached with requests still in flight"
        );
    }
}

struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.open_connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.connections_gone.notify_waiters();
        }
    }
}

/// How a client connection ended, as far as its closing goes.
#[derive(PartialEq, Eq)]
enum Ended {
    Other,
    /// The client read nothing for the whole timeout (`stall::StallGuard`).
    Stalled,
}

/// A request hyper refused before it became one (a malformed or oversized head: hyper answered
/// 400 / 414 / 431 and closed) has no access-log line; it gets a warning in the error log, as
/// gunicorn logs "Invalid request from ip=...". A client that read nothing of its answers for the
/// whole timeout gets one too. Other timeouts and clients that left are not logged.
fn log_refused(r: Result<(), hyper::Error>, peer: SocketAddr) -> Ended {
    if let Err(e) = r {
        if e.is_parse() || e.is_parse_too_large() {
            tracing::warn!(client = %peer.ip(), error = %e, "invalid request refused");
        } else if std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            tracing::warn!(client = %peer.ip(), "the client read nothing of its answers for the whole timeout; connection closed");
            return Ended::Stalled;
        }
    }
    Ended::Other
}

/// Makes the coming close of a client's socket a reset: dropping the connection then frees what
/// is queued for it, the unread response in the kernel's send queue too (a FIN would wait behind
/// it for a client that does not read, and the socket would stay).
fn reset_on_close(client: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `client` is the connection's socket, still open (its connection owns it until it is
    // dropped after this call); the option value is a valid `linger` of the size given.
    unsafe {
        libc::setsockopt(
            client,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _guard = ConnGuard(shared.clone());
    let settings = shared.settings();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(settings.limit_request_header.max(8192))
        .max_headers(settings.limit_request_fields)
        // A client may shut down its sending side once the request is out (`nc -N`, request
        // corpora, some HTTP/1.0 clients) and still read the answer, as gunicorn and uWSGI
        // give it. Without this hyper takes that end of file for a client that left and drops
        // the request. The cost: a client that really left is only noticed when its answer
        // cannot be written, so its request still runs (as under gunicorn).
        .half_close(true);
    if settings.keepalive.is_zero() {
        builder.keep_alive(false);
        builder.header_read_timeout(Duration::from_secs(30));
    } else {
        builder.header_read_timeout(settings.keepalive);
    }
    let linger = settings.keepalive;
    // A client that reads nothing of its answers for this long is cut (nginx's send_timeout).
    let send_timeout = settings.body_timeout;
    drop(settings);
    let svc_shared = shared.clone();
    let client = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    // Notified to close this connection at once: a client that stopped reading a response.
    let cut = Arc::new(tokio::sync::Notify::new());
    let svc_cut = cut.clone();
    let svc = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let cut = svc_cut.clone();
        async move {
            let mut r = handle(req, peer, client, cut, shared.clone()).await?;
            if shared.stopping.load(Ordering::Relaxed)
                && r.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(r)
        }
    });
    let conn = builder
        .serve_connection(TokioIo::new(stall::StallGuard::new(tcp, send_timeout)), svc)
        .with_upgrades();
    tokio::pin!(conn);
    if *stop.borrow() {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
        return;
    }
    tokio::select! {
        r = conn.as_mut() => {
            if log_refused(r, peer) == Ended::Stalled {
                reset_on_close(client);
            }
        }
        _ = cut.notified() => reset_on_close(client),
        _ = stop.changed() => {
            // Closing an idle keep-alive connection at once races with a request the client may
            // be sending on it. Instead let it carry one more request (answered with
            // `Connection: close`) or expire by its idle timeout; then shut down what is left.
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(linger) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
