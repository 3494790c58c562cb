//! A send deadline for websocket connections: a peer that takes nothing from its socket
//! for `send_timeout_ms` is disconnected.
//!
//! A live subscriber that falls behind is cut off by its bounded queue (4008), but a
//! connection task blocked in a write never sees that: a client that stops reading
//! during a resume's catch-up, a large replay backlog, or its own replies would hold
//! its task (and its buffers) for as long as it stays connected. [`SendDeadline`] wraps
//! the socket: a write that cannot make progress for the deadline fails with
//! `TimedOut`, every later write fails at once, and the connection ends like any
//! broken one. The deadline counts time without progress, not the time a large send
//! takes: a slow reader that keeps reading is never cut off by it.
//!
//! No close frame can reach a peer that reads nothing, so the connection is dropped
//! without one; a subscriber resumes from the last `seq` it received, as after any
//! dropped connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A stream whose writes fail once they made no progress for a deadline.
pub struct SendDeadline<S> {
    inner: S,
    /// Zero = no deadline.
    limit: Duration,
    /// Armed while a write waits; allocated on the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    /// Set once the deadline passed (shared with the connection, for its metrics).
    expired: Arc<AtomicBool>,
    /// When the peer last took bytes a write waited for (shared with the connection,
    /// for its heartbeat).
    taken: Arc<Taken>,
}

/// When the peer last took bytes that a write had to wait for: proof that it is alive
/// and reading, even while its pongs wait unread behind a long send (a connection
/// sending a resume's backlog reads nothing until the send is done). A write that goes
/// through at once proves nothing (the bytes only reached the kernel's buffer); one
/// that waited for room went through because the peer read.
#[derive(Debug)]
pub struct Taken {
    origin: Instant,
    /// Milliseconds after `origin`, plus one; 0: never.
    at: AtomicU64,
}

impl Taken {
    fn new() -> Self {
        Taken { origin: Instant::now(), at: AtomicU64::new(0) }
    }

    fn mark(&self) {
        let ms = Instant::now().saturating_duration_since(self.origin).as_millis();
        self.at.store(u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1, Ordering::Relaxed);
    }

    /// The last time the peer took bytes a write waited for, to the millisecond.
    pub fn last(&self) -> Option<Instant> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.origin + Duration::from_millis(at - 1)),
        }
    }
}

impl<S> SendDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> (Self, Arc<AtomicBool>) {
        let expired = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(Taken::new());
        (Self { inner, limit, timer: None, waiting: false, expired: expired.clone(), taken }, expired)
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// When the peer last took bytes a write waited for (see [`Taken`]).
    pub fn taken(&self) -> Arc<Taken> {
        self.taken.clone()
    }

    fn expired_error() -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, "the peer read nothing within send_timeout_ms")
    }

    /// After the inner write returned `result`: progress disarms the timer; waiting
    /// arms it (once per wait) and fails the write once it fires.
    fn watch<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            if std::mem::take(&mut self.waiting) && matches!(result, Poll::Ready(Ok(_))) {
                self.taken.mark();
            }
            return result;
        }
        if self.limit.is_zero() {
            // No deadline, but a write that waits is still a wait whose end tells that
            // the peer read (the heartbeat counts it).
            self.waiting = true;
            return result;
        }
        let deadline = Instant::now() + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            self.waiting = true;
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(Self::expired_error()));
        }
        result
    }

    fn has_expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.has_expired() {
            return Poll::Ready(Err(Self::expired_error()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.has_expired() {
            return Poll::Ready(Err(Self::expired_error()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.has_expired() {
            return Poll::Ready(Err(Self::expired_error()));
        }
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_peer_that_reads_nothing_fails_the_write_after_the_deadline_and_every_write_after() {
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut w, expired) = SendDeadline::new(a, Duration::from_secs(10));
        let started = Instant::now();
        // The pipe holds 1 KiB; the rest of the write waits for a reader that never comes.
        let write = tokio::time::timeout(Duration::from_secs(60), w.write_all(&[7u8; 64 * 1024]));
        let e = write.await.expect("the deadline ends the write").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10), "failed at the deadline (paused clock)");
        assert!(expired.load(Ordering::Relaxed));
        assert_eq!(w.write(&[1]).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(w.flush().await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // What was written before stays readable.
        let mut got = [0u8; 1024];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [7u8; 1024]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_cut_off() {
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut w, expired) = SendDeadline::new(a, Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0u8; 512];
            // 512 bytes every 6 s: the whole send takes far longer than the deadline,
            // but no wait for progress is longer than it.
            while total < 16 * 1024 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                total += b.read(&mut buf).await.unwrap();
            }
            total
        });
        let started = Instant::now();
        w.write_all(&[1u8; 16 * 1024]).await.unwrap();
        w.flush().await.unwrap();
        assert!(started.elapsed() > Duration::from_secs(100));
        assert!(!expired.load(Ordering::Relaxed));
        drop(w);
        assert_eq!(reader.await.unwrap(), 16 * 1024);
    }

    /// What the heartbeat relies on: a write that waited for room and then went
    /// through marks the peer as taking our frames (with a send deadline or without
    /// one, `send_timeout_ms = 0`); a write the buffer took at once, or one that
    /// failed, does not.
    #[tokio::test(flavor = "current_thread")]
    async fn only_a_write_the_peer_made_room_for_marks_it_as_taking_our_frames() {
        for limit in [Duration::from_secs(3600), Duration::ZERO] {
            let (a, mut b) = tokio::io::duplex(1024);
            let (mut w, _) = SendDeadline::new(a, limit);
            let taken = w.taken();
            w.write_all(&[1u8; 1024]).await.unwrap();
            w.flush().await.unwrap();
            assert_eq!(taken.last(), None, "the pipe's buffer took it: no sign of the peer");
            let reader = async {
                let mut buf = vec![0u8; 8 * 1024];
                b.read_exact(&mut buf).await.unwrap();
                b
            };
            let (written, _b) = tokio::join!(w.write_all(&[2u8; 7 * 1024]), reader);
            written.unwrap();
            assert!(taken.last().is_some(), "the peer read to make room for the rest ({limit:?})");
        }

        // A write that waits and then fails (the peer went away) is no sign of life.
        let (a, b2) = tokio::io::duplex(16);
        let (mut w, _) = SendDeadline::new(a, Duration::from_secs(3600));
        let taken = w.taken();
        let write = w.write_all(&[3u8; 1024]);
        let close = async move {
            tokio::task::yield_now().await;
            drop(b2);
        };
        let (written, ()) = tokio::join!(write, close);
        assert!(written.is_err());
        assert_eq!(taken.last(), None);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_zero_deadline_waits_for_ever() {
        let (a, _b) = tokio::io::duplex(16);
        let (mut w, expired) = SendDeadline::new(a, Duration::ZERO);
        let r = tokio::time::timeout(Duration::from_secs(3600), w.write_all(&[0u8; 1024])).await;
        assert!(r.is_err(), "still waiting after an hour");
        assert!(!expired.load(Ordering::Relaxed));
    }
}
