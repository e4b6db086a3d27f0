//! The open-file limit. systemd starts services with a soft `RLIMIT_NOFILE` of 1024 (for
//! `select()`) under a high hard limit, and says a program that needs more descriptors should
//! raise its own soft limit; a proxy holds one or two per client connection, so the master
//! raises it to the hard limit at start (as Go's runtime does, and nginx with
//! `worker_rlimit_nofile`). Its children get the original soft limit back between fork and exec,
//! so a Python app that still uses `select()` sees what it would see under gunicorn.

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit before [`raise`] changed it; `u64::MAX` when it was left alone.
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Raises the soft open-file limit to the hard one. Returns `(old, new)` when it changed it.
pub fn raise() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return None;
    }
    let old = lim.rlim_cur;
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return None;
    }
    ORIGINAL_SOFT.store(old, Ordering::Relaxed);
    Some((old, lim.rlim_max))
}

/// In a child between fork and exec: puts the original soft limit back. Only an atomic load
/// and two syscalls: async-signal-safe.
pub fn restore_in_child() {
    let old = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if old == u64::MAX {
        return;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above; a failure leaves the raised limit, which is harmless.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = old.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
