//! The single writer thread: group commit, segment rollover, fatal failure.

use super::format::{self, encode_record, encode_segment_header, framed_len, SEGMENT_HEADER_LEN};
use super::fs::{FsFile, OpenMode};
use super::recovery::Resume;
use super::{io_err, FsyncPolicy, OnDurable, State, WalError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A buffer that grew past this for one huge batch is given back afterwards.
const BUF_KEEP_BYTES: usize = 8 << 20;

/// Runs an `on_durable` callback exactly once: with the outcome, or with
/// [`WalError::Closed`] if the request is dropped unprocessed (shutdown races,
/// writer panic), so no caller ever waits forever.
pub(crate) struct Completion(Option<OnDurable>);

impl Completion {
    pub fn new(f: OnDurable) -> Self {
        Completion(Some(f))
    }

    pub fn complete(mut self, r: Result<Range<u64>, WalError>) {
        if let Some(f) = self.0.take() {
            // A panicking callback must not take the log down with it.
            if catch_unwind(AssertUnwindSafe(|| f(r))).is_err() {
                tracing::error!("a WAL on_durable callback panicked");
            }
        }
    }

    /// Drops the callback without calling it (the caller got the error directly).
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            let _ = catch_unwind(AssertUnwindSafe(|| f(Err(WalError::Closed))));
        }
    }
}

pub(crate) enum Request {
    Append {
        records: Vec<(u8, Vec<u8>)>,
        done: Completion,
    },
    /// Sync everything written so far; answers the synced seq.
    Sync(Sender<Result<u64, WalError>>),
    /// Drain, sync, stop.
    Shutdown,
}

impl Request {
    pub fn disarm(self) {
        if let Request::Append { done, .. } = self {
            done.disarm();
        }
    }
}

pub(crate) struct Writer {
    st: Arc<State>,
    rx: Receiver<Request>,
    file: Box<dyn FsFile>,
    seg_path: PathBuf,
    /// Logical end of the active segment: where the next write goes.
    offset: u64,
    buf: Vec<u8>,
    next_seq: u64,
    /// Last seq handed to the OS.
    written_seq: u64,
    unsynced: bool,
    last_sync: Instant,
    /// Under `IntervalMs`, when the pending sync is due.
    sync_due: Option<Instant>,
}

impl Writer {
    /// Opens the segment recovery ended in (or a new one) for appending.
    pub fn start(
        st: Arc<State>,
        rx: Receiver<Request>,
        resume: &Resume,
    ) -> Result<Writer, WalError> {
        let next_seq = resume.last_seq + 1;
        let cfg = &st.cfg;
        let continue_active = resume
            .active
            .as_ref()
            .filter(|(_, _, end)| *end < cfg.segment_bytes);
        let (file, seg_path, offset) = match continue_active {
            Some((_, path, end)) => {
                let mut file = st
                    .fs
                    .open(path, OpenMode::Existing)
                    .map_err(|e| io_err("open", path, e))?;
                if cfg.preallocate
                    && file.size().map_err(|e| io_err("stat", path, e))? < cfg.segment_bytes
                {
                    file.allocate(cfg.segment_bytes)
                        .map_err(|e| io_err("preallocate", path, e))?;
                    file.sync_data().map_err(|e| io_err("sync", path, e))?;
                }
                (file, path.clone(), *end)
            }
            None => {
                let (file, path) = create_segment(&st, next_seq)?;
                (file, path, SEGMENT_HEADER_LEN as u64)
            }
        };
        Ok(Writer {
            st,
            rx,
            file,
            seg_path,
            offset,
            buf: Vec::with_capacity(1 << 20),
            next_seq,
            written_seq: resume.last_seq,
            unsynced: false,
            last_sync: Instant::now(),
            sync_due: None,
        })
    }

    pub fn run(mut self) {
        let st = self.st.clone();
        if catch_unwind(AssertUnwindSafe(|| self.run_loop())).is_err() {
            st.fail("the WAL writer thread panicked".into());
        }
    }

    fn run_loop(&mut self) {
        let max_batch = self.st.cfg.max_batch_requests;
        let mut batch: Vec<Request> = Vec::with_capacity(max_batch.min(4096));
        loop {
            let first = match self.sync_due {
                Some(due) => match self.rx.recv_deadline(due) {
                    Ok(req) => Some(req),
                    Err(RecvTimeoutError::Timeout) => {
                        self.sync_or_fail();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
                None => self.rx.recv().ok(),
            };
            let Some(first) = first else {
                // Every handle is gone: make what was written durable and stop.
                self.sync_or_fail();
                return;
            };
            batch.push(first);
            // Everything that piled up while we were busy joins this batch.
            while batch.len() < max_batch {
                match self.rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            if self.process(&mut batch) {
                // Requests still queued after shutdown get `Closed` from their
                // `Completion` as they drop with the channel.
                return;
            }
        }
    }

    fn sync_or_fail(&mut self) {
        if self.st.failure().is_none() {
            if let Err(e) = self.sync() {
                self.st.fail(e.to_string());
            }
        }
        self.sync_due = None;
    }

    /// Writes and syncs one batch, then completes its requests. Returns whether
    /// a shutdown was requested.
    fn process(&mut self, batch: &mut Vec<Request>) -> bool {
        let stop = batch.iter().any(|r| matches!(r, Request::Shutdown));
        let outcome = match self.st.failure() {
            Some(reason) => Err(reason),
            None => self
                .write_batch(batch)
                .map_err(|e| self.st.fail(e.to_string())),
        };
        match outcome {
            Ok(mut ranges) => {
                let durable = self.written_seq;
                self.st.durable_seq.store(durable, Ordering::Release);
                let synced = self.st.synced_seq.load(Ordering::Acquire);
                let mut ranges = ranges.drain(..);
                for req in batch.drain(..) {
                    match req {
                        Request::Append { done, .. } => {
                            done.complete(Ok(ranges.next().expect("one range per append request")))
                        }
                        Request::Sync(tx) => {
                            let _ = tx.send(Ok(synced));
                        }
                        Request::Shutdown => {}
                    }
                }
            }
            Err(reason) => {
                for req in batch.drain(..) {
                    match req {
                        Request::Append { done, .. } => {
                            done.complete(Err(WalError::Failed(reason.clone())))
                        }
                        Request::Sync(tx) => {
                            let _ = tx.send(Err(WalError::Failed(reason.clone())));
                        }
                        Request::Shutdown => {}
                    }
                }
            }
        }
        if self.buf.capacity() > BUF_KEEP_BYTES {
            self.buf = Vec::with_capacity(1 << 20);
        }
        stop
    }

    fn write_batch(&mut self, batch: &[Request]) -> Result<Vec<Range<u64>>, WalError> {
        let mut ranges = Vec::with_capacity(batch.len());
        let mut force_sync = false;
        let mut records = 0u64;
        for req in batch {
            match req {
                Request::Append { records: recs, .. } => {
                    let start = self.next_seq;
                    for (kind, payload) in recs {
                        self.frame(*kind, payload)?;
                    }
                    records += recs.len() as u64;
                    ranges.push(start..self.next_seq);
                }
                Request::Sync(_) | Request::Shutdown => force_sync = true,
            }
        }
        self.flush()?;
        match self.st.cfg.fsync {
            FsyncPolicy::Always => self.sync()?,
            FsyncPolicy::IntervalMs(ms) => {
                let every = Duration::from_millis(ms);
                if force_sync || self.last_sync.elapsed() >= every {
                    self.sync()?;
                } else if self.unsynced && self.sync_due.is_none() {
                    self.sync_due = Some(self.last_sync + every);
                }
            }
            FsyncPolicy::Never => {
                if force_sync {
                    self.sync()?;
                }
            }
        }
        let stats = &self.st.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.records.fetch_add(records, Ordering::Relaxed);
        stats.last_batch_records.store(records, Ordering::Relaxed);
        Ok(ranges)
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), WalError> {
        let len = framed_len(payload.len()) as u64;
        let end = self.offset + self.buf.len() as u64;
        // A record bigger than a whole segment still gets one of its own.
        if end > SEGMENT_HEADER_LEN as u64 && end + len > self.st.cfg.segment_bytes {
            self.roll()?;
        }
        encode_record(&mut self.buf, self.next_seq, kind, payload);
        self.next_seq += 1;
        Ok(())
    }

    /// One write call for everything framed since the last flush.
    fn flush(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_at(self.offset, &self.buf) {
            self.st.stats.write_failures.fetch_add(1, Ordering::Relaxed);
            return Err(io_err("write", &self.seg_path, e));
        }
        self.offset += self.buf.len() as u64;
        self.st
            .stats
            .bytes_written
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        self.buf.clear();
        self.written_seq = self.next_seq - 1;
        self.st.last_seq.store(self.written_seq, Ordering::Release);
        self.unsynced = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        if !self.unsynced {
            return Ok(());
        }
        if !self.st.cfg.unsafe_skip_sync {
            let started = Instant::now();
            if let Err(e) = self.file.sync_data() {
                self.st.stats.sync_failures.fetch_add(1, Ordering::Relaxed);
                return Err(io_err("fdatasync", &self.seg_path, e));
            }
            let took = started.elapsed().as_micros() as u64;
            let stats = &self.st.stats;
            stats.last_sync_micros.store(took, Ordering::Relaxed);
            stats.sync_micros_total.fetch_add(took, Ordering::Relaxed);
            self.st.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.sync_due = None;
        self.st
            .synced_seq
            .store(self.written_seq, Ordering::Release);
        Ok(())
    }

    /// Finishes the active segment (written and synced, whatever the policy, so only
    /// the newest segment can ever be torn) and starts the next one.
    fn roll(&mut self) -> Result<(), WalError> {
        self.flush()?;
        self.sync()?;
        let (file, path) = create_segment(&self.st, self.next_seq)?;
        self.file = file;
        self.seg_path = path;
        self.offset = SEGMENT_HEADER_LEN as u64;
        Ok(())
    }
}

/// Creates a segment whose first record will be `first_seq`: header written and
/// synced, preallocated if configured, directory synced.
fn create_segment(st: &State, first_seq: u64) -> Result<(Box<dyn FsFile>, PathBuf), WalError> {
    let cfg = &st.cfg;
    let path = cfg.dir.join(format::segment_name(first_seq));
    let mut file = st
        .fs
        .open(&path, OpenMode::Create)
        .map_err(|e| io_err("create", &path, e))?;
    let fail_write = |e| {
        st.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        io_err("write header of", &path, e)
    };
    file.write_at(0, &encode_segment_header(first_seq))
        .map_err(fail_write)?;
    if cfg.preallocate {
        file.allocate(cfg.segment_bytes)
            .map_err(|e| io_err("preallocate", &path, e))?;
    }
    if !cfg.unsafe_skip_sync {
        let fail_sync = |op, p: &std::path::Path, e| {
            st.stats.sync_failures.fetch_add(1, Ordering::Relaxed);
            io_err(op, p, e)
        };
        file.sync_data()
            .map_err(|e| fail_sync("fdatasync", &path, e))?;
        st.fs
            .sync_dir(&cfg.dir)
            .map_err(|e| fail_sync("sync dir", &cfg.dir, e))?;
    }
    st.segments.lock().insert(first_seq, path.clone());
    st.stats.segments_created.fetch_add(1, Ordering::Relaxed);
    Ok((file, path))
}
