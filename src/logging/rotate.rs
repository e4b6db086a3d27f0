//! A log file that appends, reopens its path when asked (SIGUSR1, for logrotate users) and can
//! rotate itself by time (`daily`, `hourly`, local time) or by size, keeping `keep` old files.
//!
//! It runs on the log writer thread of `tracing_appender::non_blocking`, never on the request
//! path. It never fails its caller and never panics: an error (full disk, unwritable directory,
//! file removed) is reported on stderr once per streak and the lines are dropped until writing
//! works again. A failed rotation keeps writing to the current file and is retried a minute later.
//!
//! Layout, like logrotate's `dateext`: the live file is always the configured path
//! (`access.log`), so `tail -F` and log shippers keep working; rotated files get a suffix that
//! sorts by time: `access.log.2026-11-22` (daily; the day of the lines inside),
//! `access.log.2026-11-22T14` (hourly), `access.log.2026-11-22T14-03-07` (size; the time of the
//! rotation), plus `.1`, `.2`, … if that name is taken. Only names of exactly that shape (also
//! with `.gz` added by an outside compressor) are counted and deleted beyond `keep`.
//!
//! Why not a crate: tracing-appender's rolling appender names the *live* file by date (no file
//! at the configured path; its pruning matches any file with the same prefix and suffix, and its
//! "latest" symlink replaces whatever regular file is at that path) and has no size trigger;
//! file-rotate asserts and `expect`s on file-system state inside `write` (with `panic = "abort"`
//! a removed log file would abort the master); logroller brings regex, chrono, flate2 and its
//! own thread, and numbers size-rotated files. The logic here is small and unit-tested with an
//! injected clock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::local_civil;

/// When a log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// Never by itself (logrotate + SIGUSR1, or nothing).
    Never,
    /// At local midnight.
    Daily,
    /// At the start of every local hour.
    Hourly,
    /// Before a write would make the file larger than this many bytes.
    Size(u64),
}

/// Seconds since the epoch; replaced in tests.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

fn system_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Bytes buffered between flushes (the writer thread flushes after every batch of lines).
const BUFFER: usize = 64 * 1024;
/// After a failed rotation, wait this long before trying again (keep writing meanwhile).
const RETRY_SECS: i64 = 60;

/// One log file; see the module docs.
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    /// Bytes in the current file, buffered ones included.
    size: u64,
    /// Start of the time period the current file's lines belong to (any second inside it).
    period_start: i64,
    /// First second of the next period: time-based rotation is due from then on.
    period_end: i64,
    rotate: Rotate,
    keep: usize,
    reopen: Arc<AtomicBool>,
    failing: bool,
    retry_rotation_at: i64,
    clock: Clock,
}

impl LogFile {
    /// A log file at `path`. It is opened at the first write; `check_writable` tells early
    /// whether that will work.
    pub fn new(path: PathBuf, rotate: Rotate, keep: usize, reopen: Arc<AtomicBool>) -> Self {
        Self::with_clock(path, rotate, keep, reopen, Box::new(system_clock))
    }

    pub fn with_clock(
        path: PathBuf,
        rotate: Rotate,
        keep: usize,
        reopen: Arc<AtomicBool>,
        clock: Clock,
    ) -> Self {
        LogFile {
            path,
            file: None,
            buf: Vec::new(),
            size: 0,
            period_start: 0,
            period_end: i64::MAX,
            rotate,
            keep,
            reopen,
            failing: false,
            retry_rotation_at: i64::MIN,
            clock,
        }
    }

    fn report(&mut self, what: &str, e: &io::Error) {
        if !self.failing {
            self.failing = true;
            eprintln!(
                "gte-supervisor: {what} log file {}: {e}; lines are dropped until it works again",
                self.path.display()
            );
        }
    }

    fn recovered(&mut self) {
        if self.failing {
            self.failing = false;
            eprintln!(
                "gte-supervisor: log file {} is writable again",
                self.path.display()
            );
        }
    }

    /// Opens the path for appending and learns its size and period.
    fn open(&mut self, now: i64) -> bool {
        match open_append(&self.path) {
            Ok(f) => {
                let meta = f.metadata().ok();
                self.size = meta.as_ref().map_or(0, |m| m.len());
                // The lines already in the file belong to the period of its last write.
                let written_at = meta
                    .filter(|m| m.len() > 0)
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(now);
                self.set_period(written_at.min(now));
                self.file = Some(f);
                true
            }
            Err(e) => {
                self.report("cannot open the", &e);
                false
            }
        }
    }

    fn set_period(&mut self, t: i64) {
        self.period_start = t;
        self.period_end = match self.rotate {
            Rotate::Daily => period_end(t, 86_400),
            Rotate::Hourly => period_end(t, 3_600),
            Rotate::Never | Rotate::Size(_) => i64::MAX,
        };
    }

    fn flush_buf(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let res = match self.file.as_mut() {
            Some(f) => f.write_all(&self.buf),
            None => Ok(()),
        };
        self.buf.clear();
        match res {
            Ok(()) => self.recovered(),
            Err(e) => self.report("cannot write the", &e),
        }
    }

    fn rotation_due(&self, now: i64, incoming: usize) -> bool {
        if now < self.retry_rotation_at {
            return false;
        }
        match self.rotate {
            Rotate::Never => false,
            Rotate::Size(limit) => self.size > 0 && self.size + incoming as u64 > limit,
            Rotate::Daily | Rotate::Hourly => now >= self.period_end,
        }
    }

    /// Renames the live file to its dated name, opens a fresh one, deletes beyond `keep`.
    fn rotate_now(&mut self, now: i64) {
        self.flush_buf();
        if self.size == 0 {
            // Nothing to keep: a new period starts in the same (empty) file.
            self.set_period(now);
            return;
        }
        let stamp = match self.rotate {
            Rotate::Daily => stamp(self.period_start, 10),
            Rotate::Hourly => stamp(self.period_start, 13),
            _ => stamp(now, 19),
        };
        let target = free_name(&self.path, &stamp);
        if let Err(e) = fs::rename(&self.path, &target) {
            eprintln!(
                "gte-supervisor: cannot rotate log file {} to {}: {e}; still writing to it, retrying in {RETRY_SECS} s",
                self.path.display(),
                target.display()
            );
            self.retry_rotation_at = now + RETRY_SECS;
            self.set_period(now);
            return;
        }
        self.file = None;
        if self.open(now) {
            self.set_period(now);
        }
        if self.keep > 0 {
            self.prune();
        }
    }

    /// Deletes the oldest rotated files beyond `keep`.
    fn prune(&mut self) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        let Some(name) = self.path.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        let mut old = rotated_files(dir, name);
        if old.len() <= self.keep {
            return;
        }
        old.sort();
        let excess = old.len() - self.keep;
        for (_, path) in old.into_iter().take(excess) {
            if let Err(e) = fs::remove_file(&path) {
                eprintln!(
                    "gte-supervisor: cannot remove old log file {}: {e}",
                    path.display()
                );
            }
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let now = (self.clock)();
        if let Rotate::Size(_) = self.rotate {
            // A write may carry many lines (the access log writes in batches): a file is cut
            // between lines, never inside one.
            for line in data.split_inclusive(|&c| c == b'\n') {
                if !self.write_chunk(line, now) {
                    break; // the file cannot be opened: drop the batch, try again next time
                }
            }
        } else {
            self.write_chunk(data, now);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf();
        Ok(())
    }
}

impl LogFile {
    /// Appends `data` (rotating first if due); false when no file could be opened.
    fn write_chunk(&mut self, data: &[u8], now: i64) -> bool {
        if self.reopen.swap(false, Ordering::AcqRel) {
            self.flush_buf();
            self.file = None;
        }
        if self.file.is_none() && !self.open(now) {
            return false;
        }
        if self.rotation_due(now, data.len()) {
            self.rotate_now(now);
            if self.file.is_none() {
                return false;
            }
        }
        self.buf.extend_from_slice(data);
        self.size += data.len() as u64;
        if self.buf.len() >= BUFFER {
            self.flush_buf();
        }
        true
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        self.flush_buf();
    }
}

pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The first second of the period after the one containing `t` (local time, `len` seconds long).
fn period_end(t: i64, len: i64) -> i64 {
    let offset = local_civil(t).offset;
    let local = t + offset;
    let next_local = (local.div_euclid(len) + 1) * len;
    // Across a DST change the offset differs: recompute with the offset at the boundary.
    let guess = next_local - offset;
    let offset2 = local_civil(guess).offset;
    let end = next_local - offset2;
    if end > t {
        end
    } else {
        guess.max(t + 1)
    }
}

/// `2026-11-22T14-03-07` cut to `len` characters (10 = day, 13 = hour, 19 = second).
fn stamp(t: i64, len: usize) -> String {
    let c = local_civil(t);
    let full = format!(
        "{:04}-{:02}-{:02}T{:02}-{:02}-{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    );
    full[..len.min(full.len())].to_string()
}

/// `path.stamp`, or `path.stamp.N` with N above every one taken for that stamp, so that names
/// keep sorting in the order they were made even after older ones were deleted.
fn free_name(path: &Path, stamp: &str) -> PathBuf {
    let base = format!("{}.{stamp}", path.display());
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return PathBuf::from(base);
    };
    let highest = rotated_files(dir, name)
        .into_iter()
        .filter(|((s, _), _)| s == stamp)
        .map(|((_, n), _)| n)
        .max();
    match highest {
        None if !Path::new(&base).exists() => PathBuf::from(base),
        None => PathBuf::from(format!("{base}.1")),
        Some(n) => PathBuf::from(format!("{base}.{}", n + 1)),
    }
}

/// Sort key of a rotated file: (stamp, counter).
type ArchiveKey = (String, u32);

/// `name.<stamp>[.N][.gz]` → its key, for names this module makes.
fn archive_key(name: &str, file: &str) -> Option<ArchiveKey> {
    let rest = file.strip_prefix(name)?.strip_prefix('.')?;
    let rest = rest.strip_suffix(".gz").unwrap_or(rest);
    let (stamp, n) = match rest.split_once('.') {
        Some((s, n)) => (s, n.parse::<u32>().ok()?),
        None => (rest, 0),
    };
    const SHAPE: &[u8] = b"dddd-dd-ddTdd-dd-dd";
    if ![10, 13, 19].contains(&stamp.len()) {
        return None;
    }
    let ok = stamp.bytes().zip(SHAPE).all(|(c, &s)| match s {
        b'd' => c.is_ascii_digit(),
        _ => c == s,
    });
    ok.then(|| (stamp.to_string(), n))
}

fn rotated_files(dir: &Path, name: &str) -> Vec<(ArchiveKey, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let file = e.file_name();
            let key = archive_key(name, file.to_str()?)?;
            Some((key, e.path()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    struct Fixture {
        dir: PathBuf,
        now: Arc<AtomicI64>,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!(
                "gte-rotate-{name}-{}-{}",
                std::process::id(),
                system_clock()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Fixture {
                dir,
                now: Arc::new(AtomicI64::new(1_795_324_511)),
            }
        }
        fn file(&self, rotate: Rotate, keep: usize) -> LogFile {
            let now = self.now.clone();
            LogFile::with_clock(
                self.dir.join("access.log"),
                rotate,
                keep,
                Arc::new(AtomicBool::new(false)),
                Box::new(move || now.load(Ordering::SeqCst)),
            )
        }
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(&self.dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.dir.join(name)).unwrap_or_default()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn size_rotation_keeps_n_files() {
        let fx = Fixture::new("size");
        let mut f = fx.file(Rotate::Size(10), 2);
        for i in 0..5 {
            f.write_all(format!("line-{i}\n").as_bytes()).unwrap(); // 7 bytes each
            f.flush().unwrap();
            fx.now.fetch_add(1, Ordering::SeqCst);
        }
        let names = fx.names();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(fx.read("access.log"), "line-4\n");
        let archived: Vec<&String> = names.iter().filter(|n| *n != "access.log").collect();
        assert_eq!(fx.read(archived[0]), "line-2\n");
        assert_eq!(fx.read(archived[1]), "line-3\n");
        assert!(archive_key("access.log", archived[0]).is_some());
    }

    #[test]
    fn a_batch_of_lines_is_cut_between_lines() {
        let fx = Fixture::new("batch");
        let mut f = fx.file(Rotate::Size(9), 0);
        f.write_all(b"aaaa\nbbbb\ncccc\n").unwrap();
        f.flush().unwrap();
        let names = fx.names();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(fx.read("access.log"), "cccc\n");
        for n in &names[1..] {
            let t = fx.read(n);
            assert!(t.len() <= 10 && t.ends_with('\n'), "{n}: {t:?}");
        }
    }

    #[test]
    fn same_second_rotations_get_rising_counters_even_after_pruning() {
        let fx = Fixture::new("counter");
        let mut f = fx.file(Rotate::Size(4), 2);
        for i in 0..6 {
            f.write_all(format!("{i}abc").as_bytes()).unwrap();
            f.flush().unwrap();
        }
        let names = fx.names();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names[1].ends_with(".3") && names[2].ends_with(".4"),
            "{names:?}"
        );
        assert_eq!(fx.read(&names[1]), "3abc");
        assert_eq!(fx.read(&names[2]), "4abc");
        assert_eq!(fx.read("access.log"), "5abc");
    }

    #[test]
    fn daily_rotation_names_the_day_of_the_lines() {
        let fx = Fixture::new("daily");
        let mut f = fx.file(Rotate::Daily, 3);
        f.write_all(b"day one\n").unwrap();
        f.flush().unwrap();
        let first_day = stamp(fx.now.load(Ordering::SeqCst), 10);
        fx.now.fetch_add(86_400, Ordering::SeqCst);
        f.write_all(b"day two\n").unwrap();
        f.flush().unwrap();
        assert_eq!(fx.read(&format!("access.log.{first_day}")), "day one\n");
        assert_eq!(fx.read("access.log"), "day two\n");
        // Seven more days: only 3 archives stay.
        for _ in 0..7 {
            fx.now.fetch_add(86_400, Ordering::SeqCst);
            f.write_all(b"x\n").unwrap();
            f.flush().unwrap();
        }
        assert_eq!(fx.names().len(), 4, "{:?}", fx.names());
    }

    #[test]
    fn hourly_rotation_and_quiet_hours() {
        let fx = Fixture::new("hourly");
        let mut f = fx.file(Rotate::Hourly, 0);
        f.write_all(b"a\n").unwrap();
        fx.now.fetch_add(3 * 3600, Ordering::SeqCst);
        f.write_all(b"b\n").unwrap();
        f.flush().unwrap();
        let names = fx.names();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[1].len(), "access.log.".len() + 13, "{names:?}");
    }

    #[test]
    fn reopen_after_move_and_unwritable_path_never_fail() {
        let fx = Fixture::new("reopen");
        let reopen = Arc::new(AtomicBool::new(false));
        let mut f = LogFile::new(fx.dir.join("access.log"), Rotate::Never, 0, reopen.clone());
        f.write_all(b"before\n").unwrap();
        f.flush().unwrap();
        fs::rename(fx.dir.join("access.log"), fx.dir.join("moved.log")).unwrap();
        reopen.store(true, Ordering::SeqCst);
        f.write_all(b"after\n").unwrap();
        f.flush().unwrap();
        assert_eq!(fx.read("moved.log"), "before\n");
        assert_eq!(fx.read("access.log"), "after\n");

        let mut bad = LogFile::new(
            fx.dir.join("no-such-dir/access.log"),
            Rotate::Size(1),
            1,
            Arc::new(AtomicBool::new(false)),
        );
        assert_eq!(bad.write(b"dropped\n").unwrap(), 8);
        assert!(bad.flush().is_ok());
    }

    #[test]
    fn only_our_names_are_archives() {
        assert_eq!(
            archive_key("a.log", "a.log.2026-11-22"),
            Some(("2026-11-22".into(), 0))
        );
        assert!(archive_key("a.log", "a.log.2026-11-22T14.3.gz").is_some());
        assert!(archive_key("a.log", "a.log.2026-11-22T14-03-07").is_some());
        for other in [
            "a.log",
            "a.log.1",
            "a.log.old",
            "a.log.2026-11-2",
            "a.log.2026-11-22T1",
            "a.logx.2026-11-22",
            "b.log.2026-11-22",
            "a.log.2026-11-22.x",
        ] {
            assert_eq!(archive_key("a.log", other), None, "{other}");
        }
    }

    #[test]
    fn period_boundaries_are_ahead() {
        let t = 1_795_324_511;
        let d = period_end(t, 86_400);
        assert!(d > t && d - t <= 86_400 + 3600);
        let h = period_end(t, 3600);
        assert!(h > t && h - t <= 3600);
        assert_eq!(local_civil(h).minute, 0);
    }
}
