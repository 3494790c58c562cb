//! Stream history on disk: the events a tenant's replay buffer evicts, kept in
//! segment files so that a subscriber away for longer than the in-memory buffer
//! (`stream_retention_events`) can still resume without a gap.
//!
//! ```text
//! publish (WAL thread) --evicts--> transit (memory) --spill thread--> segments on disk
//!                                                    every 10 ms, one write per batch
//! resume: memory buffer, else transit, else disk; else `resume_too_old`
//! ```
//!
//! * **Off the hot path.** Publishing only moves an evicted event (a shared pointer)
//!   into the transit queue, under the hub's lock so that an event is always in
//!   exactly one of memory, transit or disk. The spill thread encodes (MessagePack
//!   frames, usually already encoded for subscribers), writes and only then removes
//!   events from transit: a reader finds every event in one of the three places.
//! * **Bounded.** The segments of one tenant hold at most `stream_spill_bytes`
//!   (oldest segment deleted first); transit holds at most `stream_retention_events`
//!   events (a disk that stalls for longer loses the oldest ones, and the history on
//!   disk restarts after them: never a gap inside what is served). It never takes the
//!   log's space: when its filesystem has less free than the smaller of 2 GiB and
//!   10 % of its size (plus the batch), the history deletes itself and skips writing
//!   until there is room again.
//! * **Synced at each snapshot, not per event.** Nothing is acknowledged on the
//!   history; it is a copy of what the log and snapshots hold. Every entry carries a
//!   CRC-32C and its sequence number; a reader serves only entries that check and
//!   follow one another, so a torn or lost write is a shorter history, never a wrong
//!   event. After a restart the history is kept only if it joins what recovery
//!   rebuilt (the snapshot's replay buffer and the log replayed after it). Each
//!   snapshot makes the history durable up to its cut before it is written
//!   ([`Spill::sync`]); a snapshot holds what was in transit at its cut. Recovery
//!   replays the log after the snapshot and publishes its events again, writing
//!   what the buffer evicts every few thousand events
//!   ([`super::hub::StreamHub::publish_recovered`]): the history continues from
//!   where it is durable (kill -9: from where it was written; power cut: at least
//!   from the snapshot's cut). A start after an unclean stop checks every entry
//!   written after the last sync (`synced` file) and ends the history at the first
//!   damage (a power cut keeps any part of what was not synced); a clean stop syncs
//!   everything and records where it ends. The history restarts only when it does
//!   not join: a disk that fell behind (transit full), a write error, or a log that
//!   lost its unsynced tail (`fsync = "never"`) and numbers events again.
//!
//! Files: `<data_dir>/streams/<tenant>/<first seq, 20 digits>.spill`, each a run of
//! entries `len: u32 LE | crc32c(seq ++ frame): u32 LE | seq: u64 LE | frame`, where
//! `frame` is the event's MessagePack stream frame, byte for byte what a MessagePack
//! subscriber receives. A segment holds about `stream_spill_bytes / 64` (4 KiB to
//! 16 MiB). A `tenant` file holds the tenant id the directory belongs to; an `end`
//! file, written at a clean stop and removed at the next start, says where the
//! history ends, so that a start reads no segment (each is read, and every entry
//! checked, when a resume first needs it; after a crash the newest is read at start).
//!
//! Cost, measured at 20,000 leads/s (about 145,000 events/s, all evicted once the
//! buffers are full): about 40 MB/s written and 5-10 % more daemon CPU (BENCHMARKS.md,
//! "Stream history on disk"); at a marketplace's usual hundreds of leads per second,
//! negligible, for tens of minutes of history instead of a few.

use super::hub::Outgoing;
use crate::ids::TenantId;
use crate::protocol::{Encoding, StreamFrame};
use crate::wal::{Fs, FsFile, OpenMode};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Entry header: length, CRC, sequence number.
const HEADER: usize = 16;
/// Largest frame accepted when reading back (a frame is a few hundred bytes; the
/// bound keeps a damaged length from asking for gigabytes).
const MAX_FRAME: usize = 16 << 20;
/// One index point per this many entries of a segment.
const INDEX_EVERY: u64 = 256;
/// How often the spill thread looks for evicted events.
const SPILL_EVERY: Duration = Duration::from_millis(10);
/// Most events written per write call.
const WRITE_BATCH: usize = 8192;
/// Free space the history always leaves on its filesystem, for the log and its
/// snapshots: the smaller of this and [`RESERVE_PERCENT`] of the filesystem.
const RESERVE_BYTES: u64 = 2 << 30;
const RESERVE_PERCENT: u64 = 10;
/// How long the history stops writing after a write error.
const ERROR_BACKOFF: Duration = Duration::from_secs(10);
const SUFFIX: &str = ".spill";
const MARKER: &str = "tenant";
/// Written at a clean stop: `<last seq> <newest segment's length>`, so the next start
/// need not read the newest segment to find where the history ends.
const END: &str = "end";
/// Written by [`Spill::sync`]: `<last seq made durable>`. A start after an unclean
/// stop checks every entry written after it (a power cut may have damaged any of them).
const SYNCED: &str = "synced";
/// Events published at a time while recovery rebuilds a stream, each batch written
/// out before the next (transit would otherwise overflow and drop them).
pub(crate) const RECOVERY_CHUNK: usize = 4096;

/// Counters, for metrics and tests.
#[derive(Debug, Default)]
pub struct SpillStats {
    pub events_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Times the history on disk was dropped for not joining what followed it.
    pub restarts: AtomicU64,
    /// Evicted events dropped from a full transit queue (the disk fell behind).
    pub dropped: AtomicU64,
    /// Batches not written because the filesystem was short of free space (the
    /// history was deleted to give it back).
    pub short_of_space: AtomicU64,
    pub write_errors: AtomicU64,
    pub segments_deleted: AtomicU64,
}

/// Why a spilled history cannot serve a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The oldest event still kept (memory, transit or disk), if known.
    pub oldest: Option<u64>,
}

/// Why a read of the history returned no events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unserved {
    /// The events after the cursor are no longer kept: overtaken by the history's
    /// bound, dropped by a writer that fell behind or failed, or cut off at damage.
    Lost(Lost),
    /// The disk could not be read for a passing reason (the process out of file
    /// descriptors or memory for a moment): the history is kept as it is, and a
    /// later read may serve the same cursor.
    Unreadable(String),
}

impl From<Lost> for Unserved {
    fn from(l: Lost) -> Self {
        Unserved::Lost(l)
    }
}

/// Why [`Spill::read_disk`] failed.
enum ReadFailure {
    /// The bytes are not what was written (a CRC, a length or a sequence number that
    /// does not fit), or the segment is gone: nothing at or before it can be served.
    Damaged(String),
    /// Reading failed for a passing reason and says nothing about the bytes.
    Io(std::io::Error),
}

impl From<std::io::Error> for ReadFailure {
    /// Errors that pass (the process out of file descriptors or memory for a moment,
    /// an interrupted call) keep the history: only this read fails. Any other error
    /// (the file deleted under the reader by the size bound, `EIO` from a bad block)
    /// is taken as what it most likely is, bytes that cannot be served, and the
    /// history is cut there: a reader kept failing on it would never get past it.
    fn from(e: std::io::Error) -> Self {
        let passing =
            matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
            ) || matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock);
        match passing {
            true => ReadFailure::Io(e),
            false => ReadFailure::Damaged(e.to_string()),
        }
    }
}

/// One tenant's history on disk.
pub struct Spill {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    cap_bytes: u64,
    segment_bytes: u64,
    transit_cap: usize,
    transit: Mutex<VecDeque<Arc<Outgoing>>>,
    /// The batch being written: moved out of transit and held here, locked, until it
    /// is on disk. Lock order: `writing`, then `transit`, then `disk`; publishing takes
    /// only `transit`, once per publish.
    ///
    /// The writer runs at the lowest priority, so what it does under `transit` must
    /// take no time at all: preempted there (by any wake-up on its core), it would
    /// hold up the publishing thread, the log's writer, until it runs again (up to a
    /// millisecond measured, on busy cores). It swaps this deque (empty, its capacity
    /// kept) with transit's: a few words, no copy, no allocation. Only a transit
    /// longer than [`WRITE_BATCH`] (a writer that fell behind) is moved in parts.
    writing: Mutex<VecDeque<Arc<Outgoing>>>,
    disk: Mutex<Disk>,
    /// The newest event the stream's replay buffer no longer holds (evicted into
    /// transit, or older than what recovery rebuilt): a cursor at or before it is
    /// served here or not at all.
    evicted_through: AtomicU64,
    /// What [`Spill::oldest_kept`] and [`Spill::disk_bytes`] read, copied here under
    /// the lock of what they mirror (0: none): the first event on disk and the bytes
    /// there (`disk`), the first event of the batch being written (`writing`), the
    /// first in transit (`transit`). The gateway asks for the oldest event kept when a
    /// subscriber resumes, and the metrics sampler for the bytes: read from the locks,
    /// both would wait for the writer's disk I/O (seconds on a stalled disk), which
    /// holds `writing` and `disk` across it.
    disk_first: AtomicU64,
    disk_len: AtomicU64,
    writing_first: AtomicU64,
    transit_first: AtomicU64,
    pub stats: SpillStats,
}

struct Disk {
    /// Oldest first; consecutive: each starts right after the previous one's last.
    segments: VecDeque<Segment>,
    /// The newest segment, open for appending.
    file: Option<Box<dyn FsFile>>,
    /// Last sequence number on disk; 0 = nothing.
    through: u64,
    /// Last sequence number made durable by [`Spill::sync`] (or found at start).
    synced: u64,
    /// Counts restarts of the history ([`Spill::clear`]): a sync that saw one under
    /// way removes the marker it wrote for the history that is gone.
    generation: u64,
    /// Set when the directory belongs to another tenant (nothing is written).
    disabled: Option<String>,
    /// After a write error nothing is written (batches are dropped) until then, so a
    /// disk that keeps failing costs one attempt and one log line per [`ERROR_BACKOFF`].
    backoff_until: Option<std::time::Instant>,
}

/// What one read of the history returns: events still in memory (transit), or
/// `(seq, MessagePack frame)` read from disk.
pub enum Chunk {
    Events(Vec<Arc<Outgoing>>),
    Frames(Vec<(u64, Vec<u8>)>),
}

impl Chunk {
    pub fn is_empty(&self) -> bool {
        match self {
            Chunk::Events(e) => e.is_empty(),
            Chunk::Frames(f) => f.is_empty(),
        }
    }
}

/// A segment as a reader saw it under the lock.
struct SegmentView {
    first: u64,
    last: u64,
    path: PathBuf,
    len: u64,
    index: Option<Arc<Vec<(u64, u64)>>>,
}

struct Segment {
    first: u64,
    last: u64,
    path: PathBuf,
    len: u64,
    /// `(seq, offset)` every [`INDEX_EVERY`] entries; `None` until first needed
    /// (built by reading the file, which also checks every entry).
    index: Option<Arc<Vec<(u64, u64)>>>,
}

impl Spill {
    /// Opens (or creates) the history of `tenant` under `root` (`<data_dir>/streams`).
    /// Damage found is cut off; nothing here fails the daemon's start: a history that
    /// cannot be read is dropped and logged.
    pub fn open(
        fs: Arc<dyn Fs>,
        root: &Path,
        tenant: &TenantId,
        cap_bytes: u64,
        transit_cap: usize,
    ) -> Arc<Spill> {
        let dir = root.join(dir_name(tenant.as_str()));
        let segment_bytes = (cap_bytes / 64).clamp(4 << 10, 16 << 20);
        let spill = Spill {
            fs,
            dir,
            cap_bytes,
            segment_bytes,
            transit_cap,
            transit: Mutex::new(VecDeque::new()),
            writing: Mutex::new(VecDeque::with_capacity(WRITE_BATCH)),
            evicted_through: AtomicU64::new(0),
            disk_first: AtomicU64::new(0),
            disk_len: AtomicU64::new(0),
            writing_first: AtomicU64::new(0),
            transit_first: AtomicU64::new(0),
            disk: Mutex::new(Disk {
                segments: VecDeque::new(),
                file: None,
                through: 0,
                synced: 0,
                generation: 0,
                disabled: None,
                backoff_until: None,
            }),
            stats: SpillStats::default(),
        };
        if let Err(e) = spill.load(tenant) {
            tracing::warn!(tenant = %tenant, dir = %spill.dir.display(), error = %e, "stream history on disk not usable; starting it afresh");
            let mut d = spill.disk.lock();
            spill.clear(&mut d);
        }
        spill.note_disk(&spill.disk.lock());
        Arc::new(spill)
    }

    fn load(&self, tenant: &TenantId) -> std::io::Result<()> {
        self.fs.create_dir_all(&self.dir)?;
        let marker = self.dir.join(MARKER);
        // An empty marker is one whose write a power cut lost (its name had been made
        // durable by a later clean stop): written again, like a missing one.
        match self.fs.read(&marker).and_then(|b| {
            if b.is_empty() {
                Err(std::io::ErrorKind::NotFound.into())
            } else {
                Ok(b)
            }
        }) {
            Ok(owner) if owner != tenant.as_str().as_bytes() => {
                let owner = String::from_utf8_lossy(&owner).into_owned();
                tracing::error!(tenant = %tenant, dir = %self.dir.display(), owner, "stream history directory belongs to another tenant; history on disk off for this tenant");
                self.disk.lock().disabled =
                    Some(format!("{} belongs to tenant {owner:?}", self.dir.display()));
                return Ok(());
            }
            Ok(_) => {}
            Err(_) => {
                let mut f = self.fs.open(&marker, OpenMode::Create)?;
                f.write_at(0, tenant.as_str().as_bytes())?;
                f.sync_data()?;
            }
        }
        let mut firsts: Vec<u64> =
            self.fs.list(&self.dir)?.iter().filter_map(|n| n.strip_suffix(SUFFIX)?.parse().ok()).collect();
        firsts.sort_unstable();
        let mut d = self.disk.lock();
        // Every segment but the newest is indexed (and checked) when first read; its
        // last event is the next one's first minus one.
        for (i, &first) in firsts.iter().enumerate() {
            let path = self.segment_path(first);
            let len = self.fs.file_len(&path)?;
            let last = firsts.get(i + 1).map_or(first, |n| n.saturating_sub(1));
            d.segments.push_back(Segment { first, last, path, len, index: None });
        }
        // Where the history ends: said by a clean stop (read and checked lazily, like
        // the older segments), else found by reading the newest segment now.
        let end = self.fs.read(&self.dir.join(END)).ok();
        if end.is_some() {
            // Consumed: after a later crash the newest segment is read again.
            self.fs.remove(&self.dir.join(END))?;
        }
        let clean = end.as_deref().and_then(|b| {
            let text = std::str::from_utf8(b).ok()?;
            let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        });
        if let (Some(seg), Some((last, len))) = (d.segments.back_mut(), clean) {
            if len == seg.len && last >= seg.first {
                seg.last = last;
            }
        }
        let clean_end = match (d.segments.back(), clean) {
            (Some(seg), Some((last, len))) => len == seg.len && last >= seg.first,
            _ => false,
        };
        if !clean_end && !d.segments.is_empty() {
            // After an unclean stop, every entry written after the last sync may be
            // damaged (a power cut keeps any part of what was not synced): each such
            // segment is read and checked, and the history ends at the first damage.
            let synced = self
                .fs
                .read(&self.dir.join(SYNCED))
                .ok()
                .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse::<u64>().ok())
                .unwrap_or(0);
            d.synced = synced;
            let newest = d.segments.len() - 1;
            let mut i = d.segments.iter().position(|s| s.last > synced).unwrap_or(newest);
            while i < d.segments.len() {
                let is_newest = i + 1 == d.segments.len();
                let seg = &mut d.segments[i];
                let scan = scan(&self.fs.read(&seg.path)?, seg.first);
                let whole = scan.end == seg.len && (is_newest || scan.last == Some(seg.last));
                if scan.end < seg.len {
                    let mut f = self.fs.open(&seg.path, OpenMode::Existing)?;
                    f.set_len(scan.end)?;
                    seg.len = scan.end;
                }
                let keep = match scan.last {
                    Some(last) => {
                        seg.last = last;
                        seg.index = Some(Arc::new(scan.index));
                        i + 1
                    }
                    None => i,
                };
                if !whole || keep == i {
                    // What follows the damage would not join what precedes it.
                    for gone in d.segments.drain(keep..) {
                        self.fs.remove(&gone.path)?;
                    }
                    break;
                }
                i += 1;
            }
        }
        d.through = d.segments.back().map_or(0, |s| s.last);
        if clean_end {
            d.synced = d.through;
        }
        if let Some(seg) = d.segments.back() {
            d.file = Some(self.fs.open(&seg.path, OpenMode::Existing)?);
        }
        Ok(())
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}{SUFFIX}"))
    }

    /// After recovery: keeps the history only if it joins `oldest` (the first event
    /// recovery kept in transit or memory; `next_seq` if none) and holds nothing at or
    /// after `next_seq` (which a log that lost its unsynced tail can renumber).
    pub fn align(&self, oldest: u64, next_seq: u64) {
        let mut d = self.disk.lock();
        if d.through != 0 && (d.through >= next_seq || d.through + 1 < oldest) {
            tracing::info!(dir = %self.dir.display(), on_disk_through = d.through, oldest, next_seq, "stream history on disk does not join the recovered stream; starting it afresh");
            self.clear(&mut d);
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// At a clean stop, after the last drain: makes the history durable, then records
    /// where it ends. The history is not synced while the daemon runs (it is a copy
    /// of what the log and snapshots hold, rebuilt after a crash); a clean stop syncs
    /// it so that a machine stopped right after the daemon (a reboot after a clean
    /// shutdown) keeps it whole. The kernel has written back most of it by then, so
    /// this waits for the last few seconds of writes.
    pub fn close(&self) {
        let mut d = self.disk.lock();
        let Some(seg) = d.segments.back() else { return };
        let text = format!("{} {}\n", d.through, seg.len);
        let older: Vec<PathBuf> = d.segments.iter().rev().skip(1).map(|s| s.path.clone()).collect();
        let durable = d
            .file
            .as_mut()
            .map_or(Ok(()), |f| f.sync_data())
            .and_then(|()| older.iter().try_for_each(|p| self.fs.open(p, OpenMode::Existing)?.sync_data()))
            .and_then(|()| self.fs.sync_dir(&self.dir));
        let written = durable.and_then(|()| {
            let mut f = self.fs.open(&self.dir.join(END), OpenMode::Create)?;
            f.write_at(0, text.as_bytes())?;
            f.sync_data()?;
            self.fs.sync_dir(&self.dir)
        });
        if let Err(e) = written {
            tracing::debug!(dir = %self.dir.display(), error = %e, "stream history end not recorded");
        }
    }

    /// Makes everything written so far durable (the segments written since the last
    /// sync, then the directory) and records up to where ([`SYNCED`]), so that a start
    /// after a power cut checks only what came after. Returns the last event made
    /// durable (0: none).
    ///
    /// Each snapshot calls it after its cut and before it is written: every event
    /// evicted before the cut is then either durable here or in the snapshot's replay
    /// buffer (which holds transit), so after a power cut the history joins the
    /// stream that recovery rebuilds from that snapshot, as it does after a kill.
    /// The batch under way at the cut is waited for (it is in neither). No lock is
    /// held while the disk syncs: the writer goes on meanwhile.
    pub fn sync(&self, paced: bool) -> std::io::Result<u64> {
        drop(self.writing.lock());
        let (through, paths, generation) = {
            let d = self.disk.lock();
            if d.disabled.is_some() || d.through <= d.synced {
                return Ok(d.synced);
            }
            let paths: Vec<PathBuf> =
                d.segments.iter().filter(|s| s.last > d.synced).map(|s| s.path.clone()).collect();
            (d.through, paths, d.generation)
        };
        for p in &paths {
            match self.fs.open(p, OpenMode::Existing) {
                // Paced while requests are acknowledged: the log's syncs would otherwise
                // queue behind up to a snapshot interval of history (hundreds of MB at
                // peak); each step waits for one of 256 KiB at most.
                Ok(mut f) if paced => f.sync_data_paced()?,
                Ok(mut f) => f.sync_data()?,
                // Deleted meanwhile (the size bound, or a restart of the history).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.fs.sync_dir(&self.dir)?;
        // Written aside and renamed over the marker: a power cut in the middle leaves
        // the old marker or the new one, never digits of both (a number above what
        // was synced would spare unsynced entries the check at start).
        let tmp = self.dir.join(format!("{SYNCED}.tmp"));
        let mut f = self.fs.open(&tmp, OpenMode::Create)?;
        f.set_len(0)?;
        f.write_at(0, format!("{through}\n").as_bytes())?;
        f.sync_data()?;
        drop(f);
        self.fs.rename(&tmp, &self.dir.join(SYNCED))?;
        self.fs.sync_dir(&self.dir)?;
        let mut d = self.disk.lock();
        if d.generation != generation {
            // The history restarted meanwhile: the marker speaks of one that is gone.
            let _ = self.fs.remove(&self.dir.join(SYNCED));
            return Ok(0);
        }
        d.synced = d.synced.max(through);
        Ok(through)
    }

    /// The oldest event this history still serves (on disk, being written, or in
    /// transit).
    ///
    /// Read from the copies the locks' holders keep ([`Spill::note_disk`] and the
    /// like), not from the locks: the writer holds `writing` and `disk` across its disk
    /// I/O, and a subscriber's resume must not wait for a stalled disk. Events move
    /// from transit to the batch being written to the disk, and each mover updates the
    /// copy of where an event arrives before the copy of where it left (with release
    /// stores); read here in the opposite order (with acquire loads), an event that
    /// moved meanwhile is seen where it arrived if it is no longer seen where it left.
    /// So the answer is the one the locks would have given at some moment of the call,
    /// as before.
    pub fn oldest_kept(&self) -> Option<u64> {
        let transit = self.transit_first.load(Ordering::Acquire);
        let writing = self.writing_first.load(Ordering::Acquire);
        let disk = self.disk_first.load(Ordering::Acquire);
        [disk, writing, transit].into_iter().find(|&s| s != 0)
    }

    /// Copies where the history on disk starts and its size for the readers that must
    /// not wait for `disk` ([`Spill::oldest_kept`], [`Spill::disk_bytes`]). Called with
    /// `disk` held, after every change of its segments.
    fn note_disk(&self, d: &Disk) {
        self.disk_len.store(d.segments.iter().map(|s| s.len).sum(), Ordering::Relaxed);
        self.disk_first.store(d.segments.front().map_or(0, |s| s.first), Ordering::Release);
    }

    /// [`Spill::note_disk`] for transit, with `transit` held.
    fn note_transit(&self, t: &VecDeque<Arc<Outgoing>>) {
        self.transit_first.store(t.front().map_or(0, |o| o.seq), Ordering::Release);
    }

    /// The oldest event not on disk yet (being written, or in transit).
    pub fn transit_front(&self) -> Option<u64> {
        let w = self.writing.lock();
        w.front().map(|o| o.seq).or_else(|| self.transit.lock().front().map(|o| o.seq))
    }

    /// After recovery rebuilt `hub`'s replay buffer: keeps the history if it joins
    /// what recovery kept (transit, evicted while replaying, then the buffer).
    pub(crate) fn align_with(&self, oldest_buffered: u64, next_seq: u64) {
        self.evicted_through.fetch_max(oldest_buffered.saturating_sub(1), Ordering::AcqRel);
        self.align(self.transit_front().unwrap_or(oldest_buffered), next_seq);
    }

    /// Called by the hub, under its lock, with the events its buffer evicted, oldest
    /// first. Events to drop (outside the lock) when transit is full go to `dropped`.
    pub(crate) fn push_evicted(
        &self,
        evicted: impl IntoIterator<Item = Arc<Outgoing>>,
        dropped: &mut impl Extend<Arc<Outgoing>>,
    ) {
        let mut t = self.transit.lock();
        t.extend(evicted);
        if let Some(last) = t.back() {
            self.evicted_through.fetch_max(last.seq, Ordering::AcqRel);
        }
        let over = t.len().saturating_sub(self.transit_cap);
        if over > 0 {
            self.stats.dropped.fetch_add(over as u64, Ordering::Relaxed);
            dropped.extend(t.drain(..over));
        }
        self.note_transit(&t);
    }

    /// Writes what is in transit to disk. Returns the number of events written.
    pub fn drain(&self) -> usize {
        let mut total = 0;
        loop {
            let mut w = self.writing.lock();
            {
                let mut t = self.transit.lock();
                if t.len() <= WRITE_BATCH {
                    // `w` is empty: this leaves transit its (empty) deque and capacity.
                    std::mem::swap(&mut *w, &mut *t);
                } else {
                    w.extend(t.drain(..WRITE_BATCH));
                }
                // Where the batch arrives first, then where it left (see `oldest_kept`).
                self.writing_first.store(w.front().map_or(0, |o| o.seq), Ordering::Release);
                self.note_transit(&t);
            }
            let n = w.len();
            if n == 0 {
                return total;
            }
            {
                let mut d = self.disk.lock();
                let now = std::time::Instant::now();
                if d.backoff_until.is_some_and(|t| now < t) {
                    // Dropped: the history restarts after the backoff (it no longer
                    // joins), like after a disk that fell behind.
                } else if let Err(e) = self.write(&mut d, w.make_contiguous()) {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(dir = %self.dir.display(), error = %e, backoff_s = ERROR_BACKOFF.as_secs(), "stream history write failed; history dropped, writing again after the backoff");
                    self.clear(&mut d);
                    d.backoff_until = Some(now + ERROR_BACKOFF);
                }
                self.note_disk(&d);
            }
            // Written (or lost to an error, or for a directory of another tenant).
            // Freed after the lock: readers wait for `writing` only while it is written.
            let mut done = std::mem::take(&mut *w);
            self.writing_first.store(0, Ordering::Release);
            drop(w);
            done.clear();
            // Its capacity goes back, for the next swap (unless another `drain` has
            // filled the slot meanwhile: `drain_spills` may run beside the writer).
            let mut w = self.writing.lock();
            if w.is_empty() && w.capacity() < done.capacity() {
                *w = done;
            }
            drop(w);
            total += n;
            if n < WRITE_BATCH {
                return total;
            }
        }
    }

    fn write(&self, d: &mut Disk, batch: &[Arc<Outgoing>]) -> std::io::Result<()> {
        if d.disabled.is_some() {
            return Ok(());
        }
        let fresh: Vec<&Arc<Outgoing>> = batch.iter().filter(|o| o.seq > d.through).collect();
        let Some(first) = fresh.first() else { return Ok(()) };
        // The history never takes the space the log needs: short of the reserve, it
        // deletes itself and skips the batch (it restarts once there is room).
        if let Ok(Some((free, total))) = self.fs.space(&self.dir) {
            let reserve = RESERVE_BYTES.min(total / 100 * RESERVE_PERCENT);
            let need: u64 = fresh.iter().map(|o| (HEADER + o.bytes(Encoding::Msgpack).len()) as u64).sum();
            if free < reserve.saturating_add(need) {
                if self.stats.short_of_space.fetch_add(1, Ordering::Relaxed) == 0 || d.through != 0 {
                    tracing::warn!(dir = %self.dir.display(), free, reserve, "filesystem short of free space; stream history dropped until there is room");
                }
                if d.through != 0 {
                    self.clear(d);
                    self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
        }
        if d.through != 0 && first.seq != d.through + 1 {
            // Transit dropped events (or recovery kept none): the old history does
            // not join; it restarts here.
            tracing::warn!(
                dir = %self.dir.display(),
                on_disk_through = d.through,
                next = first.seq,
                dropped_total = self.stats.dropped.load(Ordering::Relaxed),
                "stream history restarts: events evicted while the writer fell behind were dropped"
            );
            self.clear(d);
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        }
        let mut buf = Vec::with_capacity(fresh.len() * 512);
        let mut i = 0;
        while i < fresh.len() {
            if d.file.is_none() || d.segments.back().is_some_and(|s| s.len >= self.segment_bytes) {
                self.rotate(d, fresh[i].seq)?;
            }
            let seg = d.segments.back_mut().expect("rotate made one");
            buf.clear();
            let start = seg.len;
            while i < fresh.len() && start + (buf.len() as u64) < self.segment_bytes {
                let o = fresh[i];
                let count = o.seq - seg.first;
                if count % INDEX_EVERY == 0 {
                    if let Some(ix) = seg.index.as_mut() {
                        Arc::make_mut(ix).push((o.seq, start + buf.len() as u64));
                    }
                }
                let frame = o.bytes(Encoding::Msgpack);
                put_entry(&mut buf, o.seq, frame);
                seg.last = o.seq;
                i += 1;
            }
            d.file.as_mut().expect("rotate opened it").write_at(start, &buf)?;
            let seg = d.segments.back_mut().expect("still there");
            seg.len = start + buf.len() as u64;
            d.through = seg.last;
            self.stats.bytes_written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        self.stats.events_written.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        // Bounded: the oldest segments go first (never the one being written).
        let mut total: u64 = d.segments.iter().map(|s| s.len).sum();
        while total > self.cap_bytes && d.segments.len() > 1 {
            let old = d.segments.pop_front().expect("more than one");
            total -= old.len;
            self.fs.remove(&old.path)?;
            self.stats.segments_deleted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn rotate(&self, d: &mut Disk, first: u64) -> std::io::Result<()> {
        let path = self.segment_path(first);
        d.file = None;
        let f = self.fs.open(&path, OpenMode::Create)?;
        d.file = Some(f);
        d.segments.push_back(Segment { first, last: first, path, len: 0, index: Some(Arc::new(Vec::new())) });
        Ok(())
    }

    /// Deletes the history on disk (best effort: a file that cannot be removed is
    /// left, and a later start reads what it can of it).
    fn clear(&self, d: &mut Disk) {
        d.file = None;
        for s in d.segments.drain(..) {
            let _ = self.fs.remove(&s.path);
        }
        d.through = 0;
        d.synced = 0;
        d.generation += 1;
        let _ = self.fs.remove(&self.dir.join(SYNCED));
        self.note_disk(d);
    }

    /// Up to `max_events` events (and about `max_bytes`) right after `after`, from
    /// transit or disk. Empty: `after + 1` is not spilled (it is in memory, or not
    /// published yet). `Err`: it was, and is no longer kept (or could not be read).
    pub fn read_after(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Outgoing>>, Unserved> {
        match self.read_frames_after(after, max_events, max_bytes)? {
            Chunk::Events(events) => Ok(events),
            Chunk::Frames(frames) => {
                frames.into_iter().map(|(seq, f)| self.decode(seq, f).map_err(Unserved::from)).collect()
            }
        }
    }

    /// The event of a frame read from disk (what `read_after` returns for it). A frame
    /// that does not decode is damage: the history is cut there.
    pub fn decode(&self, seq: u64, frame: Vec<u8>) -> Result<Arc<Outgoing>, Lost> {
        match rmp_serde::from_slice::<StreamFrame>(&frame) {
            Ok(f) if f.seq == seq => Ok(Arc::new(Outgoing::spilled(seq, f.event, frame))),
            _ => {
                tracing::warn!(dir = %self.dir.display(), seq, "stream history frame does not decode; history cut there");
                Err(self.cut_through(seq))
            }
        }
    }

    /// [`Spill::read_after`] without decoding what comes from disk: a MessagePack
    /// subscriber without a per-pro filter sends the frames as they are.
    pub fn read_frames_after(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Chunk, Unserved> {
        let want = after + 1;
        // Read before transit: an event evicted by then is in transit, being written,
        // on disk, or lost; one evicted later is still in the buffer or in transit
        // when the caller looks again.
        let evicted_through = self.evicted_through.load(Ordering::Acquire);
        {
            let t = self.transit.lock();
            if let (Some(f), Some(b)) = (t.front(), t.back()) {
                if f.seq <= want && want <= b.seq {
                    let skip = (want - f.seq) as usize;
                    return Ok(Chunk::Events(t.iter().skip(skip).take(max_events).cloned().collect()));
                }
            }
        }
        // Not in transit: being written (wait for it: then it is on disk), written
        // already, not evicted yet, or lost. Transit's front and the disk are looked at
        // together, `writing` held, so the writer cannot move events from one to the
        // other between the two looks (until 2026-12-07 transit was looked at after the
        // disk's lock was dropped, and an event the writer took out of transit in
        // between was found in neither and answered `Lost`: a needless 4008).
        let view = {
            let writing = self.writing.lock();
            let transit_first =
                writing.front().map(|o| o.seq).or_else(|| self.transit.lock().front().map(|o| o.seq));
            let d = self.disk.lock();
            drop(writing);
            let on_disk = d.segments.front().is_some_and(|s| s.first <= want) && want <= d.through;
            if !on_disk {
                let (disk_first, through) = (d.segments.front().map(|s| s.first), d.through);
                drop(d);
                return match (disk_first, transit_first) {
                    // Older than anything kept.
                    (Some(o), _) | (None, Some(o)) if want < o => Err(Lost { oldest: Some(o) }.into()),
                    // Between the disk's end and transit: events transit dropped, not
                    // yet noticed by the writer (which then restarts the history).
                    (_, Some(t)) if want > through && want < t => Err(Lost { oldest: Some(t) }.into()),
                    // Evicted from the buffer, and neither in transit nor on disk: the
                    // history dropped it (a write that failed, the disk short of
                    // space, damage cut off). Without this the caller would find it
                    // neither here nor in the buffer, and look again for ever.
                    (o, t) if want <= evicted_through => Err(Lost { oldest: o.or(t) }.into()),
                    // Not evicted yet: the buffer has it.
                    _ => Ok(Chunk::Frames(Vec::new())),
                };
            }
            let seg = d.segments.iter().find(|s| s.first <= want && want <= s.last).expect("on disk");
            SegmentView {
                first: seg.first,
                last: seg.last,
                path: seg.path.clone(),
                len: seg.len,
                index: seg.index.clone(),
            }
        };
        // Read without the lock (the writer goes on meanwhile): a segment deleted under
        // the reader is gone like damaged bytes, and the cursor is then too old. An
        // error that says nothing about the bytes (no file descriptor left, say) keeps
        // the history: only this read fails.
        match self.read_disk(view, want, max_events, max_bytes) {
            Ok(frames) if frames.first().is_some_and(|f| f.0 == want) => Ok(Chunk::Frames(frames)),
            Err(ReadFailure::Io(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "stream history not readable now");
                Err(Unserved::Unreadable(e.to_string()))
            }
            Err(ReadFailure::Damaged(why)) => {
                tracing::warn!(dir = %self.dir.display(), want, %why, "stream history unreadable there; cut");
                Err(self.cut_through(want).into())
            }
            Ok(_) => Err(self.cut_through(want).into()),
        }
    }

    /// Damage at `seq` (or its segment gone): the segment holding it and every older
    /// one are dropped (a reader could not pass it); what follows stays.
    fn cut_through(&self, seq: u64) -> Lost {
        let mut d = self.disk.lock();
        if let Some(k) = d.segments.iter().position(|s| s.first <= seq && seq <= s.last) {
            for s in d.segments.drain(..=k) {
                let _ = self.fs.remove(&s.path);
            }
            if d.segments.is_empty() {
                d.file = None;
                d.through = 0;
            }
        }
        self.note_disk(&d);
        let oldest = d.segments.front().map(|s| s.first);
        drop(d);
        Lost { oldest: oldest.or_else(|| self.transit_front()) }
    }

    fn read_disk(
        &self,
        seg: SegmentView,
        want: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, ReadFailure> {
        let index = match seg.index {
            Some(ix) => ix,
            None => {
                // First read of this segment since start: index (and check) it whole.
                let s = scan(&self.fs.read(&seg.path)?, seg.first);
                if s.last.is_none_or(|l| l < seg.last) {
                    return Err(ReadFailure::Damaged(format!(
                        "{}: damaged after seq {:?} (expected through {})",
                        seg.path.display(),
                        s.last,
                        seg.last
                    )));
                }
                let ix = Arc::new(s.index);
                let mut d = self.disk.lock();
                if let Some(live) = d.segments.iter_mut().find(|x| x.first == seg.first && x.index.is_none())
                {
                    // Entries appended since the read have no index point: a later
                    // read scans a little further from the last one. Never wrong.
                    live.index = Some(ix.clone());
                }
                ix
            }
        };
        let at = index.partition_point(|&(s, _)| s <= want);
        let (mut seq, mut pos) = if at == 0 { (seg.first, 0) } else { index[at - 1] };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // Read in windows from the index point: the entries before `want` are
        // skipped (and checked), the rest returned.
        let mut window = max_bytes.max(64 << 10) + (64 << 10);
        while pos < seg.len && out.len() < max_events && bytes < max_bytes {
            let chunk = self.fs.read_range(&seg.path, pos, window.min((seg.len - pos) as usize))?;
            let mut used_total = 0usize;
            while let Some((s, frame, used)) = entry_at(&chunk[used_total..]) {
                if s != seq {
                    return Err(ReadFailure::Damaged(format!("expected seq {seq}, found {s}")));
                }
                if s >= want {
                    bytes += frame.len();
                    out.push((s, frame.to_vec()));
                }
                seq += 1;
                used_total += used;
                if out.len() >= max_events || bytes >= max_bytes {
                    break;
                }
            }
            if used_total == 0 {
                // An entry longer than the window is read whole; anything else is damage.
                let need =
                    chunk.get(0..4).map(|l| HEADER + u32::from_le_bytes(l.try_into().expect("4")) as usize);
                match need {
                    Some(n) if n > chunk.len() && n <= MAX_FRAME + HEADER && pos + n as u64 <= seg.len => {
                        window = n;
                        continue;
                    }
                    _ => {
                        return Err(ReadFailure::Damaged(format!(
                            "{}: damaged entry at {pos}",
                            seg.path.display()
                        )))
                    }
                }
            }
            pos += used_total as u64;
        }
        Ok(out)
    }

    /// Bytes of history on disk, as of the writer's last change to it: read from a
    /// copy (see [`Spill::note_disk`]), so that the metrics sampler never waits for
    /// the writer's disk I/O.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_len.load(Ordering::Relaxed)
    }

    /// The first and last event on disk, if any.
    pub fn disk_range(&self) -> Option<(u64, u64)> {
        let d = self.disk.lock();
        d.segments.front().map(|s| (s.first, d.through))
    }

    /// The events in transit, oldest first (for the snapshot's replay buffer: see
    /// [`super::hub::StreamHub::buffered_shared`]). The batch being written is not
    /// included: it precedes them and is on disk within one write.
    pub(crate) fn transit_events(&self) -> Vec<Arc<Outgoing>> {
        self.transit.lock().iter().cloned().collect()
    }

    /// Events waiting to be written.
    pub fn transit_len(&self) -> usize {
        let w = self.writing.lock();
        w.len() + self.transit.lock().len()
    }
}

/// What `rota streams verify` found in one tenant's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantHistory {
    pub dir: String,
    /// The tenant id in the directory's `tenant` file, if readable.
    pub tenant: Option<String>,
    pub segments: usize,
    pub bytes: u64,
    /// First and last event of the intact run from the oldest segment on.
    pub range: Option<(u64, u64)>,
    /// Where the first damage is: `<segment file>: <what>`; what follows it is not
    /// served (a resume from before it is told the oldest cursor after it).
    pub damage: Option<String>,
    /// A clean stop recorded where the history ends (`end` file).
    pub clean_stop: bool,
}

/// Reads every tenant's history under `root` (`<data_dir>/streams`), checking every
/// entry (CRC, consecutive seq, the frame decodes and carries its seq). Read-only.
pub fn verify(fs: &dyn Fs, root: &Path) -> std::io::Result<Vec<TenantHistory>> {
    let mut dirs: Vec<String> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for name in dirs {
        let dir = root.join(&name);
        let tenant = fs.read(&dir.join(MARKER)).ok().map(|b| String::from_utf8_lossy(&b).into_owned());
        let mut firsts: Vec<u64> =
            fs.list(&dir)?.iter().filter_map(|n| n.strip_suffix(SUFFIX)?.parse().ok()).collect();
        firsts.sort_unstable();
        let mut h = TenantHistory {
            dir: name,
            tenant,
            segments: firsts.len(),
            bytes: 0,
            range: None,
            damage: None,
            clean_stop: fs.read(&dir.join(END)).is_ok(),
        };
        let mut next: Option<u64> = None;
        for first in firsts {
            let path = dir.join(format!("{first:020}{SUFFIX}"));
            let bytes = fs.read(&path)?;
            h.bytes += bytes.len() as u64;
            if h.damage.is_some() {
                continue;
            }
            let file = path.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            if let Some(n) = next.filter(|&n| n != first) {
                h.damage = Some(format!("{file}: starts at seq {first}, expected {n}"));
                continue;
            }
            let sc = scan(&bytes, first);
            let mut pos = 0usize;
            let mut frames_ok = true;
            while let Some((seq, frame, used)) = entry_at(&bytes[pos..]).filter(|_| (pos as u64) < sc.end) {
                match rmp_serde::from_slice::<StreamFrame>(frame) {
                    Ok(f) if f.seq == seq => {}
                    Ok(f) => {
                        h.damage = Some(format!(
                            "{file}: entry at offset {pos} is seq {seq} but its frame says {}",
                            f.seq
                        ));
                        frames_ok = false;
                        break;
                    }
                    Err(e) => {
                        h.damage =
                            Some(format!("{file}: frame of seq {seq} at offset {pos} does not decode: {e}"));
                        frames_ok = false;
                        break;
                    }
                }
                pos += used;
            }
            if !frames_ok {
                continue;
            }
            if let Some(last) = sc.last {
                h.range = Some((h.range.map_or(first, |r| r.0), last));
                next = Some(last + 1);
            }
            if sc.end < bytes.len() as u64 {
                let expected = sc.last.map_or(first, |l| l + 1);
                h.damage = Some(format!(
                    "{file}: bad or torn entry at offset {} (expected seq {expected}); {} bytes after it",
                    sc.end,
                    bytes.len() as u64 - sc.end
                ));
            }
        }
        out.push(h);
    }
    Ok(out)
}

impl std::fmt::Display for TenantHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = self.tenant.as_deref().unwrap_or("(no tenant file)");
        write!(f, "{} (tenant {owner:?}): {} segment(s), {} bytes", self.dir, self.segments, self.bytes)?;
        match self.range {
            Some((a, b)) => write!(f, ", events {a}-{b}")?,
            None => write!(f, ", no events")?,
        }
        if self.clean_stop {
            write!(f, ", clean stop recorded")?;
        }
        match &self.damage {
            Some(d) => write!(f, "\n  damaged: {d}"),
            None => write!(f, "\n  ok"),
        }
    }
}

/// `entry` written: header then frame. The CRC is computed over the copy just made
/// (in cache), not over the frame, which is usually cold by the time it is evicted.
fn put_entry(buf: &mut Vec<u8>, seq: u64, frame: &[u8]) {
    let at = buf.len();
    buf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(frame);
    let crc = crc32c::crc32c(&buf[at + 8..]);
    buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The entry at the start of `b`, if whole and intact: `(seq, frame, bytes used)`.
fn entry_at(b: &[u8]) -> Option<(u64, &[u8], usize)> {
    if b.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    if len == 0 || len > MAX_FRAME || b.len() < HEADER + len {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    if crc32c::crc32c(&b[8..HEADER + len]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    Some((seq, &b[HEADER..HEADER + len], HEADER + len))
}

struct Scan {
    /// Bytes of intact, consecutive entries from the start.
    end: u64,
    last: Option<u64>,
    index: Vec<(u64, u64)>,
}

/// Reads a segment's entries from its start while they are intact and consecutive
/// from `first`.
fn scan(b: &[u8], first: u64) -> Scan {
    let (mut pos, mut next, mut index) = (0usize, first, Vec::new());
    while let Some((seq, _, used)) = entry_at(&b[pos..]) {
        if seq != next {
            break;
        }
        if (seq - first) % INDEX_EVERY == 0 {
            index.push((seq, pos as u64));
        }
        pos += used;
        let Some(after) = next.checked_add(1) else {
            // The last number there is: nothing can follow it.
            return Scan { end: pos as u64, last: Some(seq), index };
        };
        next = after;
    }
    Scan { end: pos as u64, last: (next > first).then(|| next - 1), index }
}

/// A tenant's directory name: the id itself when it is short and plain, else a
/// readable prefix and a hash (tenant ids may hold any printable character). The
/// `tenant` file inside says whose it is.
fn dir_name(id: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.len() <= 64 && id.chars().all(plain) && !id.starts_with('-') {
        return id.to_owned();
    }
    let prefix: String = id.chars().filter(|&c| plain(c)).take(32).collect();
    let h1 = crc32c::crc32c(id.as_bytes());
    let h2 = crc32c::crc32c_append(0x9e37_79b9, id.as_bytes());
    format!("x{prefix}-{h1:08x}{h2:08x}")
}

/// The thread that writes every tenant's evicted events, every [`SPILL_EVERY`].
/// It ends once the spills are dropped or `stop` is set (after a last drain).
/// The histories the writer thread drains: those opened at start, and any a reload
/// adds later (the writer reads the list again at every round).
#[derive(Clone, Default)]
pub struct Spills(Arc<Mutex<Vec<Weak<Spill>>>>);

impl Spills {
    pub fn add(&self, spill: &Arc<Spill>) {
        self.0.lock().push(Arc::downgrade(spill));
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }

    fn live(&self) -> Vec<Arc<Spill>> {
        self.0.lock().iter().filter_map(Weak::upgrade).collect()
    }
}

pub fn spawn_writer(spills: Spills, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("rota-spill".into()).spawn(move || {
        // Background work: on a small host the requests come first (as for the
        // periodic snapshot: nice 19 rather than an idle class, which under sustained
        // load might never run and let transit overflow).
        super::lower_this_thread_priority();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            let live = spills.live();
            for s in &live {
                s.drain();
                if stopping {
                    s.close();
                }
            }
            if live.is_empty() || stopping {
                return;
            }
            drop(live);
            std::thread::park_timeout(SPILL_EVERY);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hub::StreamHub;
    use crate::ids::LeadId;
    use crate::protocol::StreamEvent;
    use crate::wal::MemFs;

    fn ev(i: u64) -> StreamEvent {
        StreamEvent::LeadClosed { lead: LeadId::new(format!("L{i}")), at: i as i64 }
    }

    fn tenant() -> TenantId {
        TenantId::new("acme")
    }

    /// A hub keeping `retention` events in memory over a history of `cap` bytes.
    fn hub(fs: &Arc<MemFs>, retention: usize, cap: u64) -> (StreamHub, Arc<Spill>) {
        let fs: Arc<dyn Fs> = fs.clone();
        let spill = Spill::open(fs, Path::new("/data/streams"), &tenant(), cap, 10_000);
        (StreamHub::with_spill(retention, Some(spill.clone())), spill)
    }

    /// Everything after `after` as a resume sees it: history chunks, then the buffer.
    fn resume(hub: &StreamHub, spill: &Spill, mut after: u64) -> Result<Vec<u64>, Unserved> {
        let mut seen = Vec::new();
        loop {
            let chunk = spill.read_after(after, 7, 1 << 20)?;
            if chunk.is_empty() {
                match hub.subscribe(Some(after), None, 16, Encoding::Msgpack) {
                    Ok(s) => {
                        seen.extend(s.backlog.iter().map(|o| o.seq));
                        hub.cancel(&s);
                        return Ok(seen);
                    }
                    Err(e) => panic!("nothing spilled after {after} and the buffer refuses it: {e:?}"),
                }
            }
            for o in &chunk {
                assert_eq!(o.event, ev(o.seq), "seq {} carries its own event", o.seq);
                seen.push(o.seq);
            }
            after = chunk.last().expect("not empty").seq;
        }
    }

    /// What [`Spill::oldest_kept`] and [`Spill::disk_bytes`] said when they read the
    /// locks: their copies must give the same answers.
    fn from_the_locks(spill: &Spill) -> (Option<u64>, u64) {
        let w = spill.writing.lock();
        let pending = w.front().map(|o| o.seq).or_else(|| spill.transit.lock().front().map(|o| o.seq));
        let d = spill.disk.lock();
        drop(w);
        (d.segments.front().map(|s| s.first).or(pending), d.segments.iter().map(|s| s.len).sum())
    }

    fn copies(spill: &Spill) -> (Option<u64>, u64) {
        (spill.oldest_kept(), spill.disk_bytes())
    }

    /// A resume asks for the oldest event kept, and the metrics sampler for the bytes
    /// on disk, while the writer may hold `writing` and `disk` across a write to a
    /// stalled disk: both answer without waiting for it, and what they answer is what
    /// the locks hold.
    #[test]
    fn the_oldest_event_kept_and_the_bytes_on_disk_are_answered_while_the_writer_holds_its_locks() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=100).map(ev));
        spill.drain();
        hub.publish((101..=150).map(ev));
        let expected = from_the_locks(&spill);
        assert_eq!(expected.0, Some(1));
        assert!(expected.1 > 0);
        // The writer, in the middle of its disk I/O.
        let writing = spill.writing.lock();
        let disk = spill.disk.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let asking = spill.clone();
        std::thread::spawn(move || {
            let _ = tx.send(copies(&asking));
        });
        let answered = rx.recv_timeout(std::time::Duration::from_secs(60));
        drop((disk, writing));
        assert_eq!(answered, Ok(expected), "answered without waiting for the writer");
    }

    /// The copies follow the history through every change it goes through: events in
    /// transit only, written, bounded (oldest segments deleted), a history restarted
    /// after a write error, damage cut off, a restart of the process, a directory of
    /// another tenant.
    #[test]
    fn the_copies_of_the_oldest_event_kept_and_the_bytes_on_disk_follow_every_change_of_the_history() {
        let fs = Arc::new(MemFs::new());
        let open = |dir: &str, cap: u64| {
            Spill::open(fs.clone() as Arc<dyn Fs>, Path::new(dir), &tenant(), cap, 10_000)
        };
        let spill = open("/data/streams", 64 << 10);
        let check = |spill: &Spill, why: &str| assert_eq!(copies(spill), from_the_locks(spill), "{why}");
        check(&spill, "new, empty");
        assert_eq!(spill.oldest_kept(), None);
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=50).map(ev));
        check(&spill, "in transit only");
        assert_eq!(spill.oldest_kept(), Some(1));
        spill.drain();
        check(&spill, "written");
        for chunk in (51..=5_000u64).collect::<Vec<_>>().chunks(300) {
            hub.publish(chunk.iter().copied().map(ev));
            check(&spill, "more in transit");
            spill.drain();
            check(&spill, "written, bounded");
        }
        assert!(spill.stats.segments_deleted.load(Ordering::Relaxed) > 0, "the bound deleted segments");
        assert!(spill.oldest_kept() > Some(1));
        fs.inject(crate::wal::Fault::WriteError);
        hub.publish((5_001..=5_100).map(ev));
        spill.drain();
        check(&spill, "dropped after a write error");
        assert_eq!(spill.oldest_kept(), None);
        drop((hub, spill));

        let spill = open("/data/streams", 64 << 10);
        check(&spill, "reopened after the error");
        let spill = open("/other", 64 << 10);
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=400).map(ev));
        spill.drain();
        let first_segments: Vec<(u64, PathBuf)> =
            spill.disk.lock().segments.iter().map(|s| (s.first, s.path.clone())).take(2).collect();
        drop((hub, spill));
        let reopened = open("/other", 64 << 10);
        check(&reopened, "reopened");
        assert_eq!(reopened.oldest_kept(), Some(1));
        // Damage in the first segment: it is cut off when read.
        let (_, first) = &first_segments[0];
        let mut bytes = fs.read(first).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        fs.open(first, OpenMode::Existing).unwrap().write_at(0, &bytes).unwrap();
        assert!(reopened.read_after(0, 10_000, 1 << 20).is_err());
        check(&reopened, "damage cut off");
        assert_eq!(reopened.oldest_kept(), Some(first_segments[1].0));

        // Another tenant's directory: nothing is written, nothing is kept once drained.
        let dir = Path::new("/third/acme");
        fs.create_dir_all(dir).unwrap();
        fs.open(&dir.join(MARKER), OpenMode::Create).unwrap().write_at(0, b"someone-else").unwrap();
        let spill = open("/third", 1 << 20);
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=50).map(ev));
        check(&spill, "another tenant's, in transit");
        spill.drain();
        check(&spill, "another tenant's, drained");
        assert_eq!(spill.oldest_kept(), None);
    }

    #[test]
    fn a_resume_older_than_the_buffer_gets_every_event_from_transit_disk_and_memory_in_order() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=100).map(ev));
        // Before the writer ran: the evicted events wait in transit.
        assert_eq!(spill.transit_len(), 90);
        assert_eq!(resume(&hub, &spill, 0).unwrap(), (1..=100).collect::<Vec<_>>());
        spill.drain();
        assert_eq!((spill.transit_len(), spill.disk_range()), (0, Some((1, 90))));
        hub.publish((101..=150).map(ev));
        // Disk 1-90, transit 91-140, buffer 141-150.
        for after in [0, 37, 89, 90, 91, 139, 140, 149] {
            assert_eq!(
                resume(&hub, &spill, after).unwrap(),
                (after + 1..=150).collect::<Vec<_>>(),
                "after {after}"
            );
        }
        // The frames read back are the ones a MessagePack subscriber gets live.
        let back = spill.read_after(41, 1, 1 << 20).unwrap();
        let live = Outgoing::new(42, ev(42));
        assert_eq!(back[0].bytes(Encoding::Msgpack), live.bytes(Encoding::Msgpack));
        assert_eq!(back[0].bytes(Encoding::Json), live.bytes(Encoding::Json));
    }

    #[test]
    fn the_history_is_bounded_by_deleting_its_oldest_segments_and_older_cursors_are_refused() {
        let fs = Arc::new(MemFs::new());
        let cap = 64 << 10;
        let (hub, spill) = hub(&fs, 10, cap);
        for chunk in (1..=20_000u64).collect::<Vec<_>>().chunks(500) {
            hub.publish(chunk.iter().copied().map(ev));
            spill.drain();
        }
        assert!(spill.disk_bytes() <= cap + spill.segment_bytes, "{} bytes on disk", spill.disk_bytes());
        assert!(spill.stats.segments_deleted.load(Ordering::Relaxed) > 0);
        let (first, last) = spill.disk_range().unwrap();
        assert!(first > 1 && last == 19_990, "disk holds {first}-{last}");
        assert_eq!(resume(&hub, &spill, 0), Err(Lost { oldest: Some(first) }.into()));
        assert_eq!(resume(&hub, &spill, first - 1).unwrap(), (first..=20_000).collect::<Vec<_>>());
    }

    #[test]
    fn the_history_survives_a_reopen_and_a_torn_tail_is_cut_off() {
        let fs = Arc::new(MemFs::new());
        {
            let (hub, spill) = hub(&fs, 10, 1 << 20);
            hub.publish((1..=60).map(ev));
            spill.drain();
        }
        let dir = Path::new("/data/streams/acme");
        let seg = dir.join(format!("{:020}{SUFFIX}", 1));
        let len = fs.file_len(&seg).unwrap();
        // Tear the last entry (a write the crash cut short).
        fs.open(&seg, OpenMode::Existing).unwrap().set_len(len - 3).unwrap();
        let dyn_fs: Arc<dyn Fs> = fs.clone();
        let spill = Spill::open(dyn_fs, Path::new("/data/streams"), &tenant(), 1 << 20, 10_000);
        assert_eq!(spill.disk_range(), Some((1, 49)));
        // Recovery rebuilt events 50-60 in the buffer: the history joins and stays.
        spill.align(50, 61);
        assert_eq!(spill.disk_range(), Some((1, 49)));
        let got: Vec<u64> = spill.read_after(0, 100, 1 << 20).unwrap().iter().map(|o| o.seq).collect();
        assert_eq!(got, (1..=49).collect::<Vec<_>>());
        // A buffer that starts later leaves a gap: the history starts afresh.
        spill.align(55, 61);
        assert_eq!(spill.disk_range(), None);
        assert_eq!(fs.list(dir).unwrap(), vec![MARKER.to_string()]);
    }

    #[test]
    fn a_clean_stop_records_where_the_history_ends_and_appending_resumes_there() {
        let fs = Arc::new(MemFs::new());
        let open = || {
            Spill::open(fs.clone() as Arc<dyn Fs>, Path::new("/data/streams"), &tenant(), 64 << 10, 10_000)
        };
        let spill = open();
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=500).map(ev));
        spill.drain();
        spill.close();
        let end = Path::new("/data/streams/acme").join(END);
        assert_eq!(String::from_utf8(fs.read(&end).unwrap()).unwrap().split(' ').next(), Some("490"));
        drop((hub, spill));
        let spill = open();
        // The record is consumed at start: a crash after this start reads the segment.
        assert!(fs.read(&end).is_err());
        assert_eq!(spill.disk_range().map(|r| r.1), Some(490));
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.set_next_seq(491);
        hub.publish((491..=700).map(ev));
        spill.drain();
        let first = spill.disk_range().unwrap().0;
        let mut got = Vec::new();
        loop {
            let chunk = spill.read_after(got.last().copied().unwrap_or(first - 1), 10_000, 1 << 20).unwrap();
            if chunk.is_empty() {
                break;
            }
            got.extend(chunk.iter().map(|o| o.seq));
        }
        assert_eq!(got, (first..=690).collect::<Vec<_>>(), "one run of events across the restart");
        // A record that does not match the files is ignored (the segment is read).
        spill.close();
        let newest = spill.disk.lock().segments.back().map(|s| s.path.clone()).unwrap();
        let len = fs.file_len(&newest).unwrap();
        fs.open(&newest, OpenMode::Existing).unwrap().set_len(len - 5).unwrap();
        drop((hub, spill));
        assert_eq!(open().disk_range().map(|r| r.1), Some(689), "the torn last entry is cut off");
    }

    #[test]
    fn a_clean_stop_makes_the_history_durable_so_a_power_cut_right_after_loses_none_of_it() {
        for clean in [true, false] {
            let fs = Arc::new(MemFs::new());
            let open = || {
                Spill::open(
                    fs.clone() as Arc<dyn Fs>,
                    Path::new("/data/streams"),
                    &tenant(),
                    64 << 10,
                    10_000,
                )
            };
            let spill = open();
            let hub = StreamHub::with_spill(10, Some(spill.clone()));
            hub.publish((1..=500).map(ev));
            spill.drain();
            assert!(spill.disk.lock().segments.len() > 1, "several segments");
            if clean {
                spill.close();
            }
            let before = spill.disk_range();
            drop((hub, spill));
            // The machine goes down right after the daemon stopped (a reboot).
            fs.power_cut();
            let spill = open();
            if !clean {
                // Not synced while running: without the clean stop the cut takes it.
                assert_ne!(spill.disk_range(), before, "the history was never synced");
                continue;
            }
            assert_eq!(spill.disk_range(), before);
            let (first, through) = before.unwrap();
            let mut got = Vec::new();
            loop {
                let chunk =
                    spill.read_after(got.last().copied().unwrap_or(first - 1), 10_000, 1 << 20).unwrap();
                if chunk.is_empty() {
                    break;
                }
                got.extend(chunk.iter().map(|o| o.seq));
            }
            assert_eq!(got, (first..=through).collect::<Vec<_>>(), "every event, readable");
        }
    }

    #[test]
    fn after_an_unclean_stop_what_was_written_since_the_last_sync_is_checked_and_ends_at_its_first_damage() {
        let fs = Arc::new(MemFs::new());
        // Small segments: 4 KiB each at this cap.
        let open = || {
            Spill::open(fs.clone() as Arc<dyn Fs>, Path::new("/data/streams"), &tenant(), 64 << 10, 10_000)
        };
        let spill = open();
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=200).map(ev));
        spill.drain();
        assert_eq!(spill.sync(false).unwrap(), 190);
        hub.publish((201..=800).map(ev));
        spill.drain();
        let after: Vec<(u64, PathBuf)> = spill
            .disk
            .lock()
            .segments
            .iter()
            .filter(|s| s.first > 190)
            .map(|s| (s.first, s.path.clone()))
            .collect();
        assert!(after.len() >= 3, "several segments written after the sync: {after:?}");
        // A power cut kept the later segments but damaged the middle of the first one
        // written after the sync (the kernel writes pages back in any order).
        let (first, damaged) = after[0].clone();
        let len = fs.file_len(&damaged).unwrap();
        fs.flip_bit(&damaged, len / 2, 3).unwrap();
        drop((hub, spill));
        let reopened = open();
        let (start, through) = reopened.disk_range().unwrap();
        assert_eq!(start, 1);
        assert!(through >= first && through < after[1].0, "ends inside the damaged segment: {through}");
        assert!(
            fs.file_len(&after[1].1).is_err() && fs.file_len(&after[2].1).is_err(),
            "what followed the damage is gone"
        );
        // Everything kept reads back, and the history goes on right after it.
        let hub = StreamHub::with_spill(10, Some(reopened.clone()));
        hub.set_next_seq(through + 1);
        hub.publish((through + 1..=through + 30).map(ev));
        reopened.drain();
        assert_eq!(resume(&hub, &reopened, 0).unwrap(), (1..=through + 30).collect::<Vec<_>>());
    }

    #[test]
    fn a_history_synced_at_a_snapshot_joins_the_stream_recovered_after_a_power_cut() {
        for seed in 0..8 {
            let fs = Arc::new(MemFs::new());
            fs.set_cut_seed(seed);
            let (hub, spill) = hub(&fs, 10, 8 << 20);
            hub.publish((1..=500).map(ev));
            spill.drain();
            // The snapshot's cut: its buffer holds 491-500; the history is synced.
            assert_eq!(spill.sync(false).unwrap(), 490);
            // The traffic after it: written out, never synced; then the power goes.
            for from in (501..=30_500).step_by(1000) {
                hub.publish((from..from + 1000).map(ev));
                spill.drain();
            }
            drop((hub, spill));
            fs.power_cut();
            // Recovery: the snapshot's buffer, then the 30,000 events of the log
            // replayed after it: three times what transit holds.
            let (hub, spill) = self::hub(&fs, 10, 8 << 20);
            hub.set_next_seq(491);
            hub.publish((491..=500).map(ev));
            hub.publish_recovered((501..=30_500).map(ev).collect());
            spill.align_with(hub.oldest_buffered(), hub.next_seq());
            assert_eq!(spill.stats.dropped.load(Ordering::Relaxed), 0, "seed {seed}");
            assert_eq!(spill.stats.restarts.load(Ordering::Relaxed), 0, "seed {seed}");
            assert_eq!(resume(&hub, &spill, 0).unwrap(), (1..=30_500).collect::<Vec<_>>(), "seed {seed}");
        }
    }

    #[test]
    fn damage_inside_an_older_segment_ends_the_history_there_and_is_never_served() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        // Small segments: 4 KiB each at this cap.
        let small = Spill::open(fs.clone() as Arc<dyn Fs>, Path::new("/other"), &tenant(), 64 << 10, 10_000);
        drop((hub, spill));
        let hub = StreamHub::with_spill(10, Some(small.clone()));
        hub.publish((1..=400).map(ev));
        small.drain();
        // Synced (as at a snapshot): a start checks only what was written after.
        assert_eq!(small.sync(false).unwrap(), 390);
        let segs = small.disk.lock().segments.iter().map(|s| (s.first, s.path.clone())).collect::<Vec<_>>();
        assert!(segs.len() >= 3, "{segs:?}");
        // Flip a byte in the middle of the second segment; reopen (older segments are
        // checked when first read, not at start).
        let (second_first, second) = segs[1].clone();
        let mut bytes = fs.read(&second).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        fs.open(&second, OpenMode::Existing).unwrap().write_at(0, &bytes).unwrap();
        drop(hub);
        let reopened =
            Spill::open(fs.clone() as Arc<dyn Fs>, Path::new("/other"), &tenant(), 64 << 10, 10_000);
        // The first segment reads whole; reading into the damaged one is refused and
        // drops it with everything older; the third still serves.
        let first_seg: Vec<u64> =
            reopened.read_after(0, 10_000, 1 << 20).unwrap().iter().map(|o| o.seq).collect();
        assert_eq!(first_seg, (1..second_first).collect::<Vec<_>>());
        let third_first = segs[2].0;
        assert_eq!(
            reopened.read_after(second_first - 1, 10_000, 1 << 20).err(),
            Some(Lost { oldest: Some(third_first) }.into())
        );
        let third = reopened.read_after(third_first - 1, 5, 1 << 20).unwrap();
        assert_eq!(
            third.iter().map(|o| o.seq).collect::<Vec<_>>(),
            (third_first..third_first + 5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_disk_that_falls_behind_loses_the_oldest_events_and_the_history_restarts_after_them() {
        let fs = Arc::new(MemFs::new());
        let dyn_fs: Arc<dyn Fs> = fs.clone();
        let spill = Spill::open(dyn_fs, Path::new("/data/streams"), &tenant(), 1 << 20, 20);
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=30).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), Some((1, 20)));
        // The writer stalls while 70 more are evicted: transit keeps the newest 20.
        hub.publish((31..=100).map(ev));
        assert_eq!(spill.stats.dropped.load(Ordering::Relaxed), 50);
        assert_eq!(
            resume(&hub, &spill, 0).err(),
            Some(Lost { oldest: Some(71) }.into()),
            "1-20 served, then the gap"
        );
        spill.drain();
        // 21-70 are gone: the history restarts at 71 rather than serve a gap.
        assert_eq!(spill.disk_range(), Some((71, 90)));
        assert_eq!(spill.stats.restarts.load(Ordering::Relaxed), 1);
        assert_eq!(resume(&hub, &spill, 20).err(), Some(Lost { oldest: Some(71) }.into()));
        assert_eq!(resume(&hub, &spill, 70).unwrap(), (71..=100).collect::<Vec<_>>());
    }

    #[test]
    fn the_history_gives_its_space_back_before_the_log_would_run_short() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=200).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), Some((1, 190)));
        // Room for what is there, not for the reserve (10 % of this small disk) on top
        // of the next batch: the history deletes itself and skips the batch.
        let used = fs.used_bytes();
        fs.set_capacity(Some(used + used / 20));
        hub.publish((201..=300).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), None);
        let dir = Path::new("/data/streams/acme");
        assert_eq!(fs.list(dir).unwrap(), vec![MARKER.to_string()], "the history's files were deleted");
        assert_eq!(spill.stats.short_of_space.load(Ordering::Relaxed), 1);
        // A resume that needed it is told what is still kept: the buffer's 291-300
        // (a catch-up under way is told its events are lost, nothing older kept).
        assert_eq!(spill.read_after(150, 10, 1 << 20).err(), Some(Lost { oldest: None }.into()));
        assert_eq!(
            hub.subscribe(Some(150), None, 16, Encoding::Json).err(),
            Some(crate::engine::hub::ResumeError::TooOld { oldest_available: 291 })
        );
        // Room again: the history restarts with the next events.
        fs.set_capacity(None);
        hub.publish((301..=320).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), Some((291, 310)));
    }

    #[test]
    fn a_failing_disk_drops_the_history_and_is_not_retried_for_every_batch() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=50).map(ev));
        spill.drain();
        fs.inject(crate::wal::Fault::WriteError);
        hub.publish((51..=60).map(ev));
        spill.drain();
        assert_eq!(spill.stats.write_errors.load(Ordering::Relaxed), 1);
        assert_eq!(spill.disk_range(), None, "dropped, never half-kept");
        // Within the backoff the next batches are dropped without touching the disk.
        let writes = fs.write_count();
        hub.publish((61..=80).map(ev));
        spill.drain();
        assert_eq!((fs.write_count(), spill.stats.write_errors.load(Ordering::Relaxed)), (writes, 1));
        assert_eq!(spill.transit_len(), 0, "transit does not fill up meanwhile");
    }

    #[test]
    fn a_read_that_fails_for_want_of_a_file_descriptor_keeps_the_history() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 64 << 10);
        hub.publish((1..=400).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), Some((1, 390)));
        // A burst of catch-ups takes the last descriptors: one read fails.
        fs.inject(crate::wal::Fault::ReadError);
        match spill.read_after(200, 10, 1 << 20) {
            Err(Unserved::Unreadable(e)) => assert!(e.contains("Too many open files"), "{e}"),
            other => panic!("expected unreadable, got {:?}", other.map(|v| v.len())),
        }
        // Nothing was cut: the same cursor and older ones are served.
        assert_eq!(spill.disk_range(), Some((1, 390)));
        assert_eq!(resume(&hub, &spill, 200), Ok((201..=400).collect::<Vec<_>>()));
        assert_eq!(resume(&hub, &spill, 0).map(|v| v.len()), Ok(400));
    }

    #[test]
    fn a_cursor_whose_events_the_history_dropped_is_lost_not_looked_for_again() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=100).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), Some((1, 90)));
        // A subscriber catching up from disk has been sent 1-20.
        assert_eq!(spill.read_after(0, 20, 1 << 20).unwrap().last().map(|o| o.seq), Some(20));
        // Then a write fails: the history is dropped, and the stream goes quiet.
        fs.inject(crate::wal::Fault::WriteError);
        hub.publish((101..=110).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), None);
        // 21 is in neither transit, disk nor buffer: lost, with nothing older kept.
        // (Answered "not spilled", the gateway would hand over to the buffer, be told
        // "too old", and read again for as long as the stream stayed quiet.)
        assert_eq!(spill.read_after(20, 100, 1 << 20).err(), Some(Lost { oldest: None }.into()));
        assert!(hub.subscribe(Some(20), None, 16, Encoding::Msgpack).is_err());
        // A cursor the buffer still holds is not spilled, as before.
        assert!(spill.read_after(105, 100, 1 << 20).unwrap().is_empty());
        assert!(hub.subscribe(Some(105), None, 16, Encoding::Msgpack).is_ok());
    }

    #[test]
    fn a_snapshot_holds_transit_so_a_crash_right_after_it_keeps_the_history_whole() {
        let fs = Arc::new(MemFs::new());
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=50).map(ev));
        spill.drain();
        hub.publish((51..=100).map(ev));
        // Disk 1-40, transit 41-90, buffer 91-100: the snapshot's buffer is 41-100.
        let snap: Vec<(u64, StreamEvent)> = hub
            .buffered_shared()
            .iter()
            .map(|b| rmp_serde::from_slice(&rmp_serde::to_vec(b).unwrap()).unwrap())
            .collect();
        assert_eq!(snap.iter().map(|e| e.0).collect::<Vec<_>>(), (41..=100).collect::<Vec<_>>());
        // A crash before the writer ran: transit is gone. Recovery restores the buffer
        // from the snapshot as the engine does (numbering from its first event).
        drop((hub, spill));
        let spill =
            Spill::open(fs.clone() as Arc<dyn Fs>, Path::new("/data/streams"), &tenant(), 1 << 20, 10_000);
        assert_eq!(spill.disk_range(), Some((1, 40)));
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.set_next_seq(snap[0].0);
        hub.publish(snap.into_iter().map(|(_, e)| e));
        spill.align_with(hub.oldest_buffered(), hub.next_seq());
        assert_eq!(spill.stats.restarts.load(Ordering::Relaxed), 0, "the history joins");
        spill.drain();
        assert_eq!(resume(&hub, &spill, 0).unwrap(), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_directory_of_another_tenant_is_never_read_nor_written() {
        let fs = Arc::new(MemFs::new());
        let dir = Path::new("/data/streams/acme");
        fs.create_dir_all(dir).unwrap();
        fs.open(&dir.join(MARKER), OpenMode::Create).unwrap().write_at(0, b"someone-else").unwrap();
        let (hub, spill) = hub(&fs, 10, 1 << 20);
        hub.publish((1..=50).map(ev));
        spill.drain();
        assert_eq!(spill.disk_range(), None);
        assert_eq!(fs.list(dir).unwrap(), vec![MARKER.to_string()]);
        // Nothing spilled: a resume is answered from the buffer (or refused by it),
        // and a catch-up is told that what the buffer evicted is not kept.
        assert_eq!(spill.oldest_kept(), None);
        assert_eq!(spill.read_after(0, 10, 1 << 20).err(), Some(Lost { oldest: None }.into()));
        assert!(spill.read_after(45, 10, 1 << 20).unwrap().is_empty(), "45 on is in the buffer");
    }

    #[test]
    fn a_damaged_file_numbered_at_the_end_of_the_range_is_read_without_overflow() {
        let mut b = Vec::new();
        put_entry(&mut b, u64::MAX, b"last");
        put_entry(&mut b, 0, b"wrapped");
        let s = scan(&b, u64::MAX);
        assert_eq!((s.last, s.end), (Some(u64::MAX), (HEADER + 4) as u64));
    }

    #[test]
    fn entries_round_trip_and_damage_is_refused() {
        let mut b = Vec::new();
        put_entry(&mut b, 7, b"\x81\xa1a\x01");
        put_entry(&mut b, 8, b"\x80");
        let (s, f, used) = entry_at(&b).unwrap();
        assert_eq!((s, f), (7, &b"\x81\xa1a\x01"[..]));
        assert_eq!(entry_at(&b[used..]).unwrap().0, 8);
        let sc = scan(&b, 7);
        assert_eq!((sc.end, sc.last), (b.len() as u64, Some(8)));
        // A flipped bit in the second entry ends the segment after the first.
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(scan(&bad, 7).last, Some(7));
        // A seq that does not follow ends it too.
        assert_eq!(scan(&b, 6).last, None);
        // A torn tail: a header without its frame.
        assert_eq!(scan(&b[..n - 1], 7).last, Some(7));
    }

    #[test]
    fn plain_tenant_ids_name_their_directory_and_others_are_hashed_apart() {
        assert_eq!(dir_name("acme-it_2"), "acme-it_2");
        let a = dir_name("../etc");
        let b = dir_name("../etd");
        assert!(a.starts_with('x') && !a.contains('/') && !a.contains('.'), "{a}");
        assert_ne!(a, b);
        assert!(dir_name(&"a".repeat(128)).len() < 64);
    }
}
