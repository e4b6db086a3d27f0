//! The response body type the proxy hands to hyper: a complete buffer (the common, fast case),
//! a stream of frames from a bundled worker, or a streamed body from a `command` worker.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use hyper::body::Incoming;

use super::http::SlotEnd;
use super::route::RouteEnd;
use super::wire::WireBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client receives.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Wire(Box<WireBody>),
    Http(Box<Upstream<SlotEnd>>),
    /// Streamed from a routed `[[process]]`.
    Routed(Box<Upstream<RouteEnd>>),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            ProxyBody::Full(None)
        } else {
            ProxyBody::Full(Some(b))
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Wire(w) => w.poll_next(cx),
            ProxyBody::Http(h) => Pin::new(h.as_mut()).poll_frame(cx),
            ProxyBody::Routed(r) => Pin::new(r.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Wire(w) => w.is_done(),
            ProxyBody::Http(h) => h.is_end_stream(),
            ProxyBody::Routed(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Wire(_) => SizeHint::default(),
            ProxyBody::Http(h) => h.size_hint(),
            ProxyBody::Routed(r) => r.size_hint(),
        }
    }
}

/// What to do once when an upstream body is over: `sent` bytes went to the client; `clean` is
/// true when the body reached its end (false: an error, or dropped before the end).
pub trait BodyEnd {
    fn end(self, sent: u64, clean: bool);
}

/// A response body streamed from an HTTP upstream (a `command` worker or a routed process),
/// counted, with its end handled exactly once (also when dropped early).
pub struct Upstream<E: BodyEnd> {
    inner: Incoming,
    sent: u64,
    on_end: Option<E>,
}

impl<E: BodyEnd> Upstream<E> {
    pub fn new(inner: Incoming, on_end: E) -> Self {
        Upstream {
            inner,
            sent: 0,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self, clean: bool) {
        if let Some(e) = self.on_end.take() {
            e.end(self.sent, clean);
        }
    }
}

impl<E: BodyEnd + Unpin> Body for Upstream<E> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.end(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<E: BodyEnd> Drop for Upstream<E> {
    fn drop(&mut self) {
        self.end(false);
    }
}
