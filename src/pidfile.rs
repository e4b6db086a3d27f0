//! The master's pid file: written atomically (temp file + rename), locked for the master's life so
//! a second master on the same file refuses to start, removed on exit only if it is still ours.
//! A stale file (no process holds its lock) is taken over.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the pid file could not be taken.
#[derive(Debug)]
pub enum PidfileError {
    /// Another live master holds the lock.
    Held {
        path: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        err: io::Error,
    },
}

impl std::fmt::Display for PidfileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PidfileError::Held { path, pid: Some(pid) } => write!(
                f,
                "another gte-supervisor (pid {pid}) is running with pidfile {}; stop it first (gte-supervisor stop) or use another pidfile",
                path.display()
            ),
            PidfileError::Held { path, pid: None } => write!(
                f,
                "another gte-supervisor holds the lock on pidfile {}",
                path.display()
            ),
            PidfileError::Io { path, err } => {
                write!(f, "cannot write pidfile {}: {err}", path.display())
            }
        }
    }
}

impl std::error::Error for PidfileError {}

/// A held pid file. Dropping it removes the file if it still names this process.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    _lock: File,
    pid: u32,
}

/// Reads the pid stored in a pid file, if any.
pub fn read_pid(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// True when some process holds the lock on `path` (a master is running).
pub fn is_locked(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

impl Pidfile {
    /// Takes the pid file for `pid`.
    pub fn acquire(path: &Path, pid: u32) -> Result<Pidfile, PidfileError> {
        let io_err = |err| PidfileError::Io {
            path: path.to_path_buf(),
            err,
        };
        if is_locked(path) {
            return Err(PidfileError::Held {
                path: path.to_path_buf(),
                pid: read_pid(path),
            });
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pid".into());
        let tmp = dir.join(format!(".{name}.{pid}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err)?;
        f.try_lock()
            .map_err(|e| io_err(io::Error::other(e.to_string())))?;
        f.write_all(format!("{pid}\n").as_bytes()).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(e)
        })?;
        // Another master may have renamed its own file over ours meanwhile: the file at `path`
        // must be the one we hold.
        let ours = f.metadata().map_err(io_err)?;
        let now = std::fs::metadata(path).map_err(io_err)?;
        if ours.ino() != now.ino() || ours.dev() != now.dev() {
            return Err(PidfileError::Held {
                path: path.to_path_buf(),
                pid: read_pid(path),
            });
        }
        Ok(Pidfile {
            path: path.to_path_buf(),
            _lock: f,
            pid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the (still locked) pid file, e.g. to `<pidfile>.oldbin` during an upgrade.
    pub fn rename_to(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if read_pid(&self.path) == Some(self.pid) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_lock_remove_and_stale_takeover() {
        let dir = std::env::temp_dir().join(format!("gte-pid-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.pid");
        std::fs::write(&path, "999999\n").unwrap(); // stale: nobody holds its lock
        let p = Pidfile::acquire(&path, 4242).unwrap();
        assert_eq!(read_pid(&path), Some(4242));
        assert!(is_locked(&path));
        match Pidfile::acquire(&path, 4343) {
            Err(PidfileError::Held {
                pid: Some(4242), ..
            }) => {}
            other => panic!("expected Held, got {other:?}"),
        }
        drop(p);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
