//! The access log's writer: bounded, lossy and batching, so that logging costs a request only a
//! short lock and a copy into a shared buffer.
//!
//! `tracing_appender::non_blocking` (used for the error log) sends every line through a channel
//! and wakes its writer thread for it: at thousands of requests a second that is a futex wake,
//! a context switch and a `write(2)` per line, about 10 µs of CPU each on a small VM — more than
//! the rest of the master's work per request. Here lines gather in one buffer; the writer thread
//! is woken only when the buffer stops being empty (or passes [`WAKE_AT`]), then lets lines
//! gather for up to [`GATHER`] and writes them with one call. A line reaches the file at most
//! about 20 ms after its request ended.
//!
//! Bounded: at most [`CAPACITY`] bytes wait; when the disk cannot keep up, new lines are dropped
//! and counted ([`LineWriter::dropped`]), never waited for. The writer thread owns the
//! destination ([`super::rotate::LogFile`] or stdout), which reports its own errors.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes that may wait for the writer thread before new lines are dropped.
pub const CAPACITY: usize = 16 << 20;
/// Past this many waiting bytes the writer thread is woken at once.
pub const WAKE_AT: usize = 256 << 10;
/// How long the writer thread lets lines gather once woken.
pub const GATHER: Duration = Duration::from_millis(20);

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    stop: AtomicBool,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // Plain appends and swaps: a panic elsewhere cannot leave the buffer inconsistent.
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The request path's handle: cheap to clone.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it wrote what was queued (waits at most 2 s).
pub struct WriterGuard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

impl LineWriter {
    /// Starts the writer thread for `dest`.
    pub fn spawn<W: Write + Send + 'static>(
        dest: W,
        name: &str,
    ) -> std::io::Result<(LineWriter, WriterGuard)> {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(WAKE_AT)),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let (done_tx, done) = mpsc::channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                run(&s, dest);
                let _ = done_tx.send(());
            })?;
        Ok((
            LineWriter {
                shared: shared.clone(),
            },
            WriterGuard { shared, done },
        ))
    }

    /// Queues one line (with its newline); drops it if [`CAPACITY`] bytes are already waiting.
    pub fn write_line(&self, line: &[u8]) {
        let mut buf = self.shared.lock();
        let before = buf.len();
        if before + line.len() > CAPACITY {
            drop(buf);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buf.extend_from_slice(line);
        let wake = before == 0 || (before < WAKE_AT && buf.len() >= WAKE_AT);
        drop(buf);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Lines dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

fn run<W: Write>(s: &Shared, mut dest: W) {
    let mut out: Vec<u8> = Vec::with_capacity(WAKE_AT);
    loop {
        let mut buf = s.lock();
        while buf.is_empty() && !s.stop.load(Ordering::Acquire) {
            buf = s.wake.wait(buf).unwrap_or_else(|p| p.into_inner());
        }
        if buf.is_empty() {
            break; // stopping, nothing left
        }
        if !s.stop.load(Ordering::Acquire) && buf.len() < WAKE_AT {
            // Let more lines gather: one write for many requests.
            buf = match s.wake.wait_timeout_while(buf, GATHER, |b| {
                b.len() < WAKE_AT && !s.stop.load(Ordering::Acquire)
            }) {
                Ok((b, _)) => b,
                Err(p) => p.into_inner().0,
            };
        }
        std::mem::swap(&mut *buf, &mut out);
        drop(buf);
        // The destination reports its own errors (LogFile) or has nowhere to report (stdout).
        let _ = dest.write_all(&out);
        let _ = dest.flush();
        out.clear();
        if out.capacity() > 4 * WAKE_AT {
            out = Vec::with_capacity(WAKE_AT);
        }
    }
    let _ = dest.flush();
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        let _ = self.done.recv_timeout(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.0.extend_from_slice(b);
            g.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_soon_batched_and_all_on_drop() {
        let sink = Sink::default();
        let (w, guard) = LineWriter::spawn(sink.clone(), "test-writer").unwrap();
        w.write_line(b"one\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().0.is_empty() {
            assert!(Instant::now() < deadline, "a lone line is written soon");
            std::thread::sleep(Duration::from_millis(2));
        }
        for i in 0..10_000 {
            w.write_line(format!("line {i}\n").as_bytes());
        }
        drop(guard);
        let g = sink.0.lock().unwrap();
        let text = String::from_utf8_lossy(&g.0);
        assert_eq!(text.lines().count(), 10_001);
        assert!(text.ends_with("line 9999\n"));
        assert!(g.1 < 1000, "batched: {} writes for 10001 lines", g.1);
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        /// A destination that never finishes a write while `hold` is set.
        struct Stuck(Arc<AtomicBool>);
        impl Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                while self.0.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let hold = Arc::new(AtomicBool::new(true));
        let (w, guard) = LineWriter::spawn(Stuck(hold.clone()), "test-stuck").unwrap();
        let line = vec![b'x'; 1 << 20];
        let t = Instant::now();
        for _ in 0..40 {
            w.write_line(&line);
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "never waits for the disk"
        );
        assert!(
            w.dropped() >= 40 - 2 * (CAPACITY >> 20) as u64,
            "{}",
            w.dropped()
        );
        hold.store(false, Ordering::Release);
        drop(guard);
    }
}
