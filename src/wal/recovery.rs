//! Reading the log back: directory listing, snapshot choice, the segment walk shared
//! by recovery, `read_range` and the tools, and the torn-tail cut.

use super::format::{
    self, decode_segment_header, parse_segment_name, parse_snapshot_name, scan_records, RecordRef, ScanEnd,
    SEGMENT_HEADER_LEN, TMP_SUFFIX,
};
use super::fs::{Fs, OpenMode};
use super::{io_err, Record, Recovered, Replayed, SkippedSnapshot, TornTail, WalConfig, WalError};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The WAL files found in a directory, each list sorted by seq.
#[derive(Debug, Default, Clone)]
pub(crate) struct Listing {
    pub segments: Vec<(u64, PathBuf)>,
    pub snapshots: Vec<(u64, PathBuf)>,
    pub tmp: Vec<PathBuf>,
    /// Compacted segments kept for reuse (`recycled-*.wal.tmp`), sorted.
    pub recycled: Vec<PathBuf>,
}

pub(crate) fn list_dir(fs: &dyn Fs, dir: &Path) -> Result<Listing, WalError> {
    let mut out = Listing::default();
    for name in fs.list(dir).map_err(|e| io_err("list", dir, e))? {
        let path = dir.join(&name);
        if let Some(seq) = parse_segment_name(&name) {
            out.segments.push((seq, path));
        } else if let Some(seq) = parse_snapshot_name(&name) {
            out.snapshots.push((seq, path));
        } else if format::is_recycled_name(&name) {
            out.recycled.push(path);
        } else if name.ends_with(TMP_SUFFIX) {
            out.tmp.push(path);
        }
    }
    out.segments.sort();
    out.snapshots.sort();
    out.recycled.sort();
    Ok(out)
}

/// Where the walk of the log ended.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// Seq of the last valid record seen (0 if none).
    pub last_seq: u64,
    /// The last segment read: (first seq, path, byte offset where the next record goes).
    pub active: Option<(u64, PathBuf, u64)>,
    /// A torn tail found and not yet cut. `offset == 0` means the whole file goes
    /// (its header never made it to disk).
    pub torn: Option<TornTail>,
    pub records: u64,
    pub bytes: u64,
    pub segments_read: usize,
    /// The callback asked to stop.
    pub stopped: bool,
    /// Damaged records stepped over because the snapshot covers them.
    pub skipped_covered: u64,
}

fn corrupt(segment: &Path, offset: u64, expected_seq: u64, reason: impl Into<String>) -> WalError {
    WalError::Corrupt { segment: segment.to_path_buf(), offset, expected_seq, reason: reason.into() }
}

/// Walks `segments` (sorted) in seq order starting from the segment that holds
/// `start_seq`, checking that seqs run on without gaps, and hands every valid record
/// with `seq >= start_seq` to `f` (which returns `false` to stop). A damaged last
/// record with nothing valid after it is reported as a torn tail; any other damage
/// is an error naming the segment, the byte offset and the seq expected there.
pub(crate) fn walk_log(
    fs: &dyn Fs,
    segments: &[(u64, PathBuf)],
    start_seq: u64,
    f: &mut dyn FnMut(&Path, RecordRef<'_>) -> bool,
) -> Result<Walk, WalError> {
    let mut walk = Walk::default();
    if segments.is_empty() {
        return Ok(walk);
    }
    // The segment holding start_seq is the last one starting at or before it.
    let first_idx = match segments.iter().rposition(|(first, _)| *first <= start_seq) {
        Some(i) => i,
        None => {
            let (first, path) = &segments[0];
            return Err(corrupt(
                path,
                0,
                start_seq,
                format!("records {start_seq}..{} are missing: no segment holds them", first - 1),
            ));
        }
    };
    // Seqs start at 1: a segment named for seq 0 is not one rota wrote.
    if let Some((_, path)) = segments.iter().find(|(first, _)| *first == 0) {
        return Err(corrupt(path, 0, 1, "a segment named for seq 0 (seqs start at 1)"));
    }
    let mut expected = segments[first_idx].0;
    // Bad bytes that ended the previous segment's records: harmless if the next
    // segment starts right after its last record (the rest of a recycled file, or of
    // a zero-filled one), damage if records are missing.
    let mut ended_bad: Option<(&PathBuf, u64, String)> = None;
    for (i, (name_first, path)) in segments.iter().enumerate().skip(first_idx) {
        let is_last = i + 1 == segments.len();
        if let Some((bad_path, offset, reason)) = ended_bad.take() {
            if *name_first != expected {
                let why = "later segments exist, so this is damage in the middle of the log, not a torn tail";
                return Err(corrupt(bad_path, offset, expected, format!("{reason}; {why}")));
            }
        }
        if *name_first != expected {
            return Err(corrupt(
                path,
                0,
                expected,
                format!("segment starts at seq {name_first} but the log so far ends at seq {}", expected - 1),
            ));
        }
        let bytes = fs.read(path).map_err(|e| io_err("read", path, e))?;
        walk.segments_read += 1;
        let first = match decode_segment_header(&bytes) {
            Ok(first) => first,
            Err(reason) => {
                // A crash while creating the newest segment leaves a short or zeroed
                // header and no records; anything else with a bad header is damage.
                if is_last && format::records_after(&bytes, 0, *name_first) != format::After::Fresh {
                    walk.torn = Some(TornTail {
                        segment: path.clone(),
                        offset: 0,
                        bytes_cut: bytes.len() as u64,
                        reason,
                    });
                    break;
                }
                return Err(corrupt(path, 0, expected, reason));
            }
        };
        if first != *name_first {
            return Err(corrupt(
                path,
                0,
                expected,
                format!("segment header says first seq {first} but the file name says {name_first}"),
            ));
        }
        let mut next = first;
        let mut stopped = false;
        let mut from = SEGMENT_HEADER_LEN;
        let end = loop {
            let end = scan_records(&bytes, from, next, |rec| {
                next = rec.seq + 1;
                walk.records += 1;
                walk.bytes += rec.framed_len() as u64;
                if rec.seq >= start_seq && !f(path, rec) {
                    stopped = true;
                    return false;
                }
                true
            });
            // Damage in a record the snapshot covers (replay needs none before
            // `start_seq`): stepped over to the next intact record up to `start_seq`,
            // instead of refusing the log (and leaving `repair` to cut the records after
            // the snapshot with it). Only where a valid record of this segment follows.
            if let ScanEnd::Bad { offset, valid_follows: true, .. } = &end {
                if next < start_seq {
                    if let Some((at, seq)) =
                        format::next_record_within(&bytes, *offset as usize + 1, next, start_seq)
                    {
                        tracing::warn!(segment = %path.display(), offset, skipped_from = next, skipped_to = seq - 1,
                            "WAL records damaged before the snapshot's seq stepped over (the snapshot covers them)");
                        walk.skipped_covered += seq - next;
                        next = seq;
                        from = at;
                        continue;
                    }
                }
            }
            break end;
        };
        expected = next;
        walk.last_seq = expected - 1;
        match end {
            // Stale: the rest of a recycled file. In a segment before the last, the
            // next segment's first seq shows whether records are missing (checked
            // at the top of the loop), as it does after a zero tail.
            ScanEnd::Clean { end } | ScanEnd::ZeroTail { end } | ScanEnd::Stale { end, .. } => {
                walk.active = Some((first, path.clone(), end));
                if stopped {
                    walk.stopped = true;
                    return Ok(walk);
                }
            }
            ScanEnd::SeqMismatch { offset, found } => {
                return Err(corrupt(
                    path,
                    offset,
                    expected,
                    format!("found seq {found}: a gap or regression"),
                ));
            }
            ScanEnd::Bad { offset, reason, valid_follows } => {
                if valid_follows {
                    let why = "valid records follow it, so this is damage in the middle of the log, not a torn tail";
                    return Err(corrupt(path, offset, expected, format!("{reason}; {why}")));
                }
                if !is_last {
                    // The log may end here (the next segment's header torn by a crash
                    // while creating it): then the writer carries on in this segment,
                    // not in the last one that ended cleanly.
                    walk.active = Some((first, path.clone(), offset));
                    ended_bad = Some((path, offset, reason));
                    continue;
                }
                walk.active = Some((first, path.clone(), offset));
                walk.torn = Some(TornTail {
                    segment: path.clone(),
                    offset,
                    bytes_cut: bytes.len() as u64 - offset,
                    reason,
                });
            }
        }
    }
    Ok(walk)
}

/// Cuts a torn tail off for good: truncates the segment (or removes it when even
/// its header is torn) and makes that durable before any new record is written.
pub(crate) fn cut_torn_tail(fs: &dyn Fs, dir: &Path, torn: &TornTail) -> Result<(), WalError> {
    if torn.offset == 0 {
        fs.remove(&torn.segment).map_err(|e| io_err("remove torn segment", &torn.segment, e))?;
        fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
    } else {
        let mut file =
            fs.open(&torn.segment, OpenMode::Existing).map_err(|e| io_err("open", &torn.segment, e))?;
        file.set_len(torn.offset).map_err(|e| io_err("truncate", &torn.segment, e))?;
        file.sync_data().map_err(|e| io_err("sync", &torn.segment, e))?;
    }
    Ok(())
}

/// What the writer needs to carry on where recovery stopped.
pub(crate) struct Resume {
    pub last_seq: u64,
    pub active: Option<(u64, PathBuf, u64)>,
    pub segments: Vec<(u64, PathBuf)>,
    pub snapshots: Vec<u64>,
    /// Recycled segments found and kept for reuse (at most `recycle_segments`).
    pub recycled: Vec<PathBuf>,
}

/// Recovery: newest valid snapshot, then every later record in order.
pub(crate) fn recover(
    fs: &dyn Fs,
    cfg: &WalConfig,
    collect: bool,
    replay: &mut dyn FnMut(Replayed<'_>),
) -> Result<(Recovered, Resume), WalError> {
    let started = Instant::now();
    let dir = cfg.dir.as_path();
    fs.create_dir_all(dir).map_err(|e| io_err("create dir", dir, e))?;
    let mut listing = list_dir(fs, dir)?;
    // Leftovers of snapshot writes interrupted before their rename: never valid.
    if !listing.tmp.is_empty() {
        for tmp in &listing.tmp {
            fs.remove(tmp).map_err(|e| io_err("remove", tmp, e))?;
        }
        fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
    }
    // Recycled segments are kept for reuse up to the configured number, and the
    // prepared next segment (sorted first) on top (their content is garbage either way).
    let spare = listing.recycled.first().is_some_and(|p| p.ends_with(format::SPARE_NAME));
    let keep = if cfg.preallocate { cfg.recycle_segments + usize::from(spare) } else { 0 };
    if listing.recycled.len() > keep {
        for path in listing.recycled.drain(keep..) {
            fs.remove(&path).map_err(|e| io_err("remove", &path, e))?;
        }
        fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
    }

    let mut rec = Recovered::default();
    for (covers, path) in listing.snapshots.iter().rev() {
        let bytes = fs.read(path).map_err(|e| io_err("read", path, e))?;
        match format::decode_snapshot(&bytes) {
            Ok((seq, payload)) if seq == *covers => {
                replay(Replayed::Snapshot { covers_seq: seq, bytes: payload });
                rec.snapshot_seq = Some(seq);
                if collect {
                    rec.snapshot = Some((seq, payload.to_vec()));
                }
                break;
            }
            Ok((seq, _)) => rec.skipped_snapshots.push(SkippedSnapshot {
                path: path.clone(),
                reason: format!("header covers seq {seq} but the file name says {covers}"),
            }),
            Err(reason) => rec.skipped_snapshots.push(SkippedSnapshot { path: path.clone(), reason }),
        }
    }
    // An invalid snapshot is set aside (renamed `<name>.corrupt`, kept for a look):
    // left among the snapshots it would count as one of the `keep_snapshots`, and the
    // next snapshot would delete the valid one recovery just used, the only fallback.
    for skipped in &rec.skipped_snapshots {
        let aside = skipped.path.with_file_name(format!(
            "{}.corrupt",
            skipped.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        tracing::warn!(path = %skipped.path.display(), aside = %aside.display(), reason = %skipped.reason,
            "skipping invalid WAL snapshot; set aside");
        fs.rename(&skipped.path, &aside).map_err(|e| io_err("set aside", &skipped.path, e))?;
    }
    if !rec.skipped_snapshots.is_empty() {
        fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
        listing.snapshots.retain(|(_, p)| !rec.skipped_snapshots.iter().any(|s| s.path == *p));
    }
    let start_seq = rec.snapshot_seq.map_or(1, |s| s + 1);

    let mut records = Vec::new();
    let walk = walk_log(fs, &listing.segments, start_seq, &mut |_, r| {
        replay(Replayed::Record { seq: r.seq, kind: r.kind, payload: r.payload });
        if collect {
            records.push(Record { seq: r.seq, kind: r.kind, payload: r.payload.to_vec() });
        }
        true
    })?;
    if let Some(torn) = &walk.torn {
        tracing::warn!(
            segment = %torn.segment.display(), offset = torn.offset, bytes_cut = torn.bytes_cut,
            reason = %torn.reason, "cutting torn tail off the WAL"
        );
        cut_torn_tail(fs, dir, torn)?;
        if torn.offset == 0 {
            listing.segments.retain(|(_, p)| *p != torn.segment);
        }
    }
    make_replayed_durable(fs, dir, &listing.segments, start_seq, &walk)?;
    let log_last = walk.last_seq.max(listing.segments.first().map_or(0, |(f, _)| f.saturating_sub(1)));
    if log_last < start_seq - 1 && !listing.segments.is_empty() {
        // The snapshot covers records the log no longer holds (possible only if the
        // disk lost synced data). The snapshot is authoritative; new records start
        // after it, in a fresh segment, so seqs never repeat.
        tracing::warn!(log_last, snapshot_seq = start_seq - 1, "WAL ends before its snapshot");
    }
    rec.last_seq = log_last.max(start_seq - 1);
    rec.records_replayed = records_replayed(&walk, start_seq);
    rec.bytes_replayed = walk.bytes;
    rec.segments_read = walk.segments_read;
    rec.torn_tail = walk.torn.clone();
    rec.records = records;
    rec.duration = started.elapsed();
    tracing::info!(
        dir = %dir.display(),
        snapshot_seq = ?rec.snapshot_seq,
        records = rec.records_replayed,
        last_seq = rec.last_seq,
        torn_tail = rec.torn_tail.is_some(),
        ms = rec.duration.as_millis() as u64,
        "WAL recovered"
    );
    // The writer continues the segment recovery ended in only if the next seq
    // belongs there; otherwise (the snapshot is ahead of the log) it starts a new one.
    let active = walk.active.filter(|_| walk.last_seq == rec.last_seq);
    let resume = Resume {
        last_seq: rec.last_seq,
        active,
        segments: listing.segments,
        snapshots: listing.snapshots.iter().map(|(s, _)| *s).collect(),
        recycled: listing.recycled,
    };
    Ok((rec, resume))
}

/// Makes the records this start replayed durable before anything is answered from
/// them. What recovery read may be only in the page cache: written by a process that
/// crashed (kill -9, out of memory) before its sync, or whose sync failed (after an
/// `EIO` the kernel may mark the pages clean without having written them, so a later
/// sync does nothing for them). From here on those records count as durable: repeats
/// are answered from them, their events are published, and the writer appends after
/// them; a power cut must not then take them away, nor leave a hole before newer
/// synced records. So the segment recovery ended in is written again from the bytes
/// just read (dirtying every page, whatever the kernel thought of them) and synced,
/// every earlier segment read is synced, and so is the directory. After a clean stop
/// the final snapshot covers the whole log and there is nothing to do.
fn make_replayed_durable(
    fs: &dyn Fs,
    dir: &Path,
    segments: &[(u64, PathBuf)],
    start_seq: u64,
    walk: &Walk,
) -> Result<(), WalError> {
    if walk.last_seq < start_seq {
        return Ok(());
    }
    let Some((_, active, end)) = &walk.active else { return Ok(()) };
    let first_idx = segments.iter().rposition(|(first, _)| *first <= start_seq).unwrap_or(0);
    for (_, path) in &segments[first_idx..] {
        let mut file = fs.open(path, OpenMode::Existing).map_err(|e| io_err("open", path, e))?;
        if path == active {
            let bytes = fs.read_range(path, 0, *end as usize).map_err(|e| io_err("read", path, e))?;
            file.write_at(0, &bytes).map_err(|e| io_err("rewrite", path, e))?;
        }
        file.sync_data().map_err(|e| io_err("sync", path, e))?;
    }
    fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))
}

fn records_replayed(walk: &Walk, start_seq: u64) -> u64 {
    if walk.last_seq >= start_seq {
        walk.last_seq - start_seq + 1
    } else {
        0
    }
}

/// Bytes [`read_durable`] reads at a time.
const READ_CHUNK: usize = 1 << 20;

/// Hands the records `from_seq..=upto` to `f` in order, reading each segment in
/// chunks so memory stays at one chunk plus the largest record, whatever the
/// segment size. `segments` must include the one holding `from_seq`. Stops early
/// when `f` returns `false`.
pub(crate) fn read_durable(
    fs: &dyn Fs,
    segments: &[(u64, PathBuf)],
    from_seq: u64,
    upto: u64,
    f: &mut dyn FnMut(u64, u8, &[u8]) -> bool,
) -> Result<(), WalError> {
    let Some(first_idx) = segments.iter().rposition(|(first, _)| *first <= from_seq) else {
        return Ok(());
    };
    let mut expected = segments[first_idx].0;
    let mut last_path = &segments[first_idx].1;
    for (name_first, path) in &segments[first_idx..] {
        last_path = path;
        if expected > upto {
            return Ok(());
        }
        if *name_first != expected {
            return Err(corrupt(path, 0, expected, format!("segment starts at seq {name_first}")));
        }
        let header = fs.read_range(path, 0, SEGMENT_HEADER_LEN).map_err(|e| io_err("read", path, e))?;
        match decode_segment_header(&header) {
            Ok(first) if first == *name_first => {}
            Ok(first) => {
                return Err(corrupt(path, 0, expected, format!("segment header says first seq {first}")))
            }
            Err(reason) => return Err(corrupt(path, 0, expected, reason)),
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = 0usize;
        let mut buf_offset = SEGMENT_HEADER_LEN as u64;
        let mut eof = false;
        while expected <= upto {
            match format::decode_record(&buf[pos..], buf_offset + pos as u64) {
                // The rest of a recycled file (see `ScanEnd::Stale`).
                Ok(rec) if rec.seq < *name_first => break,
                Ok(rec) => {
                    if rec.seq != expected {
                        return Err(corrupt(path, rec.offset, expected, format!("found seq {}", rec.seq)));
                    }
                    expected += 1;
                    pos += rec.framed_len();
                    if rec.seq >= from_seq && !f(rec.seq, rec.kind, rec.payload) {
                        return Ok(());
                    }
                }
                Err(format::Bad::Truncated(_)) if !eof => {
                    // Keep the unparsed rest and append the next chunk to it.
                    buf.drain(..pos);
                    buf_offset += pos as u64;
                    pos = 0;
                    let at = buf_offset + buf.len() as u64;
                    let chunk = fs.read_range(path, at, READ_CHUNK).map_err(|e| io_err("read", path, e))?;
                    eof = chunk.is_empty();
                    buf.extend_from_slice(&chunk);
                }
                // End of this segment's records: end of file, zero-filled space, or
                // (past the durable watermark only) a batch being written right now.
                Err(_) => break,
            }
        }
    }
    if expected <= upto {
        return Err(corrupt(
            last_path,
            0,
            expected,
            format!("durable records up to seq {upto} are not all on disk"),
        ));
    }
    Ok(())
}
