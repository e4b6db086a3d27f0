//! A connection to a bundled worker and the requests that share it, in order.
//!
//! A single-threaded worker with `pipeline` > 1 serves its requests one after the other from
//! **one** connection (a [`Lane`]): the requests sent ahead wait in that socket, the worker reads
//! them with one `recv` when they arrived together and needs no `epoll` between requests, and
//! the master writes requests that are sent ahead in the same scheduler tick with one `writev`.
//! Responses come back in the order the requests went out, so each request holds a *ticket*:
//! only the ticket at the head reads frames; when its response ends ([`WireConn::done`]) the
//! next ticket is woken. A thread of a threaded worker still has a lane of its own per slot.
//!
//! A request that leaves mid-exchange without `done` (a timeout, a protocol error) breaks the
//! lane: its socket is closed at once (so the worker sees EOF and its accept loop takes the next
//! connection), and every other ticket on it gets an error — as each would have had on its own
//! connection to a worker that is being replaced.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::UnixStream;

use super::protocol::{self, Frame, ProtocolError};

/// Why an exchange with a worker failed.
#[derive(Debug)]
pub enum WireError {
    Io(io::Error),
    Eof,
    Protocol(String),
    /// The master closed the connection to give up the response ahead of this request (its
    /// client left): the worker never read this request.
    GivenUp,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "i/o error: {e}"),
            WireError::Eof => write!(f, "the worker closed the connection mid-request"),
            WireError::Protocol(m) => write!(f, "protocol error: {m}"),
            WireError::GivenUp => write!(f, "the response ahead of it was given up"),
        }
    }
}

impl std::error::Error for WireError {}

/// A piece of a request as handed to [`WireConn::begin`]: bytes in memory, or a request body
/// the master spooled to a file (`len` bytes from its start), which goes to the worker with
/// `sendfile` and is never read back into the master's memory.
#[derive(Clone, Debug)]
pub enum Piece {
    Mem(Bytes),
    File(Arc<std::fs::File>, u64),
}

/// A piece waiting to be written: what is left of it.
enum Out {
    Mem(Bytes),
    File {
        file: Arc<std::fs::File>,
        pos: u64,
        end: u64,
    },
}

impl Out {
    fn len(&self) -> u64 {
        match self {
            Out::Mem(b) => b.len() as u64,
            Out::File { pos, end, .. } => end - pos,
        }
    }

    /// `n` bytes of it were written (at most its length).
    fn advance(&mut self, n: u64) {
        match self {
            Out::Mem(b) => b.advance(n as usize),
            Out::File { pos, .. } => *pos += n,
        }
    }
}

/// The most one `sendfile` call moves (the socket takes less when its buffer is full).
const SENDFILE_MAX: u64 = 1 << 20;

struct State {
    /// None once the lane is broken (the socket is closed then).
    stream: Option<UnixStream>,
    buf: BytesMut,
    out: VecDeque<Out>,
    /// Bytes ever queued in `out` / ever written: a request's bytes are out once `written`
    /// reaches the offset its ticket recorded.
    queued: u64,
    written: u64,
    /// The next ticket to hand out, and the ticket whose response is being read.
    next: u64,
    head: u64,
    /// The tickets behind the head (index 0 = ticket `head + 1`).
    waiting: VecDeque<Waiter>,
    /// Tasks waiting for the socket to take more bytes. tokio keeps one write waker per socket,
    /// and any task may flush the shared queue, so whoever writes wakes them all: a task
    /// waiting for its own request to be out must not sleep through another's flush.
    write_waiters: Vec<Waker>,
    broken: Option<String>,
    /// The lane was broken on purpose, to give up the head's response ([`WireConn::abandon`]).
    given_up: bool,
}

/// A ticket behind the head.
struct Waiter {
    waker: Option<Waker>,
    /// Its request may go to another worker if this lane is given up before its turn.
    resendable: bool,
}

impl State {
    /// The shared first step of every poll by ticket `t`: report a broken lane, write what is
    /// queued, and wait (registered to be woken) while another ticket is at the head.
    fn poll_turn(&mut self, cx: &mut Context<'_>, t: u64) -> Poll<Result<(), WireError>> {
        if let Some(e) = self.broken_error() {
            return Poll::Ready(Err(e));
        }
        if !self.out.is_empty() {
            if let Poll::Ready(Err(e)) = self.flush(cx, u64::MAX) {
                self.break_with(&format!("write failed: {e}"));
                return Poll::Ready(Err(WireError::Io(e)));
            }
        }
        if self.head != t {
            let i = (t - self.head - 1) as usize;
            self.waiting[i].waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes pending request bytes until `until` bytes in total are out (or all are).
    fn flush(&mut self, cx: &mut Context<'_>, until: u64) -> Poll<io::Result<()>> {
        while !self.out.is_empty() && self.written < until {
            let Some(stream) = self.stream.as_ref() else {
                return Poll::Ready(Err(io::Error::other("the connection is closed")));
            };
            if stream.poll_write_ready(cx)?.is_pending() {
                if !self.write_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    self.write_waiters.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            let r = match self.out.front() {
                Some(Out::File { file, pos, end }) => {
                    let mut off = *pos as libc::off64_t;
                    let count = (end - pos).min(SENDFILE_MAX) as usize;
                    stream.try_io(Interest::WRITABLE, || {
                        nix::sys::sendfile::sendfile64(stream, &**file, Some(&mut off), count)
                            .map_err(io::Error::from)
                    })
                }
                _ => {
                    // The pieces in memory up to the first file piece, in one writev.
                    let mut iov = [IoSlice::new(&[]); 64];
                    let mut n = 0;
                    for (slot, o) in iov.iter_mut().zip(self.out.iter()) {
                        let Out::Mem(b) = o else { break };
                        *slot = IoSlice::new(b);
                        n += 1;
                    }
                    stream.try_write_vectored(&iov[..n])
                }
            };
            match r {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let mut n = n as u64;
                    self.written += n;
                    for w in self.write_waiters.drain(..) {
                        w.wake();
                    }
                    while n > 0 {
                        let front = self.out.front_mut().expect("written <= pending");
                        let len = front.len();
                        if n >= len {
                            n -= len;
                            self.out.pop_front();
                        } else {
                            front.advance(n);
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Closes the socket and fails every ticket.
    fn break_with(&mut self, why: &str) {
        if self.broken.is_none() {
            self.broken = Some(why.to_string());
        }
        self.stream = None;
        self.out.clear();
        self.buf.clear();
        for w in self.waiting.drain(..).filter_map(|w| w.waker) {
            w.wake();
        }
        for w in self.write_waiters.drain(..) {
            w.wake();
        }
    }

    fn broken_error(&self) -> Option<WireError> {
        if self.given_up {
            return Some(WireError::GivenUp);
        }
        self.broken
            .as_ref()
            .map(|why| WireError::Io(io::Error::new(io::ErrorKind::BrokenPipe, why.clone())))
    }
}

/// One connection to a bundled worker, shared in order by the requests sent on it.
pub struct Lane {
    state: Mutex<State>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Lane")
            .field("head", &st.head)
            .field("next", &st.next)
            .field("broken", &st.broken)
            .finish()
    }
}

impl Lane {
    pub fn new(stream: UnixStream) -> Arc<Lane> {
        Arc::new(Lane {
            state: Mutex::new(State {
                stream: Some(stream),
                buf: BytesMut::with_capacity(16 * 1024),
                out: VecDeque::new(),
                queued: 0,
                written: 0,
                next: 0,
                head: 0,
                waiting: VecDeque::new(),
                write_waiters: Vec::new(),
                broken: None,
                given_up: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything that could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lane broke: no new request may be sent on it.
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }
}

/// A request's use of a lane (or, between requests, a slot's hold on it).
#[derive(Debug)]
pub struct WireConn {
    lane: Arc<Lane>,
    /// The request in progress: its ticket and the offset where its bytes end.
    ticket: Option<(u64, u64)>,
}

impl WireConn {
    pub fn new(lane: Arc<Lane>) -> Self {
        WireConn { lane, ticket: None }
    }

    pub fn lane(&self) -> &Arc<Lane> {
        &self.lane
    }

    /// Queues a request's bytes on the lane and takes the next ticket. Returns true when the
    /// request waits behind others (its bytes may then go out with theirs). `resendable`: the
    /// request may go to another worker should this lane be given up before its turn.
    pub fn begin(
        &mut self,
        head: Bytes,
        body: impl IntoIterator<Item = Piece>,
        resendable: bool,
    ) -> bool {
        debug_assert!(self.ticket.is_none(), "one request at a time per handle");
        let mut st = self.lane.lock();
        let t = st.next;
        st.next += 1;
        st.queued += head.len() as u64;
        st.out.push_back(Out::Mem(head));
        for p in body {
            let o = match p {
                Piece::Mem(b) => Out::Mem(b),
                Piece::File(file, len) => Out::File {
                    file,
                    pos: 0,
                    end: len,
                },
            };
            if o.len() > 0 {
                st.queued += o.len();
                st.out.push_back(o);
            }
        }
        let end = st.queued;
        let behind = t != st.head;
        if behind && st.broken.is_none() {
            st.waiting.push_back(Waiter {
                waker: None,
                resendable,
            });
        }
        self.ticket = Some((t, end));
        behind
    }

    /// Writes pending request bytes and waits until this request's response is the next to be
    /// read (its turn), or the lane is broken (then [`next_frame`](Self::next_frame) reports why).
    pub fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (t, _) = self.ticket.expect("poll_turn without a request");
        let mut st = self.lane.lock();
        st.poll_turn(cx, t).map(|_| ())
    }

    /// Makes progress on both directions and returns the next frame of this request's response.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, WireError>> {
        let (t, _) = self.ticket.expect("poll_frame without a request");
        let mut st = self.lane.lock();
        loop {
            ready!(st.poll_turn(cx, t))?;
            match protocol::take_frame(&mut st.buf) {
                Ok(Some(f)) => return Poll::Ready(Ok(f)),
                Ok(None) => {}
                Err(e) => {
                    st.break_with(&e.0);
                    return Poll::Ready(Err(WireError::Protocol(e.0)));
                }
            }
            if st.buf.capacity() - st.buf.len() < 4096 {
                st.buf.reserve(32 * 1024);
            }
            let st = &mut *st;
            let stream = st.stream.as_ref().expect("not broken");
            ready!(stream.poll_read_ready(cx)).map_err(WireError::Io)?;
            match stream.try_read_buf(&mut st.buf) {
                Ok(0) => {
                    st.break_with("the worker closed the connection");
                    return Poll::Ready(Err(WireError::Eof));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    st.break_with(&format!("read failed: {e}"));
                    return Poll::Ready(Err(WireError::Io(e)));
                }
            }
        }
    }

    /// The next frame of this request's response (writing pending request bytes meanwhile).
    pub async fn next_frame(&mut self) -> Result<Frame, WireError> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// A frame of this request's response that is already buffered (no read). Only for the head
    /// ticket, i.e. after its first frame arrived.
    pub fn take_buffered(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let mut st = self.lane.lock();
        if st.broken.is_some() {
            return Ok(None);
        }
        protocol::take_frame(&mut st.buf)
    }

    /// Puts back an end frame just taken by [`take_buffered`](Self::take_buffered).
    pub fn unread_end(&mut self) {
        let mut st = self.lane.lock();
        let mut b = BytesMut::with_capacity(protocol::FRAME_HEADER_LEN + st.buf.len());
        b.extend_from_slice(b"E\0\0\0\0");
        b.extend_from_slice(&st.buf);
        st.buf = b;
    }

    /// Whether every byte of this request has been written to the worker.
    pub fn request_sent(&self) -> bool {
        let Some((_, end)) = self.ticket else {
            return true;
        };
        self.lane.lock().written >= end
    }

    /// Writes until every byte of this request is out.
    pub fn poll_flush_request(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((_, end)) = self.ticket else {
            return Poll::Ready(Ok(()));
        };
        let mut st = self.lane.lock();
        if let Some(WireError::Io(e)) = st.broken_error() {
            return Poll::Ready(Err(e));
        }
        let r = ready!(st.flush(cx, end));
        if let Err(e) = &r {
            st.break_with(&format!("write failed: {e}"));
        }
        Poll::Ready(r)
    }

    /// Gives up this request's response, if that can be done without harming another request:
    /// when its response is the one being read and every request waiting behind it may go to
    /// another worker (or `force`), the connection is closed (the worker's next send fails,
    /// which ends the app's response and calls its `close()`, as a write to a gone client does
    /// under gunicorn; the requests behind get [`WireError::GivenUp`]) and true is returned. Else
    /// (also when the lane is already broken) nothing changes and false is returned.
    pub fn abandon(&mut self, force: bool) -> bool {
        let Some((t, _)) = self.ticket else {
            return false;
        };
        let mut st = self.lane.lock();
        if st.broken.is_some()
            || st.head != t
            || !(force || st.waiting.iter().all(|w| w.resendable))
        {
            return false;
        }
        st.given_up = true;
        st.break_with("the response was given up (its client left)");
        self.ticket = None;
        true
    }

    /// Pings the worker's request loop on this connection (a health probe, or after a response
    /// was given up): Ok once it answers.
    pub async fn ping(&mut self) -> Result<(), WireError> {
        self.begin(Bytes::copy_from_slice(&protocol::ping_frame()), [], false);
        match self.next_frame().await? {
            Frame::Pong => {
                self.done();
                Ok(())
            }
            f => Err(WireError::Protocol(format!(
                "unexpected answer to ping: {f:?}"
            ))),
        }
    }

    /// This request's response has ended cleanly: the next ticket may read.
    pub fn done(&mut self) {
        let Some((t, _)) = self.ticket.take() else {
            return;
        };
        let mut st = self.lane.lock();
        if st.broken.is_some() || st.head != t {
            return;
        }
        st.head += 1;
        if let Some(Waiter { waker: Some(w), .. }) = st.waiting.pop_front() {
            w.wake();
        }
    }
}

impl Drop for WireConn {
    fn drop(&mut self) {
        if self.ticket.is_some() {
            // Left mid-exchange: where its response ends in the stream is unknown.
            self.lane
                .lock()
                .break_with("a request left the connection mid-exchange");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[tokio::test]
    async fn responses_go_to_tickets_in_order_and_requests_share_writes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let lane = Lane::new(a);
        let mut one = WireConn::new(lane.clone());
        let mut two = WireConn::new(lane.clone());
        assert!(!one.begin(Bytes::from_static(b"req1"), [], false));
        assert!(two.begin(
            Bytes::from_static(b"req2"),
            [Piece::Mem(Bytes::from_static(b"+body"))],
            false
        ));
        // The second ticket waits (it is not the head) but still writes both requests.
        let second = tokio::spawn(async move {
            let f = two.next_frame().await.unwrap();
            let end = two.next_frame().await.unwrap();
            two.done();
            (f, end)
        });
        let mut got = vec![0u8; 13];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"req1req2+body");
        let mut answer = frame(b'S', b"first");
        answer.extend(frame(b'E', b""));
        answer.extend(frame(b'S', b"second"));
        answer.extend(frame(b'E', b""));
        b.write_all(&answer).await.unwrap();
        assert!(matches!(one.next_frame().await.unwrap(), Frame::Start(s) if &s[..] == b"first"));
        assert!(matches!(one.take_buffered().unwrap(), Some(Frame::End)));
        assert!(one.request_sent());
        one.done();
        let (f, end) = second.await.unwrap();
        assert!(matches!(f, Frame::Start(s) if &s[..] == b"second"));
        assert!(matches!(end, Frame::End));
        assert!(!lane.is_broken());
    }

    #[tokio::test]
    async fn a_ticket_dropped_mid_exchange_breaks_the_lane_for_the_others() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let lane = Lane::new(a);
        let mut one = WireConn::new(lane.clone());
        let mut two = WireConn::new(lane.clone());
        one.begin(Bytes::from_static(b"r1"), [], false);
        two.begin(Bytes::from_static(b"r2"), [], false);
        let waiter = tokio::spawn(async move { two.next_frame().await });
        tokio::task::yield_now().await;
        drop(one);
        let r = waiter.await.unwrap();
        assert!(matches!(r, Err(WireError::Io(_))), "{r:?}");
        assert!(lane.is_broken());
        // The socket was closed: the worker side sees EOF after what was written.
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test]
    async fn a_task_waiting_for_its_request_to_be_written_wakes_when_another_flush_writes_it() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let lane = Lane::new(a);
        let mut one = WireConn::new(lane.clone());
        let mut two = WireConn::new(lane.clone());
        // Far more than the socket buffer: the first flush stops part way.
        let big = Bytes::from(vec![b'x'; 4 << 20]);
        one.begin(big, [], false);
        let first = tokio::spawn(async move {
            std::future::poll_fn(|cx| one.poll_flush_request(cx))
                .await
                .unwrap();
            one
        });
        tokio::task::yield_now().await;
        // The second request's task now holds tokio's one write registration of the socket.
        two.begin(Bytes::from_static(b"second"), [], false);
        let second = tokio::spawn(async move { two.next_frame().await });
        tokio::task::yield_now().await;
        let mut got = vec![0u8; (4 << 20) + 6];
        b.read_exact(&mut got).await.unwrap();
        let one = tokio::time::timeout(std::time::Duration::from_secs(10), first)
            .await
            .expect("the first task slept through the flush that wrote its request")
            .unwrap();
        assert!(one.request_sent());
        second.abort();
        std::mem::forget(one); // its ticket is still open: dropping it would break the lane
    }

    #[tokio::test]
    async fn a_spooled_body_goes_out_with_sendfile_between_the_bytes_around_it() {
        use std::io::Write;
        let (a, mut b) = UnixStream::pair().unwrap();
        let lane = Lane::new(a);
        let mut one = WireConn::new(lane.clone());
        let mut two = WireConn::new(lane.clone());
        // Bigger than the socket's buffer and than one sendfile call: written in several parts,
        // some of them refused with EAGAIN.
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut file = crate::proxy::spool_file(&std::env::temp_dir()).unwrap();
        file.write_all(&body).unwrap();
        let len = body.len() as u64;
        one.begin(
            Bytes::from_static(b"head1"),
            [
                Piece::Mem(Bytes::from_static(b"<")),
                Piece::File(Arc::new(file), len),
                Piece::Mem(Bytes::from_static(b">")),
            ],
            false,
        );
        two.begin(
            Bytes::from_static(b"head2"),
            [Piece::Mem(Bytes::from_static(b"tail"))],
            false,
        );
        let mut want = b"head1<".to_vec();
        want.extend_from_slice(&body);
        want.extend_from_slice(b">head2tail");
        let n = want.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; n];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| two.poll_flush_request(cx)),
        )
        .await
        .expect("the flush stalled")
        .unwrap();
        assert!(one.request_sent() && two.request_sent());
        let got = reader.await.unwrap();
        assert!(got == want, "the bytes arrived changed or out of order");
        std::mem::forget((one, two)); // their tickets are still open
    }
}
