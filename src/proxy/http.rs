//! Forwarding to `command` workers: plain HTTP/1.1 on a loopback port, over reused connections
//! (one per slot). Bodies stream both ways; WebSocket (and any other) upgrades are joined end to
//! end once the worker answers 101.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::{BodyEnd, BoxError, ProxyBody, Upstream};
use super::pool::SlotHold;
use super::{error_response, Shared};
use crate::event::Event;
use crate::logging::AccessRecord;
use crate::worker::{Conn, HttpConn, Slot, WorkerAddr};

async fn connect(addr: &WorkerAddr) -> Result<HttpConn, BoxError> {
    let WorkerAddr::Tcp(sa) = addr else {
        return Err("not a command worker".into());
    };
    let tcp = TcpStream::connect(sa).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| crate::worker::protocol::has_token(v.as_bytes(), "upgrade"))
}

/// RFC 9110 §7.6.1: what a proxy must not pass on, in either direction: the fields its
/// `Connection` header names, `Connection` itself, and the fields known to be hop-by-hop
/// (`Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`). hyper frames each
/// side itself. For an upgrade (WebSocket) `Connection: upgrade` and `Upgrade` go through: the
/// tunnel needs them.
pub(crate) fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<http::HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| http::HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    for name in [header::TE, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Forwards `req` to an idle command worker.
pub async fn forward(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    client_ip: String,
    mut record: Option<AccessRecord>,
    timeout: Option<std::time::Duration>,
) -> Response<ProxyBody> {
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // Tell the program who the client is, as a proxy in front of it would.
    let xff = match req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        req.headers_mut().insert("x-forwarded-for", v);
    }
    if !req.headers().contains_key("x-forwarded-proto") {
        req.headers_mut()
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    *req.version_mut() = http::Version::HTTP_11;
    strip_hop_by_hop(req.headers_mut(), upgrade);

    if let Some(r) = record.as_mut() {
        r.queue_enter();
    }
    // (Bounded in time as for the bundled worker; see `acquire_watched`.)
    let limit = || shared.queue_limit(timeout);
    let slot = match shared.pool.acquire_watched(limit, || false).await {
        Ok((s, _)) => s,
        Err(_) => return shared.reject(StatusCode::SERVICE_UNAVAILABLE, record),
    };
    if let Some(r) = record.as_mut() {
        r.queue_leave();
    }
    let mut hold = SlotHold::new(&shared.pool, slot);
    let deadline = Instant::now() + timeout.unwrap_or(hold.get().worker.timeout);
    let addr = hold.get().worker.addr.clone();
    let mut req = Some(req);
    let mut fresh_tries = 0;
    let (resp, mut slot) = loop {
        let mut sender = match hold.get().conn.take() {
            Some(Conn::Http(s)) if !s.is_closed() => s,
            _ => {
                fresh_tries += 1;
                match connect(&addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        return fail(shared, hold.take(), &format!("connect failed: {e}"), record)
                    }
                }
            }
        };
        if sender.ready().await.is_err() {
            if fresh_tries < 2 {
                continue;
            }
            return fail(shared, hold.take(), "connection not ready", record);
        }
        let r = req.take().expect("request present until sent");
        match tokio::time::timeout_at(deadline, sender.try_send_request(r)).await {
            Ok(Ok(resp)) => {
                let mut slot = hold.take();
                slot.conn = Some(Conn::Http(sender));
                break (resp, slot);
            }
            Ok(Err(mut e)) => match e.take_message() {
                // Not sent (the pooled connection had closed): retry once on a fresh one.
                Some(r) if fresh_tries < 2 => {
                    req = Some(r);
                    continue;
                }
                _ => return fail(shared, hold.take(), &e.into_error().to_string(), record),
            },
            Err(_) => {
                let slot = hold.take();
                tracing::error!(
                    worker = slot.worker.id,
                    pid = slot.worker.pid(),
                    "request timed out waiting for the command worker: 504"
                );
                let pid = slot.worker.pid();
                // The connection is dropped with the sender; the slot itself stays usable.
                shared.pool.release(slot);
                if let Some(r) = &record {
                    shared.access.log(r, 504, 0, Some(pid));
                }
                return error_response(StatusCode::GATEWAY_TIMEOUT);
            }
        }
    };
    let mut resp = resp;
    let status = resp.status();
    strip_hop_by_hop(
        resp.headers_mut(),
        status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_some(),
    );
    shared.access.capture_response(&mut record, resp.headers());
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let (parts, _) = resp.into_parts();
            let shared2 = shared.clone();
            slot.conn = None;
            if let Some(r) = &record {
                shared.access.log(r, 101, 0, Some(slot.worker.pid()));
            }
            tokio::spawn(async move {
                if let (Ok(c), Ok(b)) = (client_upgrade.await, backend_upgrade.await) {
                    let mut c = TokioIo::new(c);
                    let mut b = TokioIo::new(b);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                }
                shared2.pool.release(slot);
            });
            return Response::from_parts(parts, ProxyBody::empty());
        }
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        ProxyBody::Http(Box::new(Upstream::new(
            body,
            SlotEnd {
                slot,
                shared: shared.clone(),
                record,
                status: status.as_u16(),
            },
        ))),
    )
}

fn fail(
    shared: &Shared,
    slot: Slot,
    what: &str,
    record: Option<AccessRecord>,
) -> Response<ProxyBody> {
    tracing::error!(
        worker = slot.worker.id,
        pid = slot.worker.pid(),
        error = what,
        "command worker failed: 502"
    );
    slot.worker.report(Event::WorkerMisbehaved {
        id: slot.worker.id,
        what: what.to_string(),
    });
    let pid = slot.worker.pid();
    // The slot itself stays usable (a new connection is made next time).
    shared.pool.release(slot);
    if let Some(r) = &record {
        shared.access.log(r, 502, 0, Some(pid));
    }
    error_response(StatusCode::BAD_GATEWAY)
}

/// The end of a command worker's streamed response: log it and return the slot (keeping the
/// connection only after a clean end: otherwise it holds an unfinished response).
pub struct SlotEnd {
    slot: Slot,
    shared: Arc<Shared>,
    record: Option<AccessRecord>,
    status: u16,
}

impl BodyEnd for SlotEnd {
    fn end(self, sent: u64, clean: bool) {
        let mut slot = self.slot;
        if let Some(r) = &self.record {
            self.shared
                .access
                .log(r, self.status, sent, Some(slot.worker.pid()));
        }
        if !clean {
            slot.conn = None;
        }
        if slot.worker.count_request() {
            slot.worker
                .report(Event::BudgetSpent { id: slot.worker.id });
        }
        self.shared.pool.release(slot);
    }
}
