//! The error log (master events and worker output, through `tracing`) and the access log (one
//! line per request). Both write through `tracing_appender::non_blocking`: the request path only
//! hands a line to a bounded in-memory queue; a writer thread does the I/O. When the queue is full
//! (the disk cannot keep up) lines are dropped rather than stalling requests. A write error (full
//! disk, file removed) is reported on stderr once and never crashes the master. `reopen()` (USR1)
//! makes the writers reopen their files, for logrotate.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogConfig, LogTarget};

/// A file that reopens itself (same path) when asked, and never fails its writer.
struct ReopenableFile {
    path: PathBuf,
    file: Option<File>,
    reopen: Arc<AtomicBool>,
    failing: bool,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Write for ReopenableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.reopen.swap(false, Ordering::AcqRel) || self.file.is_none() {
            match open_append(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    self.report(&e);
                    return Ok(buf.len());
                }
            }
        }
        if let Some(f) = self.file.as_mut() {
            match f.write_all(buf) {
                Ok(()) => self.failing = false,
                Err(e) => self.report(&e),
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            let _ = f.flush();
        }
        Ok(())
    }
}

impl ReopenableFile {
    fn report(&mut self, e: &io::Error) {
        if !self.failing {
            self.failing = true;
            eprintln!(
                "gte-supervisor: cannot write log file {}: {e}; lines are dropped until it works again",
                self.path.display()
            );
        }
    }
}

/// Handles that must live as long as the logs are used (they flush on drop).
pub struct Logs {
    _guards: Vec<WorkerGuard>,
    pub access: AccessLog,
    reopen: Vec<Arc<AtomicBool>>,
}

impl Logs {
    /// Asks every log file to be reopened at its next write (SIGUSR1).
    pub fn reopen(&self) {
        for r in &self.reopen {
            r.store(true, Ordering::Release);
        }
    }
}

/// Checks that a log file can be opened for appending (a clear start-up error otherwise).
pub fn check_writable(target: &LogTarget, what: &str) -> Result<(), String> {
    if let LogTarget::File(p) = target {
        open_append(p).map_err(|e| format!("cannot open the {what} log {}: {e}", p.display()))?;
    }
    Ok(())
}

fn writer_for(
    target: &LogTarget,
    guards: &mut Vec<WorkerGuard>,
    reopen: &mut Vec<Arc<AtomicBool>>,
) -> Option<NonBlocking> {
    let builder = || {
        NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(64 * 1024)
    };
    let (nb, guard) = match target {
        LogTarget::Off => return None,
        LogTarget::Stdout => builder().finish(io::stdout()),
        LogTarget::Stderr => builder().finish(io::stderr()),
        LogTarget::File(p) => {
            let flag = Arc::new(AtomicBool::new(false));
            reopen.push(flag.clone());
            builder().finish(ReopenableFile {
                path: p.clone(),
                file: open_append(p).ok(),
                reopen: flag,
                failing: false,
            })
        }
    };
    guards.push(guard);
    Some(nb)
}

/// Sets up both logs. Fails (with the path) when a log file cannot be opened.
pub fn init(cfg: &LogConfig) -> Result<Logs, String> {
    check_writable(&cfg.error, "error")?;
    check_writable(&cfg.access, "access")?;
    let mut guards = Vec::new();
    let mut reopen = Vec::new();
    let error =
        writer_for(&cfg.error, &mut guards, &mut reopen).expect("the error log is never off");
    let access = writer_for(&cfg.access, &mut guards, &mut reopen);
    let subscriber = tracing_subscriber::fmt()
        .with_writer(error)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(cfg.level)
        .finish();
    // A second init (tests in one process) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(Logs {
        _guards: guards,
        access: AccessLog { writer: access },
        reopen,
    })
}

/// The access log writer; cheap to call from the request path.
#[derive(Clone)]
pub struct AccessLog {
    writer: Option<NonBlocking>,
}

/// What one access-log line needs.
pub struct AccessRecord {
    pub remote: String,
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub referer: Option<http::HeaderValue>,
    pub user_agent: Option<http::HeaderValue>,
    pub start: std::time::Instant,
}

impl AccessLog {
    pub fn disabled() -> Self {
        AccessLog { writer: None }
    }

    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Writes `host - - [time] "METHOD uri HTTP/1.1" status bytes "referer" "agent" micros pid`
    /// (Apache combined, then the duration in microseconds and the worker pid, "-" if none).
    pub fn log(&self, r: &AccessRecord, status: u16, bytes: u64, worker_pid: Option<u32>) {
        let Some(w) = &self.writer else { return };
        let micros = r.start.elapsed().as_micros();
        let mut line = String::with_capacity(200);
        use std::fmt::Write as _;
        let hv = |v: &Option<http::HeaderValue>| {
            v.as_ref()
                .map(|v| escape(v.as_bytes()))
                .unwrap_or_else(|| "-".into())
        };
        let _ = write!(
            line,
            "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" {} ",
            r.remote,
            clf_now(),
            r.method,
            escape(r.uri.to_string().as_bytes()),
            r.version,
            status,
            bytes,
            hv(&r.referer),
            hv(&r.user_agent),
            micros,
        );
        match worker_pid {
            Some(p) => {
                let _ = write!(line, "{p}");
            }
            None => line.push('-'),
        }
        line.push('\n');
        let _ = w.make_writer().write_all(line.as_bytes());
    }
}

/// Escapes quotes, backslashes and non-printable bytes so a line cannot be forged.
fn escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        match c {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => {
                use std::fmt::Write as _;
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s
}

thread_local! {
    static CLF_CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Now in Common Log Format, `22/Nov/2026:04:15:11 +0000`, formatted once per second per thread.
pub fn clf_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CLF_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (secs, format_clf(secs));
        }
        c.1.clone()
    })
}

fn format_clf(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_dates() {
        assert_eq!(format_clf(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(format_clf(1_795_324_511), "22/Nov/2026:05:15:11 +0000");
        assert_eq!(format_clf(951_782_400), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape(b"a\"b\\c\n"), "a\\\"b\\\\c\\x0a");
    }
}
