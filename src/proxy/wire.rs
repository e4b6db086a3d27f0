//! Forwarding one request to a bundled WSGI worker over its unix socket (see
//! `src/python/PROTOCOL.md`). The request body has already been read in full by the master, so a
//! slow client never holds a Python worker. The response head is awaited under the per-request
//! deadline; a response that is complete in the first reads (the common case) is handed to hyper
//! as one buffer and the slot goes back at once; otherwise the body streams frame by frame.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body::Frame as BodyFrame;
use tokio::time::Instant;

use super::body::{BoxError, ProxyBody};
use super::pool::{QueueExit, SlotHold};
use super::{error_response, Shared, CLIENT_CLOSED};
use crate::event::Event;
use crate::logging::AccessRecord;
use crate::worker::protocol::{self, Frame};
use crate::worker::{Conn, Slot, WireConn};

pub use crate::worker::lane::{Piece, WireError};

/// Takes an idle slot with an open connection to its worker (connecting on first use).
async fn take_connected(
    shared: &Arc<Shared>,
    record: &mut Option<AccessRecord>,
    client: RawFd,
    timeout: Option<std::time::Duration>,
) -> Result<(Slot, WireConn), StatusCode> {
    let mut attempts = 0;
    if let Some(r) = record.as_mut() {
        r.queue_enter();
    }
    loop {
        let (slot, waited) = match shared
            .pool
            .acquire_watched(|| shared.queue_limit(timeout), || client_closed(client))
            .await
        {
            Ok(s) => s,
            Err(QueueExit::ClientGone) => {
                // See below; nginx's 499.
                tracing::debug!("the client closed the connection while its request waited for a worker; not sent");
                return Err(CLIENT_CLOSED);
            }
            Err(QueueExit::TimedOut) => {
                tracing::debug!("no worker became free within the request's timeout: 503");
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
            Err(QueueExit::Pool(_)) => return Err(StatusCode::SERVICE_UNAVAILABLE),
        };
        if let Some(r) = record.as_mut() {
            r.queue_leave();
        }
        if waited.is_some_and(|w| w >= CLIENT_CHECK_AFTER) && client_closed(client) {
            // It waited in the queue and its client has closed the connection meanwhile (a
            // client that timed out, nginx giving up): running it would only delay the requests
            // behind it. nginx does the same (`proxy_ignore_client_abort off`). Its access-log
            // line (499) says so; at info level an overload would write one error-log line per
            // abandoned request too.
            tracing::debug!(
                "the client closed the connection while its request waited for a worker; not sent"
            );
            shared.pool.release(slot);
            return Err(CLIENT_CLOSED);
        }
        let mut hold = SlotHold::new(&shared.pool, slot);
        match hold.get().wire_conn().await {
            Ok(c) => return Ok((hold.take(), c)),
            Err(e) => {
                // Nothing was sent: safe to try another worker.
                let slot = hold.take();
                slot.worker.report(Event::WorkerMisbehaved {
                    id: slot.worker.id,
                    what: format!("connect failed: {e}"),
                });
                drop(slot);
                attempts += 1;
                if attempts >= 3 {
                    return Err(StatusCode::BAD_GATEWAY);
                }
            }
        }
    }
}

/// A request that waited in the queue at least this long has its client checked before it is
/// sent. Under a steady load most requests wait a little (~1 ms at hello-world rates): a check
/// each would add a syscall to the hot path for clients that rarely leave that fast.
const CLIENT_CHECK_AFTER: std::time::Duration = std::time::Duration::from_millis(5);

/// Whether the client has closed its side of the connection: end of file (or a reset) is
/// waiting in the socket, seen without reading (`MSG_PEEK`).
fn client_closed(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: `fd` is the client socket of the connection this request belongs to, open for as
    // long as the request is being served; one byte is peeked into a local buffer.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && matches!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::ECONNRESET | libc::ENOTCONN | libc::EPIPE)
            ))
}

/// What [`forward`] needs to know about the request besides its frames.
pub struct RequestInfo {
    /// The request may be sent again to another worker if it was waiting behind another request
    /// (pipelining) on a worker that died before answering it.
    pub idempotent: bool,
    pub head_request: bool,
    /// The client's socket, to notice a client that left while its request waited in the queue.
    pub client: RawFd,
    /// Closes the client's connection (see `serve_connection`): for a client that stopped
    /// reading a streamed response.
    pub cut: Arc<tokio::sync::Notify>,
}

/// What one attempt at a request needs to know besides the slot, the connection and the record.
struct Attempt<'a> {
    /// The request may go to another worker if this one dies before answering it.
    may_resend: bool,
    /// It was sent ahead, behind another request on the same worker.
    queued_behind: bool,
    head_request: bool,
    client: ClientEnd<'a>,
}

/// The client's side of a request, for a streamed response: its socket (to see whether it is
/// still taking bytes) and the switch that closes its connection.
#[derive(Clone, Copy)]
struct ClientEnd<'a> {
    fd: RawFd,
    cut: &'a Arc<tokio::sync::Notify>,
}

/// Sends `request` (the `R` frame) and `body` to an idle bundled worker and returns the response.
pub async fn forward(
    shared: &Arc<Shared>,
    request: Bytes,
    body: Vec<Piece>,
    mut record: Option<AccessRecord>,
    timeout: Option<std::time::Duration>,
    info: RequestInfo,
) -> Response<ProxyBody> {
    let RequestInfo {
        idempotent,
        head_request,
        client,
        cut,
    } = info;
    let mut resent = false;
    let mut message = Some((request, body));
    loop {
        let (mut slot, mut conn) = match take_connected(shared, &mut record, client, timeout).await
        {
            Ok(x) => x,
            Err(status) => return shared.reject(status, record),
        };
        let (request, body) = message
            .take()
            .expect("kept for every attempt that may follow");
        // Kept in case it is sent ahead and its worker dies first (see `RequestInfo`).
        let kept = (idempotent && !resent && slot.worker.is_pipelined())
            .then(|| (request.clone(), body.clone()));
        // Sent ahead to a busy worker: it waits in the worker's socket behind another request.
        let queued_behind = conn.begin(request, body, kept.is_some());
        if queued_behind {
            message = kept;
        }
        let may_resend = message.is_some();
        if slot.worker.is_pipelined() {
            // Its service time decides whether it may be sent requests ahead.
            slot.sent_at = Some(std::time::Instant::now());
        }
        let attempt = Attempt {
            may_resend,
            queued_behind,
            head_request,
            client: ClientEnd {
                fd: client,
                cut: &cut,
            },
        };
        match exchange(shared, slot, conn, record, timeout, attempt).await {
            Exchange::Done(resp) => return resp,
            Exchange::Resend(r) => {
                resent = true;
                record = *r;
            }
        }
    }
}

/// How one attempt ended.
enum Exchange {
    Done(Response<ProxyBody>),
    /// The worker died before answering a request that was waiting behind another one: send it
    /// again (with its access record).
    Resend(Box<Option<AccessRecord>>),
}

async fn exchange(
    shared: &Arc<Shared>,
    slot: Slot,
    conn: WireConn,
    record: Option<AccessRecord>,
    timeout: Option<std::time::Duration>,
    attempt: Attempt<'_>,
) -> Exchange {
    let Attempt {
        may_resend,
        queued_behind,
        head_request,
        client,
    } = attempt;
    let timeout = timeout.unwrap_or(slot.worker.timeout);
    let mut deadline = Instant::now() + timeout;

    // If the client goes away while the worker works, the guard gives the answer up in the
    // background (see `give_up`) and returns the slot only when the worker is idle again.
    let mut inflight = InFlight {
        shared,
        parts: Some((slot, conn)),
    };
    if queued_behind {
        // The worker is busy: let the other requests of this scheduler tick queue theirs, so
        // that they all go out in one write and the worker reads them with one recv. (After the
        // guard: a request dropped here must not leave its ticket behind.)
        tokio::task::yield_now().await;
    }
    let head = {
        let (_, conn) = inflight.parts.as_mut().expect("parts present");
        if queued_behind {
            // Its clock starts when its turn comes, as if it had waited in the master: the
            // request ahead has a timeout of its own (and a stuck worker is killed by that one),
            // and a path timeout shorter than the run of the request ahead must not kill a worker
            // that is busy, not stuck.
            std::future::poll_fn(|cx| conn.poll_turn(cx)).await;
            deadline = Instant::now() + timeout;
        }
        tokio::time::timeout_at(deadline, conn.next_frame()).await
    };
    let (slot, conn) = inflight.parts.take().expect("parts present");
    let start = match head {
        Ok(Ok(Frame::Start(p))) => p,
        Ok(Ok(other)) => {
            return Exchange::Done(fail(
                shared,
                slot,
                &format!("expected a start frame, got {other:?}"),
                record,
            ))
        }
        Ok(Err(WireError::GivenUp)) => {
            // The response ahead of it was given up before its turn: the worker never read it
            // and is not at fault. Another worker takes it if it may go to one; else the client
            // is told it was not processed.
            let mut slot = slot;
            slot.conn = None;
            shared.pool.release(slot);
            if may_resend {
                tracing::debug!(
                    "the response ahead was given up; sending the request to another worker"
                );
                return Exchange::Resend(Box::new(record));
            }
            return Exchange::Done(shared.reject(StatusCode::SERVICE_UNAVAILABLE, record));
        }
        Ok(Err(e @ (WireError::Eof | WireError::Io(_)))) if may_resend => {
            tracing::warn!(worker = slot.worker.id, pid = slot.worker.pid(), error = %e, "the worker died with a request waiting behind another; sending that request to another worker");
            slot.worker.report(Event::WorkerMisbehaved {
                id: slot.worker.id,
                what: e.to_string(),
            });
            return Exchange::Resend(Box::new(record));
        }
        Ok(Err(e)) => return Exchange::Done(fail(shared, slot, &e.to_string(), record)),
        Err(_) => return Exchange::Done(timed_out(shared, slot, record)),
    };
    Exchange::Done(respond(
        shared,
        slot,
        conn,
        start,
        record,
        timeout,
        (head_request, client),
    ))
}

/// Builds the client's response from a worker's start frame: at once when the whole response is
/// already buffered, else streamed by a pump task.
fn respond(
    shared: &Arc<Shared>,
    mut slot: Slot,
    mut conn: WireConn,
    start: Bytes,
    mut record: Option<AccessRecord>,
    timeout: std::time::Duration,
    (head_request, client): (bool, ClientEnd<'_>),
) -> Response<ProxyBody> {
    let (status, reason, mut headers) = match protocol::parse_start(&start) {
        Ok(x) => x,
        Err(e) => return fail(shared, slot, &e.0, record),
    };
    // The body must match the app's Content-Length, or the client reads the next response
    // as the rest of this one (keep-alive): see `Declared`.
    let mut declared = Declared::of(&mut headers, status, head_request);
    shared.access.capture_response(&mut record, &headers);
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if let Some(r) = reason {
        if let Ok(rp) = hyper::ext::ReasonPhrase::try_from(r) {
            resp.extensions_mut().insert(rp);
        }
    }

    // Take whatever is already buffered: often the whole body and the end frame.
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    loop {
        match conn.take_buffered() {
            Ok(Some(Frame::Body(b))) => chunks.push_back(b),
            Ok(Some(Frame::End)) if conn.request_sent() => {
                let body = match chunks.len() {
                    0 => None,
                    1 => chunks.pop_front(),
                    _ => {
                        let mut all = BytesMut::with_capacity(chunks.iter().map(|c| c.len()).sum());
                        for c in chunks {
                            all.extend_from_slice(&c);
                        }
                        Some(all.freeze())
                    }
                };
                let pid = slot.worker.pid();
                finish(shared, slot, conn);
                let body = body.and_then(|b| declared.cut(b, pid));
                if declared.short(pid) {
                    // hyper frames a whole body by its real length but writes the app's header:
                    // send what there is under the declared length and close, so the client
                    // sees an incomplete response rather than reading the next one into it.
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                let len = body.as_ref().map_or(0, |b| b.len() as u64);
                if let Some(r) = &record {
                    shared.access.log(r, status.as_u16(), len, Some(pid));
                }
                *resp.body_mut() = ProxyBody::Full(body);
                return resp;
            }
            Ok(Some(Frame::End)) => {
                // The app answered before reading the whole request body; the rest is still being
                // written. Stream so the write can finish.
                conn.unread_end();
                break;
            }
            Ok(Some(Frame::Abort(why))) => {
                // The app failed after its start_response, but all of it (status, any body
                // so far, the failure) is still here: nothing has reached the client, so it gets
                // a whole 500 instead of a cut-off 200 it could take for a dropped connection
                // (PEP 3333: an error before the headers are sent is the server's to report).
                let pid = slot.worker.pid();
                finish(shared, slot, conn);
                tracing::warn!(pid, reason = %String::from_utf8_lossy(&why), "app failed before any of its response reached the client; answered 500");
                let resp = error_response(StatusCode::INTERNAL_SERVER_ERROR);
                if let Some(r) = &record {
                    shared.access.log(r, 500, resp_len(&resp), Some(pid));
                }
                return resp;
            }
            Ok(Some(other)) => {
                return fail(shared, slot, &format!("unexpected frame {other:?}"), record)
            }
            Ok(None) => break,
            Err(e) => return fail(shared, slot, &e.0, record),
        }
    }
    // Stream the rest through a bounded queue filled by a pump task: the worker is read as fast
    // as it writes (up to the queue's bound) and its slot returns at the end frame, however slowly
    // the client reads.
    slot.conn = None;
    let slot_meter = record.as_mut().and_then(|r| r.take_slot_meter());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let budget = Arc::new(tokio::sync::Semaphore::new(STREAM_BUFFER_BYTES));
    let pid = slot.worker.pid();
    let spool_dir = shared.settings().body_temp_dir.clone();
    tokio::spawn(pump(
        shared.clone(),
        (slot, slot_meter),
        conn,
        chunks,
        timeout,
        Queue {
            tx,
            budget,
            declared,
            pid,
            cut: client.cut.clone(),
            client_fd: client.fd,
            spool: None,
            spool_dir,
            spooled_total: shared.spooled.clone(),
            spool_failed: false,
        },
    ));
    *resp.body_mut() = ProxyBody::Wire(Box::new(WireBody {
        shared: shared.clone(),
        rx: Some(rx),
        record,
        status: status.as_u16(),
        sent: 0,
        pid: Some(pid),
        done: false,
        spool: None,
        spool_at: 0,
        spool_due: 0,
        held: None,
    }));
    resp
}

const SHORT_BODY: &str = "the application sent less than its Content-Length";

/// The Content-Length the app declared for a body the client will read (not for HEAD, 1xx, 204,
/// 304), and how much of it is still to come. Bytes past it are dropped (as gunicorn does); a
/// body that ends short closes the client connection after what there is (buffered:
/// `Connection: close`; streamed: the body ends in an error), instead of letting the client take
/// the next response for the rest of this one. Either is an application bug, logged as a warning.
struct Declared {
    remaining: Option<u64>,
    warned: bool,
}

impl Declared {
    fn of(headers: &mut http::HeaderMap, status: StatusCode, head_request: bool) -> Declared {
        let none = Declared {
            remaining: None,
            warned: false,
        };
        let values = headers.get_all(http::header::CONTENT_LENGTH);
        let Some(first) = values.iter().next() else {
            return none;
        };
        if status.is_informational() || status == StatusCode::NO_CONTENT {
            // RFC 9110 §8.6: a server MUST NOT send Content-Length with these (they never have
            // a body, and a client could wait for the bytes announced).
            headers.remove(http::header::CONTENT_LENGTH);
            return none;
        }
        let parsed = std::str::from_utf8(first.as_bytes())
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        let repeated = values.iter().count() > 1;
        let consistent = values.iter().all(|v| v == first);
        let Some(n) = parsed.filter(|_| consistent) else {
            // Not a length a client could rely on: drop it (the response is then framed by
            // its real length, or chunked).
            tracing::warn!(
                value = ?first,
                "the application sent an invalid or conflicting Content-Length; dropped"
            );
            headers.remove(http::header::CONTENT_LENGTH);
            return none;
        };
        if repeated {
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
        if head_request || status == StatusCode::NOT_MODIFIED {
            return none;
        }
        Declared {
            remaining: Some(n),
            warned: false,
        }
    }

    /// The part of `b` within the declared length (None when nothing of it is).
    fn cut(&mut self, mut b: Bytes, pid: u32) -> Option<Bytes> {
        let Some(left) = self.remaining.as_mut() else {
            return Some(b);
        };
        if b.len() as u64 > *left {
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    pid,
                    "the application sent more than its Content-Length; the rest is dropped"
                );
            }
            b.truncate(*left as usize);
        }
        *left -= b.len() as u64;
        (!b.is_empty()).then_some(b)
    }

    /// At the end of the body: true (and a warning) if it was shorter than declared.
    fn short(&mut self, pid: u32) -> bool {
        match self.remaining {
            Some(left) if left > 0 => {
                tracing::warn!(
                    pid,
                    missing = left,
                    "the application sent less than its Content-Length; client connection cut"
                );
                true
            }
            _ => false,
        }
    }
}

/// A request on its way through a worker; see `forward`.
struct InFlight<'a> {
    shared: &'a Arc<Shared>,
    parts: Option<(Slot, WireConn)>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some((slot, conn)) = self.parts.take() {
            let timeout = slot.worker.timeout;
            tokio::spawn(give_up(self.shared.clone(), slot, conn, timeout));
        }
    }
}

/// The exchange ended cleanly: count it, give the slot (with its connection) back.
fn finish(shared: &Shared, mut slot: Slot, mut conn: WireConn) {
    conn.done();
    if let Some(t) = slot.sent_at.take() {
        slot.worker.record_service(t.elapsed());
    }
    if slot.worker.count_request() {
        slot.worker
            .report(Event::BudgetSpent { id: slot.worker.id });
    }
    slot.conn = Some(Conn::Wire(conn));
    shared.pool.release(slot);
}

fn fail(
    shared: &Shared,
    slot: Slot,
    what: &str,
    record: Option<AccessRecord>,
) -> Response<ProxyBody> {
    if slot
        .worker
        .cut_by_master
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        // The master is ending it (a stop, or the SIGKILL past the grace period): the operator's
        // doing, not a failure of the worker.
        tracing::warn!(
            worker = slot.worker.id,
            pid = slot.worker.pid(),
            error = what,
            "request cut: its worker was being stopped: 502"
        );
    } else {
        tracing::error!(
            worker = slot.worker.id,
            pid = slot.worker.pid(),
            error = what,
            "worker failed mid-request: 502"
        );
    }
    slot.worker.report(Event::WorkerMisbehaved {
        id: slot.worker.id,
        what: what.to_string(),
    });
    let pid = slot.worker.pid();
    drop(slot);
    let resp = error_response(StatusCode::BAD_GATEWAY);
    if let Some(r) = &record {
        shared.access.log(r, 502, resp_len(&resp), Some(pid));
    }
    resp
}

fn timed_out(shared: &Shared, slot: Slot, record: Option<AccessRecord>) -> Response<ProxyBody> {
    tracing::error!(worker = slot.worker.id, pid = slot.worker.pid(), timeout = ?slot.worker.timeout, "request timed out: 504, aborting the worker");
    slot.worker
        .report(Event::RequestTimedOut { id: slot.worker.id });
    let pid = slot.worker.pid();
    drop(slot);
    let resp = error_response(StatusCode::GATEWAY_TIMEOUT);
    if let Some(r) = &record {
        shared.access.log(r, 504, resp_len(&resp), Some(pid));
    }
    resp
}

fn resp_len(r: &Response<ProxyBody>) -> u64 {
    match r.body() {
        ProxyBody::Full(Some(b)) => b.len() as u64,
        _ => 0,
    }
}

/// Bytes of a streamed response that may wait in memory between the worker and a slow client.
/// Past this the rest waits in a spool file (see [`Spool`]); only when that cannot take it does
/// the pump stop reading and the worker wait.
const STREAM_BUFFER_BYTES: usize = 1 << 20;

/// The most of one response that waits in its spool file (nginx's `proxy_max_temp_file_size`).
const SPOOL_MAX_PER_RESPONSE: u64 = 1 << 30;

/// The most that all spool files together may hold at once.
const SPOOL_MAX_TOTAL: u64 = 8 << 30;

/// How much of a spooled response is read back for the client at a time.
const SPOOL_READ_BYTES: u64 = 128 << 10;

/// The part of a streamed response a slow client has not taken yet beyond the memory budget: an
/// unnamed file in `body_temp_dir` (as nginx's `proxy_temp_path`), so that the worker is free at
/// its end frame whatever the response's size, and the master holds at most
/// [`STREAM_BUFFER_BYTES`] plus one read of it in memory per slow client. The bytes it holds
/// count against [`SPOOL_MAX_TOTAL`] until it is closed (when the client has taken all or left).
pub struct Spool {
    file: std::fs::File,
    written: std::sync::atomic::AtomicU64,
    total: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let n = *self.written.get_mut();
        self.total
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a queued chunk costs beyond its bytes (the channel's node, the `Bytes`, the permit),
/// counted against the budget so that an app yielding tiny chunks is bounded too.
const CHUNK_COST: usize = 128;

/// How a chunk fared in the client's queue.
enum Queued {
    Yes,
    /// The client is gone.
    ClientGone,
    /// The client took nothing for the whole stall limit while the budget was spent.
    ClientStalled,
}

/// A piece of a streamed response on its way to the client.
enum Part {
    /// In memory, holding its share of the budget.
    Mem(Bytes, tokio::sync::OwnedSemaphorePermit),
    /// The next `len` bytes of the spool file.
    Spooled(Arc<Spool>, u64),
}

type Chunk = Result<Part, String>;

/// The pump's end of a streamed response's queue: unbounded channel, bounded by a byte budget;
/// what goes in is held to the app's declared length.
struct Queue {
    tx: tokio::sync::mpsc::UnboundedSender<Chunk>,
    budget: Arc<tokio::sync::Semaphore>,
    declared: Declared,
    pid: u32,
    /// Closes the client's connection (its queued chunks are freed with it).
    cut: Arc<tokio::sync::Notify>,
    /// The client's socket: bytes leaving its send queue are progress too.
    client_fd: RawFd,
    /// Where what does not fit in the budget goes, once it is needed.
    spool: Option<Arc<Spool>>,
    spool_dir: std::path::PathBuf,
    /// Bytes in all spool files (shared by every response).
    spooled_total: Arc<std::sync::atomic::AtomicU64>,
    /// The spool could not be created or written: this response waits for its client instead.
    spool_failed: bool,
}

impl Queue {
    /// Queues the part of a chunk within the declared length, waiting while the budget is spent,
    /// but not for ever: when the client takes nothing of what is queued for a whole `stall`, it
    /// has stopped reading and would otherwise hold the worker behind it for as long as it likes.
    /// (Any chunk the client takes in the meantime counts as progress and starts a new wait.)
    async fn send(&mut self, b: Bytes, stall: std::time::Duration) -> Queued {
        let Some(b) = self.declared.cut(b, self.pid) else {
            return Queued::Yes;
        };
        let n = ((b.len() + CHUNK_COST).min(STREAM_BUFFER_BYTES)) as u32;
        if self.tx.is_closed() {
            return Queued::ClientGone;
        }
        // Room in memory: there. Else in the spool file, so that the worker need not wait.
        let part = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => Part::Mem(b, p),
            Err(_) => match self.spill(&b) {
                Some(part) => part,
                None => match self.wait_for_room(n, stall).await {
                    Ok(p) => Part::Mem(b, p),
                    Err(q) => return q,
                },
            },
        };
        if self.tx.send(Ok(part)).is_ok() {
            Queued::Yes
        } else {
            Queued::ClientGone
        }
    }

    /// Writes `b` at the end of this response's spool file (created on first use); None when it
    /// cannot take it (a limit, or the file system), and the caller waits for room in memory.
    fn spill(&mut self, b: &Bytes) -> Option<Part> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering::Relaxed;
        if self.spool_failed {
            return None;
        }
        let len = b.len() as u64;
        if let Some(s) = &self.spool {
            if s.written.load(Relaxed) + len > SPOOL_MAX_PER_RESPONSE {
                return None;
            }
        }
        if self.spooled_total.fetch_add(len, Relaxed) + len > SPOOL_MAX_TOTAL {
            self.spooled_total.fetch_sub(len, Relaxed);
            return None;
        }
        if self.spool.is_none() {
            match super::spool_file(&self.spool_dir) {
                Ok(file) => {
                    self.spool = Some(Arc::new(Spool {
                        file,
                        written: 0.into(),
                        total: self.spooled_total.clone(),
                    }))
                }
                Err(e) => {
                    self.spooled_total.fetch_sub(len, Relaxed);
                    self.spool_failed = true;
                    tracing::warn!(dir = %self.spool_dir.display(), error = %e, "cannot spool a response for a slow client to body_temp_dir; the worker waits for the client instead");
                    return None;
                }
            }
        }
        let spool = self.spool.as_ref().expect("created above");
        let at = spool.written.load(Relaxed);
        if let Err(e) = spool.file.write_all_at(b, at) {
            self.spooled_total.fetch_sub(len, Relaxed);
            self.spool_failed = true;
            tracing::warn!(dir = %self.spool_dir.display(), error = %e, "cannot write a spooled response; the worker waits for the client instead");
            return None;
        }
        // (Counted in the total above; freed with the spool.)
        spool.written.store(at + len, Relaxed);
        Some(Part::Spooled(spool.clone(), len))
    }

    /// Waits for `n` permits of the memory budget, but not for ever (see [`send`](Self::send)).
    async fn wait_for_room(
        &mut self,
        n: u32,
        stall: std::time::Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Queued> {
        let permit = loop {
            // Progress is either of two things. More permits available: the client took a chunk
            // (only this pump takes permits). Or the kernel's send queue to the client shrank: it
            // is reading, just slower than a chunk per `stall` (hyper takes the next chunk only
            // once the socket is writable again, after about a third of a send buffer of up to
            // 4 MiB has drained).
            if self.tx.is_closed() {
                return Err(Queued::ClientGone);
            }
            let available = self.budget.available_permits();
            let unsent = send_queue(self.client_fd);
            match tokio::time::timeout(stall, self.budget.clone().acquire_many_owned(n)).await {
                Ok(Ok(p)) => break p,
                Ok(Err(_)) => return Err(Queued::ClientGone),
                Err(_) if self.tx.is_closed() => return Err(Queued::ClientGone),
                Err(_) if self.budget.available_permits() > available => continue,
                Err(_) if send_queue(self.client_fd) < unsent => continue,
                Err(_) => return Err(Queued::ClientStalled),
            }
        };
        Ok(permit)
    }
    fn fail(&self, why: &str) {
        let _ = self.tx.send(Err(why.to_string()));
    }
}

/// Bytes in a socket's send queue, not yet acknowledged by the peer (`SIOCOUTQ`); 0 if unknown.
fn send_queue(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: a read-only query on the client's socket, which the connection still holds (the
    // caller has just seen the body's receiver alive); `n` is a valid c_int to write to.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Queues one chunk for the client; true when the client is gone from now on. A client that
/// takes nothing for `timeout` while the buffer is full is cut: its connection is closed (what
/// was queued for it is freed) and the rest of the response is given up ([`give_up`]), so the
/// worker is free again. (gunicorn's arbiter kills a sync worker stuck
/// that long in `send()`; nginx's `send_timeout` closes such a client.)
async fn queue_chunk(tx: &mut Queue, b: Bytes, timeout: std::time::Duration) -> bool {
    match tx.send(b, timeout).await {
        Queued::Yes => false,
        Queued::ClientGone => true,
        Queued::ClientStalled => {
            tracing::warn!(
                pid = tx.pid,
                timeout_s = timeout.as_secs_f64(),
                "the client took nothing of the response for the whole timeout with the \
                 response buffer full; its connection is closed and the worker freed"
            );
            tx.fail("the client stopped reading");
            tx.cut.notify_one();
            true
        }
    }
}

/// Moves a streamed response from the worker into the client's queue; returns the slot at the end.
/// When the client is gone before the end, the rest of the response is given up (see
/// [`give_up`]).
async fn pump(
    shared: Arc<Shared>,
    // The slot's busy count in the metrics goes with it: dropped when the pump ends, which is
    // when the slot goes back (or its worker is given up).
    (slot, _slot_meter): (Slot, Option<crate::logging::SlotMeter>),
    mut conn: WireConn,
    pending: VecDeque<Bytes>,
    timeout: std::time::Duration,
    mut tx: Queue,
) {
    for b in pending {
        if queue_chunk(&mut tx, b, timeout).await {
            return give_up(shared, slot, conn, timeout).await;
        }
    }
    loop {
        match tokio::time::timeout(timeout, conn.next_frame()).await {
            Ok(Ok(Frame::Body(b))) => {
                if queue_chunk(&mut tx, b, timeout).await {
                    return give_up(shared, slot, conn, timeout).await;
                }
            }
            Ok(Ok(Frame::End)) => {
                if tx.declared.short(tx.pid) {
                    tx.fail(SHORT_BODY);
                }
                flush_then_finish(&shared, slot, conn, timeout).await;
                return;
            }
            Ok(Ok(Frame::Abort(why))) => {
                tracing::warn!(worker = slot.worker.id, pid = slot.worker.pid(), reason = %String::from_utf8_lossy(&why), "app failed while streaming; client connection aborted");
                finish(&shared, slot, conn);
                tx.fail("the application failed while streaming the response");
                return;
            }
            Ok(Ok(other)) => {
                broken(&slot, &format!("unexpected frame {other:?}"));
                tx.fail("worker failed");
                return;
            }
            Ok(Err(e)) => {
                broken(&slot, &e.to_string());
                tx.fail("worker failed");
                return;
            }
            Err(_) => {
                tracing::error!(
                    worker = slot.worker.id,
                    pid = slot.worker.pid(),
                    "response stalled past the timeout: aborting the worker"
                );
                slot.worker
                    .report(Event::RequestTimedOut { id: slot.worker.id });
                tx.fail("worker timed out mid-response");
                return;
            }
        }
    }
}

fn broken(slot: &Slot, what: &str) {
    tracing::error!(
        worker = slot.worker.id,
        pid = slot.worker.pid(),
        error = what,
        "worker failed while streaming a response"
    );
    slot.worker.report(Event::WorkerMisbehaved {
        id: slot.worker.id,
        what: what.to_string(),
    });
}

/// A streamed response body, fed by [`pump`].
pub struct WireBody {
    shared: Arc<Shared>,
    rx: Option<tokio::sync::mpsc::UnboundedReceiver<Chunk>>,
    record: Option<AccessRecord>,
    status: u16,
    sent: u64,
    pid: Option<u32>,
    done: bool,
    /// The spool file being read back, where in it, and how much of it is due before the next
    /// queued part.
    spool: Option<Arc<Spool>>,
    spool_at: u64,
    spool_due: u64,
    /// The budget share of the chunk last handed to hyper, which holds it until it is written:
    /// given back when hyper asks for the next one, so that the budget bounds all the memory a
    /// slow client costs, not only what waits in the queue.
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl WireBody {
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn log(&mut self) {
        if let Some(r) = self.record.take() {
            self.shared.access.log(&r, self.status, self.sent, self.pid);
        }
    }

    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        self.held = None;
        if self.spool_due > 0 {
            return Poll::Ready(Some(self.read_spooled()));
        }
        let Some(rx) = self.rx.as_mut() else {
            self.done = true;
            return Poll::Ready(None);
        };
        match ready!(rx.poll_recv(cx)) {
            Some(Ok(Part::Mem(b, permit))) => {
                self.held = Some(permit);
                self.sent += b.len() as u64;
                Poll::Ready(Some(Ok(BodyFrame::data(b))))
            }
            Some(Ok(Part::Spooled(spool, len))) => {
                // (One spool per response, written and read in order.)
                self.spool = Some(spool);
                self.spool_due = len;
                Poll::Ready(Some(self.read_spooled()))
            }
            Some(Err(e)) => {
                self.done = true;
                self.log();
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.done = true;
                self.log();
                Poll::Ready(None)
            }
        }
    }

    /// The next piece of the spool file (a read of the page cache, usually).
    fn read_spooled(&mut self) -> Result<BodyFrame<Bytes>, BoxError> {
        use std::os::unix::fs::FileExt;
        let n = self.spool_due.min(SPOOL_READ_BYTES);
        let mut buf = vec![0; n as usize];
        let spool = self.spool.as_ref().expect("a spool when bytes are due");
        if let Err(e) = spool.file.read_exact_at(&mut buf, self.spool_at) {
            tracing::error!(error = %e, "cannot read a spooled response back; the client's connection is aborted");
            self.done = true;
            self.log();
            return Err(Box::new(e));
        }
        self.spool_at += n;
        self.spool_due -= n;
        if self.spool_due == 0 {
            // Its bytes stay counted until the pump's handle is gone too.
            self.spool = None;
        }
        self.sent += n;
        Ok(BodyFrame::data(Bytes::from(buf)))
    }
}

impl Drop for WireBody {
    fn drop(&mut self) {
        // The client may have gone away mid-response; the pump sees it and gives the rest up.
        self.log();
    }
}

/// The response has ended. If the app answered without reading all of the request body, finish
/// writing it (the worker discards it) before the connection is reused; then return the slot.
async fn flush_then_finish(
    shared: &Shared,
    slot: Slot,
    mut conn: WireConn,
    timeout: std::time::Duration,
) {
    if !conn.request_sent() {
        let r = tokio::time::timeout(
            timeout,
            std::future::poll_fn(|cx| conn.poll_flush_request(cx)),
        )
        .await;
        if !matches!(r, Ok(Ok(()))) {
            slot.worker.report(Event::WorkerMisbehaved {
                id: slot.worker.id,
                what: "request body write failed".into(),
            });
            return;
        }
    }
    finish(shared, slot, conn);
}

/// The client has left before the end of its response. The app's work for it is stopped when
/// that harms no other request ([`WireConn::abandon`]: the connection is closed, the worker's
/// next send fails and it calls the iterable's `close()` — an endless event stream or a token
/// generator would otherwise keep its worker for as long as it runs; requests waiting behind it
/// go to other workers). When a request that may not be sent twice waits behind it, the rest of
/// the response is read and dropped instead, for at most `timeout`: then it is given up all the
/// same (that request gets 503, never having reached the app). Either way the slot goes back
/// only once the worker is free for the next request (it answers a ping, or the end frame came);
/// a worker that sends nothing for `timeout` is treated as timed out.
async fn give_up(
    shared: Arc<Shared>,
    mut slot: Slot,
    mut conn: WireConn,
    timeout: std::time::Duration,
) {
    // Its turn first (a request sent ahead): the one in front is timed on its own.
    std::future::poll_fn(|cx| conn.poll_turn(cx)).await;
    let give_up_by = Instant::now() + timeout;
    let mut deadline = give_up_by;
    loop {
        if conn.abandon(Instant::now() >= give_up_by) {
            drop(conn);
            return ping_back(shared, slot, timeout).await;
        }
        match tokio::time::timeout_at(deadline.min(give_up_by), conn.next_frame()).await {
            Ok(Ok(Frame::Start(_))) | Ok(Ok(Frame::Body(_))) => deadline = Instant::now() + timeout,
            Ok(Ok(Frame::End)) | Ok(Ok(Frame::Abort(_))) => {
                flush_then_finish(&shared, slot, conn, timeout).await;
                return;
            }
            Ok(Err(WireError::GivenUp)) => {
                // The response ahead was given up; its task pings the worker back.
                drop(conn);
                slot.conn = None;
                shared.pool.release(slot);
                return;
            }
            Ok(Ok(_)) | Ok(Err(_)) => {
                slot.worker.report(Event::WorkerMisbehaved {
                    id: slot.worker.id,
                    what: "broken response while draining".into(),
                });
                return;
            }
            // Read and dropped for `timeout`: give it up all the same (next round).
            Err(_) if Instant::now() < deadline => {}
            Err(_) => {
                slot.worker
                    .report(Event::RequestTimedOut { id: slot.worker.id });
                return;
            }
        }
    }
}

/// After a response was given up: returns the slot, with a new connection, once the worker
/// answers a ping on it (a single-threaded worker accepts it only when the given-up request is
/// over).
async fn ping_back(shared: Arc<Shared>, mut slot: Slot, timeout: std::time::Duration) {
    let answer = tokio::time::timeout(timeout, async {
        let mut c = slot.wire_conn().await.map_err(WireError::Io)?;
        c.ping().await.map(|()| c)
    })
    .await;
    match answer {
        Ok(Ok(c)) => finish(&shared, slot, c),
        Ok(Err(e)) => slot.worker.report(Event::WorkerMisbehaved {
            id: slot.worker.id,
            what: format!("after a response was given up: {e}"),
        }),
        Err(_) => {
            tracing::error!(
                worker = slot.worker.id,
                pid = slot.worker.pid(),
                timeout = ?timeout,
                "the client left a response and the worker did not stop the app within the timeout: aborting the worker"
            );
            slot.worker
                .report(Event::RequestTimedOut { id: slot.worker.id });
        }
    }
}
