//! The response body type the proxy hands to hyper: a complete buffer (the common, fast case),
//! a stream of frames from a bundled worker, or a streamed body from a `command` worker.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::http::HttpBody;
use super::wire::WireBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client receives.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Wire(Box<WireBody>),
    Http(Box<HttpBody>),
    /// Streamed from a routed `[[process]]`.
    Routed(Box<super::route::RoutedBody>),
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
