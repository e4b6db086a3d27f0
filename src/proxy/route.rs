//! Routed prefixes: a request whose path starts with a `routes` prefix goes to that `[[process]]`
//! (e.g. `/v1/` → the model server) instead of the pool, so nginx keeps a single upstream. Plain
//! HTTP/1.1 on a fresh loopback connection per request; the request and response bodies stream
//! frame by frame (server-sent events and token streams arrive as they are produced), and a
//! WebSocket (any `Upgrade`) is joined end to end once the process answers 101. No pool slot and
//! no request timeout: a process serves as many requests at once as it wants to.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::{BodyEnd, ProxyBody, Upstream};
use super::Shared;
use crate::logging::AccessRecord;

/// The address of the longest routed prefix `path` starts with.
pub fn target(routes: &[(String, SocketAddr)], path: &str) -> Option<SocketAddr> {
    routes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, a)| *a)
}

/// Forwards `req` to the process at `addr`.
pub async fn forward(
    mut req: Request<Incoming>,
    addr: SocketAddr,
    client_ip: String,
    mut record: Option<AccessRecord>,
    shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let upgrade = super::http::is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let xff = match req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        req.headers_mut().insert("x-forwarded-for", v);
    }
    if !req.headers().contains_key("x-forwarded-proto") {
        req.headers_mut()
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    *req.version_mut() = http::Version::HTTP_11;
    super::http::strip_hop_by_hop(req.headers_mut(), upgrade);

    let bad_gateway = |what: String, record: Option<AccessRecord>| {
        tracing::error!(upstream = %addr, error = %what, "routed process unreachable: 502");
        shared.reject(StatusCode::BAD_GATEWAY, record)
    };
    let tcp = match TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return bad_gateway(format!("connect: {e}"), record),
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
    {
        Ok(x) => x,
        Err(e) => return bad_gateway(format!("handshake: {e}"), record),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return bad_gateway(e.to_string(), record),
    };
    let status = resp.status();
    super::http::strip_hop_by_hop(
        resp.headers_mut(),
        status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_some(),
    );
    shared.access.capture_response(&mut record, resp.headers());
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            if let Some(r) = &record {
                shared.access.log(r, 101, 0, None);
            }
            tokio::spawn(async move {
                if let (Ok(c), Ok(b)) = (client_upgrade.await, backend_upgrade.await) {
                    let mut c = TokioIo::new(c);
                    let mut b = TokioIo::new(b);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ProxyBody::empty());
        }
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        ProxyBody::Routed(Box::new(Upstream::new(
            body,
            RouteEnd {
                shared: shared.clone(),
                record,
                status: status.as_u16(),
                _sender: sender,
            },
        ))),
    )
}

/// The end of a routed process's streamed response: log it. Holds the upstream connection's
/// sender, which keeps the connection open until the body is done.
pub struct RouteEnd {
    shared: Arc<Shared>,
    record: Option<AccessRecord>,
    status: u16,
    _sender: hyper::client::conn::http1::SendRequest<Incoming>,
}

impl BodyEnd for RouteEnd {
    fn end(self, sent: u64, _clean: bool) {
        if let Some(r) = &self.record {
            self.shared.access.log(r, self.status, sent, None);
        }
    }
}
