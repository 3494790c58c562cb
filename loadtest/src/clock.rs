//! The tool's clock and its precise sleep.
//!
//! One monotonic clock (`CLOCK_MONOTONIC`, nanoseconds) for intended times, sends and
//! receipts. tokio's timer has millisecond granularity, which alone would add up to a
//! millisecond to every measured latency; on Linux the sender sleeps on a `timerfd`
//! armed at an absolute time instead, registered with tokio's reactor (no spinning).

/// Nanoseconds on the monotonic clock.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Milliseconds since the Unix epoch (for `created_at` and friends only).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
pub struct Sleeper {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

#[cfg(target_os = "linux")]
impl Sleeper {
    pub fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the result is checked before use.
        let fd =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: the fd is an `OwnedFd` moved into the `AsyncFd`, so it stays open
        // exactly as long as its registration.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }?;
        Ok(Sleeper { fd })
    }

    /// Sleeps until the monotonic clock reads `deadline_ns` (returns at once if past).
    pub async fn until(&mut self, deadline_ns: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        if deadline_ns <= mono_ns() {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        let raw = self.fd.as_raw_fd();
        // SAFETY: valid timerfd and itimerspec; the old value is not requested.
        let rc = unsafe { libc::timerfd_settime(raw, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes (the expiration count) into an 8-byte buffer.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            guard.clear_ready();
            if mono_ns() >= deadline_ns {
                return Ok(());
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub struct Sleeper;

#[cfg(not(target_os = "linux"))]
impl Sleeper {
    pub fn new() -> std::io::Result<Self> {
        Ok(Sleeper)
    }

    pub async fn until(&mut self, deadline_ns: u64) -> std::io::Result<()> {
        let now = mono_ns();
        if deadline_ns > now {
            tokio::time::sleep(std::time::Duration::from_nanos(deadline_ns - now)).await;
        }
        Ok(())
    }
}
