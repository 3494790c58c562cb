//! Write-ahead log: framed records in segment files, a group-commit writer thread,
//! snapshots, and recovery.
//!
//! The log stores opaque typed records, `(kind: u8, payload: bytes)`, and knows
//! nothing about what they mean. Callers encode payloads (rmp-serde) and decide
//! what to do once a record is durable: **nothing may be acknowledged or published
//! before its `on_durable` callback reported success** (see [`Wal::try_append`]).
//!
//! # Files
//!
//! One data directory holds:
//!
//! | file | content |
//! |---|---|
//! | `00000000000000000001.wal` | a segment; the name is the seq of its first record, 20 digits |
//! | `snapshot-00000000000000001000.snap` | a snapshot covering every record up to seq 1000 |
//! | `recycled-00000000000000000001.wal.tmp` | a segment compacted away and kept for reuse (`recycle_segments`); kept by recovery up to that number, never read |
//! | `next-segment.wal.tmp` | the next segment, prepared ahead of the rollover (zero-filled, or a recycled file); kept by recovery for reuse with preallocation on, never read |
//! | `*.tmp` | anything else: a snapshot being written; removed by recovery (never valid) |
//! | `*.corrupt-N` | a copy made by [`tools::repair`] before it cut anything; never read |
//!
//! All integers are little-endian. All checksums are CRC32C (Castagnoli).
//!
//! ## Segment header (32 bytes)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `ROTAWAL\0` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length (32) |
//! | 12 | 4 | reserved, zero |
//! | 16 | 8 | first seq (equals the number in the file name) |
//! | 24 | 4 | reserved, zero |
//! | 28 | 4 | CRC32C of bytes 0..28 |
//!
//! ## Record (24-byte header + payload), back to back after the segment header
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | payload length `n` (at most 16 MiB) |
//! | 4 | 8 | seq: the previous record's seq + 1, across segments |
//! | 12 | 1 | kind (record type, chosen by the caller) |
//! | 13 | 3 | reserved, zero |
//! | 16 | 4 | header CRC: CRC32C of bytes 0..16 |
//! | 20 | 4 | record CRC: CRC32C of bytes 0..16 followed by the payload |
//! | 24 | n | payload |
//!
//! The length has its own checksum (the header CRC), so a flipped bit in it is
//! caught before the length is used: a reader never allocates or skips by a
//! garbage length. A header of zeros is never valid (the CRC of zeros is not
//! zero), so a zero-filled (preallocated) tail after the last record reads as the
//! end of the log.
//!
//! ## Recycled segments
//!
//! A segment made from a recycled file still holds that file's old records after
//! its own (PostgreSQL recycles its WAL files the same way). They are told apart by
//! seq: seqs only grow, so every old record has a seq below the segment's first. A
//! valid record with a lower seq, or bytes that are not a record followed by nothing
//! but such records and fragments of them, is the end of the segment's records
//! (`ScanEnd::Stale`), exactly like a zero-filled tail; only a valid record with a
//! seq at least the segment's first counts as "valid records follow" (damage in the
//! middle). A record torn by a crash over old content therefore reads as the end of
//! the log and is overwritten by the next append rather than cut off.
//!
//! ## Snapshot file (40-byte header + payload)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `ROTASNP\0` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length (40) |
//! | 12 | 4 | reserved, zero |
//! | 16 | 8 | covers seq: the snapshot includes every record up to this seq |
//! | 24 | 8 | payload length |
//! | 32 | 4 | CRC32C of the payload |
//! | 36 | 4 | CRC32C of bytes 0..36 |
//! | 40 | n | payload (opaque to the log) |
//!
//! # Writing: group commit
//!
//! Appends go through a **bounded** channel to one writer thread. The writer takes
//! everything queued (up to a cap), frames it into one buffer, writes it with one
//! positional write, syncs once (`fdatasync`), publishes the durable watermark and
//! only then runs every request's `on_durable` callback. While it syncs, new
//! requests pile up in the channel and form the next batch: no timers, and the
//! batch grows exactly as fast as the disk is slow.
//!
//! Callers get the most out of it by keeping many appends in flight from a few
//! threads (`try_append` with a callback that sends a message), not by parking one
//! thread per append: on 2 cores the first form reached ~1.5M durable records/s
//! with 256 appends in flight, the second ~150k/s (see `BENCHMARKS.md`).
//!
//! With `preallocate`, each segment is zero-filled to `segment_bytes` and synced
//! before it takes records, so a later `fdatasync` has no size or block-map change
//! to write (measured ~30% faster per sync here). The next segment is prepared on
//! a helper thread (`next-segment.wal.tmp`) and renamed into place at rollover.
//!
//! A segment is rolled over when the next record would pass `segment_bytes`: the
//! old segment is written and synced first (whatever the policy), then the new one
//! is created, its header synced and the directory synced. So only the newest
//! segment can ever have a torn tail.
//!
//! # Failure is fatal
//!
//! A failed write or sync stops the log for good (until the process restarts and
//! recovers): every pending and later request fails with [`WalError::Failed`],
//! nothing is acknowledged after it, and the sync is never retried. After a failed
//! `fsync` the kernel may have dropped the dirty pages and a retry would "succeed"
//! without the data (PostgreSQL's fsyncgate, 2018); only a restart that re-reads
//! the log from disk knows what is really there.
//!
//! # Recovery
//!
//! Newest snapshot whose checksums hold (an invalid one is skipped with a warning
//! and the next older one used), then every later record in seq order. The last
//! record of the newest segment may be torn (incomplete, or failing its checksum,
//! with nothing valid after it): it is cut off (the file truncated) and reported
//! in [`Recovered::torn_tail`]. A segment before the newest may end in bytes that
//! are not a record (the rest of a recycled or zero-filled file) only if the next
//! segment starts right after its last record. Any other damage (a bad record with
//! valid records after it, a bad record in an older segment followed by missing
//! records, a seq gap or regression, a missing segment) is refused with [`WalError::Corrupt`] naming the segment, byte offset
//! and expected seq; [`tools::repair`] exists for an operator who decides to cut.
//!
//! Known limit: a crash can in principle persist a later record of an unsynced
//! batch but not an earlier one (page writeback order is not append order). That
//! looks exactly like a bit flip in the middle and is refused; nothing acknowledged
//! is at stake, and `repair` resolves it.
//!
//! # Snapshots and compaction
//!
//! [`Wal::write_snapshot`] writes `*.tmp`, syncs it, renames it, syncs the
//! directory. The newest `keep_snapshots` snapshots (default 2) are kept; a segment
//! is deleted once all its records are covered by the *oldest kept* snapshot, so
//! falling back to the previous snapshot always finds the records it needs.
//!
//! With `preallocate`, up to `recycle_segments` of those segments are renamed
//! `recycled-*.wal.tmp` instead of deleted (the directory synced before any is
//! reused, so a crash never shows an old segment's name over new content), and the
//! thread that prepares the next segment takes one of them instead of zero-filling
//! a new file: the file already has every block written at its full size, so its
//! syncs stay metadata-free, half the bytes a segment costs the disk are saved, and
//! no freed blocks are discarded (on a filesystem mounted with `discard`, deleting
//! a 64 MiB file makes the log's syncs of that moment wait).

mod format;
mod fs;
mod recovery;
pub mod tools;
mod writer;

pub use format::{decode_snapshot, MAX_RECORD_BYTES, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
pub use fs::{DirLock, Fault, Fs, FsFile, MemFs, OpenMode, RealFs, SyncHold, LOCK_FILE};

use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use writer::{Completion, Request};

/// When an append counts as durable, and what each choice risks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Acknowledge only after the `fdatasync` that covers the record. Nothing
    /// acknowledged is lost on a crash or power cut. The default.
    #[default]
    Always,
    /// Acknowledge after the write reaches the OS; sync at most every N ms. A
    /// process crash loses nothing, but a power cut or kernel crash can lose up to
    /// N ms of acknowledged records.
    IntervalMs(u64),
    /// Acknowledge after the write; the OS flushes when it likes (plus a sync at
    /// each segment rollover and at shutdown). A power cut can lose any amount of
    /// acknowledged records, typically up to 30 s of them.
    Never,
}

/// WAL settings. Units are in the field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Data directory; created if missing.
    pub dir: PathBuf,
    /// A segment is rolled over before it would grow past this size.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Append requests that may wait for the writer; beyond it `try_append` answers
    /// [`WalError::Full`].
    pub queue_capacity: usize,
    /// Fill each new segment with zeros up front, so a sync never has to update the
    /// file's size or block map.
    pub preallocate: bool,
    /// With `preallocate`: segments compacted away are kept (renamed
    /// `recycled-<seq>.wal.tmp`, at most this many) and reused as later segments
    /// instead of deleting old files and zero-filling new ones. 0 = delete them.
    pub recycle_segments: usize,
    /// Snapshots kept on disk (at least 1). Segments are deleted only once the
    /// oldest kept snapshot covers them.
    pub keep_snapshots: usize,
    /// Most append requests taken into one batch (bounds the latency of one batch).
    pub max_batch_requests: usize,
    /// With `fsync = "always"`, once appends overlap (the previous batch held more
    /// than one): a sync starts at least this many microseconds after the previous
    /// one ended. A batch that arrives sooner waits for the rest of the interval, and
    /// whatever arrives meanwhile joins it: under load, fewer and larger batches, so
    /// fewer syncs and fewer wake-ups of the threads waiting for them (at 20,000
    /// leads/s, 300 us: about 13 % less CPU per lead; at 40,000 leads/s offered, 10 %
    /// more accepted). A request after a quiet spell, or from a lone client that waits
    /// for each answer (batches of one), waits for nothing. 0 = sync as soon as a
    /// batch is written.
    pub min_sync_interval_us: u64,
    /// How long an open waits for another process to let go of the directory (one
    /// killed a moment ago is still exiting; an old one in a rolling update is still
    /// shutting down) before it is refused with [`WalError::InUse`].
    #[serde(default = "default_lock_wait_ms")]
    pub lock_wait_ms: u64,
    /// Test switch: skip every sync while pretending it happened. Exists only to
    /// prove that the crash tests catch a log that does not sync.
    #[doc(hidden)]
    #[serde(skip)]
    pub unsafe_skip_sync: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            dir: PathBuf::from("rota-data/wal"),
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Always,
            queue_capacity: 65_536,
            preallocate: true,
            recycle_segments: 8,
            keep_snapshots: 2,
            max_batch_requests: 4_096,
            min_sync_interval_us: 300,
            lock_wait_ms: default_lock_wait_ms(),
            unsafe_skip_sync: false,
        }
    }
}

impl WalConfig {
    /// Defaults with the given directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig { dir: dir.into(), ..WalConfig::default() }
    }

    pub fn validate(&self) -> Result<(), WalError> {
        let bad = |m: String| Err(WalError::InvalidConfig(m));
        if self.segment_bytes < 4096 {
            return bad(format!("segment_bytes = {} is too small; use at least 4096", self.segment_bytes));
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity must be at least 1".into());
        }
        if self.keep_snapshots == 0 {
            return bad("keep_snapshots must be at least 1".into());
        }
        if self.max_batch_requests == 0 {
            return bad("max_batch_requests must be at least 1".into());
        }
        if self.min_sync_interval_us > 100_000 {
            return bad(format!(
                "min_sync_interval_us = {} would hold every acknowledgement that long; use at most 100000",
                self.min_sync_interval_us
            ));
        }
        if let FsyncPolicy::IntervalMs(0) = self.fsync {
            return bad(
                "fsync = {interval_ms = 0} is `always` in disguise; use \"always\" or at least 1".into()
            );
        }
        Ok(())
    }
}

/// Everything that can go wrong, with enough detail to act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("WAL queue is full; answer `overloaded` and retry later")]
    Full,
    #[error("WAL has failed and refuses writes until the process restarts: {0}")]
    Failed(Arc<str>),
    #[error("WAL is shut down")]
    Closed,
    #[error("WAL I/O error: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("corrupt WAL: segment {}, byte offset {offset}, expected seq {expected_seq}: {reason}", segment.display())]
    Corrupt { segment: PathBuf, offset: u64, expected_seq: u64, reason: String },
    #[error("WAL record of {len} bytes exceeds the {max}-byte limit")]
    RecordTooLarge { len: usize, max: usize },
    #[error("invalid WAL config: {0}")]
    InvalidConfig(String),
    #[error("snapshot covering seq {covers_seq} refused: {reason}")]
    Snapshot { covers_seq: u64, reason: String },
    /// Not a failure: two snapshots raced (a periodic one still encoding when the stop's
    /// final one was written) and the newer one is on disk.
    #[error("snapshot covering seq {covers_seq} not written: a newer snapshot covering seq {newest} exists")]
    Superseded { covers_seq: u64, newest: u64 },
    #[error("seq {from_seq} is no longer in the WAL (oldest kept: {oldest})")]
    Compacted { from_seq: u64, oldest: u64 },
    #[error(
        "the WAL directory {} is in use by another process (it holds {}/{}); stop that \
         process first, or give this one another data_dir",
        dir.display(), dir.display(), fs::LOCK_FILE
    )]
    InUse { dir: PathBuf },
}

fn default_lock_wait_ms() -> u64 {
    15_000
}

/// [`lock_dir`], waiting up to `wait` for another process to let go of it.
fn lock_dir_waiting(fs: &dyn Fs, dir: &Path, wait: std::time::Duration) -> Result<fs::DirLock, WalError> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match lock_dir(fs, dir) {
            Err(WalError::InUse { .. }) if started.elapsed() < wait => {
                if !said {
                    said = true;
                    tracing::warn!(dir = %dir.display(), wait_ms = wait.as_millis() as u64,
                        "the WAL directory is held by another process; waiting for it to exit");
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Takes `dir` for this process ([`Fs::lock_dir`]), creating it if needed.
pub(crate) fn lock_dir(fs: &dyn Fs, dir: &Path) -> Result<fs::DirLock, WalError> {
    fs.create_dir_all(dir).map_err(|e| io_err("create dir", dir, e))?;
    fs.lock_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => WalError::InUse { dir: dir.to_path_buf() },
        _ => io_err("lock", dir, e),
    })
}

pub(crate) fn io_err(op: &'static str, path: &Path, e: std::io::Error) -> WalError {
    WalError::Io { op, path: path.to_path_buf(), source: Arc::new(e) }
}

/// One record handed back by [`Wal::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// What recovery hands to the [`Wal::open_with`] callback, in order: at most one
/// snapshot, then every later record.
#[derive(Debug, Clone, Copy)]
pub enum Replayed<'a> {
    Snapshot { covers_seq: u64, bytes: &'a [u8] },
    Record { seq: u64, kind: u8, payload: &'a [u8] },
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// Where the cut was made; 0 means the whole segment was removed (its header was torn).
    pub offset: u64,
    pub bytes_cut: u64,
    pub reason: String,
}

/// A snapshot recovery could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSnapshot {
    pub path: PathBuf,
    pub reason: String,
}

/// The outcome of recovery.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// `(covers_seq, bytes)` of the snapshot used; filled by [`Wal::open`] only
    /// ([`Wal::open_with`] hands the bytes to its callback instead).
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub snapshot_seq: Option<u64>,
    /// Records after the snapshot; filled by [`Wal::open`] only.
    pub records: Vec<Record>,
    pub skipped_snapshots: Vec<SkippedSnapshot>,
    pub torn_tail: Option<TornTail>,
    /// The seq the next append continues after.
    pub last_seq: u64,
    pub records_replayed: u64,
    pub bytes_replayed: u64,
    pub segments_read: usize,
    pub duration: Duration,
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalStats {
    pub bytes_written: u64,
    pub batches: u64,
    pub records: u64,
    pub segments_created: u64,
    pub segments_live: u64,
    pub segments_deleted: u64,
    /// Segments compacted away and kept for reuse instead of deleted.
    pub segments_recycled: u64,
    /// New segments made from a recycled file (no zero-fill, no new blocks).
    pub segments_reused: u64,
    /// Spares (next segments) the background thread prepared ahead of time.
    pub spares_prepared: u64,
    /// New segments that were the spare prepared ahead by the background thread.
    pub segments_from_spare: u64,
    /// Attempts of the background thread to prepare a spare that failed (it tries
    /// again after 250 ms, doubling up to 30 s).
    pub spare_failures: u64,
    pub syncs: u64,
    pub sync_failures: u64,
    pub write_failures: u64,
    pub queue_full: u64,
    pub last_batch_records: u64,
    pub last_sync_micros: u64,
    /// Time spent in `fdatasync` altogether (for an average: divide by `syncs`).
    pub sync_micros_total: u64,
    /// Batches that waited for `min_sync_interval_us` before being written.
    pub interval_waits: u64,
    pub snapshots_written: u64,
    pub failed: bool,
}

#[derive(Default)]
pub(crate) struct StatCells {
    pub bytes_written: AtomicU64,
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub segments_recycled: AtomicU64,
    pub segments_reused: AtomicU64,
    pub spares_prepared: AtomicU64,
    pub segments_from_spare: AtomicU64,
    pub spare_failures: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_failures: AtomicU64,
    pub write_failures: AtomicU64,
    pub queue_full: AtomicU64,
    pub last_batch_records: AtomicU64,
    pub last_sync_micros: AtomicU64,
    pub sync_micros_total: AtomicU64,
    pub interval_waits: AtomicU64,
    pub snapshots_written: AtomicU64,
}

/// State shared by the handles and the writer thread.
pub(crate) struct State {
    /// This process's hold on the directory, for as long as the log is open.
    _lock: fs::DirLock,
    pub cfg: WalConfig,
    pub fs: Arc<dyn Fs>,
    /// Highest seq handed to the disk (written, maybe not synced).
    pub last_seq: AtomicU64,
    /// Highest seq acknowledged per the fsync policy.
    pub durable_seq: AtomicU64,
    /// Highest seq covered by a successful sync.
    pub synced_seq: AtomicU64,
    pub failed: Mutex<Option<Arc<str>>>,
    /// Mirrors `failed.is_some()` so the append path checks it without a lock.
    pub failed_flag: AtomicBool,
    pub stats: StatCells,
    /// Live segments by first seq; the last one is the writer's active segment.
    pub segments: Mutex<BTreeMap<u64, PathBuf>>,
    /// Covers seqs of the snapshots on disk.
    pub snapshots: Mutex<Vec<u64>>,
    /// Compacted segments kept for reuse (`recycle_segments`), oldest first; the
    /// directory entry of each is durable under its recycled name.
    pub recycled: Mutex<Vec<PathBuf>>,
    /// Told about every batch and sync as it happens ([`Wal::set_observer`]).
    pub observer: std::sync::OnceLock<Arc<dyn WalObserver>>,
}

/// Told about every group commit as the writer thread completes it: exact
/// distributions for metrics (one sample per scrape would miss the slow syncs
/// that make a latency tail). Called on the writer thread; must be cheap.
pub trait WalObserver: Send + Sync {
    /// A batch of `records` records was written.
    fn batch(&self, records: u64);
    /// An `fdatasync` succeeded after `took`.
    fn synced(&self, took: std::time::Duration);
}

impl State {
    pub fn failure(&self) -> Option<Arc<str>> {
        if self.failed_flag.load(Ordering::Acquire) {
            self.failed.lock().clone()
        } else {
            None
        }
    }

    /// Marks the log failed for good (first reason wins).
    pub fn fail(&self, reason: String) -> Arc<str> {
        let mut failed = self.failed.lock();
        if let Some(r) = &*failed {
            return r.clone();
        }
        tracing::error!(reason = %reason, dir = %self.cfg.dir.display(), "WAL failed; refusing all writes until restart");
        let r: Arc<str> = reason.into();
        *failed = Some(r.clone());
        self.failed_flag.store(true, Ordering::Release);
        r
    }
}

struct Handle {
    tx: Sender<Request>,
    st: Arc<State>,
    join: Mutex<Option<JoinHandle<()>>>,
    /// Serializes snapshot writes and the compaction that follows them.
    snapshot_lock: Mutex<()>,
}

impl Handle {
    fn stop(&self) -> bool {
        let Some(join) = self.join.lock().take() else {
            return false;
        };
        // Dropping the last handle from inside an `on_durable` callback runs on the
        // writer thread itself; joining would deadlock, and the writer stops anyway
        // once the channel disconnects.
        if join.thread().id() == std::thread::current().id() {
            return false;
        }
        let _ = self.tx.send(Request::Shutdown);
        join.join().is_ok()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A handle to the log. Cheap to clone; every clone feeds the same writer. The
/// writer stops when [`Wal::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Wal {
    h: Arc<Handle>,
}

/// The callback of [`Wal::try_append`].
pub type OnDurable = Box<dyn FnOnce(Result<Range<u64>, WalError>) + Send>;

impl Wal {
    /// Reports every batch and sync to `observer` from now on. Only the first
    /// observer set is kept; returns whether this one was.
    pub fn set_observer(&self, observer: Arc<dyn WalObserver>) -> bool {
        self.h.st.observer.set(observer).is_ok()
    }

    /// Recovers the log in `cfg.dir` (collecting the snapshot and every later
    /// record into [`Recovered`]) and starts the writer.
    pub fn open(cfg: WalConfig, fs: Arc<dyn Fs>) -> Result<(Wal, Recovered), WalError> {
        Self::start(cfg, fs, true, &mut |_| {})
    }

    /// Like [`Wal::open`], but hands the snapshot and then each record to `replay`
    /// as they are read, without collecting them (the fast path for big logs). If
    /// recovery fails half way, `replay` has seen a prefix: discard that state.
    pub fn open_with(
        cfg: WalConfig,
        fs: Arc<dyn Fs>,
        mut replay: impl FnMut(Replayed<'_>),
    ) -> Result<(Wal, Recovered), WalError> {
        Self::start(cfg, fs, false, &mut replay)
    }

    fn start(
        cfg: WalConfig,
        fs: Arc<dyn Fs>,
        collect: bool,
        replay: &mut dyn FnMut(Replayed<'_>),
    ) -> Result<(Wal, Recovered), WalError> {
        cfg.validate()?;
        // Before anything is read or cut: a second process on the same directory
        // would cut the first one's tail as torn and write over its records.
        let lock =
            lock_dir_waiting(fs.as_ref(), &cfg.dir, std::time::Duration::from_millis(cfg.lock_wait_ms))?;
        let (recovered, resume) = recovery::recover(fs.as_ref(), &cfg, collect, replay)?;
        let st = Arc::new(State {
            _lock: lock,
            fs,
            last_seq: AtomicU64::new(resume.last_seq),
            durable_seq: AtomicU64::new(resume.last_seq),
            synced_seq: AtomicU64::new(resume.last_seq),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            stats: StatCells::default(),
            segments: Mutex::new(resume.segments.iter().cloned().collect()),
            snapshots: Mutex::new(resume.snapshots.clone()),
            recycled: Mutex::new(resume.recycled.clone()),
            observer: std::sync::OnceLock::new(),
            cfg,
        });
        let (tx, rx) = bounded(st.cfg.queue_capacity);
        let writer = writer::Writer::start(st.clone(), rx, &resume)?;
        let join = std::thread::Builder::new()
            .name("rota-wal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| io_err("spawn writer thread for", &st.cfg.dir, e))?;
        let h = Handle { tx, st, join: Mutex::new(Some(join)), snapshot_lock: Mutex::new(()) };
        Ok((Wal { h: Arc::new(h) }, recovered))
    }

    fn check_records(&self, records: &[(u8, Vec<u8>)]) -> Result<(), WalError> {
        if let Some(r) = self.h.st.failure() {
            return Err(WalError::Failed(r));
        }
        for (_, payload) in records {
            if payload.len() > MAX_RECORD_BYTES {
                return Err(WalError::RecordTooLarge { len: payload.len(), max: MAX_RECORD_BYTES });
            }
        }
        Ok(())
    }

    fn closed_or_failed(&self) -> WalError {
        self.h.st.failure().map_or(WalError::Closed, WalError::Failed)
    }

    /// Appends `records` as one unit: they get consecutive seqs, assigned by the
    /// writer in submission order, and become durable together.
    ///
    /// `on_durable` runs on the writer thread exactly once: with the assigned seq
    /// range once the batch holding them is durable per the [`FsyncPolicy`], or with
    /// the error that stopped the log. Keep it short (it delays the whole batch
    /// behind it): send a message, complete a future. Publish nothing about these
    /// records before it reports success.
    ///
    /// Returns `Err(WalError::Full)` without queueing when the bounded queue is full
    /// (answer `overloaded`), `Err(WalError::Failed)` after a fatal failure; in
    /// both cases `on_durable` is dropped without being called.
    pub fn try_append(&self, records: Vec<(u8, Vec<u8>)>, on_durable: OnDurable) -> Result<(), WalError> {
        self.check_records(&records)?;
        let req = Request::Append { records, done: Completion::new(on_durable) };
        match self.h.tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(req)) => {
                req.disarm();
                self.h.st.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                Err(WalError::Full)
            }
            Err(TrySendError::Disconnected(req)) => {
                req.disarm();
                Err(self.closed_or_failed())
            }
        }
    }

    /// Like [`Wal::try_append`], but waits for room in the bounded queue instead of
    /// answering `Full` (for callers that already committed to the record, e.g. after
    /// moving money; their own bounded mailboxes provide back-pressure). Errors are
    /// reported through `on_durable`, which always runs exactly once.
    pub fn append(&self, records: Vec<(u8, Vec<u8>)>, on_durable: OnDurable) {
        if let Err(e) = self.check_records(&records) {
            on_durable(Err(e));
            return;
        }
        let req = Request::Append { records, done: Completion::new(on_durable) };
        // A send error hands the request back; dropping it runs the completion with
        // `Closed`, so the caller always hears back.
        let _ = self.h.tx.send(req);
    }

    /// Appends `records` as one unit and waits until they are durable per the
    /// policy. Waits for room in the queue instead of answering `Full`.
    pub fn append_blocking(&self, records: Vec<(u8, Vec<u8>)>) -> Result<Range<u64>, WalError> {
        self.check_records(&records)?;
        let (tx, rx) = bounded(1);
        let done = Completion::new(Box::new(move |r| {
            // The receiver only goes away if this thread panicked; nothing to tell.
            let _ = tx.send(r);
        }));
        if let Err(e) = self.h.tx.send(Request::Append { records, done }) {
            e.into_inner().disarm();
            return Err(self.closed_or_failed());
        }
        rx.recv().unwrap_or(Err(WalError::Closed))
    }

    /// Highest seq acknowledged durable per the policy (everything up to it may be
    /// published and read back with [`Wal::read_range`]).
    pub fn durable_seq(&self) -> u64 {
        self.h.st.durable_seq.load(Ordering::Acquire)
    }

    /// Highest seq covered by a successful `fdatasync` (equals `durable_seq` under
    /// `Always`; lags it under the other policies).
    pub fn synced_seq(&self) -> u64 {
        self.h.st.synced_seq.load(Ordering::Acquire)
    }

    /// Highest seq assigned and written so far.
    pub fn last_seq(&self) -> u64 {
        self.h.st.last_seq.load(Ordering::Acquire)
    }

    /// Why the log stopped, if it did (for health checks).
    pub fn is_failed(&self) -> Option<String> {
        self.h.st.failure().map(|r| r.to_string())
    }

    /// Forces a sync of everything written so far and returns the synced seq.
    pub fn sync(&self) -> Result<u64, WalError> {
        let (tx, rx) = bounded(1);
        if self.h.tx.send(Request::Sync(tx)).is_err() {
            return Err(self.closed_or_failed());
        }
        rx.recv().unwrap_or(Err(WalError::Closed))
    }

    /// Writes a snapshot covering every record up to `covers_seq` (the caller's state
    /// after applying them), durably: temp file, sync, rename, directory sync. Then
    /// drops snapshots beyond `keep_snapshots` and the segments the oldest kept
    /// snapshot covers. Records up to `covers_seq` are synced first if they are not yet.
    pub fn write_snapshot(&self, covers_seq: u64, bytes: &[u8]) -> Result<(), WalError> {
        self.write_snapshot_paced(covers_seq, bytes, true)
    }

    /// [`Wal::write_snapshot`], choosing whether the file goes out in paced steps
    /// ([`FsFile::write_at_paced`]: the log's syncs keep going meanwhile, the snapshot
    /// takes longer) or at once (nothing is being acknowledged, e.g. at shutdown).
    pub fn write_snapshot_paced(&self, covers_seq: u64, bytes: &[u8], paced: bool) -> Result<(), WalError> {
        let _serial = self.h.snapshot_lock.lock();
        let st = &self.h.st;
        let refuse = |reason: String| Err(WalError::Snapshot { covers_seq, reason });
        let last = self.last_seq();
        if covers_seq > last {
            return refuse(format!("the log only holds records up to seq {last}"));
        }
        if let Some(newest) = st.snapshots.lock().last().copied() {
            if covers_seq < newest {
                return Err(WalError::Superseded { covers_seq, newest });
            }
        }
        if self.synced_seq() < covers_seq {
            // A snapshot must never cover records a power cut could still take away,
            // or recovery would continue the seqs after records that are gone.
            self.sync()?;
        }
        let dir = &st.cfg.dir;
        let fs = st.fs.as_ref();
        let name = format::snapshot_name(covers_seq);
        let path = dir.join(&name);
        let tmp = dir.join(format!("{name}{}", format::TMP_SUFFIX));
        let mut file = fs.open(&tmp, OpenMode::Create).map_err(|e| io_err("create", &tmp, e))?;
        // Paced: the log's syncs keep going while a snapshot of hundreds of MB goes out.
        // Header and payload written apart: a payload of hundreds of MB is not copied.
        let header = format::snapshot_header(covers_seq, bytes);
        let at = header.len() as u64;
        file.write_at(0, &header)
            .and_then(|()| if paced { file.write_at_paced(at, bytes) } else { file.write_at(at, bytes) })
            .map_err(|e| io_err("write", &tmp, e))?;
        file.sync_data().map_err(|e| io_err("sync", &tmp, e))?;
        drop(file);
        fs.rename(&tmp, &path).map_err(|e| io_err("rename", &tmp, e))?;
        fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
        st.stats.snapshots_written.fetch_add(1, Ordering::Relaxed);

        // The new snapshot is durable; only now may older files go.
        let mut snaps = st.snapshots.lock();
        if !snaps.contains(&covers_seq) {
            snaps.push(covers_seq);
            snaps.sort_unstable();
        }
        let keep = st.cfg.keep_snapshots;
        let mut removed = false;
        while snaps.len() > keep {
            let old = snaps.remove(0);
            let p = dir.join(format::snapshot_name(old));
            fs.remove(&p).map_err(|e| io_err("remove", &p, e))?;
            removed = true;
        }
        let compact_upto = if snaps.len() >= keep { snaps.first().copied() } else { None };
        drop(snaps);
        let mut recycled = Vec::new();
        if let Some(upto) = compact_upto {
            // Taken out of the segment map under its lock, renamed or removed after:
            // the writer takes that lock to start a segment, and must not wait for
            // the unlinks of gigabytes of preallocated files.
            let compacted: Vec<(u64, PathBuf)> = {
                let mut segs = st.segments.lock();
                let firsts: Vec<u64> = segs.keys().copied().collect();
                // Never the last (active) segment; a segment goes when the next one
                // starts at or before upto + 1, i.e. all its records are <= upto.
                firsts
                    .windows(2)
                    .take_while(|pair| pair[1] <= upto + 1)
                    .map(|pair| {
                        let p = segs.remove(&pair[0]).expect("key listed just above under the same lock");
                        (pair[0], p)
                    })
                    .collect()
            };
            let room = if st.cfg.preallocate { st.cfg.recycle_segments } else { 0 };
            let mut pooled = st.recycled.lock().len();
            let mut left = compacted.into_iter();
            while let Some((first, p)) = left.next() {
                let done = if pooled < room {
                    // Kept for reuse: renamed out of the log, so recovery never reads
                    // it as a segment again.
                    let to = dir.join(format::recycled_name(first));
                    fs.rename(&p, &to).map(|()| {
                        recycled.push(to);
                        pooled += 1;
                        st.stats.segments_recycled.fetch_add(1, Ordering::Relaxed);
                    })
                } else {
                    // Gone already (a removal that took effect but reported an error,
                    // or a hand): done, not a failure of every compaction from now on.
                    match fs.remove(&p) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        other => other,
                    }
                    .map(|()| {
                        st.stats.segments_deleted.fetch_add(1, Ordering::Relaxed);
                    })
                };
                if let Err(e) = done {
                    // This one and those after it go back to the map: the next
                    // compaction tries them again (until a restart, which would). Those
                    // renamed for reuse so far join the pool once the renames are
                    // durable, as below.
                    let what = if pooled < room { "rename for reuse" } else { "remove" };
                    let err = io_err(what, &p, e);
                    {
                        let mut segs = st.segments.lock();
                        segs.insert(first, p);
                        segs.extend(left);
                    }
                    if removed && fs.sync_dir(dir).is_ok() {
                        st.recycled.lock().extend(recycled);
                    }
                    return Err(err);
                }
                removed = true;
            }
        }
        if removed {
            fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
        }
        // Only once the renames are durable may a recycled file be overwritten: a
        // crash must never show an old segment's name over new content.
        st.recycled.lock().extend(recycled);
        Ok(())
    }

    /// Reads durable records with `seq >= from_seq` from disk, in order, calling
    /// `f(seq, kind, payload)` until it returns `false` or the durable watermark is
    /// reached (stream resume). Errs with [`WalError::Compacted`] if `from_seq` is
    /// older than the oldest segment kept.
    ///
    /// Segments are read in 1 MiB chunks from the start of the segment holding
    /// `from_seq` (there is no index), so memory stays small; the cost is a scan
    /// of that segment's earlier records (millions per second).
    pub fn read_range(
        &self,
        from_seq: u64,
        mut f: impl FnMut(u64, u8, &[u8]) -> bool,
    ) -> Result<(), WalError> {
        let upto = self.durable_seq();
        if from_seq > upto {
            return Ok(());
        }
        let st = &self.h.st;
        let segments: Vec<(u64, PathBuf)> = st.segments.lock().iter().map(|(k, v)| (*k, v.clone())).collect();
        let oldest = segments.first().map_or(upto + 1, |(s, _)| *s);
        if from_seq < oldest {
            return Err(WalError::Compacted { from_seq, oldest });
        }
        match recovery::read_durable(st.fs.as_ref(), &segments, from_seq, upto, &mut f) {
            // Compaction deleted a segment while we were reading.
            Err(WalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let oldest = st.segments.lock().keys().next().copied().unwrap_or(upto + 1);
                Err(WalError::Compacted { from_seq, oldest })
            }
            other => other,
        }
    }

    pub fn stats(&self) -> WalStats {
        let s = &self.h.st.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WalStats {
            bytes_written: get(&s.bytes_written),
            batches: get(&s.batches),
            records: get(&s.records),
            segments_created: get(&s.segments_created),
            segments_live: self.h.st.segments.lock().len() as u64,
            segments_deleted: get(&s.segments_deleted),
            segments_recycled: get(&s.segments_recycled),
            segments_reused: get(&s.segments_reused),
            spares_prepared: get(&s.spares_prepared),
            segments_from_spare: get(&s.segments_from_spare),
            spare_failures: get(&s.spare_failures),
            syncs: get(&s.syncs),
            sync_failures: get(&s.sync_failures),
            write_failures: get(&s.write_failures),
            queue_full: get(&s.queue_full),
            last_batch_records: get(&s.last_batch_records),
            last_sync_micros: get(&s.last_sync_micros),
            sync_micros_total: get(&s.sync_micros_total),
            interval_waits: get(&s.interval_waits),
            snapshots_written: get(&s.snapshots_written),
            failed: self.h.st.failed_flag.load(Ordering::Acquire),
        }
    }

    /// Drains the queue, syncs, and stops the writer. Other clones get
    /// [`WalError::Closed`] afterwards.
    pub fn shutdown(self) -> Result<(), WalError> {
        self.h.stop();
        match self.h.st.failure() {
            Some(r) => Err(WalError::Failed(r)),
            None => Ok(()),
        }
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.h.st.cfg.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_handles_can_be_shared_across_threads() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Wal>();
    }

    #[test]
    fn fsync_policy_reads_as_documented_in_toml() {
        #[derive(Deserialize)]
        struct T {
            fsync: FsyncPolicy,
        }
        let parse = |s: &str| toml::from_str::<T>(s).map(|t| t.fsync);
        assert_eq!(parse(r#"fsync = "always""#).unwrap(), FsyncPolicy::Always);
        assert_eq!(parse(r#"fsync = "never""#).unwrap(), FsyncPolicy::Never);
        assert_eq!(parse("fsync = { interval_ms = 5 }").unwrap(), FsyncPolicy::IntervalMs(5));
        assert!(parse(r#"fsync = "sometimes""#).is_err());
    }

    #[test]
    fn config_rejects_unknown_keys_and_names_bad_values() {
        assert!(toml::from_str::<WalConfig>("segment_byte = 4096").is_err());
        let cfg: WalConfig = toml::from_str("dir = \"/x\"\nsegment_bytes = 100").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("segment_bytes = 100"), "{err}");
        assert!(WalConfig::default().validate().is_ok());
    }
}
