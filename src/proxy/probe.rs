//! Health probes of idle workers, run by the master on a timer. A probe borrows one *idle* slot of
//! the worker (so a worker busy with requests is never probed, let alone killed by a probe), and
//! either pings the bundled worker's request loop (proving the loop runs, not just that a port is
//! open), sends a GET of the configured path, or — for a `command` worker without a path —
//! connects to its port. The result goes to the master as events.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};
use tokio::sync::mpsc::UnboundedSender;

use super::Shared;
use crate::event::Event;
use crate::worker::protocol::{self, Frame, RequestFacts, ServerInfo};
use crate::worker::{Conn, Slot, WorkerAddr};

/// Probes one worker through `slot`; reports `HealthResult` (within `timeout`) and `ProbeFinished`
/// (when the slot is back, or gone).
pub async fn probe(
    shared: Arc<Shared>,
    slot: Slot,
    path: Option<String>,
    timeout: Duration,
    patience: Duration,
    events: UnboundedSender<Event>,
) {
    let id = slot.worker.id;
    let work = exchange(slot, path);
    tokio::pin!(work);
    let first = tokio::time::timeout(timeout, &mut work).await;
    let (mut slot, outcome) = match first {
        Ok(r) => r,
        Err(_) => {
            let _ = events.send(Event::HealthResult {
                id,
                ok: false,
                detail: format!("no answer within {timeout:?}"),
            });
            // Keep the slot until the late answer arrives (or the worker is replaced), so no
            // request is queued behind the stuck probe.
            if let Ok((slot, Ok(()))) = tokio::time::timeout(patience, &mut work).await {
                shared.pool.release(slot);
            }
            let _ = events.send(Event::ProbeFinished { id });
            return;
        }
    };
    match outcome {
        Ok(()) => {
            let _ = events.send(Event::HealthResult {
                id,
                ok: true,
                detail: String::new(),
            });
            shared.pool.release(slot);
        }
        Err(detail) => {
            let _ = events.send(Event::HealthResult {
                id,
                ok: false,
                detail,
            });
            // The connection state is unknown: reconnect next time.
            slot.conn = None;
            shared.pool.release(slot);
        }
    }
    let _ = events.send(Event::ProbeFinished { id });
}

async fn exchange(mut slot: Slot, path: Option<String>) -> (Slot, Result<(), String>) {
    let r = exchange_on(&mut slot, path.as_deref()).await;
    (slot, r)
}

async fn exchange_on(slot: &mut Slot, path: Option<&str>) -> Result<(), String> {
    match slot.worker.addr.clone() {
        WorkerAddr::Unix(_) => {
            let mut conn = slot
                .wire_conn()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            match path {
                None => conn.ping().await.map_err(|e| e.to_string())?,
                Some(p) => {
                    let uri: Uri = p
                        .parse()
                        .map_err(|_| format!("invalid health path {p:?}"))?;
                    let headers = HeaderMap::new();
                    let server = ServerInfo {
                        name: "127.0.0.1".into(),
                        port: "0".into(),
                    };
                    let facts = RequestFacts {
                        method: &Method::GET,
                        uri: &uri,
                        version: Version::HTTP_11,
                        headers: &headers,
                        remote: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                        remote_ip_override: None,
                        scheme: "http",
                        trusted_peer: false,
                        server: &server,
                        body_len: 0,
                        has_body: false,
                    };
                    let mut frame = Vec::with_capacity(128);
                    protocol::encode_request(&mut frame, &facts).map_err(|e| format!("{e:?}"))?;
                    conn.begin(Bytes::from(frame), [], false);
                    let mut status = None;
                    loop {
                        match conn.next_frame().await.map_err(|e| e.to_string())? {
                            Frame::Start(s) => {
                                let (st, _, _) = protocol::parse_start(&s).map_err(|e| e.0)?;
                                status = Some(st);
                            }
                            Frame::Body(_) => {}
                            Frame::End => break,
                            Frame::Abort(_) => {
                                // The exchange ended (A ends it like E): the connection stays usable.
                                conn.done();
                                slot.conn = Some(Conn::Wire(conn));
                                return Err("the app failed while answering".into());
                            }
                            Frame::Pong => return Err("unexpected pong".into()),
                        }
                    }
                    let st = status.ok_or("no status")?;
                    conn.done();
                    if !(st.is_success() || st.is_redirection()) {
                        slot.conn = Some(Conn::Wire(conn));
                        return Err(format!("status {st}"));
                    }
                }
            }
            slot.conn = Some(Conn::Wire(conn));
            Ok(())
        }
        WorkerAddr::Tcp(sa) => {
            let Some(p) = path else {
                tokio::net::TcpStream::connect(sa)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("connect: {e}"))?;
                return Ok(());
            };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = tokio::net::TcpStream::connect(sa)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let req = format!("GET {p} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nUser-Agent: gte-supervisor-health\r\n\r\n", sa.port());
            tcp.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let n = tcp.read(&mut buf).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("status {code}"))
            }
        }
    }
}
