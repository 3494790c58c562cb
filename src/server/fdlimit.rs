//! Open-file limit and what the gateway does when it runs out of descriptors.
//!
//! Every websocket connection holds a file descriptor, as do the WAL's segments, the
//! stream history's files and the admin listener's connections. Service managers often
//! start a process with a soft `RLIMIT_NOFILE` of 1,024, far below `max_connections`
//! (10,000 by default), so at start the daemon raises its soft limit to the hard limit
//! (as Go's runtime and most servers do). If even that leaves less than
//! [`RESERVED_FDS`] beyond `max_connections`, the gateway takes at most
//! [`connection_cap`] connections (and says so at start): a flood of connections then
//! meets `connections_full` instead of taking the descriptors the log needs to open its
//! next segment, which would stop every acknowledgement.
//!
//! When `accept` still fails for want of a resource (`EMFILE`, `ENFILE`, `ENOBUFS`,
//! `ENOMEM`), the pending connection stays in the kernel's backlog and the next
//! `accept` fails at once: retrying immediately would spin a core and flood the log.
//! The listener backs off ([`ACCEPT_BACKOFF`]), counts each failure
//! (`rota_overload_refusals_total{reason="fd_limit"}`) and logs at most once per
//! [`LOG_EVERY`], with the number of failures since the last line.

use std::time::{Duration, Instant};

/// Descriptors kept beyond `max_connections` for the WAL, the stream history, the
/// admin listener and the process's own (logs, the runtime's event fds).
pub const RESERVED_FDS: u64 = 256;

/// How long the listener waits after `accept` failed for want of a resource.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per this long about failed accepts.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The open-file limit after [`raise`]: `(soft, hard)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before, when it was raised.
    pub raised_from: Option<u64>,
}

impl Limit {
    /// Whether `max_connections` plus [`RESERVED_FDS`] fit in the soft limit.
    pub fn fits(&self, max_connections: usize) -> bool {
        (max_connections as u64).saturating_add(RESERVED_FDS) <= self.soft
    }
}

/// The connections the gateway takes at most: `max_connections`, or fewer when the
/// open-file limit `soft` leaves less than [`RESERVED_FDS`] beyond them (at least 1).
pub fn connection_cap(max_connections: usize, soft: u64) -> usize {
    let room = usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    max_connections.min(room).max(1)
}

/// The soft `RLIMIT_NOFILE` in force, if it can be read.
pub fn soft_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through the pointer, a local of that type.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit in force.
pub fn raise() -> std::io::Result<Limit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through the pointer, which points to a
    // local of that type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = r.rlim_cur;
    if r.rlim_cur >= r.rlim_max {
        return Ok(Limit { soft: before, hard: r.rlim_max, raised_from: None });
    }
    let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
    // SAFETY: setrlimit reads one rlimit through the pointer, a local of that type.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Limit { soft: r.rlim_max, hard: r.rlim_max, raised_from: Some(before) })
}

/// Whether an `accept` error means the process or the system ran out of a resource
/// (descriptors, buffers, memory): the listener should wait before trying again.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Counts failed accepts and says when to log them (at most once per [`LOG_EVERY`]).
#[derive(Debug, Default)]
pub struct AcceptFailures {
    since_log: u64,
    last_log: Option<Instant>,
}

impl AcceptFailures {
    /// Records one failure at `now`; returns the number of failures to report now
    /// (this one included), or `None` while the last line is recent.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        self.since_log += 1;
        if self.last_log.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.since_log))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_are_logged_once_per_interval_with_the_count_since_the_last_line() {
        let t0 = Instant::now();
        let mut f = AcceptFailures::default();
        assert_eq!(f.record(t0), Some(1), "the first failure is logged at once");
        for i in 1..=99 {
            assert_eq!(f.record(t0 + Duration::from_millis(i * 50)), None);
        }
        assert_eq!(
            f.record(t0 + LOG_EVERY + Duration::from_millis(1)),
            Some(100),
            "99 held back, and this one"
        );
        assert_eq!(f.record(t0 + LOG_EVERY + Duration::from_millis(2)), None);
    }

    #[test]
    fn descriptor_and_memory_exhaustion_are_told_from_other_accept_errors() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_exhaustion(&std::io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::ECONNABORTED, libc::EINTR, libc::EPERM] {
            assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(code)), "{code}");
        }
    }

    #[test]
    fn the_limit_fits_max_connections_only_with_the_reserve() {
        let l = Limit { soft: 1024, hard: 1024, raised_from: None };
        assert!(l.fits(768));
        assert!(!l.fits(769));
        assert!(!l.fits(10_000));
    }

    #[test]
    fn connections_are_capped_to_leave_the_reserve_free() {
        assert_eq!(connection_cap(10_000, 1024), 768);
        assert_eq!(connection_cap(500, 1024), 500);
        assert_eq!(connection_cap(10_000, 100), 1, "always at least one");
        assert_eq!(connection_cap(10_000, u64::MAX), 10_000);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_limit() {
        let l = raise().expect("getrlimit works");
        assert_eq!(l.soft, l.hard);
    }
}
