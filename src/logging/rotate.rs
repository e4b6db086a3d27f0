//! A log file that appends, reopens its path when asked (SIGUSR1, for logrotate users) and can
//! rotate itself by time (`daily`, `hourly`, local time) or by size, keeping `keep` old files.
//!
//! Rotation is the `file-rotate` crate's: it decides when a file is due (the local day or hour
//! of its last write has passed, or it has grown past the size), renames it, opens a fresh one
//! and deletes the oldest beyond `keep`. What is ours is the naming ([`DatedSuffix`], a
//! `file_rotate` suffix scheme) and the guard around it.
//!
//! Layout, like logrotate's `dateext`: the live file is always the configured path
//! (`access.log`), so `tail -F` and log shippers keep working; rotated files get a suffix that
//! sorts by time: `access.log.2026-11-22` (daily; the day of the lines inside),
//! `access.log.2026-11-22T14` (hourly), `access.log.2026-11-22T14-03-07` (size; the time of the
//! rotation), plus `.1`, `.2`, … if that name is taken. Only names of exactly that shape (also
//! with `.gz` added by an outside compressor) are counted and deleted beyond `keep`.
//!
//! It runs on a log writer thread, never on the request path. It never fails its caller and
//! never panics: an error (full disk, unwritable directory, file removed) is reported on stderr
//! once per streak and the lines are dropped until writing works again. `file-rotate` asserts
//! and `expect`s on file-system state (a missing directory or live file), and with
//! `panic = "abort"` that would take the master down, so the guard makes those states
//! unreachable: the file is opened by us first (our error, reported), the directory is read
//! before the crate scans it, a live file that vanished is recreated before the crate may rotate
//! it, and a rotated name already on disk is never handed to the crate.
//!
//! Crates weighed (2026-12): tracing-appender's rolling appender names the *live* file by date
//! (no file at the configured path), rotates at UTC midnight and has no size trigger;
//! rolling-file numbers files and unwraps a chrono result that fails at DST changes; logroller
//! fixes the UTC offset at start (wrong after a DST change) and brings regex; file-rotate does
//! what we need and is extensible where its defaults do not fit (its timestamp scheme panics
//! when the clock steps back onto a kept name — ours cannot).

use std::cmp::Ordering as CmpOrdering;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use file_rotate::compression::Compression;
use file_rotate::suffix::{Representation, SuffixScheme};
use file_rotate::{ContentLimit, FileRotate, TimeFrequency};

use super::format::local_civil;

/// When a log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// Never by itself (logrotate + SIGUSR1, or nothing).
    Never,
    /// At local midnight (at the first write after it).
    Daily,
    /// At the start of every local hour (at the first write after it).
    Hourly,
    /// Once the file has grown past this many bytes (at most one piece of a write past it:
    /// see [`piece_len`]; lines are never cut).
    Size(u64),
}

/// Bytes buffered between writes (the writer thread flushes after every batch of lines).
const BUFFER: usize = 64 * 1024;

enum Sink {
    Plain(File),
    Rotating(Box<FileRotate<DatedSuffix>>),
}

/// One log file; see the module docs.
pub struct LogFile {
    path: PathBuf,
    sink: Option<Sink>,
    buf: Vec<u8>,
    rotate: Rotate,
    keep: usize,
    reopen: Arc<AtomicBool>,
    failing: bool,
}

impl LogFile {
    /// A log file at `path`. It is opened at the first write; `check_writable` tells early
    /// whether that will work.
    pub fn new(path: PathBuf, rotate: Rotate, keep: usize, reopen: Arc<AtomicBool>) -> Self {
        // file-rotate needs a parent directory to scan: make a relative path absolute.
        let path = std::path::absolute(&path).unwrap_or(path);
        LogFile {
            path,
            sink: None,
            buf: Vec::new(),
            rotate,
            keep,
            reopen,
            failing: false,
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

    /// Opens the path for appending (creating it), and the rotation around it if configured.
    fn open(&mut self) -> bool {
        let file = match open_append(&self.path) {
            Ok(f) => f,
            Err(e) => {
                self.report("cannot open the", &e);
                return false;
            }
        };
        let limit = match self.rotate {
            Rotate::Never => {
                self.sink = Some(Sink::Plain(file));
                return true;
            }
            Rotate::Daily => ContentLimit::Time(TimeFrequency::Daily),
            Rotate::Hourly => ContentLimit::Time(TimeFrequency::Hourly),
            Rotate::Size(n) => ContentLimit::BytesSurpassed(n.clamp(1, usize::MAX as u64) as usize),
        };
        drop(file);
        // FileRotate::new unwraps reading the directory.
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        if let Err(e) = fs::read_dir(dir) {
            self.report("cannot list the directory of the", &e);
            return false;
        }
        let scheme = DatedSuffix::new(self.rotate, self.keep);
        self.sink = Some(Sink::Rotating(Box::new(FileRotate::new(
            &self.path,
            scheme,
            limit,
            Compression::None,
            None,
        ))));
        true
    }

    fn flush_buf(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self.reopen.swap(false, Ordering::AcqRel) {
            self.sink = None;
        }
        if matches!(self.sink, Some(Sink::Rotating(_))) && fs::symlink_metadata(&self.path).is_err()
        {
            // Removed under us: file-rotate would write into the deleted file and then assert,
            // when rotating, that it exists. Start over with a fresh file.
            self.sink = None;
        }
        if self.sink.is_none() && !self.open() {
            self.buf.clear();
            return;
        }
        let res = match self.sink.as_mut() {
            Some(Sink::Plain(f)) => f.write_all(&self.buf),
            Some(Sink::Rotating(r)) => match self.rotate {
                Rotate::Size(limit) => write_in_pieces(r, &self.buf, piece_len(limit)),
                _ => r.write_all(&self.buf),
            },
            None => Ok(()),
        };
        self.buf.clear();
        match res {
            Ok(()) => self.recovered(),
            Err(e) => {
                self.report("cannot write or rotate the", &e);
                if matches!(self.sink, Some(Sink::Rotating(_))) {
                    // Its view of the directory may be stale: scan again at the next write.
                    self.sink = None;
                }
            }
        }
    }
}

/// The most a size-rotated file grows past its limit: writes go to file-rotate in pieces of at
/// most this many bytes, cut between lines (a longer line is one piece).
fn piece_len(limit: u64) -> usize {
    (limit / 16).clamp(256, BUFFER as u64) as usize
}

/// Writes `data` in pieces of at most `max` bytes, each ending at a line end.
fn write_in_pieces(w: &mut impl Write, data: &[u8], max: usize) -> io::Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            match rest[..max].iter().rposition(|&c| c == b'\n') {
                Some(i) => i + 1,
                // No line end within `max`: the piece is the whole (long) line.
                None => rest
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(rest.len(), |i| i + 1),
            }
        };
        w.write_all(&rest[..cut])?;
        rest = &rest[cut..];
    }
    Ok(())
}

impl Write for LogFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BUFFER {
            self.flush_buf();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf();
        Ok(())
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

// ---------------------------------------------------------------------------------------------
// Names of rotated files: a file_rotate suffix scheme
// ---------------------------------------------------------------------------------------------

/// The suffix of a rotated file: `2026-11-22` (+ `T14`, + `-03-07`), and a counter when that
/// name was taken (`.1`, `.2`, …; 0 is no counter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    stamp: String,
    n: u32,
}

impl Ord for Stamp {
    /// file-rotate wants the most recent first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (&other.stamp, other.n).cmp(&(&self.stamp, self.n))
    }
}

impl PartialOrd for Stamp {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.n {
            0 => f.write_str(&self.stamp),
            n => write!(f, "{}.{n}", self.stamp),
        }
    }
}

impl Representation for Stamp {}

/// Names rotated files by the period of the lines inside (daily, hourly: the last write's local
/// day or hour) or by the moment of rotation (size), never reusing a name that is on disk.
pub struct DatedSuffix {
    /// Characters of the stamp: 10 (day), 13 (hour) or 19 (second).
    len: usize,
    keep: usize,
}

impl DatedSuffix {
    fn new(rotate: Rotate, keep: usize) -> Self {
        let len = match rotate {
            Rotate::Daily => 10,
            Rotate::Hourly => 13,
            Rotate::Never | Rotate::Size(_) => 19,
        };
        DatedSuffix { len, keep }
    }
}

impl SuffixScheme for DatedSuffix {
    type Repr = Stamp;

    fn rotate_file(
        &mut self,
        basepath: &Path,
        newest: Option<&Stamp>,
        suffix: &Option<Stamp>,
    ) -> io::Result<Stamp> {
        if suffix.is_some() {
            // Only the live file is ever renamed (file-rotate asks this when the name it got is
            // one it knows; ours never is, unless its list is stale).
            return Err(io::Error::other(
                "a rotated log file is in the way; the directory is scanned again",
            ));
        }
        let now = unix_now();
        let t = if self.len == 19 {
            now
        } else {
            // The live file's last write tells the period of its lines.
            fs::metadata(basepath)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(now, |d| (d.as_secs() as i64).min(now))
        };
        let stamp = stamp(t, self.len);
        // Above the newest of the same stamp (names keep sorting in the order they were made),
        // and above any on disk (another writer, a file restored by hand).
        let mut n = match newest {
            Some(s) if s.stamp == stamp => s.n + 1,
            _ => 0,
        };
        loop {
            let candidate = Stamp {
                stamp: stamp.clone(),
                n,
            };
            let path = candidate.to_path(basepath);
            let gz = PathBuf::from(format!("{}.gz", path.display()));
            if fs::symlink_metadata(&path).is_err() && fs::symlink_metadata(&gz).is_err() {
                return Ok(candidate);
            }
            n += 1;
        }
    }

    fn parse(&self, suffix: &str) -> Option<Stamp> {
        parse_stamp(suffix)
    }

    fn too_old(&self, _suffix: &Stamp, file_number: usize) -> bool {
        self.keep > 0 && file_number >= self.keep
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-11-22T14-03-07` cut to `len` characters (10 = day, 13 = hour, 19 = second), local time.
fn stamp(t: i64, len: usize) -> String {
    let c = local_civil(t);
    let full = format!(
        "{:04}-{:02}-{:02}T{:02}-{:02}-{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    );
    full[..len.min(full.len())].to_string()
}

/// `<stamp>[.N]` (file-rotate has taken off the name and a `.gz`) → a stamp, for names of the
/// shapes we make, whatever the current mode (all of them count towards `keep`).
fn parse_stamp(suffix: &str) -> Option<Stamp> {
    let (stamp, n) = match suffix.split_once('.') {
        Some((s, n)) if !n.starts_with('0') => (s, n.parse::<u32>().ok()?),
        Some(_) => return None,
        None => (suffix, 0),
    };
    const SHAPE: &[u8] = b"dddd-dd-ddTdd-dd-dd";
    if ![10, 13, 19].contains(&stamp.len()) {
        return None;
    }
    let ok = stamp.bytes().zip(SHAPE).all(|(c, &s)| match s {
        b'd' => c.is_ascii_digit(),
        _ => c == s,
    });
    ok.then(|| Stamp {
        stamp: stamp.to_string(),
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Fixture {
        dir: PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!(
                "gte-rotate-{name}-{}-{}",
                std::process::id(),
                unix_now()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Fixture { dir }
        }
        fn file(&self, rotate: Rotate, keep: usize) -> LogFile {
            LogFile::new(
                self.dir.join("access.log"),
                rotate,
                keep,
                Arc::new(AtomicBool::new(false)),
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
        /// Writes `access.log` with `text`, last modified `ago` in the past.
        fn live_written(&self, text: &str, ago: Duration) -> i64 {
            fs::write(self.dir.join("access.log"), text).unwrap();
            let t = SystemTime::now() - ago;
            File::options()
                .write(true)
                .open(self.dir.join("access.log"))
                .unwrap()
                .set_modified(t)
                .unwrap();
            t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn line(f: &mut LogFile, text: &str) {
        f.write_all(text.as_bytes()).unwrap();
        f.flush().unwrap();
    }

    #[test]
    fn size_rotation_keeps_n_files_in_order() {
        let fx = Fixture::new("size");
        let mut f = fx.file(Rotate::Size(10), 2);
        for i in 0..8 {
            line(&mut f, &format!("line-{i}\n")); // 7 bytes: two lines a file
        }
        let names = fx.names();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(fx.read("access.log"), "line-6\nline-7\n");
        let mut archived: Vec<Stamp> = names
            .iter()
            .filter(|n| *n != "access.log")
            .map(|n| parse_stamp(&n["access.log.".len()..]).expect(n))
            .collect();
        archived.sort();
        archived.reverse(); // oldest first
        let text: Vec<String> = archived
            .iter()
            .map(|s| fx.read(&format!("access.log.{s}")))
            .collect();
        assert_eq!(text, ["line-2\nline-3\n", "line-4\nline-5\n"]);
    }

    #[test]
    fn pieces_end_at_line_ends() {
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        struct Rec<'a>(&'a mut Vec<Vec<u8>>);
        impl Write for Rec<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = b"aaaa\nbbbb\ncccc\nddddddddddddddddd\ne";
        write_in_pieces(&mut Rec(&mut pieces), data, 10).unwrap();
        let s: Vec<&str> = pieces
            .iter()
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect();
        assert_eq!(s, ["aaaa\nbbbb\n", "cccc\n", "ddddddddddddddddd\n", "e"]);
        assert_eq!(piece_len(4096), 256);
        assert_eq!(piece_len(100 << 20), BUFFER);
    }

    #[test]
    fn daily_rotation_names_the_day_of_the_lines_and_prunes() {
        let fx = Fixture::new("daily");
        for d in 1..=5 {
            fs::write(fx.dir.join(format!("access.log.2020-01-0{d}")), "old\n").unwrap();
        }
        fs::write(fx.dir.join("access.log.old"), "not ours\n").unwrap();
        let written = fx.live_written("day one\n", Duration::from_secs(2 * 86_400));
        let mut f = fx.file(Rotate::Daily, 3);
        line(&mut f, "day two\n");
        let day = stamp(written, 10);
        assert_eq!(fx.read(&format!("access.log.{day}")), "day one\n");
        assert_eq!(fx.read("access.log"), "day two\n");
        // Three archives kept: the new one and the two newest old ones; not ours stays.
        let expected = [
            "access.log".to_string(),
            format!("access.log.{day}"),
            "access.log.2020-01-04".into(),
            "access.log.2020-01-05".into(),
            "access.log.old".into(),
        ];
        let mut expected = expected.to_vec();
        expected.sort();
        assert_eq!(fx.names(), expected);
        // The same day: no rotation.
        line(&mut f, "day two, later\n");
        assert_eq!(fx.read("access.log"), "day two\nday two, later\n");
    }

    #[test]
    fn hourly_rotation_names_the_hour_of_the_lines() {
        let fx = Fixture::new("hourly");
        let written = fx.live_written("a\n", Duration::from_secs(3 * 3600));
        let mut f = fx.file(Rotate::Hourly, 0);
        line(&mut f, "b\n");
        let names = fx.names();
        assert_eq!(
            names,
            [
                "access.log".to_string(),
                format!("access.log.{}", stamp(written, 13))
            ]
        );
        assert_eq!(fx.read("access.log"), "b\n");
    }

    #[test]
    fn reopen_after_move_and_unwritable_path_never_fail() {
        let fx = Fixture::new("reopen");
        for rotate in [Rotate::Never, Rotate::Daily] {
            let reopen = Arc::new(AtomicBool::new(false));
            let mut f = LogFile::new(fx.dir.join("access.log"), rotate, 0, reopen.clone());
            line(&mut f, "before\n");
            fs::rename(fx.dir.join("access.log"), fx.dir.join("moved.log")).unwrap();
            reopen.store(true, Ordering::SeqCst);
            line(&mut f, "after\n");
            assert_eq!(fx.read("moved.log"), "before\n", "{rotate:?}");
            assert_eq!(fx.read("access.log"), "after\n", "{rotate:?}");
            fs::remove_file(fx.dir.join("access.log")).unwrap();
        }
        for rotate in [Rotate::Never, Rotate::Size(1), Rotate::Hourly] {
            let mut bad = LogFile::new(
                fx.dir.join("no-such-dir/access.log"),
                rotate,
                1,
                Arc::new(AtomicBool::new(false)),
            );
            assert_eq!(bad.write(b"dropped\n").unwrap(), 8);
            assert!(bad.flush().is_ok());
        }
    }

    #[test]
    fn a_removed_live_file_is_recreated_not_a_crash() {
        let fx = Fixture::new("removed");
        let mut f = fx.file(Rotate::Size(10), 2);
        line(&mut f, "one\n");
        fs::remove_file(fx.dir.join("access.log")).unwrap();
        for i in 0..4 {
            line(&mut f, &format!("again-{i}\n"));
        }
        assert!(fx.read("access.log").ends_with("again-3\n"));
        // The directory itself removed: lines dropped, reported, no panic; back when it is.
        fs::remove_dir_all(&fx.dir).unwrap();
        line(&mut f, "lost\n");
        fs::create_dir_all(&fx.dir).unwrap();
        line(&mut f, "back\n");
        assert_eq!(fx.read("access.log"), "back\n");
    }

    #[test]
    fn a_name_on_disk_is_never_reused() {
        let fx = Fixture::new("taken");
        let written = fx.live_written("x\n", Duration::from_secs(86_400 * 3));
        let day = stamp(written, 10);
        fs::write(fx.dir.join(format!("access.log.{day}")), "restored\n").unwrap();
        fs::write(fx.dir.join(format!("access.log.{day}.1.gz")), "gz").unwrap();
        let mut scheme = DatedSuffix::new(Rotate::Daily, 0);
        let base = fx.dir.join("access.log");
        let got = scheme.rotate_file(&base, None, &None).unwrap();
        assert_eq!(got.to_string(), format!("{day}.2"));
        // Asked to move an archive (its list is stale): an error, not a panic.
        assert!(scheme.rotate_file(&base, None, &Some(got)).is_err());
        assert!(!scheme.too_old(&parse_stamp("2020-01-01").unwrap(), 100));
        let mut kept = DatedSuffix::new(Rotate::Daily, 2);
        assert!(!kept.too_old(&parse_stamp("2020-01-01").unwrap(), 1));
        assert!(kept.too_old(&parse_stamp("2020-01-01").unwrap(), 2));
        let _ = kept.rotate_file(&base, None, &None).unwrap();
    }

    #[test]
    fn only_our_names_are_archives() {
        let p = |s: &str| parse_stamp(s).map(|s| s.to_string());
        assert_eq!(p("2026-11-22"), Some("2026-11-22".into()));
        assert_eq!(p("2026-11-22T14.3"), Some("2026-11-22T14.3".into()));
        assert!(p("2026-11-22T14-03-07").is_some());
        for other in [
            "",
            "1",
            "old",
            "2026-11-2",
            "2026-11-22T1",
            "2026-11-22.x",
            "2026-11-22.01",
            "2026-11-22T14:03:07",
        ] {
            assert_eq!(p(other), None, "{other}");
        }
        // Newest first, counters above the bare stamp.
        let mut v: Vec<Stamp> = ["2026-11-22", "2026-11-22.2", "2026-11-23", "2026-11-22.1"]
            .iter()
            .map(|s| parse_stamp(s).unwrap())
            .collect();
        v.sort();
        let order: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            order,
            ["2026-11-23", "2026-11-22.2", "2026-11-22.1", "2026-11-22"]
        );
    }
}
