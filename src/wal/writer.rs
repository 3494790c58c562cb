//! The single writer thread: group commit, segment rollover, fatal failure.

use super::format::{self, encode_record, encode_segment_header, framed_len, SEGMENT_HEADER_LEN, SPARE_NAME};
use super::fs::{FsFile, OpenMode};
use super::recovery::Resume;
use super::{io_err, FsyncPolicy, OnDurable, State, WalError};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
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
    /// Append requests in the previous batch: more than one means appends overlap,
    /// and only then is `min_sync_interval_us` applied.
    last_batch_appends: usize,
    spare: Option<Spare>,
}

/// Preallocates the next segment on its own thread: writing `segment_bytes` of
/// zeros takes far longer than a batch, and the writer must not stall on it at
/// every rollover.
struct Spare {
    slot: Arc<Mutex<Option<Box<dyn FsFile>>>>,
    tx: Option<Sender<()>>,
    join: Option<JoinHandle<()>>,
}

/// How long the preparing thread waits before trying again after a failure, at first
/// and at most (doubling in between): a disk that was full or failing for a moment
/// gets spares again once it recovers, without a log line per rollover meanwhile.
const SPARE_RETRY_FIRST: Duration = Duration::from_millis(250);
const SPARE_RETRY_MAX: Duration = Duration::from_secs(30);

impl Spare {
    fn start(st: &Arc<State>) -> Spare {
        let slot: Arc<Mutex<Option<Box<dyn FsFile>>>> = Arc::default();
        let (tx, rx) = bounded::<()>(1);
        let (st, thread_slot) = (st.clone(), slot.clone());
        let join = std::thread::Builder::new()
            .name("rota-wal-prealloc".into())
            .spawn(move || {
                // Asked for by the writer only after it took the last spare (and
                // renamed it into place); after a failure this thread tries again on
                // its own, since no rollover will ask while the slot stays empty.
                let mut retry: Option<Duration> = None;
                loop {
                    let asked = match retry {
                        None => rx.recv().is_ok(),
                        Some(wait) => !matches!(rx.recv_timeout(wait), Err(RecvTimeoutError::Disconnected)),
                    };
                    if !asked {
                        return;
                    }
                    if thread_slot.lock().is_some() {
                        retry = None;
                        continue;
                    }
                    match prepare_spare(&st) {
                        Ok(file) => {
                            *thread_slot.lock() = Some(file);
                            st.stats.spares_prepared.fetch_add(1, Ordering::Relaxed);
                            retry = None;
                        }
                        // Not fatal: the writer then creates its segments itself (and
                        // reports any real trouble with the disk from there) until a
                        // later attempt succeeds.
                        Err(e) => {
                            st.stats.spare_failures.fetch_add(1, Ordering::Relaxed);
                            let wait = retry.map_or(SPARE_RETRY_FIRST, |w| (w * 2).min(SPARE_RETRY_MAX));
                            tracing::warn!(
                                error = %e,
                                retry_in_ms = wait.as_millis() as u64,
                                "could not preallocate the next WAL segment"
                            );
                            retry = Some(wait);
                        }
                    }
                }
            })
            .ok();
        let spare = Spare { slot, tx: Some(tx), join };
        spare.request();
        spare
    }

    fn request(&self) {
        if let Some(tx) = &self.tx {
            // Full means a request is already pending: nothing to add.
            let _ = tx.try_send(());
        }
    }

    fn take(&self) -> Option<Box<dyn FsFile>> {
        self.slot.lock().take()
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// The next segment's file, as `SPARE_NAME`: a recycled segment if one is kept
/// (already the right size with every block written: no zero-fill, no new blocks,
/// no discard of freed ones), else a new file filled with zeros. Either way its old
/// content is garbage that recovery tells from the new segment's records (see
/// `ScanEnd::Stale`).
fn prepare_spare(st: &State) -> std::io::Result<Box<dyn FsFile>> {
    let path = st.cfg.dir.join(SPARE_NAME);
    let recycled = {
        let mut pool = st.recycled.lock();
        (!pool.is_empty()).then(|| pool.remove(0))
    };
    let mut file = match recycled {
        Some(old) => {
            if old != path {
                st.fs.rename(&old, &path)?;
            }
            st.stats.segments_reused.fetch_add(1, Ordering::Relaxed);
            st.fs.open(&path, OpenMode::Existing)?
        }
        None => st.fs.open(&path, OpenMode::Create)?,
    };
    if file.size()? < st.cfg.segment_bytes {
        file.allocate(st.cfg.segment_bytes)?;
        if !st.cfg.unsafe_skip_sync {
            file.sync_data()?;
        }
    }
    Ok(file)
}

impl Writer {
    /// Opens the segment recovery ended in (or a new one) for appending.
    pub fn start(st: Arc<State>, rx: Receiver<Request>, resume: &Resume) -> Result<Writer, WalError> {
        let next_seq = resume.last_seq + 1;
        let cfg = &st.cfg;
        let continue_active = resume.active.as_ref().filter(|(_, _, end)| *end < cfg.segment_bytes);
        let (file, seg_path, offset) = match continue_active {
            Some((_, path, end)) => {
                let mut file = st.fs.open(path, OpenMode::Existing).map_err(|e| io_err("open", path, e))?;
                if cfg.preallocate && file.size().map_err(|e| io_err("stat", path, e))? < cfg.segment_bytes {
                    file.allocate(cfg.segment_bytes).map_err(|e| io_err("preallocate", path, e))?;
                    file.sync_data().map_err(|e| io_err("sync", path, e))?;
                }
                (file, path.clone(), *end)
            }
            None => {
                let (file, path) = create_segment(&st, next_seq, None)?;
                (file, path, SEGMENT_HEADER_LEN as u64)
            }
        };
        let spare = cfg.preallocate.then(|| Spare::start(&st));
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
            last_batch_appends: 0,
            spare,
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
            // A sync or shutdown request is not held for the interval.
            if matches!(first, Request::Append { .. }) {
                self.wait_for_sync_interval();
            }
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

    /// `min_sync_interval_us`: under `fsync = "always"`, when the previous batch held
    /// more than one append (appends overlap: there is load to gather), a batch that
    /// would start sooner than the interval after the previous sync waits for the rest
    /// of it (sleeping, not watching the channel: senders wake no one meanwhile), so
    /// what arrives in between joins it. A lone client that waits for each answer
    /// before the next request makes batches of one and never waits: its rate stays
    /// bounded by the disk, not by the interval.
    fn wait_for_sync_interval(&self) {
        let interval = self.st.cfg.min_sync_interval_us;
        if interval == 0 || self.last_batch_appends < 2 || !matches!(self.st.cfg.fsync, FsyncPolicy::Always) {
            return;
        }
        let next = self.last_sync + Duration::from_micros(interval);
        let now = Instant::now();
        if next > now {
            self.st.stats.interval_waits.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(next - now);
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
            None => self.write_batch(batch).map_err(|e| self.st.fail(e.to_string())),
        };
        match outcome {
            Ok(mut ranges) => {
                // One range per append request.
                self.last_batch_appends = ranges.len();
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
                        Request::Append { done, .. } => done.complete(Err(WalError::Failed(reason.clone()))),
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
                    // An append of several records is one unit (durable together): it
                    // starts a new segment rather than being split across two, which
                    // would make its first part durable at the rollover's sync, alone,
                    // unless it is larger than a segment anyway.
                    if recs.len() > 1 {
                        let len: u64 = recs.iter().map(|(_, p)| framed_len(p.len()) as u64).sum();
                        let end = self.offset + self.buf.len() as u64;
                        let seg = self.st.cfg.segment_bytes;
                        if end > SEGMENT_HEADER_LEN as u64
                            && end + len > seg
                            && SEGMENT_HEADER_LEN as u64 + len <= seg
                        {
                            self.roll()?;
                        }
                    }
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
        if let Some(o) = self.st.observer.get() {
            o.batch(records);
        }
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
        self.st.stats.bytes_written.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
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
            let elapsed = started.elapsed();
            if let Some(o) = self.st.observer.get() {
                o.synced(elapsed);
            }
            let took = elapsed.as_micros() as u64;
            let stats = &self.st.stats;
            stats.last_sync_micros.store(took, Ordering::Relaxed);
            stats.sync_micros_total.fetch_add(took, Ordering::Relaxed);
            self.st.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.sync_due = None;
        self.st.synced_seq.store(self.written_seq, Ordering::Release);
        Ok(())
    }

    /// Finishes the active segment (written and synced, whatever the policy, so only
    /// the newest segment can ever be torn) and starts the next one.
    fn roll(&mut self) -> Result<(), WalError> {
        self.flush()?;
        self.sync()?;
        let spare = self.spare.as_ref().and_then(Spare::take);
        let used_spare = spare.is_some();
        let (file, path) = create_segment(&self.st, self.next_seq, spare)?;
        if used_spare {
            self.st.stats.segments_from_spare.fetch_add(1, Ordering::Relaxed);
        }
        // Only after using one: a request queued while the thread still prepares the
        // last would make it prepare another under the same name while this thread
        // renames the first into place.
        if used_spare {
            if let Some(s) = &self.spare {
                s.request();
            }
        }
        self.file = file;
        self.seg_path = path;
        self.offset = SEGMENT_HEADER_LEN as u64;
        Ok(())
    }
}

/// Creates a segment whose first record will be `first_seq`: header written and
/// synced, preallocated if configured, directory synced. A `spare` (already
/// zero-filled and synced) is renamed into place instead of creating a file.
fn create_segment(
    st: &State,
    first_seq: u64,
    spare: Option<Box<dyn FsFile>>,
) -> Result<(Box<dyn FsFile>, PathBuf), WalError> {
    let cfg = &st.cfg;
    let path = cfg.dir.join(format::segment_name(first_seq));
    let from_spare = spare.is_some();
    let mut file = match spare {
        Some(file) => file,
        None => st.fs.open(&path, OpenMode::Create).map_err(|e| io_err("create", &path, e))?,
    };
    let fail_write = |e| {
        st.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        io_err("write header of", &path, e)
    };
    file.write_at(0, &encode_segment_header(first_seq)).map_err(fail_write)?;
    if cfg.preallocate && !from_spare {
        file.allocate(cfg.segment_bytes).map_err(|e| io_err("preallocate", &path, e))?;
    }
    let fail_sync = |op, p: &std::path::Path, e| {
        st.stats.sync_failures.fetch_add(1, Ordering::Relaxed);
        io_err(op, p, e)
    };
    // The header is durable before the name appears, so a segment that exists
    // after a crash always has its header (or is the torn newest one).
    if !cfg.unsafe_skip_sync {
        file.sync_data().map_err(|e| fail_sync("fdatasync", &path, e))?;
    }
    if from_spare {
        let spare_path = cfg.dir.join(SPARE_NAME);
        st.fs.rename(&spare_path, &path).map_err(|e| io_err("rename spare segment to", &path, e))?;
    }
    if !cfg.unsafe_skip_sync {
        st.fs.sync_dir(&cfg.dir).map_err(|e| fail_sync("sync dir", &cfg.dir, e))?;
    }
    st.segments.lock().insert(first_seq, path.clone());
    st.stats.segments_created.fetch_add(1, Ordering::Relaxed);
    Ok((file, path))
}
