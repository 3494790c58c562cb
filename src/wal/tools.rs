//! Operator tools behind `rota wal verify|dump|repair`: library functions that
//! write human-readable text to any `io::Write`.
//!
//! `verify` and `dump` only read. `repair` is the explicit opt-in for cutting a
//! log at damage that recovery refuses; it copies every file it changes or sets
//! aside to `<name>.corrupt-<n>` first, so nothing is destroyed.

use super::format::{decode_snapshot, file_name, SEGMENT_HEADER_LEN};
use super::fs::{Fs, OpenMode};
use super::recovery::{cut_torn_tail, list_dir, walk_log, Listing};
use super::{io_err, TornTail, WalError};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes of payload shown as hex by `dump`.
const HEX_PREFIX_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    pub path: PathBuf,
    pub first_seq: u64,
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub covers_seq: u64,
    /// `Err(reason)` if the snapshot fails its checks.
    pub status: Result<u64, String>,
}

/// What `verify` found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub segments: Vec<SegmentReport>,
    pub snapshots: Vec<SnapshotReport>,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// A torn tail recovery would cut (not an error).
    pub torn_tail: Option<TornTail>,
    /// Damage recovery would refuse.
    pub corruption: Option<WalError>,
    /// Files kept for reuse as later segments (compacted segments, the prepared next
    /// segment): never read, not part of the log.
    pub kept_for_reuse: Vec<PathBuf>,
}

impl VerifyReport {
    /// No damage that recovery would refuse (a torn tail is fine: recovery cuts it).
    pub fn is_recoverable(&self) -> bool {
        self.corruption.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "WAL directory {}", self.dir.display())?;
        for s in &self.snapshots {
            match &s.status {
                Ok(bytes) => writeln!(
                    f,
                    "  snapshot {} covers seq {}: ok, {bytes} bytes",
                    file_name(&s.path),
                    s.covers_seq
                )?,
                Err(why) => writeln!(
                    f,
                    "  snapshot {} covers seq {}: INVALID: {why}",
                    file_name(&s.path),
                    s.covers_seq
                )?,
            }
        }
        for s in &self.segments {
            writeln!(
                f,
                "  segment {} first seq {}: {} records, {} bytes of records",
                file_name(&s.path),
                s.first_seq,
                s.records,
                s.bytes
            )?;
        }
        if !self.kept_for_reuse.is_empty() {
            let names: Vec<String> = self.kept_for_reuse.iter().map(|p| file_name(p)).collect();
            writeln!(f, "  kept for reuse as later segments (not part of the log): {}", names.join(", "))?;
        }
        match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => writeln!(f, "records: {} (seq {a}..={b})", self.records)?,
            _ => writeln!(f, "records: {}", self.records)?,
        }
        if let Some(t) = &self.torn_tail {
            writeln!(
                f,
                "torn tail: {} at byte {} ({} bytes would be cut): {}",
                file_name(&t.segment),
                t.offset,
                t.bytes_cut,
                t.reason
            )?;
        }
        match &self.corruption {
            Some(e) => writeln!(f, "CORRUPT: {e}\nrecovery will refuse this log; `rota wal repair` can cut it after copying the damaged files"),
            None => writeln!(f, "ok: recovery will accept this log"),
        }
    }
}

fn newest_valid_snapshot(reports: &[SnapshotReport]) -> Option<u64> {
    reports.iter().rev().find(|s| s.status.is_ok()).map(|s| s.covers_seq)
}

fn check_snapshots(fs: &dyn Fs, listing: &Listing) -> Result<Vec<SnapshotReport>, WalError> {
    let mut out = Vec::new();
    for (covers, path) in &listing.snapshots {
        let bytes = fs.read(path).map_err(|e| io_err("read", path, e))?;
        let status = match decode_snapshot(&bytes) {
            Ok((seq, payload)) if seq == *covers => Ok(payload.len() as u64),
            Ok((seq, _)) => Err(format!("header covers seq {seq} but the file name says {covers}")),
            Err(why) => Err(why),
        };
        out.push(SnapshotReport { path: path.clone(), covers_seq: *covers, status });
    }
    Ok(out)
}

/// The records recovery will need but no segment holds, if any.
fn missing_start(listing: &Listing, snapshot: Option<u64>) -> Option<WalError> {
    let start = snapshot.map_or(1, |s| s + 1);
    let (first, path) = listing.segments.first()?;
    (*first > start).then(|| WalError::Corrupt {
        segment: path.clone(),
        offset: 0,
        expected_seq: start,
        reason: format!("records {start}..{} are missing: no segment holds them", first - 1),
    })
}

/// Where recovery starts reading the log: after the newest valid snapshot, or at the
/// first segment's first record when there is none. Segments wholly before it are
/// kept only for an older snapshot to fall back to; recovery never reads them.
fn recovery_start(listing: &Listing, snapshots: &[SnapshotReport]) -> Option<u64> {
    let first = listing.segments.first().map(|(f, _)| *f)?;
    Some(newest_valid_snapshot(snapshots).map_or(first, |s| s + 1))
}

/// Refuses a directory that holds no log at all (no segment, no snapshot), naming
/// where the log usually is: a tool pointed at the data directory instead of its `wal`
/// subdirectory, or at a mistyped path, would otherwise report an empty log as sound
/// (and `repair` would create the directory and its lock).
pub fn check_holds_a_log(fs: &dyn Fs, dir: &Path) -> Result<(), String> {
    let listing =
        list_dir(fs, dir).map_err(|e| format!("{} is not a readable log directory: {e}", dir.display()))?;
    if !listing.segments.is_empty() || !listing.snapshots.is_empty() {
        return Ok(());
    }
    let wal = dir.join("wal");
    let hint = if fs.list(&wal).is_ok() {
        format!(" (did you mean {}?)", wal.display())
    } else {
        " (the log is in <data_dir>/wal)".to_string()
    };
    Err(format!("{} holds no log: no segment, no snapshot{hint}", dir.display()))
}

/// Checks every snapshot, and every record recovery would read (from the newest
/// valid snapshot on, as [`super::Wal::open`] does), without changing anything.
pub fn verify(fs: &dyn Fs, dir: &Path) -> Result<VerifyReport, WalError> {
    let listing = list_dir(fs, dir)?;
    let snapshots = check_snapshots(fs, &listing)?;
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        segments: Vec::new(),
        snapshots,
        records: 0,
        first_seq: None,
        last_seq: None,
        torn_tail: None,
        corruption: None,
        kept_for_reuse: listing.recycled.clone(),
    };
    // With a valid snapshot the log may legitimately start after seq 1.
    report.corruption = missing_start(&listing, newest_valid_snapshot(&report.snapshots));
    let Some(start) = recovery_start(&listing, &report.snapshots) else {
        return Ok(report);
    };
    let mut per_segment: BTreeMap<PathBuf, (u64, u64)> = BTreeMap::new();
    let (mut first_seq, mut last_seq) = (None, None);
    let result = walk_log(fs, &listing.segments, start, &mut |path, rec| {
        let e = per_segment.entry(path.to_path_buf()).or_default();
        e.0 += 1;
        e.1 += rec.framed_len() as u64;
        first_seq.get_or_insert(rec.seq);
        last_seq = Some(rec.seq);
        true
    });
    for (first, path) in &listing.segments {
        let (records, bytes) = per_segment.get(path).copied().unwrap_or_default();
        report.segments.push(SegmentReport { path: path.clone(), first_seq: *first, records, bytes });
    }
    report.records = per_segment.values().map(|v| v.0).sum();
    report.first_seq = first_seq;
    report.last_seq = last_seq;
    match result {
        Ok(walk) => report.torn_tail = walk.torn,
        Err(e @ WalError::Corrupt { .. }) => report.corruption = Some(e),
        Err(e) => return Err(e),
    }
    Ok(report)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn out_err(e: std::io::Error) -> WalError {
    io_err("write output to", Path::new("<output>"), e)
}

/// Prints up to `limit` records with `seq >= from_seq`, one line each: seq, type,
/// length, crc, segment, offset, a hex prefix of the payload and, if the payload is
/// MessagePack, its JSON form. Returns how many records were printed. Damage ends
/// the listing with a line saying what and where.
pub fn dump(
    fs: &dyn Fs,
    dir: &Path,
    from_seq: u64,
    limit: u64,
    out: &mut impl Write,
) -> Result<u64, WalError> {
    let listing = list_dir(fs, dir)?;
    let Some((first, _)) = listing.segments.first() else {
        writeln!(out, "no segments in {}", dir.display()).map_err(out_err)?;
        return Ok(0);
    };
    let mut printed = 0u64;
    let mut write_error = None;
    let result = walk_log(fs, &listing.segments, from_seq.max(*first), &mut |path, rec| {
        if printed >= limit {
            return false;
        }
        let shown = &rec.payload[..rec.payload.len().min(HEX_PREFIX_BYTES)];
        let ellipsis = if rec.payload.len() > HEX_PREFIX_BYTES { "..." } else { "" };
        let json = rmp_serde::from_slice::<serde_json::Value>(rec.payload)
            .ok()
            .and_then(|v| serde_json::to_string(&v).ok())
            .map(|j| format!(" json={j}"))
            .unwrap_or_default();
        let line = writeln!(
            out,
            "seq={} type={} len={} crc={:#010x} segment={} offset={} hex={}{ellipsis}{json}",
            rec.seq,
            rec.kind,
            rec.payload.len(),
            rec.crc,
            file_name(path),
            rec.offset,
            hex(shown),
        );
        if let Err(e) = line {
            write_error = Some(e);
            return false;
        }
        printed += 1;
        true
    });
    if let Some(e) = write_error {
        return Err(out_err(e));
    }
    match result {
        Ok(walk) => {
            if let Some(t) = walk.torn.filter(|_| !walk.stopped) {
                writeln!(
                    out,
                    "-- torn tail in {} at byte {} ({} bytes): {}",
                    file_name(&t.segment),
                    t.offset,
                    t.bytes_cut,
                    t.reason
                )
                .map_err(out_err)?;
            }
            Ok(printed)
        }
        Err(e) => {
            writeln!(out, "!! {e}").map_err(out_err)?;
            Err(e)
        }
    }
}

/// What `repair` did.
#[derive(Debug, Clone, Default)]
pub struct RepairReport {
    /// Copies made before anything was cut or set aside.
    pub backups: Vec<PathBuf>,
    /// One line per change.
    pub actions: Vec<String>,
    /// Records in the log after the repair.
    pub records_kept: u64,
    pub last_seq: Option<u64>,
}

/// First free `<path>.corrupt-<n>`.
fn backup_path(fs: &dyn Fs, dir: &Path, path: &Path) -> Result<PathBuf, WalError> {
    let names = fs.list(dir).map_err(|e| io_err("list", dir, e))?;
    let base = file_name(path);
    let n = (1..)
        .find(|n| !names.contains(&format!("{base}.corrupt-{n}")))
        .expect("an unbounded range has a free number");
    Ok(dir.join(format!("{base}.corrupt-{n}")))
}

/// Copies `path` to a fresh `.corrupt-<n>` file, durably.
fn backup(fs: &dyn Fs, dir: &Path, path: &Path) -> Result<PathBuf, WalError> {
    let to = backup_path(fs, dir, path)?;
    let bytes = fs.read(path).map_err(|e| io_err("read", path, e))?;
    let mut file = fs.open(&to, OpenMode::Create).map_err(|e| io_err("create", &to, e))?;
    file.write_at(0, &bytes).map_err(|e| io_err("write", &to, e))?;
    file.sync_data().map_err(|e| io_err("sync", &to, e))?;
    fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
    Ok(to)
}

/// Cuts the log at its first bad record, even in the middle, so recovery accepts
/// it again; records after the cut are given up (but kept in the backups). Every
/// segment changed is copied to `<name>.corrupt-<n>` first, and later segments are
/// renamed to such names rather than deleted. Only what recovery reads is looked at
/// (from the newest valid snapshot on): damage in older segments, kept for a fallback
/// snapshot, never costs the records after it. Refused while another process (a
/// running daemon) holds the directory.
pub fn repair(fs: &dyn Fs, dir: &Path, out: &mut impl Write) -> Result<RepairReport, WalError> {
    let _lock = super::lock_dir(fs, dir)?;
    let mut report = RepairReport::default();
    let say = |report: &mut RepairReport, line: String, out: &mut dyn Write| -> Result<(), WalError> {
        writeln!(out, "{line}").map_err(out_err)?;
        report.actions.push(line);
        Ok(())
    };
    // Each round removes at least one segment or ends; bound the loop anyway.
    for _ in 0..1_000_000 {
        let listing = list_dir(fs, dir)?;
        let snapshots = check_snapshots(fs, &listing)?;
        if let Some(e) = missing_start(&listing, newest_valid_snapshot(&snapshots)) {
            say(&mut report, format!("cannot repair: {e}"), out)?;
            return Err(e);
        }
        let Some(start) = recovery_start(&listing, &snapshots) else {
            break;
        };
        match walk_log(fs, &listing.segments, start, &mut |_, _| true) {
            Ok(walk) => {
                if let Some(torn) = &walk.torn {
                    let b = backup(fs, dir, &torn.segment)?;
                    cut_torn_tail(fs, dir, torn)?;
                    say(
                        &mut report,
                        format!(
                            "cut torn tail of {} at byte {} ({} bytes; copy in {})",
                            file_name(&torn.segment),
                            torn.offset,
                            torn.bytes_cut,
                            file_name(&b)
                        ),
                        out,
                    )?;
                    report.backups.push(b);
                    continue;
                }
                report.records_kept = walk.records;
                report.last_seq = (walk.records > 0).then_some(walk.last_seq);
                break;
            }
            Err(WalError::Corrupt { segment, offset, expected_seq, reason }) => {
                let b = backup(fs, dir, &segment)?;
                report.backups.push(b.clone());
                if offset <= SEGMENT_HEADER_LEN as u64 {
                    fs.remove(&segment).map_err(|e| io_err("remove", &segment, e))?;
                    say(
                        &mut report,
                        format!(
                            "set aside {} (bad from its start: {reason}; copy in {})",
                            file_name(&segment),
                            file_name(&b)
                        ),
                        out,
                    )?;
                } else {
                    let mut file =
                        fs.open(&segment, OpenMode::Existing).map_err(|e| io_err("open", &segment, e))?;
                    file.set_len(offset).map_err(|e| io_err("truncate", &segment, e))?;
                    file.sync_data().map_err(|e| io_err("sync", &segment, e))?;
                    say(
                        &mut report,
                        format!(
                            "cut {} at byte {offset}, seq {expected_seq} onwards ({reason}; copy in {})",
                            file_name(&segment),
                            file_name(&b)
                        ),
                        out,
                    )?;
                }
                let later = listing.segments.iter().filter(|(_, p)| *p > segment);
                for (_, path) in later {
                    let to = backup_path(fs, dir, path)?;
                    fs.rename(path, &to).map_err(|e| io_err("rename", path, e))?;
                    say(&mut report, format!("set aside {} as {}", file_name(path), file_name(&to)), out)?;
                    report.backups.push(to);
                }
                fs.sync_dir(dir).map_err(|e| io_err("sync dir", dir, e))?;
            }
            Err(e) => return Err(e),
        }
    }
    let summary = match report.last_seq {
        Some(last) => format!("log holds {} records up to seq {last}", report.records_kept),
        None => "log holds no records".to_string(),
    };
    say(&mut report, summary, out)?;
    Ok(report)
}
